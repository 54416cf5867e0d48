"""Helpers the test files share for running the `llmscratch` command in-process (importable because
pyproject's pytest settings put tests/ on the path)."""

from __future__ import annotations


def run(argv, capsys) -> tuple[int, str, str]:
    """Run `llmscratch ARGV...` in-process; returns (exit code, stdout, stderr)."""
    from llmscratch.cli import main

    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argument errors exit from the parser
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code, err, *needles) -> None:
    """Exit code 2 and exactly one line on stderr (no traceback) that contains every needle."""
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got: {err!r}"
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
