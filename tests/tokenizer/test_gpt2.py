"""GPT-2's BPE: our file reader and encoder give tiktoken's ids; resolution order; offline failure message."""

import json

import pytest
import tiktoken
import tiktoken.load
from hypothesis import given, settings
from hypothesis import strategies as st

from llmscratch.errors import UserError
from llmscratch.tokenizer import GPT2_PATTERN, BPETokenizer, TiktokenTokenizer, gpt2_tokenizer, load_tokenizer
from llmscratch.tokenizer.gpt2 import gpt2_byte_to_unicode, read_gpt2_files

HELLO = "Hello, world! Is this-- a test?"
HELLO_IDS = [15496, 11, 995, 0, 1148, 428, 438, 257, 1332, 30]


def tiktoken_from_files(folder, monkeypatch, eot_id: int = 50256) -> tiktoken.Encoding:
    """The reference: tiktoken's own loader for GPT-2's files (its path-keyed cache switched off)."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(folder / "vocab.bpe"), encoder_json_file=str(folder / "encoder.json")
    )
    return tiktoken.Encoding(
        "gpt2-files", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={"<|endoftext|>": eot_id}
    )


def write_gpt2_style_files(folder, merges: list[tuple[str, str]], extra: dict | None = None) -> None:
    """A tiny vocabulary in GPT-2's file format: bytes in GPT-2's order, then `merges`, then <|endoftext|>."""
    folder.mkdir(parents=True, exist_ok=True)
    byte_chars = gpt2_byte_to_unicode()
    order = sorted(range(256), key=lambda b: ord(byte_chars[b]))
    encoder = {byte_chars[b]: i for i, b in enumerate(order)}
    for a, b in merges:
        encoder[a + b] = len(encoder)
    encoder["<|endoftext|>"] = len(encoder)
    encoder.update(extra or {})
    (folder / "encoder.json").write_text(json.dumps(encoder), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "vocab.bpe").write_text("\n".join(lines) + "\n", encoding="utf-8")


TINY_MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("#", "#"), ("i", "n"), ("Ġ", "in")]


def test_byte_map_matches_gpt2_rule():
    mapping = gpt2_byte_to_unicode()
    assert len(set(mapping.values())) == 256
    assert mapping[ord("A")] == "A" and mapping[ord(" ")] == "Ġ" and mapping[ord("\n")] == "Ċ"
    # GPT-2's byte ids: printable non-space Latin-1 bytes first, the rest after (tiktoken's derivation).
    printable_first = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    assert sorted(range(256), key=lambda b: ord(mapping[b])) == printable_first + [
        b for b in range(256) if b not in printable_first
    ]


def test_tiny_gpt2_style_files_match_tiktoken_loader(tmp_path, monkeypatch):
    write_gpt2_style_files(tmp_path, TINY_MERGES)
    ranks, special = read_gpt2_files(tmp_path / "encoder.json", tmp_path / "vocab.bpe")
    reference = tiktoken_from_files(tmp_path, monkeypatch, eot_id=262)
    assert special == {"<|endoftext|>": 262}
    text = "## in the thin theme <|endoftext|>\n the"
    assert BPETokenizer(ranks, special).encode(text) == reference.encode(text, allowed_special="all")
    assert gpt2_tokenizer(tmp_path).encode(text) == reference.encode(text, allowed_special="all")


def test_inconsistent_files_are_rejected(tmp_path):
    write_gpt2_style_files(tmp_path, TINY_MERGES)
    lines = (tmp_path / "vocab.bpe").read_text().splitlines()
    lines[1], lines[2] = lines[2], lines[1]
    (tmp_path / "vocab.bpe").write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=r"vocab\.bpe line 2: merge 'h e' should create id 256"):
        read_gpt2_files(tmp_path / "encoder.json", tmp_path / "vocab.bpe")


def test_corrupt_encoder_json_names_the_file(tmp_path):
    write_gpt2_style_files(tmp_path, TINY_MERGES)
    (tmp_path / "encoder.json").write_text("{not json")
    with pytest.raises(UserError, match=r"encoder\.json: not valid JSON"):
        gpt2_tokenizer(tmp_path)


def test_explicit_folder_missing_a_file(tmp_path):
    write_gpt2_style_files(tmp_path, TINY_MERGES)
    (tmp_path / "vocab.bpe").unlink()
    with pytest.raises(UserError, match=r"lacks vocab\.bpe"):
        gpt2_tokenizer(tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        gpt2_tokenizer(tmp_path / "missing")


def test_env_var_folder_is_used_and_checked(tmp_path, monkeypatch):
    write_gpt2_style_files(tmp_path / "good", TINY_MERGES)
    monkeypatch.setenv("LLMSCRATCH_GPT2_DIR", str(tmp_path / "good"))
    monkeypatch.setattr(tiktoken, "get_encoding", _no_network)
    assert gpt2_tokenizer().encode(" the") == [258]
    monkeypatch.chdir(tmp_path)
    assert load_tokenizer("gpt2", fast=False).encode(" the") == [258]
    monkeypatch.setenv("LLMSCRATCH_GPT2_DIR", str(tmp_path / "empty"))
    with pytest.raises(UserError, match="LLMSCRATCH_GPT2_DIR"):
        gpt2_tokenizer()


def _no_network(name):
    raise ConnectionError(f"pretend offline: cannot download {name}")


def test_offline_with_nothing_available_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.delenv("LLMSCRATCH_GPT2_DIR", raising=False)
    monkeypatch.setattr(tiktoken, "get_encoding", _no_network)
    monkeypatch.chdir(tmp_path)  # so a stray ./gpt2 folder cannot be picked up by load_tokenizer("gpt2")
    for resolve in (gpt2_tokenizer, lambda: load_tokenizer("gpt2")):
        with pytest.raises(UserError) as info:
            resolve()
        message = str(info.value)
        assert "\n" not in message
        for hint in ("encoder.json + vocab.bpe", "--tokenizer", "LLMSCRATCH_GPT2_DIR", "TIKTOKEN_CACHE_DIR"):
            assert hint in message


def test_tiktoken_registry_is_used_when_it_works(trained, monkeypatch):
    monkeypatch.delenv("LLMSCRATCH_GPT2_DIR", raising=False)
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: trained.to_tiktoken(name))
    tok = gpt2_tokenizer()
    assert isinstance(tok, TiktokenTokenizer) and tok.encode(HELLO) == trained.encode(HELLO)


# ---- against OpenAI's real files (skipped when ../shared/data/gpt2 is absent) ----


@pytest.fixture(scope="module")
def gpt2_pure(gpt2_dir):
    return BPETokenizer.from_gpt2_files(gpt2_dir / "encoder.json", gpt2_dir / "vocab.bpe")


@pytest.fixture(scope="module")
def gpt2_fast(gpt2_dir):
    return gpt2_tokenizer(gpt2_dir)


def test_gpt2_known_ids(gpt2_pure, gpt2_fast):
    assert gpt2_pure.encode(HELLO) == gpt2_fast.encode(HELLO) == HELLO_IDS
    assert gpt2_pure.vocab_size == gpt2_fast.vocab_size == 50257
    assert gpt2_pure.eos_id == gpt2_fast.eos_id == 50256
    assert gpt2_fast.decode(HELLO_IDS) == HELLO


def test_gpt2_matches_tiktoken_from_files(gpt2_dir, gpt2_pure, gpt2_fast, varied_texts, monkeypatch):
    reference = tiktoken_from_files(gpt2_dir, monkeypatch)
    verdict = gpt2_dir.parent / "the-verdict.txt"
    texts = [*varied_texts, verdict.read_text(encoding="utf-8") if verdict.is_file() else ""]
    for text in texts:
        expected = reference.encode(text, allowed_special="all")
        assert gpt2_pure.encode(text) == expected, text[:80]
        assert gpt2_fast.encode(text) == expected, text[:80]
        assert gpt2_pure.decode(expected) == gpt2_fast.decode(expected) == text


def test_load_tokenizer_reads_a_gpt2_folder(gpt2_dir):
    assert load_tokenizer(gpt2_dir).encode(HELLO) == HELLO_IDS
    assert isinstance(load_tokenizer(gpt2_dir, fast=False), BPETokenizer)


def test_gpt2_save_load_round_trip(gpt2_fast, tmp_path):
    gpt2_fast.save(tmp_path)
    assert load_tokenizer(tmp_path).encode(HELLO) == HELLO_IDS


@settings(max_examples=100, deadline=None)
@given(text=st.text())
def test_gpt2_pure_equals_fast_on_arbitrary_unicode(gpt2_pure, gpt2_fast, text):
    ids = gpt2_fast.encode(text)
    assert gpt2_pure.encode(text) == ids
    assert gpt2_pure.decode(ids) == text


@settings(max_examples=50, deadline=None)
@given(text=st.text(alphabet="aeinrst-=_😀é", min_size=70, max_size=600))
def test_gpt2_long_words_match(gpt2_pure, gpt2_fast, text):
    assert gpt2_pure.encode(text) == gpt2_fast.encode(text)
