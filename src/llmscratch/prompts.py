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

Chat (`llmscratch chat`, the OpenAI-compatible server): `chat_format(tokenizer, style)` picks how a checkpoint
renders a conversation — OpenAI-style `messages`, a list of {"role": "system"|"user"|"assistant", "content"} —
as a `ChatPrompt` (the text up to where the answer begins, and the strings that end the answer):
  1. the checkpoint's saved prompt style: a model fine-tuned in alpaca or phi3 style answers best in it (even a
     Qwen3 one); the system message and earlier turns become the record's `system` and `history`;
  2. else the tokenizer's own chat template (Llama 3 / Qwen3 folders), stopping at its end-of-turn tokens;
  3. else a plain format, so every checkpoint (GPT-2 base, a model pretrained here) can chat:

         {system}                          (and a blank line; only when there is a system message)
         User: {first message}
         Assistant: {first answer}
         User: {next message}
         Assistant:

     A newline, then `User:` ends the answer.

Messages are checked as an API would (`UserError` naming `messages[i]`): roles system, user or assistant;
content a string or OpenAI's list of text parts (joined); the last message from the user. System messages,
wherever they are, are joined with a blank line into one, first. For the style and plain formats the turns must
start with a user message, and messages in a row from one role are joined with a newline (two user messages
sent together read as one); a chat template gets the other messages as they are.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
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
        raise UserError(f"--prompt-style {name}: unknown prompt style {name!r}; choose one of: {', '.join(STYLES)}")
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


def strip_leading_space(pieces: Iterable[str]) -> Iterator[str]:
    """The pieces of a streamed answer without the whitespace a model may put before its first word (a
    style's prompt ends in a newline, the plain format's in `Assistant:`)."""
    started = False
    for piece in pieces:
        if not started:
            piece = piece.lstrip()
            started = bool(piece)
        if piece:
            yield piece


# --- chat: OpenAI-style messages -> prompt text ---------------------------------------------------------------
@dataclass(frozen=True)
class ChatPrompt:
    """A conversation ready for its next answer: `text` ends where the assistant's answer begins; `stop` holds the
    strings that end the answer (besides the tokenizer's end-of-text id)."""

    text: str
    stop: tuple[str, ...]


_ROLES = ("system", "user", "assistant")


