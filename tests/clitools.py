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
    """Exit code 2 and exactly one line on stderr (no traceback) that contains every needle; a needle that is a
    tuple of strings is met by any one of them (where the contract names the fault but not the wording)."""
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got: {err!r}"
    assert "Traceback" not in err
    for needle in needles:
        options = needle if isinstance(needle, tuple) else (needle,)
        assert any(option in lines[0] for option in options), f"none of {options} in: {lines[0]}"


def run_quiet(argv) -> tuple[int, str, str]:
    """`run` for fixtures, which have no capsys: stdout and stderr are collected instead of printed."""
    import contextlib
    import io

    from llmscratch.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exc:
            code = exc.code
    return code, out.getvalue(), err.getvalue()


def snapshot(root) -> dict[str, str]:
    """Everything under `root`, as {relative path: what it is}: a file's sha256, "dir", or a symlink's target
    (links are recorded, never followed, so a symlink loop is just an entry). Two equal snapshots mean nothing
    was changed, added or removed."""
    import hashlib
    import os
    from pathlib import Path

    root = Path(root)
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                found[rel] = f"link -> {os.readlink(path)}"
            elif path.is_dir():
                found[rel] = "dir"
            else:
                found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def assert_same_files(before: dict[str, str], after: dict[str, str]) -> None:
    """Two `snapshot`s are equal; the message lists what changed, appeared and disappeared."""
    changed = sorted(k for k in before.keys() & after.keys() if before[k] != after[k])
    added = sorted(after.keys() - before.keys())
    removed = sorted(before.keys() - after.keys())
    assert not (changed or added or removed), f"changed: {changed}; new: {added}; gone: {removed}"


class TookTooLong(BaseException):
    """Raised by `time_limit`; a BaseException so that no `except Exception` (or OSError) in the code under test
    can turn a hang into a pass."""


def time_limit(seconds: int):
    """A context manager that interrupts the body (main thread, POSIX) after `seconds`: a command that should
    have refused an option at once must not hang the suite instead."""
    import contextlib
    import signal

    @contextlib.contextmanager
    def limit():
        def expire(signum, frame):
            raise TookTooLong(f"still running after {seconds} s")

        previous = signal.signal(signal.SIGALRM, expire)
        signal.alarm(seconds)
        try:
            yield
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)

    return limit()


def assert_hf_cli_round_trip(theirs, tmp_path, tokenizer, capsys, n_tokens: int = 12) -> None:
    """`convert from-hf` a saved transformers model (tmp_path/hf) with `tokenizer`, `generate` from the result,
    `convert to-hf` it back, and check transformers' reload gives `theirs`' logits."""
    import torch
    import transformers

    code, out, err = run(["convert", "from-hf", tmp_path / "hf", tmp_path / "ours", "--tokenizer", tokenizer],
                         capsys)
    assert code == 0, err
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= {p.name for p in (tmp_path / "ours").iterdir()}
    code, out, err = run(["generate", tmp_path / "ours", "--prompt", "The", "--max-new-tokens", 5,
                          "--temperature", 0, "--dtype", "fp32"], capsys)
    assert code == 0 and out.startswith("The"), err
    code, out, err = run(["convert", "to-hf", tmp_path / "ours", tmp_path / "back"], capsys)
    assert code == 0, err
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert type(again) is type(theirs)
    idx = torch.randint(0, theirs.config.vocab_size, (1, n_tokens))
    with torch.no_grad():
        torch.testing.assert_close(again(idx).logits, theirs(idx).logits, atol=1e-5, rtol=1e-5)


class Crash(Exception):
    """What `crash_at`'s callback raises: a failure in the middle of a training run."""


def crash_at(step: int):
    """An `on_step` callback for `train` that raises `Crash` once the run reaches `step` (to test resuming)."""
    def on_step(reached, loss):
        if reached == step:
            raise Crash(f"crashed at step {step}")
    return on_step
