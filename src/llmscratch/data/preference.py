"""Preference data for DPO: records with a prompt and a chosen and a rejected answer, as token pairs.

Record formats (JSON list or JSONL, read by `data.files.read_json_objects`):
  * the book's (chapter 7 bonus): `instruction`, optional `input`, `chosen`, `rejected` (other keys such as
    `output` ride along);
  * the common `{prompt, chosen, rejected}`: `prompt` is the user's request; it is wrapped in the model's prompt
    style like an `instruction`.

Each record becomes two instruction examples that share the prompt — prompt + chosen + end-of-text and prompt +
rejected + end-of-text — encoded by `data.instruct.encode_records` with the prompt masked, so the log-probability
of an answer counts answer tokens only. `PreferenceCollate` pads a batch of pairs into one tensor of 2B rows
(chosen rows first, then rejected) with `InstructCollate`, so the policy scores both answers in one forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from llmscratch.data.files import read_json_objects, string_field
from llmscratch.data.instruct import EncodeStats, Example, InstructCollate, encode_records
from llmscratch.errors import UserError

_KEYS = ("preference records need 'chosen' and 'rejected' answers and an 'instruction' (optional 'input') or a "
         "'prompt'")
_FORMATS = "{instruction, input, chosen, rejected} or {prompt, chosen, rejected}"


def preference_record(obj: object, where: str) -> dict:
    """A checked record {instruction, input, chosen, rejected, ...} from one item of a preference file."""
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "instruction" in obj:
        record = {**obj, "instruction": string_field(obj, "instruction", where, _KEYS),
                  "input": string_field(obj, "input", where)}
    elif "prompt" in obj:
        record = {**obj, "instruction": string_field(obj, "prompt", where, _KEYS), "input": ""}
    else:
        raise UserError(f"{where}: no 'instruction' or 'prompt' key (keys: {', '.join(map(str, obj)) or 'none'}); "
                        f"use the book's {_FORMATS}")
    if not record["instruction"].strip():
        raise UserError(f"{where}: empty prompt; give every record an instruction or remove it")
    record["chosen"] = string_field(obj, "chosen", where, _KEYS)
    record["rejected"] = string_field(obj, "rejected", where, _KEYS)
    return record


def load_preferences(src: str | Path) -> list[dict]:
    """Preference records from a JSON list or JSONL file (see the module docstring); bad input → UserError
    naming the file and the line (JSONL) or record number (JSON list)."""
    path = Path(src)
    items = read_json_objects(path, f"use a list of {_FORMATS}",
                              missing=f"no such file; give a JSON list or JSONL of {_FORMATS} records")
    records = [preference_record(obj, where) for where, obj in items]
    if not records:
        raise UserError(f"{path}: no records; it needs at least one prompt with a chosen and a rejected answer")
    return records


@dataclass
class PreferencePair:
    """One prompt's two answers as token examples (prompt masked), and — once computed — the reference model's
    summed log-probabilities of each answer (`--precompute-reference`)."""

    chosen: Example
    rejected: Example
    ref_chosen: float | None = None
    ref_rejected: float | None = None


@dataclass
class PairStats:
    chosen: EncodeStats
    rejected: EncodeStats

    def describe(self, max_length: int) -> str:
        text = f"{self.chosen.total - self.chosen.dropped} pairs"
        cut = self.chosen.truncated - self.chosen.dropped + self.rejected.truncated - self.rejected.dropped
        if cut:
            text += f"; {cut} answers longer than {max_length} tokens with their prompt were truncated"
        if self.chosen.dropped:
            text += f"; {self.chosen.dropped} dropped because the prompt alone fills {max_length} tokens"
        return text


def encode_preferences(records: list[dict], tokenizer, style, max_length: int) -> tuple[list[PreferencePair],
                                                                                         PairStats]:
    """Token pairs of `records` in prompt `style`, each sequence cut to `max_length + 1` ids. A record whose
    prompt leaves no room for an answer token is dropped (both of its answers: they share the prompt)."""
    chosen, c_stats = encode_records([{**r, "output": r["chosen"]} for r in records], tokenizer, style,
                                     max_length, mask_prompt=True)
    rejected, r_stats = encode_records([{**r, "output": r["rejected"]} for r in records], tokenizer, style,
                                       max_length, mask_prompt=True)
    if len(chosen) != len(rejected):  # dropping depends on the prompt alone, which both share
        raise RuntimeError("chosen and rejected examples fell out of step")
    return [PreferencePair(c, r) for c, r in zip(chosen, rejected)], PairStats(c_stats, r_stats)


class PreferenceBatch(NamedTuple):
    """x, y: (2B, T) inputs and targets (-100 on prompt and padding), chosen rows first; n_targets: answer
    tokens in the batch; ref_chosen / ref_rejected: (B,) precomputed reference log-probs, or None."""

    x: torch.Tensor
    y: torch.Tensor
    n_targets: int
    ref_chosen: torch.Tensor | None
    ref_rejected: torch.Tensor | None


class PreferenceCollate:
    """Pairs → one `PreferenceBatch`: the chosen and rejected examples padded together by `InstructCollate`."""

    def __init__(self, pad_id: int, device: str | torch.device = "cpu"):
        self.inner = InstructCollate(pad_id, mask_prompt=True, device=device)
        self.device = torch.device(device)

    def __call__(self, pairs: list[PreferencePair]) -> PreferenceBatch:
        x, y, n = self.inner([p.chosen for p in pairs] + [p.rejected for p in pairs])
        ref_c = ref_r = None
        if all(p.ref_chosen is not None and p.ref_rejected is not None for p in pairs):
            ref_c = torch.tensor([p.ref_chosen for p in pairs], dtype=torch.float32, device=self.device)
            ref_r = torch.tensor([p.ref_rejected for p in pairs], dtype=torch.float32, device=self.device)
        return PreferenceBatch(x, y, n, ref_c, ref_r)
