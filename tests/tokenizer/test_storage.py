"""tokenizer.json: one format for both classes, atomic writes, and errors that name the file."""

import json

import pytest

from llmscratch.errors import UserError
from llmscratch.tokenizer import BPETokenizer, TiktokenTokenizer, load_tokenizer

SAMPLE = "Saving and loading keeps ids: naïve 😀 <|endoftext|> done.\n\n  x"


@pytest.mark.parametrize("fast_saves", [False, True])
def test_save_load_round_trip_either_class(trained, tmp_path, fast_saves):
    saver = (
        TiktokenTokenizer(trained.ranks, trained.special_tokens, trained.pattern) if fast_saves else trained
    )
    saver.save(tmp_path / "ckpt")
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["tokenizer.json"]  # no temp file left behind

    fast = load_tokenizer(tmp_path / "ckpt")
    pure = load_tokenizer(tmp_path / "ckpt", fast=False)
    assert isinstance(fast, TiktokenTokenizer) and isinstance(pure, BPETokenizer)
    expected = trained.encode(SAMPLE)
    assert fast.encode(SAMPLE) == pure.encode(SAMPLE) == expected
    assert fast.ranks == pure.ranks == trained.ranks
    assert fast.special_tokens == pure.special_tokens == trained.special_tokens
    assert load_tokenizer(tmp_path / "ckpt" / "tokenizer.json").encode(SAMPLE) == expected


def test_file_is_plain_json_with_the_documented_fields(trained, tmp_path):
    trained.save(tmp_path)
    data = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    assert data["format"] == "llmscratch-bpe" and data["version"] == 1
    assert data["pattern"] == trained.pattern
    assert data["special_tokens"] == {"<|endoftext|>": 399}
    assert data["ranks"][32] == ["IA==", 32, " "]
    assert len(data["ranks"]) == len(trained.ranks)


def test_saving_again_replaces_the_file(trained, tmp_path):
    trained.save(tmp_path)
    BPETokenizer.train("tiny text tiny text", 260, progress=False).save(tmp_path)
    assert load_tokenizer(tmp_path).vocab_size == 260


def test_missing_folder(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_tokenizer(tmp_path / "nope")


def test_folder_without_tokenizer_files(tmp_path):
    with pytest.raises(UserError, match=r"neither tokenizer\.json nor GPT-2's encoder\.json"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"format": "llmscratch-bpe", "version": 1, "ranks": [', "not valid JSON"),
        ('{"model": {"type": "BPE"}}', "tokenizer.json: cannot read it"),  # a broken Hugging Face one
        ('{"format": "other", "ranks": []}', "format is 'other', expected 'llmscratch-bpe'"),
        ('{"format": "llmscratch-bpe", "version": 9}', "version 9 is not supported"),
        ('{"format": "llmscratch-bpe", "version": 1, "pattern": "(", "ranks": []}', "not a valid regex"),
        ('{"format": "llmscratch-bpe", "version": 1, "pattern": "x", "ranks": [["@@", 0]]}', r"ranks\[0\]"),
        (
            '{"format": "llmscratch-bpe", "version": 1, "pattern": "x", "ranks": [["AA==", 0]]}',
            "255 of the 256",
        ),
    ],
)
def test_corrupt_tokenizer_json_names_the_file(tmp_path, content, message):
    (tmp_path / "tokenizer.json").write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match=message) as info:
        load_tokenizer(tmp_path)
    assert "tokenizer.json" in str(info.value)
    assert "\n" not in str(info.value)