def _content_text(content: object, at: str) -> str:
    """A message's content as text: a string, or OpenAI's content parts [{"type": "text", "text": ...}] joined."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise UserError(f"{at}.content must be a string or a list of text parts, got {type(content).__name__}")
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict):
            raise UserError(f"{at}.content[{j}] must be an object {{\"type\": \"text\", \"text\": ...}}")
        if part.get("type") != "text":
            raise UserError(f"{at}.content[{j}]: part type {part.get('type')!r} is not supported; this model reads "
                            "text parts only")
        if not isinstance(part.get("text"), str):
            raise UserError(f"{at}.content[{j}].text must be a string")
        texts.append(part["text"])
    return "".join(texts)


def _checked_messages(messages: object) -> list[tuple[int, str, str]]:
    """(index, role, content text) of each message, checked (see the module docstring)."""
    if not isinstance(messages, list) or not messages:
        raise UserError("messages must be a non-empty list of {role, content} objects")
    checked = []
    for i, message in enumerate(messages):
        at = f"messages[{i}]"
        if not isinstance(message, dict) or "content" not in message:
            raise UserError(f"{at} must be an object with 'role' and 'content'")
        role = message.get("role")
        if role == "developer":  # OpenAI's newer name for the system role
            role = "system"
        if role not in _ROLES:
            raise UserError(f"{at}.role must be one of {', '.join(_ROLES)} (or developer), got {role!r}")
        checked.append((i, role, _content_text(message["content"], at)))
    if checked[-1][1] != "user":
        raise UserError(f"messages[{len(checked) - 1}]: the last message must be from the user, "
                        f"got {checked[-1][1]}")
    return checked


def chat_messages(messages: object) -> list[dict]:
    """`messages` checked, as [{"role", "content": str}]: the system messages joined into one, first, then the
    others in order. UserError (one line, naming `messages[i]`) for what an API would reject."""
    checked = _checked_messages(messages)
    systems = [c for _, role, c in checked if role == "system"]
    head = [{"role": "system", "content": "\n\n".join(systems)}] if systems else []
    return head + [{"role": role, "content": c} for _, role, c in checked if role != "system"]


def chat_turns(messages: object) -> tuple[str, list[list[str]], str]:
    """(system text or "", history [[user, assistant], ...], last user message) of `messages`, checked; messages
    in a row from one role are joined with a newline."""
    checked = _checked_messages(messages)
    system = "\n\n".join(c for _, role, c in checked if role == "system")
    runs: list[tuple[str, str]] = []  # (role, text): alternating user, assistant, ..., user
    for i, role, content in checked:
        if role == "system":
            continue
        if not runs and role == "assistant":
            raise UserError(f"messages[{i}]: the conversation must start with a user message (after any system "
                            "messages)")
        if runs and runs[-1][0] == role:
            runs[-1] = (role, runs[-1][1] + "\n" + content)
        else:
            runs.append((role, content))
    history = [[runs[k][1], runs[k + 1][1]] for k in range(0, len(runs) - 1, 2)]
    return system, history, runs[-1][1]


class ChatFormat(ABC):
    """How one checkpoint renders a conversation. `kind`: "style" (its saved prompt style), "template" (its
    tokenizer's chat template) or "plain" (User:/Assistant: lines)."""

    kind: str

    @abstractmethod
    def render(self, messages: list[dict], thinking: bool | None = None) -> ChatPrompt:
        """The prompt for the assistant's answer to `messages` (checked: UserError for a malformed list).
        `thinking`: Qwen3's `enable_thinking` switch for a chat template (None: the template's default); the other
        kinds ignore it."""

    @abstractmethod
    def describe(self) -> str:
        """The format in a few words, for a status line ("prompt style alpaca")."""


class StyleChat(ChatFormat):
    """A conversation as a prompt-style record: system and earlier turns as `system` and `history`."""

    kind = "style"

    def __init__(self, style: PromptStyle):
        self.style = style

    def render(self, messages: list[dict], thinking: bool | None = None) -> ChatPrompt:
        system, history, user = chat_turns(messages)
        record = {"system": system, "history": history, "instruction": user, "input": ""}
        return ChatPrompt(self.style.prompt(record), self.style.stop)

    def describe(self) -> str:
        return f"prompt style {self.style.name}"


class TemplateChat(ChatFormat):
    """A conversation through the tokenizer's chat template; the tokenizer's stop ids, decoded, end the answer."""

    kind = "template"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.stop = tuple(dict.fromkeys(tokenizer.decode([i]) for i in tokenizer.stop_ids))

    def render(self, messages: list[dict], thinking: bool | None = None) -> ChatPrompt:
        variables = {} if thinking is None else {"enable_thinking": thinking}
        text = self.tokenizer.apply_chat_template(chat_messages(messages), add_generation_prompt=True, **variables)
        return ChatPrompt(text, self.stop)

    def describe(self) -> str:
        return "the tokenizer's chat template"


class PlainChat(ChatFormat):
    """The User:/Assistant: lines of the module docstring, for a model with neither a style nor a template."""

    kind = "plain"
    stop = ("\nUser:",)

    def render(self, messages: list[dict], thinking: bool | None = None) -> ChatPrompt:
        system, history, user = chat_turns(messages)
        text = f"{system}\n\n" if system else ""
        for asked, answered in history:
            text += f"User: {asked}\nAssistant: {answered}\n"
        return ChatPrompt(text + f"User: {user}\nAssistant:", self.stop)

    def describe(self) -> str:
        return "plain User:/Assistant: format"


def chat_format(tokenizer, style: PromptStyle | None) -> ChatFormat:
    """How a checkpoint with `tokenizer` and saved prompt `style` (`load_style`; None without one) renders a chat:
    its style first, else its tokenizer's chat template, else the plain format (module docstring)."""
    if style is not None:
        return StyleChat(style)
    if callable(getattr(tokenizer, "apply_chat_template", None)) and getattr(tokenizer, "chat_template", None):
        return TemplateChat(tokenizer)
    return PlainChat()
