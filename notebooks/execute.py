"""Run the chapter notebooks top to bottom on a fresh kernel, as a reader would, and fail on any error.

    python notebooks/execute.py                 # every notebook in this folder, in order
    python notebooks/execute.py 03_attention    # the ones whose names start with these prefixes

Each notebook runs in its own folder (so the files it writes land beside it, in a scratch folder it makes) with
a per-notebook time limit. The notebooks on disk are never modified: outputs stay out of git (tests/test_notebooks.py
checks it). Prints one line per notebook with its time; exits 1 when any notebook fails.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def notebooks(prefixes: list[str]) -> list[Path]:
    found = sorted(HERE.glob("*.ipynb"))
    return [p for p in found if not prefixes or p.name.startswith(tuple(prefixes))]


def execute(path: Path, timeout: int) -> float:
    """Run `path` in memory with a fresh kernel; returns the seconds it took. Raises on the first failing cell."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}).execute()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prefixes", nargs="*", help="run only the notebooks whose names start with these")
    parser.add_argument("--timeout", type=int, default=300, help="seconds a single cell may take")
    args = parser.parse_args(argv)
    paths = notebooks(args.prefixes)
    if not paths:
        print(f"no notebooks match {args.prefixes}", file=sys.stderr)
        return 1
    failed, total = [], 0.0
    for path in paths:
        try:
            seconds = execute(path, args.timeout)
        except Exception as exc:  # noqa: BLE001 (a failing cell, a timeout, a dead kernel: report and go on)
            failed.append(path.name)
            print(f"FAIL {path.name}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__}",
                  flush=True)
            print(str(exc)[-3000:], file=sys.stderr)
            continue
        total += seconds
        print(f"ok   {path.name}  {seconds:6.1f} s", flush=True)
    print(f"{len(paths) - len(failed)}/{len(paths)} notebooks ran in {total:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
