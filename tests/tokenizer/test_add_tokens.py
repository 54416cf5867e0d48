"""Growing a vocabulary: special tokens added to each tokenizer kind (our BPE, the tiktoken-backed one, GPT-2's,
a Hugging Face tokenizer.json) keep every old id, and `tokenizer add-tokens` grows a checkpoint's embedding and
LM head (tied and untied, and a vocabulary padded past its tokenizer) with mean rows and unchanged old logits."""

import pytest
import torch
import yaml
from clitools import assert_user_error
from clitools import run as cli

from llmscratch.checkpoint import load, save_model
from llmscratch.config import ModelConfig
from llmscratch.errors import UserError
from llmscratch.generate import generate
from llmscratch.model import GPT
from llmscratch.tokenizer import BPETokenizer, HFTokenizer, TiktokenTokenizer, load_tokenizer

NEW = ["<|user|>", "<|assistant|>"]


def hf_tokenizer_folder(folder, corpus_text):
    """A byte-level BPE tokenizer.json (+ tokenizer_config.json with added_tokens_decoder, as transformers
    writes it) trained by the `tokenizers` library."""
    import json

    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.train_from_iterator([corpus_text], tokenizers.trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    folder.mkdir(parents=True)
    tok.save(str(folder / "tokenizer.json"))
    flags = dict(lstrip=False, normalized=False, rstrip=False, single_word=False, special=True)
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "<|endoftext|>", "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": {"0": dict(flags, content="<|endoftext|>")}}))
    return folder


@pytest.fixture(params=["bpe", "tiktoken", "gpt2", "hf"])
def tokenizer(request, trained, tmp_path, corpus):
    """A fresh tokenizer of each kind (add_special_tokens changes it in place)."""
    if request.param == "bpe":
        return BPETokenizer(trained.ranks, trained.special_tokens, trained.pattern)
    if request.param == "tiktoken":
        return TiktokenTokenizer(trained.ranks, trained.special_tokens, trained.pattern)
    if request.param == "gpt2":
        return load_tokenizer(request.getfixturevalue("gpt2_dir"))
    return HFTokenizer(hf_tokenizer_folder(tmp_path / "hf", corpus))


def test_new_tokens_get_the_next_ids_and_old_ids_stay(tokenizer, varied_texts, tmp_path):
    before = [tokenizer.encode(t) for t in varied_texts]
    size = tokenizer.vocab_size
    assert tokenizer.add_special_tokens(NEW) == [size, size + 1]
    assert tokenizer.vocab_size == size + 2
    assert tokenizer.special_tokens["<|user|>"] == size
    assert [tokenizer.encode(t) for t in varied_texts] == before
    text = "<|user|>Hi there.<|assistant|> Hello!"
    ids = tokenizer.encode(text)
    assert ids[0] == size and size + 1 in ids and ids.count(size) == 1
    assert tokenizer.decode(ids) == text and tokenizer.decode([size + 1]) == "<|assistant|>"

    tokenizer.save(tmp_path / "saved")  # the grown vocabulary is what a checkpoint folder gets
    again = load_tokenizer(tmp_path / "saved")
    assert again.vocab_size == size + 2
    assert again.encode(text) == ids and [again.encode(t) for t in varied_texts] == before


def test_present_tokens_are_not_added_twice(tokenizer):
    size = tokenizer.vocab_size
    eot = tokenizer.token_id("<|endoftext|>")
    assert eot is not None
    ids = tokenizer.add_special_tokens(["<|endoftext|>", "<|x|>", "<|x|>"])
    assert ids == [eot, size, size] and tokenizer.vocab_size == size + 1
    assert tokenizer.add_special_tokens(["<|x|>"]) == [size] and tokenizer.vocab_size == size + 1
    with pytest.raises(UserError, match="non-empty"):
        tokenizer.add_special_tokens([""])


