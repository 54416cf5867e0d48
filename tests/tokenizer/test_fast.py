"""The tiktoken-backed tokenizer: same ids as the pure one, lenient decode, clear errors."""

import pytest
import tiktoken
from hypothesis import given, settings
from hypothesis import strategies as st

from llmscratch.errors import UserError
from llmscratch.tokenizer import TiktokenTokenizer


@pytest.fixture(scope="module")
def fast(trained):
    return TiktokenTokenizer(trained.ranks, trained.special_tokens, trained.pattern)


def test_same_ids_as_pure_python(trained, fast, varied_texts):
    assert fast.vocab_size == trained.vocab_size
    assert fast.eos_id == trained.eos_id
    for text in varied_texts:
        for allowed in ("all", "none"):
            assert fast.encode(text, allowed) == trained.encode(text, allowed), (text, allowed)
        assert fast.decode(fast.encode(text)) == text, text


def test_special_tokens_allowed_or_plain_text(fast):
    text = "a<|endoftext|>b"
    assert fast.eos_id in fast.encode(text)
    assert fast.encode(text, allowed_special={"<|endoftext|>"}) == fast.encode(text)
    for plain in ("none", set()):
        ids = fast.encode(text, allowed_special=plain)
        assert fast.eos_id not in ids
        assert fast.decode(ids) == text
    with pytest.raises(UserError, match="<|im_start|>"):
        fast.encode(text, allowed_special={"<|im_start|>"})


def test_decode_never_raises_on_a_split_character(fast):
    snowman = "☃".encode()
    assert fast.decode([snowman[0], snowman[1]]) == "\ufffd"
    assert fast.decode(list(snowman)) == "☃"


def test_decode_rejects_out_of_range_ids(fast):
    with pytest.raises(UserError, match=rf"token id {fast.vocab_size + 5} .*vocab_size {fast.vocab_size}"):
        fast.decode([0, fast.vocab_size + 5])
    with pytest.raises(UserError, match="token id -3"):
        fast.decode([-3])


def test_decode_rejects_ids_in_a_gap_of_the_vocabulary():
    ranks = {bytes([b]): b for b in range(256)}
    tok = TiktokenTokenizer(ranks, {"<|endoftext|>": 300}, r"\S+|\s+")
    assert tok.vocab_size == 301
    assert tok.decode([104, 105, 300]) == "hi<|endoftext|>"
    with pytest.raises(UserError, match="token id 280 belongs to no token"):
        tok.decode([280])


def test_rejects_vocabulary_without_all_bytes():
    with pytest.raises(UserError, match="single-byte tokens are missing"):
        TiktokenTokenizer({b"a": 0}, {}, r"\S+")


def test_from_encoding_wraps_a_tiktoken_encoding(trained, fast):
    wrapped = TiktokenTokenizer.from_encoding(trained.to_tiktoken("mine"))
    assert isinstance(wrapped.encoding, tiktoken.Encoding)
    assert wrapped.ranks == fast.ranks and wrapped.special_tokens == fast.special_tokens
    assert wrapped.encode("from_encoding works") == fast.encode("from_encoding works")


@settings(max_examples=200, deadline=None)
@given(text=st.text())
def test_round_trip_on_arbitrary_unicode(fast, text):
    assert fast.decode(fast.encode(text)) == text
