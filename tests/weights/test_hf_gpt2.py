"""Parity with Hugging Face transformers: their GPT2LMHeadModel → our converter → equal logits, and back."""

import json

import pytest
import torch
from clitools import assert_hf_cli_round_trip
from clitools import run as _cli

from llmscratch.errors import UserError
from llmscratch.generate import generate_ids
from llmscratch.weights import export_hf_gpt2, load_hf_gpt2

transformers = pytest.importorskip("transformers", reason="transformers is a test dependency for parity")

CONFIGS = [  # vary layers, heads, width, vocab, context, tying
    dict(n_layer=2, n_head=4, n_embd=32, vocab_size=101, n_positions=24, tie_word_embeddings=True),
    dict(n_layer=3, n_head=2, n_embd=48, vocab_size=257, n_positions=40, tie_word_embeddings=False),
    dict(n_layer=1, n_head=8, n_embd=64, vocab_size=77, n_positions=16, tie_word_embeddings=True, n_inner=96),
]


@pytest.mark.parametrize("kw", CONFIGS)
def test_logits_and_greedy_tokens_equal_transformers(hf_gpt2, tmp_path, kw):
    theirs = hf_gpt2(tmp_path, **kw)
    ours, cfg = load_hf_gpt2(tmp_path / "hf")
    assert cfg.tie_embeddings == kw["tie_word_embeddings"]
    idx = torch.randint(0, kw["vocab_size"], (3, kw["n_positions"]))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), theirs(idx).logits, atol=1e-5, rtol=1e-5)
    prompt = idx[:1, :5]
    ours_ids = torch.stack(list(generate_ids(ours, prompt, 8)), 1)
    theirs_ids = theirs.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                                 pad_token_id=kw["vocab_size"] - 1)[:, 5:]
    assert torch.equal(ours_ids, theirs_ids)


@pytest.mark.parametrize("kw", CONFIGS)
def test_export_round_trip_through_transformers(hf_gpt2, tmp_path, kw):
    hf_gpt2(tmp_path, **kw)
    ours, _ = load_hf_gpt2(tmp_path / "hf")
    export_hf_gpt2(ours, tmp_path / "export")
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "export").eval()
    idx = torch.randint(0, kw["vocab_size"], (2, kw["n_positions"]))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(idx).logits, ours(idx), atol=1e-5, rtol=1e-5)


