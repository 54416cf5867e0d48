"""`llmscratch doctor`: the facts of this machine, a fix line for each problem, --json, exit 1 on a failure, and a
GPT-2 BPE check that never reaches the network."""

import hashlib
import json
import shutil
import sys

import pytest
import torch
from clitools import run

from llmscratch import doctor
from llmscratch.runtime import resolve_device
from llmscratch.tokenizer.gpt2 import gpt2_byte_to_unicode


@pytest.fixture(autouse=True)
def _plenty_of_disk(monkeypatch):
    # The real free space varies by machine; tests that need a small disk say so.
    monkeypatch.setattr(doctor, "free_bytes", lambda folder: 50 * 10**9)


def lines_of(out: str) -> dict[str, str]:
    """Each check's line by its name, and the `fix:` line under a WARN/FAIL as `name/fix`."""
    found, last = {}, None
    for line in out.splitlines():
        status, _, rest = line.partition("  ")
        if status.strip() in ("OK", "WARN", "FAIL"):
            last = next(n for n in _NAMES if rest.strip().startswith(n + "  "))
            found[last] = line
        elif line.strip().startswith("fix: "):
            found[f"{last}/fix"] = line.strip()
    return found


# longest first, so "extra transformers" is not taken for a shorter name it starts with
_NAMES = sorted(["python", "pytorch", "device", "bf16", "triton", "cache", "out", "gpt2-bpe"]
                + [f"extra {e.name}" for e in doctor.EXTRAS], key=len, reverse=True)


def test_reports_the_facts_of_this_machine(tmp_path, capsys):
    code, out, err = run(["doctor", "--out", tmp_path], capsys)
    assert code == 0, out + err
    lines = lines_of(out)
    assert lines["pytorch"].startswith("OK") and f" {torch.__version__}, " in lines["pytorch"]
    build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU-only build"
    assert build in lines["pytorch"] or torch.version.hip
    assert f"--device auto → {resolve_device('auto').type};" in lines["device"]
    assert ".".join(map(str, sys.version_info[:3])) in lines["python"]
    assert f"{tmp_path}: 50.0 GB free, writable" in lines["out"]
    if not torch.cuda.is_available():
        assert "CUDA: none visible" in lines["device"]
        assert lines["triton"].startswith("OK") and "not needed on cpu" in lines["triton"]
        assert "--train.precision auto trains in " in lines["bf16"]
        from llmscratch.runtime import bf16_upcast_rows

        upcast = bf16_upcast_rows()  # (measured once per CPU: the doctor's line reads the same answer)
        assert (f"bf16 weights multiply {upcast} rows or more in fp32" in lines["bf16"]) == (upcast is not None)
    assert out.strip().splitlines()[-1].endswith(("all checks passed", "see the fix lines above"))


def test_missing_extra_is_a_warning_with_its_pip_line(tmp_path, capsys, monkeypatch):
    real = doctor.installed
    monkeypatch.setattr(doctor, "installed", lambda m: m not in ("uvicorn", "tensorflow") and real(m))
    code, out, err = run(["doctor", "--out", tmp_path], capsys)
    lines = lines_of(out)
    assert lines["extra serve"].startswith("WARN") and "uvicorn not installed" in lines["extra serve"]
    assert "fastapi" not in lines["extra serve"]  # only what is missing is named
    assert lines["extra serve/fix"] == "fix: pip install 'llmscratch[serve]'"
    # TensorFlow is for the test suite only: missing it is no problem, and no fix is offered
    assert lines["extra tensorflow"].startswith("OK") and "extra tensorflow/fix" not in lines


