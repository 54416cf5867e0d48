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