def test_sharded_and_unprefixed_keys(hf_gpt2, tmp_path):
    """A sharded index and keys without the "transformer." prefix (OpenAI's upload) load the same."""
    from safetensors.torch import load_file, save_file

    kw = CONFIGS[0]
    hf_gpt2(tmp_path, **kw)
    tensors = load_file(str(tmp_path / "hf" / "model.safetensors"))
    names = sorted(tensors)
    shard_dir = tmp_path / "sharded"
    shard_dir.mkdir()
    (shard_dir / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    halves = {"a.safetensors": names[: len(names) // 2], "b.safetensors": names[len(names) // 2:]}
    weight_map = {}
    for shard, keys in halves.items():
        save_file({k.removeprefix("transformer."): tensors[k] for k in keys}, str(shard_dir / shard))
        weight_map.update({k.removeprefix("transformer."): shard for k in keys})
    (shard_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    a, _ = load_hf_gpt2(tmp_path / "hf")
    b, _ = load_hf_gpt2(shard_dir)
    idx = torch.randint(0, kw["vocab_size"], (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(a(idx), b(idx))


def test_bad_folders(hf_gpt2, tmp_path):
    with pytest.raises(UserError, match="config.json"):
        load_hf_gpt2(tmp_path)
    hf_gpt2(tmp_path, **CONFIGS[0])
    cfg_path = tmp_path / "hf" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["n_embd"] = 64
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="do not fit"):
        load_hf_gpt2(tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"truncated")
    with pytest.raises(UserError, match="cannot read"):
        load_hf_gpt2(tmp_path / "hf")


# --- CLI --------------------------------------------------------------------------------------------------
def test_cli_convert_from_hf_generate_and_back(hf_gpt2, tmp_path, prepared, capsys):
    from llmscratch.tokenizer import load_tokenizer

    vocab = load_tokenizer(prepared).vocab_size
    theirs = hf_gpt2(tmp_path, n_layer=2, n_head=2, n_embd=32, vocab_size=vocab, n_positions=32)
    assert_hf_cli_round_trip(theirs, tmp_path, prepared, capsys)


def test_cli_convert_without_tokenizer_is_a_user_error(hf_gpt2, tmp_path, capsys):
    hf_gpt2(tmp_path, **CONFIGS[0])
    capsys.readouterr()  # transformers' own progress bars
    code, _, err = _cli(["convert", "from-hf", tmp_path / "hf", tmp_path / "ours"], capsys)
    assert code == 2 and "vocab.json" in err and err.count("\n") == 1
    assert not (tmp_path / "ours").exists()


def test_cli_convert_reads_hf_gpt2_tokenizer_files(hf_gpt2, tmp_path, capsys, shared_data):
    """HF's vocab.json + merges.txt are OpenAI's encoder.json + vocab.bpe: GPT-2 ids come out of the folder."""
    gpt2 = shared_data / "gpt2"
    if not (gpt2 / "encoder.json").is_file():
        pytest.skip(f"GPT-2's BPE files not found in {gpt2}")
    hf_gpt2(tmp_path, n_layer=1, n_head=2, n_embd=16, vocab_size=50257, n_positions=16)
    (tmp_path / "hf" / "vocab.json").write_bytes((gpt2 / "encoder.json").read_bytes())
    (tmp_path / "hf" / "merges.txt").write_bytes((gpt2 / "vocab.bpe").read_bytes())
    code, _, err = _cli(["convert", "from-hf", tmp_path / "hf", tmp_path / "ours"], capsys)
    assert code == 0, err
    from llmscratch.tokenizer import load_tokenizer

    tok = load_tokenizer(tmp_path / "ours")
    assert tok.encode("Hello, world! Is this-- a test?") == [15496, 11, 995, 0, 1148, 428, 438, 257, 1332, 30]
    code, out, err = _cli(["generate", tmp_path / "ours", "--prompt", "Hello, world!", "--max-new-tokens", 4,
                           "--temperature", 0, "--dtype", "fp32"], capsys)  # GPT-2's BPE through the CLI
    assert code == 0 and out.startswith("Hello, world!"), err


def test_pytorch_model_bin_is_read_with_weights_only(hf_gpt2, tmp_path):
    theirs = hf_gpt2(tmp_path, **CONFIGS[1])
    # transformers 5 only writes safetensors; older releases wrote this pickle-based file (a plain state dict)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    torch.save(theirs.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    ours, _ = load_hf_gpt2(tmp_path / "bin")
    idx = torch.randint(0, CONFIGS[1]["vocab_size"], (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), theirs(idx).logits, atol=1e-5, rtol=1e-5)


def test_shape_problems_name_both_shapes_and_unexpected_tensors(hf_gpt2, tmp_path):
    hf_gpt2(tmp_path, **CONFIGS[1])  # 3 layers, untied
    cfg_path = tmp_path / "hf" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(n_layer=2, vocab_size=250)
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(UserError) as info:
        load_hf_gpt2(tmp_path / "hf")
    message = str(info.value)
    assert "\n" not in message
    assert "wte.weight is (257, 48), expected (250, 48)" in message
    assert "unexpected tensor(s), first: h.2.attn.c_attn.bias" in message


# --- export with the tokenizer ------------------------------------------------------------------------------
SAMPLE = "Hello, world! It's 2024 -- the module's __init__ ran   twice.\n\nÜnïcödé 日本語 <|endoftext|> end"


def _to_hf(model, tokenizer, tmp_path, name="ckpt"):
    from llmscratch.checkpoint import save_model
    from llmscratch.weights.convert import to_hf

    save_model(tmp_path / name, model, tokenizer)
    return to_hf(tmp_path / name, tmp_path / f"{name}-hf")


def test_to_hf_writes_a_tokenizer_transformers_loads_with_our_ids(tmp_path, prepared):
    from llmscratch.config import ModelConfig
    from llmscratch.model import GPT
    from llmscratch.tokenizer import load_tokenizer

    tok = load_tokenizer(prepared)  # a byte-level BPE trained from scratch, GPT-2's regex
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, context_length=32, d_model=32, n_layers=1, n_heads=2))
    note = _to_hf(model, tok, tmp_path)
    assert "vocab.json + merges.txt" in note
    out = tmp_path / "ckpt-hf"
    assert {"vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"} <= {
        p.name for p in out.iterdir()}
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    assert theirs.encode(SAMPLE) == tok.encode(SAMPLE)
    assert theirs.eos_token == "<|endoftext|>" and theirs.eos_token_id == tok.special_tokens["<|endoftext|>"]
    assert transformers.GPT2LMHeadModel.from_pretrained(out).config.eos_token_id == theirs.eos_token_id


def test_to_hf_gpt2_tokenizer_files_equal_openai_files(tmp_path, shared_data):
    """GPT-2's own ranks → merges.txt identical to OpenAI's vocab.bpe, and transformers' ids equal tiktoken's."""
    gpt2 = shared_data / "gpt2"
    if not (gpt2 / "encoder.json").is_file():
        pytest.skip(f"GPT-2's BPE files not found in {gpt2}")
    from llmscratch.config import ModelConfig
    from llmscratch.model import GPT
    from llmscratch.tokenizer import gpt2_tokenizer

    tok = gpt2_tokenizer(gpt2)
    _to_hf(GPT(ModelConfig(context_length=16, d_model=16, n_layers=1, n_heads=2)), tok, tmp_path)
    out = tmp_path / "ckpt-hf"
    original = [line for line in (gpt2 / "vocab.bpe").read_text(encoding="utf-8").splitlines()[1:] if line]
    assert (out / "merges.txt").read_text(encoding="utf-8").splitlines()[1:] == original
    assert json.loads((out / "vocab.json").read_text(encoding="utf-8")) == json.loads(
        (gpt2 / "encoder.json").read_text(encoding="utf-8"))
    assert transformers.AutoTokenizer.from_pretrained(out).encode(SAMPLE) == tok.encode(SAMPLE)


def test_to_hf_without_a_gpt2_style_tokenizer_writes_weights_only(tmp_path):
    from llmscratch.config import ModelConfig
    from llmscratch.model import GPT
    from llmscratch.tokenizer import BPETokenizer

    tok = BPETokenizer.train("aaa bbb aaa ccc " * 50, 270, pattern=r"\S+|\s+", progress=False)
    note = _to_hf(GPT(ModelConfig(vocab_size=270, context_length=8, d_model=16, n_layers=1, n_heads=2)), tok,
                  tmp_path)
    assert note.startswith("weights only") and "regex" in note
    assert {p.name for p in (tmp_path / "ckpt-hf").iterdir()} == {"model.safetensors", "config.json"}


def test_to_hf_refuses_a_classifier_and_a_used_folder(tmp_path, capsys):
    from llmscratch.checkpoint import save_model
    from llmscratch.config import ModelConfig
    from llmscratch.model import GPT

    cfg = ModelConfig(vocab_size=50, context_length=8, d_model=16, n_layers=1, n_heads=2, n_classes=2,
                      tie_embeddings=False)
    save_model(tmp_path / "clf", GPT(cfg))
    code, _, err = _cli(["convert", "to-hf", tmp_path / "clf", tmp_path / "clf-hf"], capsys)
    assert code == 2 and "classifier (n_classes=2)" in err and err.count("\n") == 1
    assert not (tmp_path / "clf-hf").exists()
    save_model(tmp_path / "lm", GPT(cfg.replace(n_classes=None)))
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "keep.txt").write_text("mine")
    code, _, err = _cli(["convert", "to-hf", tmp_path / "lm", tmp_path / "used"], capsys)
    assert code == 2 and "not empty" in err
    assert [p.name for p in (tmp_path / "used").iterdir()] == ["keep.txt"]


# --- untrusted contents: shard names, pickles, NaN ---------------------------------------------------------
def _sharded_copy(tmp_path, shard_name: str):
    """tmp_path/sharded: the config of tmp_path/hf and an index that puts every tensor in `shard_name`."""
    from safetensors.torch import load_file

    folder = tmp_path / "sharded"
    folder.mkdir()
    (folder / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    names = load_file(str(tmp_path / "hf" / "model.safetensors"))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": dict.fromkeys(names,
                                                                                                  shard_name)}))
    return folder


