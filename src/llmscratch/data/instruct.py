"""Instruction data: records from Alpaca JSON/JSONL or OpenAI `messages` JSONL, a seeded split, token
examples with the prompt masked, and the padding collate (the book's chapter 7, `custom_collate_fn`).

Record formats (one home for reading them):
  * Alpaca — a JSON list, or JSONL with one object a line: `instruction` (non-empty), `input` (optional),
    `output`. Other keys (e.g. `family`, `id`) ride along into the test-set responses.
  * OpenAI chat — JSONL lines `{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}`.
    A conversation becomes one record per assistant turn: that turn is the `output`, the user turn just
    before it the `instruction`, earlier user/assistant pairs the record's `history`, and a leading system
    message its `system`. So every assistant reply is learned once, with the whole conversation before it
    in the prompt (`llmscratch.prompts` renders history and system for each style).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from llmscratch.data.files import read_json_objects, string_field
from llmscratch.errors import UserError
from llmscratch.tokenizer.base import prompt_ids

IGNORE_INDEX = -100  # targets with this value add nothing to the loss (PyTorch's cross_entropy default)

# Named data sets `--data` accepts besides a path: the book's chapter-7 file, downloaded once and checked.
BOOK_INSTRUCTIONS_URL = ("https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/01_main-chapter-code/"
                         "instruction-data.json")
NAMED_INSTRUCTION_DATA = {
    "book-instructions": (BOOK_INSTRUCTIONS_URL,
                          "7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944",
                          "instruction-data.json"),
}


# ---------------------------------------------------------------------------------------------------------
# reading records


def resolve_instruction_source(src: str | Path, progress: bool = True) -> Path:
    """A local file, or a named data set (downloaded into the cache on first use)."""
    path = Path(src)
    if path.exists():
        if not path.is_file():
            raise UserError(f"--data {src}: expected a JSON or JSONL file, got a folder")
        return path
    if str(src) in NAMED_INSTRUCTION_DATA:
        from llmscratch.download import cache_dir, download

        url, sha256, filename = NAMED_INSTRUCTION_DATA[str(src)]
        return download(url, cache_dir() / "instruct" / filename, sha256, name=str(src), progress=progress)
    raise UserError(f"--data {src}: no such file; give an Alpaca JSON/JSONL or OpenAI messages JSONL file, or "
                    f"a named set ({', '.join(NAMED_INSTRUCTION_DATA)})")


def load_records(src: str | Path, progress: bool = True) -> list[dict]:
    """Instruction records from `src` (see the module docstring), checked; bad input → UserError naming
    the file and the line (JSONL) or record number (JSON list)."""
    path = resolve_instruction_source(src, progress)
    records: list[dict] = []
    for where, obj in read_json_objects(path, "use a list of {instruction, input, output} objects, or JSONL"):
        if "messages" in obj:
            records.extend(records_from_messages(obj, where))
        else:
            records.append(alpaca_record(obj, where))
    if not records:
        raise UserError(f"{path}: no records; it needs at least one instruction with an output")
    return records


_ALPACA_KEYS = "Alpaca records need 'instruction' and 'output' ('input' is optional)"


def alpaca_record(obj: dict, where: str) -> dict:
    """A checked copy of an Alpaca object (`instruction`, optional `input`, `output`, extra keys kept)."""
    instruction = string_field(obj, "instruction", where, _ALPACA_KEYS)
    if not instruction.strip():
        raise UserError(f"{where}: empty 'instruction'; give every record an instruction or remove it")
    return {**obj, "instruction": instruction, "input": string_field(obj, "input", where),
            "output": string_field(obj, "output", where, _ALPACA_KEYS)}


_ROLES = ("system", "user", "assistant")


def _message(message: object, at: str) -> tuple[str, str]:
    """(role, content) of one checked OpenAI message; `at` names it for errors."""
    if not isinstance(message, dict) or "role" not in message:
        raise UserError(f"{at} must be an object with 'role' and 'content'")
    content = message.get("content")
    if isinstance(content, list):  # OpenAI content parts: keep the text ones
        parts = [p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        content = "".join(parts) if parts else None
    if not isinstance(content, str):
        raise UserError(f"{at}: message 'content' must be a string (or text parts), got {type(content).__name__}")
    if message["role"] not in _ROLES:
        raise UserError(f"{at}: unknown role {message['role']!r}; use system, user or assistant")
    return message["role"], content


def records_from_messages(obj: dict, where: str) -> list[dict]:
    """One record per assistant turn of an OpenAI `messages` conversation (see the module docstring)."""
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    system, history, records = "", [], []
    pending_user: str | None = None
    for i, m in enumerate(messages):
        at = f"{where}: message {i + 1}"
        role, content = _message(m, at)
        if role == "system":
            if i != 0:
                raise UserError(f"{at}: a system message may only come first")
            system = content
        elif role == "user":
            if pending_user is not None:
                raise UserError(f"{at}: two user turns in a row; alternate user and assistant turns")
            if not content.strip():
                raise UserError(f"{at}: empty user message")
            pending_user = content
        else:
            if pending_user is None:
                raise UserError(f"{at}: an assistant turn without a user turn before it")
            record = {"instruction": pending_user, "input": "", "output": content}
            if system:
                record["system"] = system
            if history:
                record["history"] = [list(turn) for turn in history]
            records.append(record)
            history.append((pending_user, content))
            pending_user = None
    if not records:
        raise UserError(f"{where}: the conversation has no assistant turn to learn")
    return records


def split_records(records: list, seed: int = 0, val_fraction: float = 0.05, test_fraction: float = 0.10):
    """Seeded shuffle, then (train, val, test) — 85/5/10 by default, as in the book's chapter 7."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise UserError(f"val/test fractions {val_fraction}/{test_fraction} must be in [0, 1) and sum below 1")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_test = round(len(records) * test_fraction)
    n_val = round(len(records) * val_fraction)
    shuffled = [records[i] for i in order]
    test, val, train = shuffled[:n_test], shuffled[n_test:n_test + n_val], shuffled[n_test + n_val:]
    if not train:
        raise UserError(f"{len(records)} records leave no training examples after the val/test split")
    return train, val, test


