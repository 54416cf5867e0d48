"""The checkpoint folder: round trips, `llmscratch.load`, and a UserError for every broken folder."""

import json
import os
from pathlib import Path

import pytest
import torch

import llmscratch
from llmscratch.checkpoint import (
    CONFIG,
    WEIGHTS,
    atomic_write,
    check_state_dict,
    find_model_folder,
    load_model,
    save_model,
)
from llmscratch.config import ModelConfig
from llmscratch.errors import UserError
from llmscratch.model import GPT

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TEXT = ("The quick brown fox jumps over the lazy dog. A checkpoint folder holds the weights, the config and "
        "the tokenizer, so that loading needs nothing else. Ünïcödé → text too. ") * 20


@pytest.fixture
def cfg() -> ModelConfig:
    return ModelConfig(vocab_size=97, context_length=32, d_model=32, n_layers=2, n_heads=4)


def _randomised(cfg: ModelConfig) -> GPT:
    torch.manual_seed(0)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():  # non-zero biases and non-unit norms: every tensor must round-trip
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _tmp_files(folder: Path) -> list[str]:
    return [str(p) for p in folder.rglob("*") if p.name.endswith(".tmp") or ".tmp" in p.name]


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("n_kv_heads,bias", [(4, True), (2, True), (4, False)])
def test_round_trip_gives_identical_logits(tmp_path, cfg, tie, n_kv_heads, bias):
    config = cfg.replace(tie_embeddings=tie, n_kv_heads=n_kv_heads, bias=bias, qkv_bias=bias)
    model = _randomised(config)
    save_model(tmp_path / "ckpt", model)
    loaded = load_model(tmp_path / "ckpt")
    assert loaded.config == config
    assert not loaded.training
    idx = torch.randint(0, config.vocab_size, (2, 16))
    torch.testing.assert_close(loaded(idx), model(idx), atol=0, rtol=0)
    if tie:
        assert loaded.lm_head.weight is loaded.tok_emb.weight
    else:
        assert loaded.lm_head.weight.data_ptr() != loaded.tok_emb.weight.data_ptr()
        torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight, atol=0, rtol=0)
    assert all(p.device.type == "cpu" for p in loaded.parameters())  # nothing left on the meta device


def test_tied_head_is_stored_once(tmp_path, cfg):
    from safetensors.torch import load_file

    save_model(tmp_path, _randomised(cfg))
    assert "lm_head.weight" not in load_file(str(tmp_path / WEIGHTS))
    save_model(tmp_path / "untied", _randomised(cfg.replace(tie_embeddings=False)))
    assert "lm_head.weight" in load_file(str(tmp_path / "untied" / WEIGHTS))


