"""Verbs for fine-tuning data and its scores: `data synth-instruct` and `eval tasks | judge`."""

from __future__ import annotations

from pathlib import Path

from llmscratch.cli.base import (
    Group,
    NonNegativeInt,
    Optional,
    PositiveFloat,
    PositiveInt,
    Seed,
    Verb,
    device_options,
    overwrite_option,
    progress_option,
)
from llmscratch.errors import UserError


# --- data synth-instruct ----------------------------------------------------------------------------------
def _data_synth_instruct_parser(p) -> None:
    p.add_argument("--out", required=True, help="folder for train.jsonl and test.jsonl (or .json with --format json)")
    p.add_argument("--n-train", type=PositiveInt, default=2000, help="training records per family")
    p.add_argument("--n-test", type=PositiveInt, default=100, help="test records per family (all distinct)")
    p.add_argument("--families", default=None,
                   help="comma-separated families; default: arithmetic, unit_conversion, comparison, counting, "
                        "first_letter. Copying families for larger models: long_arithmetic, word_reversal, "
                        "spelling, sorting, capitalization, last_word, repeat_word")
    p.add_argument("--seed", type=Seed, default=0, help="seed of the draw and of the held-out word list")
    p.add_argument("--format", default="jsonl", help="jsonl | json (Alpaca JSON list)")
    overwrite_option(p)


def cmd_data_synth_instruct(a) -> None:
    from collections import Counter

    from llmscratch.data.synth import synth_instructions, write_records
    from llmscratch.runs import check_out_folder, write_folder

    if a.format not in ("jsonl", "json"):
        raise UserError(f"--format {a.format}: use jsonl or json")
    out = check_out_folder(a.out, a.overwrite)
    families = [f.strip() for f in a.families.split(",") if f.strip()] if a.families else None
    train, test = synth_instructions(a.n_train, a.n_test, families, a.seed)

    def write(tmp: Path) -> None:
        for name, records in (("train", train), ("test", test)):
            write_records(records, tmp / f"{name}.{a.format}")
    write_folder(out, write, a.overwrite)
    counts = Counter(r["family"] for r in test)
    print(f"wrote {len(train):,} train and {len(test):,} test records ({len(counts)} families: "
          f"{', '.join(counts)}) to {out}/train.{a.format} and {out}/test.{a.format}")


DATA = Group("Make data sets.", "make data sets (synthetic instruction tasks)", {
    "synth-instruct": Verb("Write a procedural instruction data set with verifiable answers as --out/train.jsonl and "
                           "--out/test.jsonl (each record has a `family`); test items use held-out words and "
                           "operands.", _data_synth_instruct_parser, cmd_data_synth_instruct),
})


# --- eval tasks | judge -----------------------------------------------------------------------------------
def _eval_tasks_parser(p) -> None:
    p.add_argument("checkpoint", help="checkpoint folder (instruction-tuned, or a base model with --prompt-style)")
    p.add_argument("data", help="Alpaca JSON/JSONL records with `output` (and `family`) fields")
    p.add_argument("--prompt-style", default=None,
                   help="alpaca | phi3 (default: the style saved with the checkpoint, else alpaca)")
    p.add_argument("--max-new-tokens", type=PositiveInt, default=32, help="longest answer generated")
    p.add_argument("--batch-size", type=PositiveInt, default=64, help="prompts of equal token length decoded together")
    p.add_argument("--limit", type=Optional[PositiveInt], default=None, help="score only the first N records")
    p.add_argument("--json", default=None, help="also write per-family scores and every answer to this JSON file")
    overwrite_option(p, "--json file")
    device_options(p, dtype_default="fp32",
                   dtype_help="fp32 (default: scores that do not depend on the CPU's bf16 support) | bf16 | auto")
    progress_option(p)


def cmd_eval_tasks(a) -> None:
    from llmscratch.eval.tasks import run_tasks

    run_tasks(a.checkpoint, a.data, prompt_style=a.prompt_style, max_new_tokens=a.max_new_tokens,
              batch_size=a.batch_size, limit=a.limit, json_out=a.json, device=a.device, dtype=a.dtype,
              progress=not a.no_progress, overwrite=a.overwrite)


def _eval_judge_parser(p) -> None:
    p.add_argument("responses", help="JSON list of records with instruction, input, output and the answer "
                   "(e.g. test_responses.json from `finetune instruct`)")
    p.add_argument("--url", default="http://localhost:11434",
                   help="server base URL (…/v1/chat/completions is appended unless given); Ollama's by default")
    p.add_argument("--model", required=True, help="judge model name as the server knows it, e.g. llama3")
    p.add_argument("--response-key", default="model_response", help="record key holding the answer to score")
    p.add_argument("--out", default=None, help="scores file (default: RESPONSES.scores.json beside the input)")
    p.add_argument("--timeout", type=PositiveFloat, default=60.0, help="seconds to wait for each reply")
    p.add_argument("--retries", type=NonNegativeInt, default=3,
                   help="extra tries after a failed request (backoff 1, 2, 4 s...)")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY",
                   help="environment variable holding a bearer token, sent when set (Ollama needs none)")
    overwrite_option(p, "scores file")
    progress_option(p)


def cmd_eval_judge(a) -> None:
    import os

    from llmscratch.eval.judge import ChatClient, judge_file

    if a.retries < 0 or a.timeout <= 0:
        raise UserError("--retries must be >= 0 and --timeout positive")
    client = ChatClient(a.url, a.model, timeout=a.timeout, retries=a.retries,
                        api_key=os.environ.get(a.api_key_env) or None)
    r = judge_file(a.responses, client, response_key=a.response_key, out=a.out, progress=not a.no_progress,
                   overwrite=a.overwrite)
    mean = f"{r.mean:.2f}" if r.mean is not None else "n/a"
    unscored = f" ({r.unscored} replies without a usable score)" if r.unscored else ""
    print(f"mean score {mean} over {r.scored} responses{unscored}; per-record scores in {r.out}")


EVAL = Group("Evaluate fine-tuned models.", "evaluate answers: exact-match tasks, LLM-as-judge", {
    "tasks": Verb("Exact-match accuracy per task family on records with known answers (e.g. from `data "
                  "synth-instruct`), answering greedily in the checkpoint's prompt style.", _eval_tasks_parser,
                  cmd_eval_tasks),
    "judge": Verb("Score each answer 0-100 with a judge model behind an OpenAI-compatible chat endpoint (Ollama, "
                  "vLLM, llama.cpp, OpenAI); prints the mean and writes per-record scores to RESPONSES.scores.json.",
                  _eval_judge_parser, cmd_eval_judge),
})
