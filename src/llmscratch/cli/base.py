"""What the verb modules of the command line share: the entries of its table of verbs (`Verb`, `Group`), help
texts and options used by several verbs (`--device`/`--dtype`, `--no-progress`), and the `--train.*` options of
the training verbs."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Optional

from jsonargparse.typing import (
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    restricted_number_type,
)

# Option types with their allowed range: a value outside it is a parse error that names the flag and the range
# (cli/parser.py words it), before any work starts. NaN fails every range.
TopP = restricted_number_type("TopP", float, [(">", 0), ("<=", 1)])
Fraction = restricted_number_type("Fraction", float, [(">=", 0), ("<", 1)])  # a share held out, a dropout rate
Port = restricted_number_type("Port", int, [(">=", 0), ("<=", 65535)])
Seed = restricted_number_type("Seed", int, [(">=", 0), ("<", 2**32)])  # numpy and torch both accept these
LabelSmoothing = restricted_number_type("LabelSmoothing", float, [(">=", 0), ("<", 0.5)])  # conservative DPO
VocabSize = restricted_number_type("VocabSize", int, [(">=", 257), ("<=", 2**31 - 1)])  # 256 bytes + a special
__all__ = ["NonNegativeFloat", "NonNegativeInt", "PositiveFloat", "PositiveInt", "TopP", "Fraction", "Port", "Seed",
           "VocabSize", "LabelSmoothing", "Optional"]

CORPUS_HELP = ("a named corpus (pydocs, the-verdict, tinyshakespeare, gutenberg: 20 English books), a text file, "
               "a .jsonl file (its `text` field; `prepare --text-field` picks another), a folder or a glob")


@dataclass(frozen=True)
class Verb:
    """One verb: `description` is its `--help` text and its line in the list of its parent; `parser(p)` adds its
    options to its parser `p`; `run(a)` does the work, given the parsed options `a`."""

    description: str
    parser: Callable[[Any], None]
    run: Callable[[Any], None]


@dataclass(frozen=True)
class Group:
    """Verbs under one name (`llmscratch convert from-hf`): `description` heads the group's `--help`, `summary` is
    its line in `llmscratch --help`."""

    description: str
    summary: str
    verbs: dict[str, Verb]


def device_options(p, dtype_default: str | None = None, dtype_help: str | None = None) -> None:
    """`--device`, and `--dtype` after it when `dtype_default` is given (the verbs that run a model differ on its
    default, and so on its help)."""
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    if dtype_default is not None:
        p.add_argument("--dtype", default=dtype_default, help=dtype_help)


MODEL_FOLDER_HELP = ("checkpoint folder, training run folder, or LoRA adapter folder (its base and adapter are "
                     "merged in memory)")


def sampling_options(p, temperature: float, seed_help: str = "seed for reproducible sampling") -> None:
    """`--temperature`, `--top-k`, `--top-p`, `--seed`: how the verbs that write text pick each token."""
    p.add_argument("--temperature", type=NonNegativeFloat, default=temperature, help="0 = greedy")
    p.add_argument("--top-k", type=NonNegativeInt, default=50, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=Optional[TopP], default=None, help="nucleus sampling mass in (0, 1], e.g. 0.9")
    p.add_argument("--seed", type=Optional[Seed], default=None, help=seed_help)


def inference_options(p, pack: bool = True) -> None:
    """`--no-pack` (where the verb offers it), then `--device` and `--dtype` as the verbs that run a model for text
    share them (dtype auto)."""
    if pack:
        p.add_argument("--no-pack", action="store_true",
                       help="on CPU, keep plain nn.Linear weights: no oneDNN packing, and bf16 products of many "
                            "rows stay in bf16 where fp32 is faster (slower decoding and prompt reading)")
    device_options(p, dtype_default="auto",
                   dtype_help="auto (bf16 on CUDA, and on CPUs where a bf16 product measured faster; else fp32) | "
                              "fp32 | bf16 | fp16")


def overwrite_option(p, what: str = "--out", run: bool = False) -> None:
    """`--overwrite`: let a verb write into an existing, non-empty output (it replaces only its own files; `run`:
    a training verb, which also removes an earlier run's checkpoints and history there)."""
    mine = "the run's files (an earlier run's checkpoints/ and metrics.csv go)" if run else \
        "the files this command writes"
    p.add_argument("--overwrite", action="store_true",
                   help=f"write into an existing, non-empty {what}: replaces {mine}; every other file stays")


def progress_option(p, help: str = "no progress bar") -> None:
    """`--no-progress` (`help` says "bars" where a verb shows several)."""
    p.add_argument("--no-progress", action="store_true", help=help)


def train_options(p, skip: Iterable[str] = ("progress",), defaults=None) -> None:
    """`--train.*`: every TrainConfig field but `skip` (its docstring as help), with the values of the TrainConfig
    `defaults` as defaults (the dataclass's own when None)."""
    from llmscratch.train.config import TrainConfig

    skip = set(skip)
    p.add_class_arguments(TrainConfig, "train", skip=skip)
    if defaults is not None:
        p.set_defaults({f"train.{k}": v for k, v in dataclasses.asdict(defaults).items() if k not in skip})


def run_summary(train_result, out, files: list[str] | None = None) -> str:
    """The last lines of a training verb: where the run stopped and why, its validation loss, and the files now
    in `out` (as written: a LoRA run leaves an adapter, not full weights)."""
    from llmscratch import runs

    note = {"time": " (time budget reached)", "interrupt": " (interrupted; resume with --resume)"}.get(
        train_result.stopped_early, "")
    val = f", val loss {train_result.val_loss:.3f}" if train_result.val_loss is not None else ""
    files = files if files is not None else runs.written_files(out)
    return (f"stopped at step {train_result.step}{note}: {train_result.tokens:,} tokens{val}. Files in {out}/: "
            f"{', '.join(files)}")


def exit_if_interrupted(train_result) -> None:
    """End an interrupted training verb (Ctrl-C: its checkpoint is saved) with exit code 130, as a shell reports
    SIGINT, so a script can tell it from a finished run."""
    if train_result.stopped_early == "interrupt":
        raise SystemExit(130)


def _train_config(a):
    """The TrainConfig of a training verb's parsed `--train.*` options (and `--no-progress`)."""
    from llmscratch.train.config import TrainConfig

    return TrainConfig(**{k: v for k, v in vars(a.train).items() if not k.startswith("__")},
                       progress=not a.no_progress)