def test_load_with_dtype(tmp_path, cfg):
    save_model(tmp_path, _randomised(cfg))
    loaded = load_model(tmp_path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    assert loaded.lm_head.weight is loaded.tok_emb.weight


def test_loaded_model_can_train(tmp_path, cfg):
    save_model(tmp_path, _randomised(cfg))
    loaded = load_model(tmp_path).train()
    idx = torch.randint(0, cfg.vocab_size, (2, 8))
    torch.nn.functional.cross_entropy(loaded(idx).flatten(0, 1), idx.flatten()).backward()
    assert loaded.tok_emb.weight.grad is not None


def test_load_returns_model_and_real_tokenizer(tmp_path):
    from llmscratch.tokenizer import BPETokenizer

    tok = BPETokenizer.train(TEXT, 300, progress=False)
    cfg = ModelConfig(vocab_size=tok.vocab_size, context_length=32, d_model=32, n_layers=2, n_heads=4)
    model = _randomised(cfg)
    save_model(tmp_path / "run", model, tok, hyperparameters={"lr": 3e-4, "steps": 10})
    assert {WEIGHTS, CONFIG, "tokenizer.json", "hyperparameters.yaml"} <= {p.name for p in (tmp_path / "run").iterdir()}

    loaded_model, loaded_tok = llmscratch.load(tmp_path / "run")
    sample = "The lazy fox loads a checkpoint. Ünïcödé"
    assert loaded_tok.encode(sample) == tok.encode(sample)
    assert loaded_tok.decode(tok.encode(sample)) == sample
    assert loaded_tok.eos_id == tok.eos_id
    idx = torch.tensor([tok.encode(sample)[:32]])
    torch.testing.assert_close(loaded_model(idx), model(idx), atol=0, rtol=0)
    kw = dict(max_new_tokens=10, temperature=0.0)
    assert llmscratch.generate(loaded_model, loaded_tok, "The", **kw) == llmscratch.generate(model, tok, "The", **kw)


def test_hyperparameters_yaml(tmp_path, cfg):
    import yaml

    save_model(tmp_path, _randomised(cfg), hyperparameters={"lr": 0.001, "data": "x.txt", "nested": {"a": 1}})
    assert yaml.safe_load((tmp_path / "hyperparameters.yaml").read_text()) == {
        "lr": 0.001, "data": "x.txt", "nested": {"a": 1}}


def test_save_overwrites_an_existing_checkpoint(tmp_path, cfg):
    save_model(tmp_path, _randomised(cfg))
    torch.manual_seed(99)
    other = GPT(cfg).eval()
    save_model(tmp_path, other)
    idx = torch.randint(0, cfg.vocab_size, (1, 8))
    torch.testing.assert_close(load_model(tmp_path)(idx), other(idx), atol=0, rtol=0)


def test_no_tmp_files_left_after_save(tmp_path):
    from llmscratch.tokenizer import BPETokenizer

    tok = BPETokenizer.train(TEXT, 280, progress=False)
    cfg = ModelConfig(vocab_size=tok.vocab_size, context_length=32, d_model=32, n_layers=1, n_heads=4)
    save_model(tmp_path / "c", _randomised(cfg), tok, hyperparameters={"a": 1})
    assert _tmp_files(tmp_path) == []
    assert sorted(os.listdir(tmp_path / "c")) == sorted([WEIGHTS, CONFIG, "tokenizer.json", "hyperparameters.yaml"])


SAFETENSORS_0600 = ("src bug: safetensors' save_file (0.8) replaces the file it is given with a new one (new "
                    "inode, mode 0600), so fileio.atomic_write's os.chmod(tmp, 0o644) is lost for model.safetensors")


@pytest.mark.parametrize("name", [
    CONFIG, "tokenizer.json", "hyperparameters.yaml",
    WEIGHTS,
])
def test_saved_files_are_readable_by_others(tmp_path, name):
    # atomic_write promises the usual 0644 rather than mkstemp's 0600, so a shared run folder stays readable.
    from llmscratch.tokenizer import BPETokenizer

    tok = BPETokenizer.train(TEXT, 260, progress=False)
    cfg = ModelConfig(vocab_size=tok.vocab_size, context_length=8, d_model=8, n_layers=1, n_heads=2)
    save_model(tmp_path, GPT(cfg), tok, hyperparameters={"a": 1})
    assert (tmp_path / name).stat().st_mode & 0o777 == 0o644


def test_atomic_write_mode_is_0644(tmp_path):
    atomic_write(tmp_path / "f.txt", lambda p: p.write_text("x"))
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o644


# --- atomic_write -------------------------------------------------------------------------------------------
def test_atomic_write_writes_and_cleans_up(tmp_path):
    atomic_write(tmp_path / "sub" / "f.txt", lambda p: p.write_text("hello"))
    assert (tmp_path / "sub" / "f.txt").read_text() == "hello"
    assert os.listdir(tmp_path / "sub") == ["f.txt"]


def test_atomic_write_leaves_nothing_when_the_writer_raises(tmp_path):
    def failing(p: Path):
        p.write_text("half")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        atomic_write(tmp_path / "f.bin", failing)
    assert os.listdir(tmp_path) == []


def test_atomic_write_keeps_the_old_file_when_the_writer_raises(tmp_path):
    (tmp_path / "f.txt").write_text("old")

    def failing(p: Path):
        p.write_text("new but broken")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "f.txt", failing)
    assert (tmp_path / "f.txt").read_text() == "old"
    assert os.listdir(tmp_path) == ["f.txt"]


# --- find_model_folder --------------------------------------------------------------------------------------
def test_find_model_folder_on_a_checkpoint_folder(tmp_path, cfg):
    save_model(tmp_path, _randomised(cfg))
    assert find_model_folder(tmp_path) == tmp_path


