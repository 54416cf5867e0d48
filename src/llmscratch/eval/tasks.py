"""Exact-match evaluation on instruction records with verifiable answers (e.g. `llmscratch data synth-instruct`).

Each record is answered greedily in the model's prompt style; the answer counts when it equals the record's
`output` after stripping surrounding whitespace. Scores are reported per `family` and overall.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from llmscratch.errors import UserError


@dataclass
class FamilyScore:
    n: int = 0
    correct: int = 0

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0


@dataclass
class TaskReport:
    families: dict[str, FamilyScore] = field(default_factory=dict)
    records: list[dict] = field(default_factory=list)  # each record + model_response + correct

    @property
    def overall(self) -> FamilyScore:
        return FamilyScore(sum(f.n for f in self.families.values()), sum(f.correct for f in self.families.values()))

    def to_dict(self) -> dict:
        fam = {k: {"n": v.n, "correct": v.correct, "accuracy": v.accuracy} for k, v in self.families.items()}
        o = self.overall
        return {"overall": {"n": o.n, "correct": o.correct, "accuracy": o.accuracy}, "families": fam,
                "records": self.records}

    def table(self) -> str:
        rows = [(name, s) for name, s in sorted(self.families.items())] + [("overall", self.overall)]
        width = max(len("family"), *(len(name) for name, _ in rows))
        lines = [f"{'family':<{width}}  {'n':>5}  {'correct':>7}  {'exact match':>11}"]
        lines.append("-" * len(lines[0]))
        for i, (name, s) in enumerate(rows):
            if i == len(rows) - 1:
                lines.append("-" * len(lines[0]))
            lines.append(f"{name:<{width}}  {s.n:>5}  {s.correct:>7}  {100 * s.accuracy:>10.1f}%")
        return "\n".join(lines)


def is_exact_match(response: str, expected: str) -> bool:
    return response.strip() == expected.strip()


def evaluate_tasks(model, tokenizer, records: list[dict], style, max_new_tokens: int = 32, batch_size: int = 64,
                   progress: bool = True) -> TaskReport:
    """Greedy answers for `records` in prompt `style`, scored by exact match per family."""
    from llmscratch.generate import generate_batch

    texts = generate_batch(model, tokenizer, [style.prompt(r) for r in records], max_new_tokens=max_new_tokens,
                           stop=style.stop, batch_size=batch_size, progress=progress)
    report = TaskReport()
    for record, text in zip(records, texts):
        answer = style.clean(text)
        ok = is_exact_match(answer, record["output"])
        score = report.families.setdefault(str(record.get("family", "all")), FamilyScore())
        score.n += 1
        score.correct += ok
        report.records.append({**record, "model_response": answer, "correct": ok})
    return report


def run_tasks(checkpoint: str | Path, data: str | Path, prompt_style: str | None = None, max_new_tokens: int = 32,
              batch_size: int = 64, limit: int | None = None, json_out: str | Path | None = None,
              device: str = "auto", dtype: str = "fp32", progress: bool = True, log=print,
              overwrite: bool = False) -> TaskReport:
    """Load a checkpoint and records, score them (see `evaluate_tasks`), print the table, write JSON if asked
    (`json_out`: a new file, or replaced with `overwrite`)."""
    from llmscratch.checkpoint import load
    from llmscratch.data.instruct import load_records
    from llmscratch.fileio import atomic_write_text
    from llmscratch.generate import check_new_tokens
    from llmscratch.model.packed import pack_for_cpu_inference
    from llmscratch.prompts import get_style, load_style
    from llmscratch.runs import check_out_file, find_model_folder
    from llmscratch.runtime import inference_dtype, resolve_device

    if json_out:
        check_out_file(json_out, overwrite, inputs=(checkpoint, data), flag="--json")
    if max_new_tokens <= 0:
        raise UserError(f"--max-new-tokens must be positive, got {max_new_tokens}")
    records = load_records(data, progress=progress)
    if limit is not None:
        if limit <= 0:
            raise UserError(f"--limit must be positive, got {limit}")
        records = records[:limit]
    folder = find_model_folder(checkpoint)
    if prompt_style:
        style = get_style(prompt_style)
    else:
        style = load_style(folder)
        if style is None:
            style = get_style("alpaca")
            log(f"note: {checkpoint} has no saved prompt style (not instruction-tuned?); using alpaca — "
                "pass --prompt-style to choose")
    dev = resolve_device(device)
    model, tok = load(folder, device=dev, dtype=inference_dtype(dtype, dev))
    if model.config.n_classes is not None:
        raise UserError(f"{checkpoint}: a classifier (labels, not text) cannot answer tasks; give an "
                        "instruction-tuned language model")
    check_new_tokens(max_new_tokens, model)
    pack_for_cpu_inference(model, where_faster=True)  # CPU only; a no-op elsewhere
    report = evaluate_tasks(model, tok, records, style, max_new_tokens, batch_size, progress)
    log(f"{checkpoint} on {data} (prompt style {style.name}, greedy, exact match)")
    log(report.table())
    if json_out:
        payload = {"checkpoint": str(checkpoint), "data": str(data), "prompt_style": style.name,
                   **report.to_dict()}
        atomic_write_text(json_out, json.dumps(payload, indent=1, ensure_ascii=False) + "\n")
        log(f"wrote {json_out}")
    return report