def test_hf_export_keeps_added_tokens_for_transformers(tmp_path, corpus):
    transformers = pytest.importorskip("transformers")
    tok = HFTokenizer(hf_tokenizer_folder(tmp_path / "hf", corpus))
    tok.add_special_tokens(NEW)
    tok.save(tmp_path / "out")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    text = "<|user|>Hi there.<|assistant|> Hello!"
    assert theirs(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    added = theirs.added_tokens_decoder[tok.token_id("<|assistant|>")]
    assert added.content == "<|assistant|>" and added.special
    assert theirs.decode(tok.encode(text), skip_special_tokens=True) == "Hi there. Hello!"


def make_checkpoint(folder, tok, tied, vocab_size=None, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig.from_preset("gpt-micro", vocab_size=vocab_size or tok.vocab_size, tie_embeddings=tied)
    model = GPT(cfg).eval()
    save_model(folder, model, tok, {"model": "gpt-micro"})
    return model


@pytest.mark.parametrize("tied", [True, False])
def test_add_tokens_grows_the_checkpoint(tmp_path, capsys, trained, tied):
    make_checkpoint(tmp_path / "base", trained, tied)
    old, old_tok = load(tmp_path / "base")
    V = old_tok.vocab_size
    code, out, err = cli(["tokenizer", "add-tokens", tmp_path / "base", "--tokens", *NEW, "<|endoftext|>",
                          "--out", tmp_path / "grown"], capsys)
    assert code == 0, err
    assert f"'<|endoftext|>' is already token {old_tok.eos_id}" in out and f"{V} → {V + 2}" in out
    model, tok = load(tmp_path / "grown")
    assert model.config.vocab_size == tok.vocab_size == V + 2
    assert model.config.tie_embeddings == tied and (model.lm_head.weight is model.tok_emb.weight) == tied
    emb, head = model.tok_emb.weight, model.lm_head.weight
    assert torch.equal(emb[:V], old.tok_emb.weight) and torch.equal(head[:V], old.lm_head.weight)
    for rows, old_rows in ((emb, old.tok_emb.weight), (head, old.lm_head.weight)):
        torch.testing.assert_close(rows[V:], old_rows.mean(0).expand(2, -1), rtol=0, atol=0)
    ids = torch.randint(0, V, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[..., :V], old(ids), rtol=0, atol=1e-6)
        model(torch.tensor([[V, 5, V + 1]]))  # the new ids are valid inputs
    hp = yaml.safe_load((tmp_path / "grown" / "hyperparameters.yaml").read_text())
    assert hp["added_tokens"] == {"<|user|>": V, "<|assistant|>": V + 1} and hp["model"] == "gpt-micro"

    if not tied:  # a head row that wins every step: greedy decoding then writes the new token out as text
        with torch.no_grad():
            model.lm_head.weight[V + 1] = 50 * model.norm(model.features(ids)).mean((0, 1))
    reply = generate(model, tok, "<|user|>Hello", max_new_tokens=4)
    assert isinstance(reply, str) and (tied or reply.startswith("<|assistant|>"))


def test_padded_vocabulary_uses_free_rows(tmp_path, capsys, corpus):
    """A Hugging Face tokenizer of 300 ids under a model padded to 320 rows: the new ids 300 and 301 take padding
    rows, which are reset to the mean of the 300 used rows; the matrices keep 320 rows."""
    folder = hf_tokenizer_folder(tmp_path / "hf", corpus)
    make_checkpoint(tmp_path / "base", HFTokenizer(folder), tied=False, vocab_size=320)
    old, _ = load(tmp_path / "base")
    code, out, err = cli(["tokenizer", "add-tokens", tmp_path / "base", "--tokens", *NEW, "--out",
                          tmp_path / "grown"], capsys)
    assert code == 0, err
    model, tok = load(tmp_path / "grown")
    assert isinstance(tok, HFTokenizer) and tok.encode("<|user|>") == [300] and tok.vocab_size == 302
    assert model.config.vocab_size == 320
    for new, before in ((model.tok_emb.weight, old.tok_emb.weight), (model.lm_head.weight, old.lm_head.weight)):
        assert torch.equal(new[:300], before[:300]) and torch.equal(new[302:], before[302:])
        torch.testing.assert_close(new[300:302], before[:300].mean(0).expand(2, -1), rtol=0, atol=0)


def test_nothing_new_and_bad_calls(tmp_path, capsys, trained):
    make_checkpoint(tmp_path / "base", trained, tied=True)
    code, out, _ = cli(["tokenizer", "add-tokens", tmp_path / "base", "--tokens", "<|endoftext|>", "--out",
                        tmp_path / "same"], capsys)
    assert code == 0 and "not added again" in out and "nothing to add" in out
    model, tok = load(tmp_path / "same")
    assert model.config.vocab_size == tok.vocab_size == trained.vocab_size
    code, _, err = cli(["tokenizer", "add-tokens", tmp_path / "base", "--tokens", "<|a|>", "--out",
                        tmp_path / "same"], capsys)
    assert_user_error(code, err, "--out", "not empty")
    code, _, err = cli(["tokenizer", "add-tokens", tmp_path / "nowhere", "--tokens", "<|a|>", "--out",
                        tmp_path / "x"], capsys)
    assert_user_error(code, err, "nowhere", "not found")
    assert not (tmp_path / "x").exists()


def test_resize_vocab_contract():
    from llmscratch.model.resize import resize_vocab

    model = GPT(ModelConfig.from_preset("gpt-micro", vocab_size=40, tie_embeddings=False))
    before = model.tok_emb.weight.detach().clone()
    resize_vocab(model.to(torch.bfloat16), 43, mean_of=30)
    assert model.tok_emb.weight.shape == (43, 64) and model.lm_head.weight.shape == (43, 64)
    assert model.tok_emb.num_embeddings == 43 and model.config.vocab_size == 43
    mean = before.to(torch.bfloat16)[:30].float().mean(0).to(torch.bfloat16)
    assert torch.equal(model.tok_emb.weight[40:], mean.expand(3, -1))
    assert model.tok_emb.weight.requires_grad and model.tok_emb.weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="only grows"):
        resize_vocab(model, 42)
    classifier = GPT(ModelConfig.from_preset("gpt-micro", n_classes=2, tie_embeddings=False))
    with pytest.raises(UserError, match="classifier"):
        resize_vocab(classifier, 600)


def test_the_general_token_lookup_encodes_and_checks_the_round_trip():
    """A Tokenizer without an id table finds a token's id by encoding it: one id that decodes back to the text."""
    from llmscratch.tokenizer.base import Tokenizer

    class Words(Tokenizer):
        words = ["hello", "world", "<|endoftext|>"]

        @property
        def vocab_size(self):
            return len(self.words)

        def encode(self, text, allowed_special="all"):
            return [self.words.index(w) for w in text.split()]

        def decode(self, ids):
            return " ".join(self.words[int(i)] for i in ids)

        def save(self, directory):
            raise AssertionError("not saved here")

    tok = Words()
    assert tok.token_id("world") == 1 and tok.token_id("hello world") is None and tok.token_id("") is None
    assert tok.token_id(" world") is None  # one id, but it decodes to another text
