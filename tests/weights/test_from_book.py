"""`convert from-book`: a model shaped like the book's `GPTModel` (its module and parameter names, written here),
saved with torch.save as chapter 5 does → our checkpoint → equal logits and greedy tokens; bad files refused."""

import collections

import pytest
import torch
from clitools import assert_user_error
from clitools import run as cli
from torch import nn

from llmscratch.checkpoint import load
from llmscratch.generate import generate_ids

VOCAB, CTX, D, HEADS, LAYERS = 300, 48, 64, 4, 2


class BookNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.eps = 1e-5
        self.scale = nn.Parameter(torch.ones(d))
        self.shift = nn.Parameter(torch.zeros(d))

    def forward(self, x):
        mean, var = x.mean(-1, keepdim=True), x.var(-1, keepdim=True, unbiased=False)
        return self.scale * (x - mean) / torch.sqrt(var + self.eps) + self.shift


class BookGELU(nn.Module):
    def forward(self, x):
        return 0.5 * x * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (x + 0.044715 * x**3)))


class BookAttention(nn.Module):
    def __init__(self, d, heads, ctx, qkv_bias):
        super().__init__()
        self.heads, self.hd = heads, d // heads
        self.W_query, self.W_key, self.W_value = (nn.Linear(d, d, bias=qkv_bias) for _ in range(3))
        self.out_proj = nn.Linear(d, d)
        self.register_buffer("mask", torch.triu(torch.ones(ctx, ctx), diagonal=1))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (w(x).view(b, t, self.heads, self.hd).transpose(1, 2) for w in (self.W_query, self.W_key,
                                                                                   self.W_value))
        scores = (q @ k.transpose(2, 3)).masked_fill(self.mask.bool()[:t, :t], -torch.inf)
        weights = torch.softmax(scores / self.hd**0.5, dim=-1)
        return self.out_proj((weights @ v).transpose(1, 2).reshape(b, t, d))


class BookBlock(nn.Module):
    def __init__(self, qkv_bias):
        super().__init__()
        self.att = BookAttention(D, HEADS, CTX, qkv_bias)
        self.ff = nn.Module()
        self.ff.layers = nn.Sequential(nn.Linear(D, 4 * D), BookGELU(), nn.Linear(4 * D, D))
        self.norm1, self.norm2 = BookNorm(D), BookNorm(D)

    def forward(self, x):
        x = x + self.att(self.norm1(x))
        return x + self.ff.layers(self.norm2(x))


class BookGPT(nn.Module):
    def __init__(self, qkv_bias):
        super().__init__()
        self.tok_emb, self.pos_emb = nn.Embedding(VOCAB, D), nn.Embedding(CTX, D)
        self.trf_blocks = nn.Sequential(*(BookBlock(qkv_bias) for _ in range(LAYERS)))
        self.final_norm = BookNorm(D)
        self.out_head = nn.Linear(D, VOCAB, bias=False)

    def forward(self, idx):
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(idx.shape[1]))
        return self.out_head(self.final_norm(self.trf_blocks(x)))


class NotATensor:  # pickled by torch.save as a reference to this module: weights_only must refuse it
    pass


def book_model(qkv_bias, tied=False, seed=0):
    torch.manual_seed(seed)
    model = BookGPT(qkv_bias).eval()
    with torch.no_grad():  # random norms and biases, so a swapped or dropped tensor cannot hide behind its init
        for name, p in model.named_parameters():
            if name.endswith(("scale", "shift", "bias")):
                p.normal_(1.0 if name.endswith("scale") else 0.0, 0.3)
        if tied:
            model.out_head.weight = model.tok_emb.weight
    return model


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, tiny_corpus):
    from llmscratch.tokenizer import BPETokenizer

    folder = tmp_path_factory.mktemp("tok")
    BPETokenizer.train(tiny_corpus.read_text(), VOCAB, progress=False).save(folder)
    return folder