@pytest.mark.parametrize("shard", ["../hf/model.safetensors", "/etc/passwd", "sub/../../hf/model.safetensors"])
def test_shard_names_outside_the_folder_are_refused(hf_gpt2, tmp_path, shard):
    hf_gpt2(tmp_path, **CONFIGS[0])
    folder = _sharded_copy(tmp_path, shard)
    with pytest.raises(UserError) as err:
        load_hf_gpt2(folder)
    message = str(err.value)
    assert message.startswith(f"{folder / 'model.safetensors.index.json'}: file name {shard!r} points outside")
    assert "\n" not in message


def test_shard_reached_through_a_symlinked_folder_is_refused_but_a_symlinked_file_is_read(hf_gpt2, tmp_path):
    hf_gpt2(tmp_path, **CONFIGS[0])
    folder = _sharded_copy(tmp_path, "link/model.safetensors")
    (folder / "link").symlink_to(tmp_path / "hf", target_is_directory=True)
    with pytest.raises(UserError, match="'link/model.safetensors' leads outside .* through a symlinked folder"):
        load_hf_gpt2(folder)
    # Hugging Face's own cache links each file of a snapshot to ../../blobs/<hash>: that must keep working
    (folder / "link").unlink()
    (folder / "model.safetensors.index.json").unlink()
    folder.rename(tmp_path / "snapshot")
    folder = _sharded_copy(tmp_path, "model-00001-of-00001.safetensors")
    (folder / "model-00001-of-00001.safetensors").symlink_to(tmp_path / "hf" / "model.safetensors")
    a, _ = load_hf_gpt2(tmp_path / "hf")
    b, _ = load_hf_gpt2(folder)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_index_that_is_not_a_weight_map_is_a_user_error(hf_gpt2, tmp_path):
    hf_gpt2(tmp_path, **CONFIGS[0])
    folder = _sharded_copy(tmp_path, "a.safetensors")
    index = folder / "model.safetensors.index.json"
    for content, needle in (("{oops", "not valid JSON"), ('{"weight_map": []}', "no \"weight_map\" object"),
                            ('{"weight_map": {"w": 3}}', "3 is not a file name")):
        index.write_text(content)
        with pytest.raises(UserError, match=needle) as err:
            load_hf_gpt2(folder)
        assert str(err.value).startswith(str(index)) and "\n" not in str(err.value)


