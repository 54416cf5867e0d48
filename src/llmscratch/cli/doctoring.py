"""`llmscratch doctor`: checks the environment (llmscratch.doctor) and prints what to fix."""

from __future__ import annotations

import json
from pathlib import Path

from llmscratch.cli.base import Verb


def _doctor_parser(p) -> None:
    p.add_argument("--out", default=".",
                   help="the folder you will write runs into: its free disk space and permissions are checked (it "
                        "need not exist yet)")
    p.add_argument("--json", action="store_true",
                   help="print the checks as a JSON list of {name, status, found, fix} for scripts")


def cmd_doctor(a) -> None:
    import dataclasses

    from llmscratch.doctor import FAIL, run_checks

    checks = run_checks(Path(a.out))
    if a.json:
        print(json.dumps([dataclasses.asdict(c) for c in checks], indent=2, ensure_ascii=False))
    else:
        print(report(checks))
    if any(c.status == FAIL for c in checks):
        raise SystemExit(1)  # a finding, not a user mistake (2): the checks themselves ran


def report(checks) -> str:
    """The checks as aligned lines `STATUS  name  found`, each WARN/FAIL followed by its `fix:` line, then a
    count of the problems."""
    width = max(len(c.name) for c in checks)
    lines = []
    for c in checks:
        lines.append(f"{c.status:<4}  {c.name:<{width}}  {c.found}")
        if c.fix:
            lines.append(f"{'':<4}  {'':<{width}}  fix: {c.fix}")
    counts = {s: sum(c.status == s for c in checks) for s in ("WARN", "FAIL")}
    lines.append("all checks passed" if not any(counts.values())
                 else f"{counts['FAIL']} failed, {counts['WARN']} warning(s): see the fix lines above")
    return "\n".join(lines)


DOCTOR = Verb("Check this machine for llmscratch: Python and PyTorch (build, devices, what --device auto picks), "
              "bf16 and what --train.precision auto uses, Triton, free disk space in the cache and --out, GPT-2's "
              "BPE files offline, optional extras; prints the fix for each problem. Exit code 1 when a check "
              "fails.", _doctor_parser, cmd_doctor)
