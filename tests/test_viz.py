"""llmscratch.viz and `llmscratch inspect`: the attention weights drawn are the ones the layer uses, and the
pictures are written as PNG, with bad requests refused in one line."""

import pytest
import torch
from clitools import assert_user_error, run

from llmscratch import GPT, ModelConfig
from llmscratch.checkpoint import save_model
from llmscratch.tokenizer import BPETokenizer
from llmscratch.viz import attention_maps, embedding_projection, plot_attention

TEXT = "the cat sat on the mat and the dog sat on the log"


@pytest.fixture(scope="module")
def tok():
    return BPETokenizer.train([TEXT * 3], 300, progress=False)


@pytest.mark.parametrize("preset", ["gpt-micro", "llama-micro", "qwen3-micro"])
def test_attention_weights_are_the_ones_the_layer_applies(preset, tok):
    """weights @ V, through the output projection, reproduces the layer's own output (SDPA's path)."""
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset(preset, vocab_size=tok.vocab_size)).eval()
    tokens, weights = attention_maps(model, tok, TEXT)
    L, H, T = model.config.n_layers, model.config.n_heads, len(tokens)
    assert weights.shape == (L, H, T, T)
    torch.testing.assert_close(weights.sum(-1), torch.ones(L, H, T))
    assert torch.all(weights.triu(1) == 0)  # causal: no token reads a later one
    attn, captured = model.blocks[1].attn, {}
    hook = attn.register_forward_pre_hook(lambda m, args: captured.setdefault("args", args))
    with torch.no_grad():
        model(torch.tensor([tok.encode(TEXT)]))
        hook.remove()
        x, _, rope = captured["args"]
        _, _, v = attn._heads(x, rope)
        v = v.repeat_interleave(attn.n_heads // attn.n_kv_heads, dim=1)
        mixed = (weights[1].unsqueeze(0) @ v).transpose(1, 2).reshape(1, T, -1)
        torch.testing.assert_close(attn.proj(mixed), attn(x, None, rope), atol=1e-5, rtol=1e-5)


def test_embedding_projection_places_words_and_vocabulary(tok):
    model = GPT(ModelConfig.from_preset("gpt-micro", vocab_size=tok.vocab_size))
    labels, coords = embedding_projection(model, tok, ["cat", "dog", "mat"])
    assert labels == ["cat", "dog", "mat"] and coords.shape == (3, 2)
    labels, coords = embedding_projection(model, tok, n=10)
    assert 2 <= len(labels) <= 10 and coords.shape == (len(labels), 2)
    with pytest.raises(Exception, match="layers"):
        plot_attention(["a"], torch.ones(2, 2, 1, 1), layers=[5])


def test_inspect_cli_writes_pngs_and_refuses_bad_requests(tok, tmp_path, capsys):
    ckpt = save_model(tmp_path / "m", GPT(ModelConfig.from_preset("gpt-micro", vocab_size=tok.vocab_size)), tok)
    out = tmp_path / "attn.png"
    code, stdout, err = run(["inspect", "attention", ckpt, "--prompt", TEXT, "--out", out, "--layers", "0",
                             "--heads", "0,1"], capsys)
    assert code == 0, err
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "1 layer(s) × 2 head(s)" in stdout
    code, _, err = run(["inspect", "embeddings", ckpt, "--out", tmp_path / "emb.png", "--words", "cat,dog"], capsys)
    assert code == 0, err
    assert (tmp_path / "emb.png").read_bytes()[:4] == b"\x89PNG"
    for argv, needle in ((["attention", ckpt, "--prompt", TEXT, "--out", tmp_path / "a.png", "--layers", "7"],
                          "--layers 7: the model has layers 0..1"),
                         (["attention", ckpt, "--prompt", TEXT, "--out", tmp_path / "a.jpg"], "ending in .png"),
                         (["attention", ckpt, "--prompt", "", "--out", tmp_path / "a.png"], "empty"),
                         (["attention", ckpt, "--prompt", TEXT, "--out", tmp_path / "a.png", "--heads", "x"],
                          "--heads x"),
                         (["embeddings", tmp_path / "nowhere", "--out", tmp_path / "e2.png"], "not found")):
        code, _, err = run(["inspect", *argv], capsys)
        assert_user_error(code, err, needle)
    assert not (tmp_path / "a.png").exists() and not (tmp_path / "e2.png").exists()