class _NotATensor:
    pass


def test_pytorch_model_bin_with_other_pickled_objects_is_one_line(hf_gpt2, tmp_path):
    theirs = hf_gpt2(tmp_path, **CONFIGS[0])
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    state = dict(theirs.state_dict())
    state["extra"] = _NotATensor()
    torch.save(state, tmp_path / "bin" / "pytorch_model.bin")
    with pytest.raises(UserError) as err:
        load_hf_gpt2(tmp_path / "bin")
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'bin' / 'pytorch_model.bin'}: refused by torch.load(weights_only=True)")
    assert "model.safetensors" in message and "\n" not in message
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(UserError, match="pytorch_model.bin: empty or truncated"):
        load_hf_gpt2(tmp_path / "bin")


def test_nan_in_a_hf_safetensors_file_names_the_file_and_tensor(hf_gpt2, tmp_path):
    from safetensors.torch import load_file, save_file

    hf_gpt2(tmp_path, **CONFIGS[0])
    weights = tmp_path / "hf" / "model.safetensors"
    tensors = load_file(str(weights))
    name = next(k for k in sorted(tensors) if k.endswith("mlp.c_fc.weight"))
    tensors[name][0, 0] = float("nan")
    save_file(tensors, str(weights))
    with pytest.raises(UserError) as err:
        load_hf_gpt2(tmp_path / "hf")
    assert str(err.value).startswith(f"{weights}: tensor {name} holds NaN/Inf values")