def test_json_lists_every_check(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(doctor, "installed", lambda m: m != "peft")
    code, out, err = run(["doctor", "--out", tmp_path, "--json"], capsys)
    checks = json.loads(out)
    assert [c["name"] for c in checks][:2] == ["python", "pytorch"]
    assert all(set(c) == {"name", "status", "found", "fix"} for c in checks)
    assert all(c["status"] in ("OK", "WARN", "FAIL") and bool(c["fix"]) == (c["status"] != "OK") for c in checks)
    by_name = {c["name"]: c for c in checks}
    assert by_name["extra peft"]["status"] == "WARN" and "pip install 'peft" in by_name["extra peft"]["fix"]
    assert torch.__version__ in by_name["pytorch"]["found"]


def test_a_full_disk_fails_with_exit_code_1(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(doctor, "free_bytes", lambda folder: 10**6)
    code, out, err = run(["doctor", "--out", tmp_path], capsys)
    assert code == 1 and not err
    lines = lines_of(out)
    assert lines["out"].startswith("FAIL") and "1 MB free" in lines["out"]
    assert lines["cache"].startswith("FAIL") and "LLMSCRATCH_CACHE" in lines["cache/fix"]
    assert "2 failed" in out.strip().splitlines()[-1]
    code, out, err = run(["doctor", "--out", tmp_path, "--json"], capsys)
    assert code == 1 and [c["name"] for c in json.loads(out) if c["status"] == "FAIL"] == ["cache", "out"]


def test_low_disk_is_a_warning(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(doctor, "free_bytes", lambda folder: 10**9)
    code, out, err = run(["doctor", "--out", tmp_path], capsys)
    assert code == 0
    assert lines_of(out)["out"].startswith("WARN") and "1.0 GB free" in lines_of(out)["out"]


def test_out_that_does_not_exist_is_checked_through_its_parent(tmp_path, capsys):
    code, out, err = run(["doctor", "--out", tmp_path / "runs" / "new"], capsys)
    line = lines_of(out)["out"]
    assert line.startswith("OK") and f"not created yet; checked {tmp_path})" in line
    assert not (tmp_path / "runs").exists()  # the doctor only looks
    (tmp_path / "file").write_text("x")
    code, out, err = run(["doctor", "--out", tmp_path / "file" / "sub"], capsys)
    assert code == 1 and lines_of(out)["out"].startswith("FAIL") and "is a file" in lines_of(out)["out"]


def _tiny_gpt2_files(folder) -> None:
    """GPT-2's file format with no merges: the 256 byte tokens and <|endoftext|>."""
    folder.mkdir(parents=True)
    chars = sorted(gpt2_byte_to_unicode().values())
    encoder = {c: i for i, c in enumerate(chars)} | {"<|endoftext|>": 256}
    (folder / "encoder.json").write_text(json.dumps(encoder), encoding="utf-8")
    (folder / "vocab.bpe").write_text("#version: 0.2\n", encoding="utf-8")


def test_gpt2_bpe_from_the_env_folder(tmp_path, monkeypatch):
    _tiny_gpt2_files(tmp_path / "gpt2")
    monkeypatch.setenv("LLMSCRATCH_GPT2_DIR", str(tmp_path / "gpt2"))
    check = doctor.check_gpt2_bpe()
    assert check.status == "OK" and f"LLMSCRATCH_GPT2_DIR={tmp_path / 'gpt2'}" in check.found
    monkeypatch.setenv("LLMSCRATCH_GPT2_DIR", str(tmp_path))
    check = doctor.check_gpt2_bpe()
    assert check.status == "WARN" and "lacks encoder.json and vocab.bpe" in check.found
    assert f"into {tmp_path}" in check.fix


def test_gpt2_bpe_that_needs_a_download_says_how_to_get_it(tmp_path, monkeypatch):
    # An empty tiktoken cache: tiktoken would download, and the check must say so without reaching the network.
    monkeypatch.delenv("LLMSCRATCH_GPT2_DIR", raising=False)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken"))
    check = doctor.check_gpt2_bpe()
    assert check.status == "WARN" and "needs a download" in check.found
    assert "tiktoken.get_encoding('gpt2')" in check.fix and "LLMSCRATCH_GPT2_DIR" in check.fix
    assert not (tmp_path / "tiktoken").exists()
    # GPT-2 weights downloaded earlier left the same two files (Hugging Face's names) in llmscratch's cache
    from llmscratch.weights.hub import cache_folder

    _tiny_gpt2_files(tmp_path / "files")
    shutil.copytree(tmp_path / "files", hf := cache_folder("gpt2-355m"))
    (hf / "encoder.json").rename(hf / "vocab.json")
    (hf / "vocab.bpe").rename(hf / "merges.txt")
    try:
        assert doctor.check_gpt2_bpe().fix.startswith(f"export LLMSCRATCH_GPT2_DIR={hf} ")
    finally:
        shutil.rmtree(hf)


def test_gpt2_bpe_from_tiktokens_cache(tmp_path, monkeypatch, shared_data):
    if not (shared_data / "gpt2" / "encoder.json").is_file():
        pytest.skip("needs GPT-2's real encoder.json + vocab.bpe in ../shared/data/gpt2")
    # tiktoken's cache names each file by the sha1 of the URL it came from (tiktoken/load.py)
    monkeypatch.delenv("LLMSCRATCH_GPT2_DIR", raising=False)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    for name in ("encoder.json", "vocab.bpe"):
        key = hashlib.sha1(f"{doctor.GPT2_FILES_URL}{name}".encode()).hexdigest()
        shutil.copy(shared_data / "gpt2" / name, tmp_path / key)
    check = doctor.check_gpt2_bpe()
    assert check.status == "OK" and f"tiktoken's cache {tmp_path}" in check.found


def test_help_imports_no_torch():
    import subprocess

    code = ("import sys\nfrom llmscratch.cli import main\ntry:\n    main(['doctor', '--help'])\n"
            "except SystemExit:\n    pass\nassert 'torch' not in sys.modules, 'torch imported'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "--json" in done.stdout, done.stderr