def test_find_model_folder_on_a_run_with_only_checkpoints(tmp_path, cfg):
    step = tmp_path / "checkpoints" / "step-0000010"
    save_model(step, _randomised(cfg))
    assert find_model_folder(tmp_path) == step
    idx = torch.randint(0, cfg.vocab_size, (1, 6))
    torch.testing.assert_close(load_model(tmp_path)(idx), load_model(step)(idx))


def test_find_model_folder_picks_the_newest_step(tmp_path, cfg):
    for step in ("step-0000009", "step-0000010", "step-0000100"):
        (tmp_path / "checkpoints" / step).mkdir(parents=True)
    (tmp_path / "checkpoints" / ".step-0000200.abc").mkdir()  # a temp folder mid-write is not a checkpoint
    assert find_model_folder(tmp_path) == tmp_path / "checkpoints" / "step-0000100"


def test_missing_folder_is_not_found(tmp_path):
    with pytest.raises(UserError, match="not found") as err:
        llmscratch.load(tmp_path / "nowhere")
    assert "nowhere" in str(err.value)
    with pytest.raises(UserError, match="not found"):
        load_model(tmp_path / "nowhere")


def test_empty_folder_raises(tmp_path):
    with pytest.raises(UserError) as err:
        load_model(tmp_path)
    assert WEIGHTS in str(err.value) and str(tmp_path) in str(err.value)


def test_a_file_instead_of_a_folder_raises(tmp_path):
    (tmp_path / "model.bin").write_text("x")
    with pytest.raises(UserError, match="expected a checkpoint folder"):
        load_model(tmp_path / "model.bin")


def test_config_without_weights_raises(tmp_path, cfg):
    cfg.save(tmp_path / CONFIG)
    with pytest.raises(UserError, match="missing") as err:
        load_model(tmp_path)
    assert WEIGHTS in str(err.value)


def test_weights_without_config_raises(tmp_path, cfg):
    save_model(tmp_path, _randomised(cfg))
    (tmp_path / CONFIG).unlink()
    with pytest.raises(UserError, match="not found") as err:
        load_model(tmp_path)
    assert CONFIG in str(err.value)


def test_load_without_tokenizer_raises(tmp_path, cfg):
    save_model(tmp_path, _randomised(cfg))
    with pytest.raises(UserError, match="tokenizer"):
        llmscratch.load(tmp_path)


@pytest.mark.parametrize("keep", [0.5, 0.01, 0.0])
def test_truncated_weights_raise_naming_the_file(tmp_path, cfg, keep):
    save_model(tmp_path, _randomised(cfg))
    weights = tmp_path / WEIGHTS
    data = weights.read_bytes()
    weights.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(UserError) as err:
        load_model(tmp_path)
    message = str(err.value)
    assert str(weights) in message and "truncated" in message


def test_garbage_weights_raise(tmp_path, cfg):
    save_model(tmp_path, _randomised(cfg))
    (tmp_path / WEIGHTS).write_bytes(b"\x00" * 64 + b"not a safetensors file" * 10)
    with pytest.raises(UserError, match=WEIGHTS):
        load_model(tmp_path)


def _edit_config(folder: Path, **changes) -> None:
    data = json.loads((folder / CONFIG).read_text())
    data.update(changes)
    (folder / CONFIG).write_text(json.dumps(data))


def test_shape_mismatch_in_d_ff_names_key_and_shapes(tmp_path, cfg):
    save_model(tmp_path, _randomised(cfg))  # d_ff = 128
    _edit_config(tmp_path, d_ff=64)
    with pytest.raises(UserError) as err:
        load_model(tmp_path)
    message = str(err.value)
    assert "blocks.0.mlp.fc.weight" in message
    assert "(128, 32)" in message and "(64, 32)" in message
    assert message.index("blocks.0.mlp.fc.weight") < message.index("blocks.0.mlp.proj.weight")
    assert str(tmp_path / WEIGHTS) in message


def test_shape_mismatch_in_vocab_names_key_and_shapes(tmp_path, cfg):
    save_model(tmp_path, _randomised(cfg))
    _edit_config(tmp_path, vocab_size=100)
    with pytest.raises(UserError) as err:
        load_model(tmp_path)
    message = str(err.value)
    assert "tok_emb.weight" in message and "(97, 32)" in message and "(100, 32)" in message


