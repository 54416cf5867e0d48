"""The from-scratch BPE: training bookkeeping against a naive oracle, encode/decode, tiktoken parity."""

from collections import Counter
from itertools import pairwise

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmscratch.errors import UserError
from llmscratch.tokenizer import BPETokenizer
from llmscratch.tokenizer.bpe import count_words, learn_merges

EOT = "<|endoftext|>"


def naive_merges(word_counts: dict[bytes, int], vocab_size: int) -> list[tuple[bytes, bytes]]:
    """Textbook BPE: recount every pair of every word before each merge. Same tie rule as `learn_merges`
    (highest count, then smallest (left bytes, right bytes)); slow but obviously right."""
    tokens = [bytes([b]) for b in range(256)]
    ids = {t: i for i, t in enumerate(tokens)}
    words = [(list(w), n) for w, n in word_counts.items()]
    merges = []
    while len(tokens) < vocab_size:
        counts: Counter = Counter()
        for w, n in words:
            for pair in pairwise(w):
                counts[pair] += n
        if not counts:
            break
        a, b = min(counts, key=lambda p: (-counts[p], tokens[p[0]], tokens[p[1]]))
        merged = tokens[a] + tokens[b]
        if merged not in ids:
            ids[merged] = len(tokens)
            tokens.append(merged)
        new = ids[merged]
        merges.append((tokens[a], tokens[b]))
        rewritten = []
        for w, n in words:
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == (a, b):
                    out.append(new)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            rewritten.append((out, n))
        words = rewritten
    return merges


def test_incremental_training_matches_naive_recount_on_text(corpus):
    counts = count_words(corpus[:6000])
    assert learn_merges(counts, 256 + 150) == naive_merges(counts, 256 + 150)


# Few letters and small counts: many ties, repeated letters ("aaaa": overlapping pairs), words that run out.
_words = st.dictionaries(
    st.text(alphabet="aab", min_size=1, max_size=12).map(str.encode), st.integers(1, 4), max_size=12
)


@settings(max_examples=150, deadline=None)
@given(word_counts=_words, n_merges=st.integers(0, 40))
def test_incremental_training_matches_naive_recount_property(word_counts, n_merges):
    assert learn_merges(word_counts, 256 + n_merges) == naive_merges(word_counts, 256 + n_merges)


def test_trained_vocabulary_layout(trained):
    assert trained.vocab_size == 400
    assert trained.special_tokens == {EOT: 399}
    assert trained.eos_id == 399
    assert len(trained.ranks) == 399
    assert all(trained.ranks[bytes([b])] == b for b in range(256))
    assert sorted(trained.ranks.values()) == list(range(399))
    assert b"<|endoftext|>" not in trained.ranks


def test_training_is_deterministic_and_accepts_an_iterable(corpus):
    half = len(corpus) // 2
    first = BPETokenizer.train(corpus, 320, progress=False)
    assert first.ranks == BPETokenizer.train(corpus, 320, progress=False).ranks
    assert Counter(count_words([corpus[:half], corpus[half:]])) == Counter(
        count_words(corpus[:half])
    ) + Counter(count_words(corpus[half:]))


def test_special_tokens_are_cut_out_of_training_text():
    assert count_words(f"a{EOT}b{EOT}", special_tokens=[EOT]) == {b"a": 1, b"b": 1}


def test_train_stops_when_pairs_run_out():
    tok = BPETokenizer.train("ab ab", 1000, special_tokens=("<|a|>", "<|b|>"), progress=False)
    assert tok.vocab_size == len(tok.ranks) + 2
    assert tok.special_tokens == {"<|a|>": len(tok.ranks), "<|b|>": len(tok.ranks) + 1}
    assert tok.decode(tok.encode("ab ab<|b|>")) == "ab ab<|b|>"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"vocab_size": 200}, "vocab_size=200 is too small"),
        ({"vocab_size": 300, "special_tokens": ("<|x|>", "<|x|>")}, "distinct non-empty"),
        ({"vocab_size": 300, "pattern": "(?P<"}, "not a valid regex"),
    ],
)
def test_train_rejects_bad_arguments(kwargs, message):
    with pytest.raises(UserError, match=message):
        BPETokenizer.train("some text", progress=False, **kwargs)


def test_round_trip_and_tiktoken_parity(trained, trained_tiktoken, varied_texts):
    for text in varied_texts:
        ids = trained.encode(text)
        assert trained.decode(ids) == text, text
        assert ids == trained_tiktoken.encode(text, allowed_special="all"), text
        assert all(0 <= i < trained.vocab_size for i in ids), text


def test_encode_compresses_the_training_text(trained, corpus):
    assert len(trained.encode(corpus)) < 0.6 * len(corpus.encode("utf-8"))


def test_special_tokens_allowed_or_plain_text(trained):
    text = f"end{EOT}start"
    ids = trained.encode(text)
    assert ids.count(trained.eos_id) == 1
    assert trained.encode(text, allowed_special={EOT}) == ids
    for plain in ("none", set()):
        as_text = trained.encode(text, allowed_special=plain)
        assert trained.eos_id not in as_text
        assert trained.decode(as_text) == text
        assert as_text == trained.to_tiktoken().encode_ordinary(text)


def test_allowed_special_rejects_unknown_names(trained):
    with pytest.raises(UserError, match="<|pad|>"):
        trained.encode("x", allowed_special={"<|pad|>"})
    with pytest.raises(UserError, match="allowed_special='some'"):
        trained.encode("x", allowed_special="some")


def test_decode_split_utf8_character_gives_replacement_char(trained):
    euro = "€".encode()  # 3 bytes; byte ids equal byte values in a trained vocabulary
    assert trained.decode([euro[0]]) == "\ufffd"
    assert trained.decode(list(euro)) == "€"


def test_decode_accepts_tensors_and_rejects_bad_ids(trained):
    ids = trained.encode("tensor input")
    assert trained.decode(torch.tensor(ids)) == "tensor input"
    with pytest.raises(UserError, match=rf"token id {trained.vocab_size} .*vocab_size {trained.vocab_size}"):
        trained.decode([1, trained.vocab_size])
    with pytest.raises(UserError, match="token id -1"):
        trained.decode([-1])
    with pytest.raises(UserError, match="1-D"):
        trained.decode(torch.tensor([ids, ids]))


def test_lone_surrogates_encode_like_tiktoken(trained):
    text = "a\ud800b \ud83d\ude00"  # a lone surrogate, then a valid pair spelled as two code units
    assert trained.encode(text) == trained.to_tiktoken().encode(text)
    assert trained.decode(trained.encode(text)) == "a\ufffdb 😀"


@settings(max_examples=200, deadline=None)
@given(text=st.text())
def test_round_trip_and_parity_on_arbitrary_unicode(trained, trained_tiktoken, text):
    ids = trained.encode(text)
    assert trained.decode(ids) == text
    assert ids == trained_tiktoken.encode(text, allowed_special="all")


def test_long_words_take_the_heap_path_with_the_same_ids(trained, trained_tiktoken):
    for text in ("=" * 5000, "ab" * 3000, "😀" * 500, "x" + "-=" * 2000 + " tail", "é" * 1000):
        assert trained.encode(text) == trained_tiktoken.encode(text), text[:20]
        assert trained.decode(trained.encode(text)) == text


@settings(max_examples=100, deadline=None)
@given(text=st.text(alphabet="aabé-=😀", min_size=60, max_size=400))
def test_long_words_match_tiktoken_property(trained, trained_tiktoken, text):
    assert trained.encode(text) == trained_tiktoken.encode(text)