@pytest.mark.parametrize("qkv_bias,tied,wrapped", [(True, False, False), (False, False, True), (False, True, False)])
def test_book_model_converts_with_equal_logits_and_tokens(tmp_path, capsys, tokenizer_dir, qkv_bias, tied, wrapped):
    book = book_model(qkv_bias, tied)
    state = book.state_dict()
    assert "trf_blocks.0.att.mask" in state and ("trf_blocks.0.att.W_query.bias" in state) == qkv_bias
    saved = {"model_state_dict": state, "optimizer_state_dict": torch.optim.AdamW(book.parameters()).state_dict()}
    torch.save(saved if wrapped else state, tmp_path / "model.pth")
    code, out, err = cli(["convert", "from-book", tmp_path / "model.pth", tmp_path / "ours", "--tokenizer",
                          tokenizer_dir, "--heads", HEADS, "--name", "mine"], capsys)
    assert code == 0, err
    assert "converted" in out
    ours, tok = load(tmp_path / "ours")
    assert (ours.config.name, ours.config.qkv_bias, ours.config.tie_embeddings) == ("mine", qkv_bias, tied)
    assert tok.vocab_size == VOCAB
    ids = torch.randint(0, VOCAB, (2, CTX), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), book(ids), atol=1e-5, rtol=1e-5)
    prompt, greedy = ids[:, :5], ids[:, :5]
    with torch.no_grad():
        for _ in range(12):  # the book's generate_text_simple: argmax of the last position, appended
            greedy = torch.cat([greedy, book(greedy)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(torch.stack(list(generate_ids(ours, prompt, 12)), 1), greedy[:, 5:])


def test_heads_inferred_from_the_book_presets(tmp_path):
    from llmscratch.errors import UserError
    from llmscratch.weights.book_gpt import config_from_book

    state = {k: v for k, v in book_model(True).state_dict().items()}
    with pytest.raises(UserError, match="--heads"):  # emb_dim 64 is none of the book's presets
        config_from_book(state, "m.pth")
    state["tok_emb.weight"] = torch.zeros(VOCAB, 768)
    assert config_from_book(state, "m.pth").n_heads == 12
    assert config_from_book(state, "m.pth", heads=6).n_heads == 6


def test_bad_files_are_refused_in_one_line(tmp_path, capsys, tokenizer_dir):
    state = book_model(True).state_dict()
    cases = {
        "object.pth": {"tok_emb.weight": torch.zeros(2), "thing": NotATensor()},  # weights_only refuses it
        "number.pth": {**state, "epoch": 3},  # loads, but is not a state dict of tensors
        "counter.pth": collections.Counter(a=1),
    }
    for name, obj in cases.items():
        torch.save(obj, tmp_path / name)
    (tmp_path / "text.pth").write_text("not a torch file")
    needles = {"object.pth": "weights_only", "number.pth": "not a state dict of tensors",
               "counter.pth": "not a state dict of tensors", "text.pth": "not a file torch.save wrote"}
    for name, needle in needles.items():
        code, _, err = cli(["convert", "from-book", tmp_path / name, tmp_path / f"out-{name}", "--tokenizer",
                            tokenizer_dir, "--heads", HEADS], capsys)
        assert_user_error(code, err, str(tmp_path / name), needle)
        assert not (tmp_path / f"out-{name}").exists()

    broken = dict(state)
    del broken["trf_blocks.1.att.W_key.weight"], broken["trf_blocks.0.ff.layers.2.bias"]
    broken["trf_blocks.1.att.extra.weight"] = torch.zeros(1)
    torch.save(broken, tmp_path / "broken.pth")
    code, _, err = cli(["convert", "from-book", tmp_path / "broken.pth", tmp_path / "out", "--tokenizer",
                        tokenizer_dir, "--heads", HEADS], capsys)
    assert_user_error(code, err, "2 missing tensor(s)", "trf_blocks.1.att.W_key.weight",
                      "trf_blocks.0.ff.layers.2.bias", "1 unexpected tensor(s), first: trf_blocks.1.att.extra.weight")
    not_book = {"wte.weight": torch.zeros(VOCAB, D)}
    torch.save(not_book, tmp_path / "hf.pth")
    code, _, err = cli(["convert", "from-book", tmp_path / "hf.pth", tmp_path / "out", "--tokenizer", tokenizer_dir],
                       capsys)
    assert_user_error(code, err, "tok_emb.weight", "not the book's GPTModel")
