"""Instruction data: both record formats, bad input, the seeded split, truncation and the masking collate."""

import json

import pytest
import torch

from llmscratch.data.instruct import (
    IGNORE_INDEX,
    Example,
    InstructCollate,
    encode_records,
    load_records,
    split_records,
)
from llmscratch.errors import UserError
from llmscratch.prompts import get_style

ALPACA = [{"instruction": "Name a colour.", "input": "", "output": "Blue."},
          {"instruction": "Add.", "input": "2 + 3", "output": "5", "family": "arithmetic"}]


class CharTokenizer:
    """One id per character (ord), eos = 0: makes expected token ids easy to write down."""

    eos_id = 0

    def encode(self, text, allowed_special="all"):
        return [ord(c) for c in text]


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_alpaca_json_list_and_jsonl_agree(tmp_path):
    a = load_records(write(tmp_path / "d.json", json.dumps(ALPACA)))
    b = load_records(write(tmp_path / "d.jsonl", "\n".join(json.dumps(r) for r in ALPACA) + "\n\n"))
    assert a == b
    assert a[1] == {"instruction": "Add.", "input": "2 + 3", "output": "5", "family": "arithmetic"}


def test_missing_input_is_empty(tmp_path):
    (r,) = load_records(write(tmp_path / "d.jsonl", '{"instruction": "Hi", "output": "Hello"}\n'))
    assert r["input"] == ""


def test_messages_one_record_per_assistant_turn(tmp_path):
    conv = {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                         {"role": "user", "content": [{"type": "text", "text": "And 3+3?"}]},
                         {"role": "assistant", "content": "6"}]}
    records = load_records(write(tmp_path / "chat.jsonl", json.dumps(conv) + "\n"))
    assert records == [
        {"instruction": "2+2?", "input": "", "output": "4", "system": "Be brief."},
        {"instruction": "And 3+3?", "input": "", "output": "6", "system": "Be brief.", "history": [["2+2?", "4"]]},
    ]


@pytest.mark.parametrize("name,text,needle", [
    ("bad.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n',
     "bad.jsonl:2: not valid JSON"),
    ("bad.json", '[\n {"instruction": "a", "output": "b"},\n {"instruction" "a"}\n]', "bad.json:3: not valid JSON"),
    ("d.jsonl", '{"instruction": "a"}\n', "d.jsonl:1: missing key 'output'"),
    ("d.jsonl", '{"instruction": "  ", "output": "x"}\n', "d.jsonl:1: empty 'instruction'"),
    ("d.json", '[{"instruction": "a", "output": "b"}, {"output": "c"}]', "record 2: missing key 'instruction'"),
    ("d.json", '[{"instruction": "a", "output": 5}]', "'output' must be a string"),
    ("d.json", '{"instruction": "a", "output": "b"}', "expected a JSON list"),
    ("d.json", '[]', "no records"),
    ("c.jsonl", '{"messages": [{"role": "assistant", "content": "hi"}]}\n', "without a user turn"),
    ("c.jsonl", '{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}\n',
     "two user turns"),
    ("c.jsonl", '{"messages": [{"role": "user", "content": "a"}]}\n', "no assistant turn"),
    ("c.jsonl", '{"messages": [{"role": "bot", "content": "a"}]}\n', "unknown role 'bot'"),
])
def test_bad_input_names_file_and_place(tmp_path, name, text, needle):
    with pytest.raises(UserError, match=None) as exc:
        load_records(write(tmp_path / name, text))
    assert needle in str(exc.value)


def test_missing_file():
    with pytest.raises(UserError, match="no such file"):
        load_records("/nonexistent/data.json")


def test_split_is_seeded_disjoint_and_85_5_10():
    records = list(range(1100))
    train, val, test = split_records(records, seed=123)
    assert (len(train), len(val), len(test)) == (935, 55, 110)  # the book's sizes
    assert sorted(train + val + test) == records
    assert split_records(records, seed=123) == (train, val, test)
    assert split_records(records, seed=1)[0] != train


def test_encode_appends_eos_and_counts_truncation():
    style = get_style("phi3")
    rec = {"instruction": "ab", "input": "", "output": "xyz"}
    prompt, response = style.format(rec)
    (ex,), stats = encode_records([rec], CharTokenizer(), style, max_length=100)
    assert ex.ids == [ord(c) for c in prompt + response] + [0] and ex.n_prompt == len(prompt)
    assert stats.truncated == 0
    # max_length just past the prompt: the answer is cut, but at least one answer token stays
    (ex,), stats = encode_records([rec], CharTokenizer(), style, max_length=len(prompt))
    assert len(ex.ids) == len(prompt) + 1 and stats.truncated == 1 and stats.dropped == 0
    # the prompt alone fills max_length: dropped (its loss would be 0/0), unless the prompt is trained too
    examples, stats = encode_records([rec], CharTokenizer(), style, max_length=len(prompt) - 1)
    assert examples == [] and stats.dropped == 1 and "1 dropped" in stats.describe(len(prompt) - 1)
    examples, stats = encode_records([rec], CharTokenizer(), style, max_length=len(prompt) - 1, mask_prompt=False)
    assert len(examples[0].ids) == len(prompt) and stats.dropped == 0


def test_collate_masks_prompt_and_padding_exactly():
    batch = [Example([10, 11, 12, 13, 14, 0], n_prompt=3), Example([20, 21, 22, 0], n_prompt=2)]
    x, y, n = InstructCollate(pad_id=0)(batch)
    M = IGNORE_INDEX
    assert torch.equal(x, torch.tensor([[10, 11, 12, 13, 14], [20, 21, 22, 0, 0]]))
    # row 0: targets 11, 12 are prompt (masked); 13, 14, eos learned. row 1: 21 prompt; 22, eos; pads masked
    assert torch.equal(y, torch.tensor([[M, M, 13, 14, 0], [M, 22, 0, M, M]]))
    assert n == 5
    x2, y2, n2 = InstructCollate(pad_id=0, mask_prompt=False)(batch)
    assert torch.equal(x2, x)
    assert torch.equal(y2, torch.tensor([[11, 12, 13, 14, 0], [21, 22, 0, M, M]])) and n2 == 8


def test_collate_loss_ignores_masked_targets():
    from llmscratch.config import ModelConfig
    from llmscratch.model import GPT

    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset("gpt-micro", vocab_size=64)).eval()
    x, y, _ = InstructCollate(pad_id=0)([Example([5, 6, 7, 8, 0], 2), Example([9, 10, 0], 1)])
    logits = model(x)
    keep = y != IGNORE_INDEX
    expected = torch.nn.functional.cross_entropy(logits[keep], y[keep])
    torch.testing.assert_close(model(x, targets=y), expected, rtol=1e-5, atol=1e-5)


def test_named_book_data_set_downloads_once_with_its_checksum(tmp_path, monkeypatch):
    import llmscratch.download

    calls = []

    def fake_download(url, dest, sha256, **kw):
        calls.append((url, sha256))
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(json.dumps(ALPACA))
        return dest

    monkeypatch.setattr(llmscratch.download, "download", fake_download)
    assert load_records("book-instructions", progress=False) == load_records(write(tmp_path / "d.json",
                                                                                   json.dumps(ALPACA)))
    (url, sha256), = calls
    assert url.endswith("ch07/01_main-chapter-code/instruction-data.json")
    assert sha256 == "7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944"
