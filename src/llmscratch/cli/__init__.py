"""The `llmscratch` command line: one verb per pipeline stage.

Every verb takes `--config FILE.yaml` (keys = option names with underscores) and, where a run has training
settings, dotted overrides such as `--train.lr 3e-4`. User mistakes end as one line on stderr and exit 2.

Each verb lives in a module of this package as a `Verb`: the function that adds its options beside the handler
that runs it. `VERBS` below lists them in the order `llmscratch --help` shows; a `Group` holds the verbs under
one name (`llmscratch convert from-hf`).
"""

from __future__ import annotations

import os
import sys

from llmscratch.cli import (
    chatting,
    doctoring,
    evaluation,
    finetuning,
    inference,
    inspecting,
    pretraining,
    serving,
    weights,
)
from llmscratch.cli.base import Group, Verb
from llmscratch.errors import UserError, os_error_line

VERBS: dict[str, Verb | Group] = {
    "tokenizer": pretraining.TOKENIZER,
    "prepare": pretraining.PREPARE,
    "pretrain": pretraining.PRETRAIN,
    "generate": inference.GENERATE,
    "chat": chatting.CHAT,
    "serve": serving.SERVE,
    "info": inference.INFO,
    "download": weights.DOWNLOAD,
    "convert": weights.CONVERT,
    "finetune": finetuning.FINETUNE,
    "lora": weights.LORA,
    "classify": inference.CLASSIFY,
    "inspect": inspecting.INSPECT,
    "data": evaluation.DATA,
    "eval": evaluation.EVAL,
    "quickstart": pretraining.QUICKSTART,
    "doctor": doctoring.DOCTOR,
}


def build_parser(argv: list[str] | None = None):
    """The command line. Building it imports no PyTorch, so `--help` and mistakes answer at once; and a verb's
    options are added only when `argv` names it (all of them when `argv` is None, for the full parser): the
    other verbs need only their names and descriptions, for the lists of `--help`."""
    from jsonargparse import set_parsing_settings

    from llmscratch.cli.parser import Parser, add_group, add_verb

    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # TrainConfig field docstrings → --help
    named = None if argv is None else set(argv)
    root = Parser(prog="llmscratch", description="Build, train and sample a GPT from scratch. "
                  "Start with `llmscratch quickstart`.")
    root.add_argument("--version", action="version", version=_version())
    verbs = root.add_subcommands(dest="verb", required=True)
    for name, entry in VERBS.items():
        if isinstance(entry, Verb):
            add_verb(verbs, name, f"llmscratch {name}", entry, named is None or name in named)
            continue
        actions = add_group(verbs, name, entry.description, entry.summary)
        for action, verb in entry.verbs.items():
            add_verb(actions, action, f"llmscratch {name} {action}", verb, named is None or {name, action} <= named)
    return root


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        _check_config_files(argv)
        args = _plain_numbers(build_parser(argv).parse_args(argv))
        entry, options = VERBS[args.verb], getattr(args, args.verb)
        if isinstance(entry, Group):
            entry, options = entry.verbs[options.action], getattr(options, options.action)
        entry.run(options)
    except UserError as exc:
        sys.stderr.write(f"llmscratch: error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("llmscratch: interrupted\n")
        return 130
    except OSError as exc:  # disk full, permission denied...: the system's reason in one line, not a traceback
        sys.stderr.write(f"llmscratch: error: {os_error_line(exc)}\n")
        return 2
    return 0


def _plain_numbers(args):
    """The parsed options with ranged numbers (cli/base.py's types, subclasses of int and float) as plain ints
    and floats, so that they print, compare and serialise (hyperparameters.yaml) like any other number."""
    for key, value in list(args.items()):
        if isinstance(value, (int, float)) and type(value) not in (int, float, bool):
            args[key] = float(value) if isinstance(value, float) else int(value)
    return args


def _check_config_files(argv: list[str]) -> None:
    """Each `--config FILE` that exists must be a readable text file: the parser would fail on a binary one with
    a traceback. (A value that is no file is left to the parser, which also takes inline YAML.)"""
    given = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == "--config"]
    given += [arg.partition("=")[2] for arg in argv if arg.startswith("--config=")]
    for path in given:
        if not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                f.read()
        except UnicodeDecodeError:
            raise UserError(f"--config {path}: not a text file (YAML expected)") from None
        except OSError as exc:
            raise UserError(f"--config {path}: {exc.strerror}") from None


def _version() -> str:
    from llmscratch import __version__

    return f"llmscratch {__version__}"
