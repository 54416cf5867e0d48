"""Prompt formatting: the one place that turns an instruction record into model text and back.

A *record* is a dict with `instruction`, `input` (may be empty) and `output`; records made from chat
transcripts may also carry `system` (a system message) and `history` (earlier `[user, assistant]` turns).
A *style* renders a record as `(prompt_text, response_text)`: training learns `response_text` (then the
tokenizer's end-of-text id) after `prompt_text`, and generation feeds `prompt_text` and stops at the style's
stop strings or at end-of-text.

Styles:
  * `alpaca` — the book's (chapter 7, after Stanford Alpaca): a fixed preamble, `### Instruction:`, an optional
    `### Input:`, then `### Response:`.
  * `phi3` — Microsoft Phi-3's chat turns: `<|user|>\\n...<|end|>\\n<|assistant|>\\n`, the answer closed by
    `<|end|>`.

A fine-tuned checkpoint folder keeps its style in `prompt_style.json` (`save_style` / `load_style`), so
`llmscratch generate` and `llmscratch eval tasks` wrap prompts the way the model was trained.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

from llmscratch.errors import UserError, read_json
from llmscratch.fileio import atomic_write_text
from llmscratch.runs import PROMPT_STYLE, find_in_run

ALPACA_PREAMBLE = ("Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.")


@dataclass(frozen=True)
class PromptStyle(ABC):
    """How a record becomes text. `stop`: strings that end a generated answer (besides end-of-text)."""

    name: str
    stop: tuple[str, ...]

    @abstractmethod
    def prompt(self, record: dict) -> str:
        """The text the model sees before its answer."""

    @abstractmethod
    def response(self, record: dict) -> str:
        """The text the model learns to produce (the record's `output`, closed as the style closes a turn)."""

    def format(self, record: dict) -> tuple[str, str]:
        return self.prompt(record), self.response(record)

    def wrap(self, text: str) -> str:
        """A user's plain request as a prompt (for `generate --prompt`)."""
        return self.prompt({"instruction": text, "input": ""})

    def clean(self, generated: str) -> str:
        """A generated answer without its stop string and surrounding whitespace. A stop string cut short by
        the token limit ("blue<|en") is dropped too: the answer before it was complete."""
        cut = [i for s in self.stop if (i := generated.find(s)) >= 0]
        text = generated[:min(cut)] if cut else generated
        for s in self.stop:
            for n in range(len(s) - 1, 1, -1):  # partial markers of at least 2 characters
                if text.endswith(s[:n]):
                    text = text[:-n]
                    break
        return text.strip()


class AlpacaStyle(PromptStyle):
    def __init__(self):
        super().__init__("alpaca", ("### Instruction:", "### Input:", "### Response:"))

    def prompt(self, record: dict) -> str:
        text = record.get("system") or ALPACA_PREAMBLE
        # Earlier chat turns (records made from `messages`) come first as answered instruction blocks.
        for user, assistant in record.get("history") or ():
            text += f"\n\n### Instruction:\n{user}\n\n### Response:\n{assistant}"
        text += f"\n\n### Instruction:\n{record['instruction']}"
        if record.get("input"):
            text += f"\n\n### Input:\n{record['input']}"
        return text + "\n\n### Response:\n"

    def response(self, record: dict) -> str:
        return record["output"]


class Phi3Style(PromptStyle):
    def __init__(self):
        super().__init__("phi3", ("<|end|>", "<|user|>", "<|assistant|>"))

    def prompt(self, record: dict) -> str:
        text = f"<|system|>\n{record['system']}<|end|>\n" if record.get("system") else ""
        for user, assistant in record.get("history") or ():
            text += f"<|user|>\n{user}<|end|>\n<|assistant|>\n{assistant}<|end|>\n"
        user = record["instruction"] + (f"\n{record['input']}" if record.get("input") else "")
        return text + f"<|user|>\n{user}<|end|>\n<|assistant|>\n"

    def response(self, record: dict) -> str:
        return record["output"] + "<|end|>"


STYLES: dict[str, PromptStyle] = {s.name: s for s in (AlpacaStyle(), Phi3Style())}


def get_style(name: str) -> PromptStyle:
    if name not in STYLES:
        raise UserError(f"unknown prompt style {name!r}; choose one of: {', '.join(STYLES)}")
    return STYLES[name]


def save_style(folder: str | Path, name: str) -> Path:
    """Record in `folder` that its model was trained with style `name`."""
    style = get_style(name)
    path = Path(folder) / PROMPT_STYLE
    atomic_write_text(path, json.dumps({"prompt_style": style.name}) + "\n")
    return path


def load_style(folder: str | Path) -> PromptStyle | None:
    """The style saved with a checkpoint, or None for a model without one (e.g. a pretrained base).

    `folder` may be a fine-tuning run folder or one of its `checkpoints/step-*` folders: a step folder takes
    the style of the run it belongs to.
    """
    path = find_in_run(folder, PROMPT_STYLE)
    if path is None:
        return None
    data = read_json(path, hint='; delete it or rewrite it as {"prompt_style": "alpaca"}')
    name = data.get("prompt_style") if isinstance(data, dict) else None
    if name not in STYLES:
        raise UserError(f"{path}: prompt_style must be one of {', '.join(STYLES)}, got {name!r}")
    return STYLES[name]
