"""OpenAI's TensorFlow checkpoint format, read without TensorFlow: real checkpoints are written by TensorFlow
itself (in a child process, see make_openai_checkpoint.py) from the weights of a transformers GPT-2, and our
reader must give that model's logits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from llmscratch.errors import UserError
from llmscratch.generate import generate_ids
from llmscratch.weights import load_openai_gpt2
from llmscratch.weights.openai_tf import read_index

transformers = pytest.importorskip("transformers", reason="transformers is a test dependency for parity")

CONFIGS = [  # OpenAI's GPT-2 always ties the LM head to the token embedding
    dict(n_layer=2, n_head=4, n_embd=32, n_positions=24),  # vocab: the `prepared` tokenizer's, for the CLI test
    dict(n_layer=3, n_head=2, n_embd=48, n_positions=16, vocab_size=77),
]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, prepared, hf_gpt2, openai_writer):
    """[(transformers model, folder of OpenAI-format files written by TensorFlow)] for each of CONFIGS."""
    from llmscratch.tokenizer import load_tokenizer

    vocab = load_tokenizer(prepared).vocab_size
    made = []
    for n, kw in enumerate(CONFIGS):
        root = tmp_path_factory.mktemp(f"openai{n}")
        made.append((hf_gpt2(root, seed=n, **{"vocab_size": vocab, **kw}), root / "openai"))
    openai_writer(made)
    return made


@pytest.mark.parametrize("n", range(len(CONFIGS)))
def test_tensorflow_checkpoint_gives_transformers_logits_and_tokens(checkpoints, n):
    theirs, folder = checkpoints[n]
    assert {"checkpoint", "model.ckpt.index", "model.ckpt.data-00000-of-00001", "model.ckpt.meta"} <= {
        p.name for p in folder.iterdir()}
    ours, cfg = load_openai_gpt2(folder)
    assert cfg.tie_embeddings and cfg.n_layers == theirs.config.n_layer
    idx = torch.randint(0, cfg.vocab_size, (3, cfg.context_length))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), theirs(idx).logits, atol=1e-5, rtol=1e-5)
    prompt = idx[:1, :5]
    ours_ids = torch.stack(list(generate_ids(ours, prompt, 8)), 1)
    theirs_ids = theirs.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                                 pad_token_id=cfg.vocab_size - 1)[:, 5:]
    assert torch.equal(ours_ids, theirs_ids)


def test_index_lists_every_variable_with_its_shape(checkpoints):
    theirs, folder = checkpoints[1]
    header, entries = read_index(folder / "model.ckpt.index")
    assert header.get(1) == 1  # one data shard
    assert entries["model/h2/mlp/c_fc/w"].shape == (1, 48, 192)
    assert entries["model/wte"].shape == (77, 48) and len(entries) == 4 + 12 * 3


def test_cli_from_openai_then_generate_and_to_hf(checkpoints, prepared, tmp_path, capsys):
    from llmscratch.cli import main
    from llmscratch.tokenizer import load_tokenizer
    from llmscratch.weights.hf_tokenizer import write_gpt2_files

    theirs, folder = checkpoints[0]
    write_gpt2_files(load_tokenizer(prepared), folder, names=("encoder.json", "vocab.bpe"))
    assert main(["convert", "from-openai", str(folder), str(tmp_path / "ours")]) == 0
    assert "converted" in capsys.readouterr().out
    assert main(["generate", str(tmp_path / "ours"), "--prompt", "The", "--max-new-tokens", "4", "--temperature",
                 "0", "--dtype", "fp32"]) == 0
    assert capsys.readouterr().out.startswith("The")
    assert main(["convert", "to-hf", str(tmp_path / "ours"), str(tmp_path / "hf")]) == 0
    back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, theirs.config.vocab_size, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(back(idx).logits, theirs(idx).logits, atol=1e-5, rtol=1e-5)


# --- bad input ------------------------------------------------------------------------------------------------
def _damaged(folder: Path, tmp_path: Path, damage) -> Path:
    copy = tmp_path / "damaged"
    shutil.copytree(folder, copy)
    damage(copy)
    return copy


DATA = "model.ckpt.data-00000-of-00001"


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "hparams.json").unlink(), "hparams.json: missing"),
    (lambda d: (d / "hparams.json").write_text("{\"n_vocab\": 77}"), "missing field 'n_ctx'"),
    (lambda d: (d / "model.ckpt.index").unlink(), "no model.ckpt.index"),
    (lambda d: (d / DATA).unlink(), f"{DATA}: data shard missing"),
    (lambda d: (d / DATA).write_bytes((d / DATA).read_bytes()[:-100]), "truncated"),
    (lambda d: (d / "model.ckpt.index").write_bytes(b"not an index" * 10), "cannot read the checkpoint index"),
    (lambda d: (d / "hparams.json").write_text(json.dumps(
        {**json.loads((d / "hparams.json").read_text()), "n_embd": 64})),
     "model/wte is (77, 48), expected (77, 64)"),
    (lambda d: (d / "hparams.json").write_text(json.dumps(
        {**json.loads((d / "hparams.json").read_text()), "n_layer": 2})),
     "unexpected tensor(s), first: model/h2/attn/c_attn/b"),
])
def test_bad_folders_are_one_line_errors(checkpoints, tmp_path, damage, message):
    folder = _damaged(checkpoints[1][1], tmp_path, damage)
    with pytest.raises(UserError) as info:
        load_openai_gpt2(folder)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_cli_bad_folder_exits_2_and_writes_nothing(checkpoints, prepared, tmp_path, capsys):
    from llmscratch.cli import main

    folder = _damaged(checkpoints[0][1], tmp_path, lambda d: (d / DATA).write_bytes(b"\0" * 10))
    code = main(["convert", "from-openai", str(folder), str(tmp_path / "out"), "--tokenizer", str(prepared)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "truncated" in err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
