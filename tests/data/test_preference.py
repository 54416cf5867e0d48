"""Preference data: the book's and the {prompt, chosen, rejected} formats, errors naming file and place, token pairs
that share their prompt, and the pair collate (chosen rows first, prompt and padding masked)."""

import json

import pytest
import torch

from llmscratch.data.instruct import IGNORE_INDEX
from llmscratch.data.preference import (
    PreferenceCollate,
    encode_preferences,
    load_preferences,
)
from llmscratch.errors import UserError
from llmscratch.prompts import get_style

BOOK = [{"instruction": "Fix the spelling.", "input": "freind", "output": "friend", "chosen": "It is 'friend'.",
         "rejected": "Obviously 'friend', learn to spell."},
        {"instruction": "Say hello.", "input": "", "output": "Hello!", "chosen": "Hello!", "rejected": "What."}]


@pytest.fixture(scope="module")
def tok():
    from llmscratch.tokenizer import BPETokenizer

    return BPETokenizer.train(["bytes"], 257, progress=False)


def test_book_json_list_and_prompt_jsonl(tmp_path):
    book = tmp_path / "book.json"
    book.write_text(json.dumps(BOOK))
    records = load_preferences(book)
    assert [r["instruction"] for r in records] == ["Fix the spelling.", "Say hello."]
    assert records[0]["input"] == "freind" and records[0]["output"] == "friend"  # extra keys ride along
    assert records[1]["chosen"] == "Hello!" and records[1]["rejected"] == "What."

    plain = tmp_path / "plain.jsonl"
    plain.write_text('{"prompt": "Say hello.", "chosen": "Hello!", "rejected": "What."}\n\n'
                     '{"prompt": "Count to two.", "chosen": "1, 2", "rejected": "no"}\n')
    records = load_preferences(plain)
    assert records[0]["instruction"] == "Say hello." and records[0]["input"] == ""
    assert len(records) == 2
    style = get_style("alpaca")
    assert style.prompt(load_preferences(book)[1]) == style.prompt(records[0])  # same text as an instruction


@pytest.mark.parametrize("name, text, needles", [
    ("a.jsonl", '{"prompt": "x", "chosen": "a", "rejected": "b"}\n{"prompt": "y", "chosen": \n',
     ["a.jsonl:2", "not valid JSON"]),
    ("a.jsonl", '{"prompt": "x", "chosen": "a"}\n', ["a.jsonl:1", "missing key 'rejected'"]),
    ("a.json", json.dumps([BOOK[0], {"instruction": "y", "chosen": 3, "rejected": "b"}]),
     ["record 2", "'chosen' must be a string"]),
    ("a.json", json.dumps([{"question": "y", "chosen": "a", "rejected": "b"}]),
     ["record 1", "no 'instruction' or 'prompt'", "question"]),
    ("a.json", json.dumps([{"instruction": "  ", "chosen": "a", "rejected": "b"}]), ["record 1", "empty prompt"]),
    ("a.json", json.dumps([{"instruction": "x", "input": 5, "chosen": "a", "rejected": "b"}]),
     ["'input' must be a string"]),
    ("a.json", json.dumps({"prompt": "x"}), ["expected a JSON list"]),
    ("a.json", "[]", ["no records"]),
    ("a.jsonl", '["x"]\n', ["a.jsonl:1", "expected a JSON object"]),
])
def test_bad_input_names_file_and_place(tmp_path, name, text, needles):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(UserError) as info:
        load_preferences(path)
    for needle in needles:
        assert needle in str(info.value), str(info.value)


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        load_preferences(tmp_path / "nope.json")


def test_pairs_share_their_prompt_and_end_with_eos(tok):
    style = get_style("alpaca")
    records = [{**r, "input": r["input"]} for r in BOOK]
    pairs, stats = encode_preferences(records, tok, style, max_length=256)
    assert len(pairs) == 2 and "2 pairs" in stats.describe(256)
    for pair, record in zip(pairs, records):
        prompt_ids = tok.encode(style.prompt(record))
        assert pair.chosen.n_prompt == pair.rejected.n_prompt == len(prompt_ids)
        assert pair.chosen.ids[:len(prompt_ids)] == pair.rejected.ids[:len(prompt_ids)] == prompt_ids
        assert pair.chosen.ids[len(prompt_ids):-1] == tok.encode(record["chosen"])
        assert pair.rejected.ids[-1] == pair.chosen.ids[-1] == tok.eos_id
        assert pair.ref_chosen is None


def test_a_prompt_that_fills_the_length_drops_the_whole_pair(tok):
    style = get_style("alpaca")
    long = {"instruction": "x " * 300, "input": "", "chosen": "a", "rejected": "b"}
    pairs, stats = encode_preferences([long, BOOK[1]], tok, style, max_length=200)
    assert len(pairs) == 1 and pairs[0].chosen.ids[-2] == tok.encode("Hello!")[-1]
    assert "1 dropped" in stats.describe(200)


def test_collate_puts_chosen_rows_first_and_masks_prompt_and_padding(tok):
    style = get_style("alpaca")
    pairs, _ = encode_preferences(BOOK, tok, style, max_length=256)
    batch = PreferenceCollate(pad_id=tok.eos_id)(pairs)
    assert batch.x.shape == batch.y.shape and batch.x.shape[0] == 4
    assert batch.ref_chosen is None and batch.ref_rejected is None
    rows = [pairs[0].chosen, pairs[1].chosen, pairs[0].rejected, pairs[1].rejected]
    for i, ex in enumerate(rows):
        n = len(ex.ids) - 1
        assert batch.x[i, :n].tolist() == ex.ids[:-1]
        targets = batch.y[i].tolist()
        assert targets[:ex.n_prompt - 1] == [IGNORE_INDEX] * (ex.n_prompt - 1)
        assert targets[ex.n_prompt - 1:n] == ex.ids[ex.n_prompt:]  # the answer and its end-of-text
        assert targets[n:] == [IGNORE_INDEX] * (batch.y.shape[1] - n)  # padding
    assert batch.n_targets == sum(len(ex.ids) - ex.n_prompt for ex in rows)

    pairs[0].ref_chosen, pairs[0].ref_rejected = -1.5, -2.5
    assert PreferenceCollate(tok.eos_id)(pairs).ref_chosen is None  # only when every pair has them
    pairs[1].ref_chosen, pairs[1].ref_rejected = -3.0, -4.0
    batch = PreferenceCollate(tok.eos_id)(pairs)
    assert torch.equal(batch.ref_chosen, torch.tensor([-1.5, -3.0]))
    assert torch.equal(batch.ref_rejected, torch.tensor([-2.5, -4.0]))


def test_the_books_preference_file(shared_data):
    path = shared_data / "instruction-data-with-preference.json"
    if not path.is_file():
        pytest.skip(f"{path} absent (real data from ../shared/data)")
    records = load_preferences(path)
    assert len(records) == 1100
    assert all(r["chosen"] and r["rejected"] and r["instruction"] for r in records)