def test_missing_and_unexpected_tensors(tmp_path, cfg):
    save_model(tmp_path, _randomised(cfg))
    _edit_config(tmp_path, n_layers=3)
    with pytest.raises(UserError, match="missing tensor") as err:
        load_model(tmp_path)
    assert "blocks.2." in str(err.value)

    _edit_config(tmp_path, n_layers=1)
    with pytest.raises(UserError, match="unexpected tensor") as err:
        load_model(tmp_path)
    assert "blocks.1." in str(err.value)

    _edit_config(tmp_path, n_layers=2, tie_embeddings=False)
    with pytest.raises(UserError, match="lm_head.weight"):
        load_model(tmp_path)


def test_check_state_dict_accepts_a_matching_state(cfg):
    from llmscratch.checkpoint import model_state

    model = GPT(cfg)
    check_state_dict(model, model_state(model), "x")
    state = model_state(model)
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(UserError, match="extra.weight"):
        check_state_dict(model, state, "x")


def test_bad_config_json_in_checkpoint(tmp_path, cfg):
    save_model(tmp_path, _randomised(cfg))
    _edit_config(tmp_path, emb_dim=32)
    with pytest.raises(UserError, match="emb_dim"):
        load_model(tmp_path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_or_inf_weights_are_refused_at_load_naming_file_and_tensor(tmp_path, cfg, bad, dtype):
    model = _randomised(cfg).to(dtype)
    with torch.no_grad():
        model.blocks[1].mlp.fc.weight[3, 5] = bad
    save_model(tmp_path, model)
    with pytest.raises(UserError) as err:
        load_model(tmp_path)
    message = str(err.value)
    assert message.startswith(f"{tmp_path / WEIGHTS}: tensor blocks.1.mlp.fc.weight holds NaN/Inf values")
    assert "corrupt or training diverged" in message and "\n" not in message


def test_finite_weights_and_integer_tensors_pass_the_check(tmp_path):
    from llmscratch.checkpoint import check_finite

    check_finite({"w": torch.randn(5, 3), "n": torch.tensor([2**31 - 1]), "empty": torch.zeros(0)}, "x")
    big = torch.zeros((1 << 24) + 7)  # the last slice of a tensor longer than one check slice is checked too
    big[-1] = float("nan")
    with pytest.raises(UserError, match="x: tensor big holds NaN/Inf"):
        check_finite({"big": big}, "x")


# --- file names read from files stay inside their folder (fileio.safe_child) ---------------------------------


@pytest.mark.parametrize("name", ["../outside.bin", "a/../../outside.bin", "/etc/passwd", "..\\outside.bin",
                                  "C:\\x.bin", "C:x.bin", "", ".", "a\0b", 7, None])
def test_safe_child_refuses_names_that_leave_the_folder(tmp_path, name):
    from llmscratch.fileio import safe_child

    with pytest.raises(UserError) as err:
        safe_child(tmp_path, name, tmp_path / "index.json")
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'index.json'}: ") and repr(name) in message and "\n" not in message


def test_safe_child_follows_file_links_but_not_folder_links_out(tmp_path):
    from llmscratch.fileio import safe_child

    folder, elsewhere = tmp_path / "model", tmp_path / "elsewhere"
    (folder / "sub").mkdir(parents=True)
    elsewhere.mkdir()
    (elsewhere / "blob").write_bytes(b"x")
    (folder / "linked.bin").symlink_to(elsewhere / "blob")  # Hugging Face's cache: snapshot files link to blobs
    (folder / "out").symlink_to(elsewhere, target_is_directory=True)
    assert safe_child(folder, "a.bin", "idx") == folder / "a.bin"
    assert safe_child(folder, "sub/./b.bin", "idx") == folder / "sub" / "b.bin"
    assert safe_child(folder, "linked.bin", "idx").read_bytes() == b"x"
    with pytest.raises(UserError, match="idx: file name 'out/blob' leads outside .* through a symlinked folder"):
        safe_child(folder, "out/blob", "idx")


def test_finite_values_whose_sum_overflows_pass_the_check():
    from llmscratch.checkpoint import check_finite

    check_finite({"huge": torch.full((4,), 3e38), "half": torch.full((3,), 60000.0, dtype=torch.float16)}, "x")
    with pytest.raises(UserError, match="x: tensor mixed holds NaN/Inf"):
        check_finite({"mixed": torch.tensor([float("inf"), float("-inf")])}, "x")