# ---------------------------------------------------------------------------------------------------------
# tokens and batches


@dataclass
class Example:
    """Token ids of prompt + response + end-of-text; the first `n_prompt` ids are the prompt."""

    ids: list[int]
    n_prompt: int


@dataclass
class EncodeStats:
    total: int = 0
    truncated: int = 0  # longer than max_length + 1 tokens: the end of the response was cut
    dropped: int = 0  # the prompt alone fills max_length: no answer token would be left to learn

    def describe(self, max_length: int) -> str:
        text = f"{self.total - self.dropped} examples"
        if self.truncated:
            text += f"; {self.truncated} longer than {max_length} tokens were truncated (the end of the answer)"
        if self.dropped:
            text += f"; {self.dropped} dropped because the prompt alone fills {max_length} tokens"
        return text


def encode_records(records: list[dict], tokenizer, style, max_length: int,
                   mask_prompt: bool = True) -> tuple[list[Example], EncodeStats]:
    """Tokenize records as prompt + response + eos, cut to `max_length + 1` ids (so inputs and shifted targets
    are at most `max_length` long). With `mask_prompt`, a record whose prompt leaves no room for a single
    answer token is dropped: its targets would all be masked and its loss undefined (0/0)."""
    eos = tokenizer.eos_id
    if eos is None:
        raise UserError("the tokenizer has no <|endoftext|> token; instruction tuning appends it to each answer")
    if max_length < 2:
        raise UserError(f"--max-length must be at least 2, got {max_length}")
    stats = EncodeStats(total=len(records))
    limit = max_length + 1
    examples = []
    start = prompt_ids(tokenizer, "")  # what the tokenizer puts before every prompt (Gemma's BOS), as when answering
    for record in records:
        prompt, response = style.format(record)
        p = start + tokenizer.encode(prompt, allowed_special="none")  # special-token text in data stays plain text
        ids = p + tokenizer.encode(response, allowed_special="none") + [eos]
        if len(ids) > limit:
            stats.truncated += 1
            if mask_prompt and len(p) + 1 > limit:
                stats.dropped += 1
                continue
            ids = ids[:limit]
        examples.append(Example(ids, len(p)))
    return examples, stats


class InstructCollate:
    """Pad a batch of `Example`s to its longest member and shift: returns (inputs, targets, n_targets).

    Inputs are padded with `pad_id`; targets are the ids shifted left by one, with padding and (when
    `mask_prompt`) the prompt's positions set to -100 so only the answer and its end-of-text are learned.
    """

    def __init__(self, pad_id: int, mask_prompt: bool = True, device: str | torch.device = "cpu"):
        self.pad_id, self.mask_prompt, self.device = pad_id, mask_prompt, torch.device(device)

    def __call__(self, batch: list[Example]):
        T = max(len(e.ids) for e in batch) - 1
        x = torch.full((len(batch), T), self.pad_id, dtype=torch.long)
        y = torch.full((len(batch), T), IGNORE_INDEX, dtype=torch.long)
        for i, e in enumerate(batch):
            ids = torch.tensor(e.ids, dtype=torch.long)
            n = len(e.ids) - 1
            x[i, :n] = ids[:-1]  # (n,)
            y[i, :n] = ids[1:]  # position t learns token t+1
            if self.mask_prompt:
                y[i, :e.n_prompt - 1] = IGNORE_INDEX  # targets that are still prompt tokens
        n_targets = int((y != IGNORE_INDEX).sum())
        if self.device.type != "cpu":
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        return x, y, n_targets
