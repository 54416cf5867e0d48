"""Property tests (hypothesis): tokenizers give back any text they are given and agree id for id, the data readers
give back what the csv and json modules wrote, and malformed input fails as a UserError — never anything else.

Every example count is modest: the whole file runs in seconds.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from llmscratch.data.instruct import load_records
from llmscratch.data.labelled import load_labelled
from llmscratch.errors import UserError
from llmscratch.tokenizer import BPETokenizer, TiktokenTokenizer, gpt2_tokenizer, load_tokenizer

#: OpenAI's encoder.json + vocab.bpe in the `shared` folder beside the repository (absent on most machines).
GPT2_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "gpt2"

# Fixtures are built once per module and each example writes its own file, so hypothesis' check against
# function-scoped fixtures does not apply.
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# --- text strategies ---------------------------------------------------------------------------------------

_UNICODE = st.characters(blacklist_categories=("Cs",))  # any code point a UTF-8 file can hold
_EMOJI = st.sampled_from(["😀", "👍🏽", "👨‍👩‍👧‍👦", "🇫🇷", "❤️", "e\u0301", "\u200b", "🧪", "ﷺ", "\U0010ffff"])
_ODD = st.sampled_from(["\x00", "\t", "\n", "\r\n", " ", "  ", "'s", "<|endoftext|>", "<|endof", "\ufeff", "\\"])
TEXTS = st.one_of(
    st.text(_UNICODE),
    st.lists(st.one_of(_EMOJI, _ODD, st.text(_UNICODE, max_size=5)), max_size=30).map("".join),
    # very long runs take the tokenizers' long-word path
    st.builds(lambda piece, n: piece * n, st.text(_UNICODE, min_size=1, max_size=3), st.integers(200, 2000)),
)


# --- tokenizers --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ours(tiny_corpus):
    """A 400-id BPE trained on real English plus emoji and CJK, its tiktoken-backed twin, and both read back
    from the tokenizer.json the pure one saves."""
    corpus = tiny_corpus.read_text(encoding="utf-8") + " naïve café 😀👍🏽 日本語のテキスト 한국어 \t\n" * 20
    pure = BPETokenizer.train(corpus, vocab_size=400, progress=False)
    return pure, TiktokenTokenizer(pure.ranks, pure.special_tokens, pure.pattern)


@pytest.fixture(scope="module")
def ours_reloaded(ours, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    ours[0].save(folder)
    return load_tokenizer(folder, fast=False), load_tokenizer(folder)


@settings(max_examples=150, **SETTINGS)
@given(text=TEXTS)
def test_bpe_and_its_tiktoken_twin_round_trip_and_agree(ours, text):
    pure, fast = ours
    ids = fast.encode(text)
    assert pure.encode(text) == ids
    assert pure.decode(ids) == fast.decode(ids) == text
    plain = fast.encode(text, allowed_special="none")  # special-token strings as plain text round-trip too
    assert pure.encode(text, allowed_special="none") == plain and fast.decode(plain) == text


@settings(max_examples=60, **SETTINGS)
@given(text=TEXTS)
def test_saved_tokenizer_reloads_with_the_same_ids(ours, ours_reloaded, text):
    ids = ours[0].encode(text)
    assert [tok.encode(text) for tok in ours_reloaded] == [ids, ids]


@pytest.fixture(scope="module")
def gpt2_pair():
    if not (GPT2_DIR / "encoder.json").is_file() or not (GPT2_DIR / "vocab.bpe").is_file():
        pytest.skip(f"GPT-2's encoder.json + vocab.bpe not found in {GPT2_DIR}")
    return BPETokenizer.from_gpt2_files(GPT2_DIR / "encoder.json", GPT2_DIR / "vocab.bpe"), gpt2_tokenizer(GPT2_DIR)


@settings(max_examples=60, **SETTINGS)
@given(text=TEXTS)
def test_gpt2_round_trips_and_both_implementations_agree(gpt2_pair, text):
    pure, fast = gpt2_pair
    ids = fast.encode(text)
    assert pure.encode(text) == ids and all(0 <= i < 50257 for i in ids)
    assert pure.decode(ids) == fast.decode(ids) == text


# --- data readers: what the csv and json modules write is read back ---------------------------------------

# Fields with commas, quotes, tabs, newlines, NUL and any unicode. CRLF is read as LF (documented), so a lone
# "\r" is left out; a text must hold more than whitespace (blank texts are skipped and counted), and a label
# is compared stripped (the reader strips labels).
_FIELD_CHARS = st.one_of(_UNICODE, st.sampled_from([",", '"', "'", "\t", "\n", "\x00", ";", " "]))
CSV_TEXT = st.text(_FIELD_CHARS, min_size=1, max_size=40).filter(lambda t: t.strip() and "\r" not in t)
CSV_LABEL = st.text(_FIELD_CHARS, min_size=1, max_size=8).map(str.strip).filter(lambda t: t and "\r" not in t)
# TSV has no quoting: a field cannot hold a tab or a line break
_TSV_CHARS = _UNICODE.filter(lambda c: c not in "\t\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")
TSV_TEXT = st.text(_TSV_CHARS, min_size=1, max_size=40).filter(str.strip)
TSV_LABEL = st.text(_TSV_CHARS, min_size=1, max_size=8).map(str.strip).filter(bool)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("props")


def _written(folder: Path, name: str, write) -> Path:
    path = folder / name
    with open(path, "w", encoding="utf-8", newline="") as f:
        write(f)
    return path


@settings(max_examples=80, **SETTINGS)
@given(rows=st.lists(st.tuples(CSV_TEXT, CSV_LABEL), min_size=1, max_size=8), text_first=st.booleans(),
       extra=st.booleans())
def test_csv_with_a_header_reads_back_what_csv_wrote(folder, rows, text_first, extra):
    header = ["text", "label"] if text_first else ["label", "text"]
    table = [[t, lab] if text_first else [lab, t] for t, lab in rows]
    if extra:  # a column the reader does not use
        header, table = [*header, "id"], [[*r, str(i)] for i, r in enumerate(table)]
    path = _written(folder, "rows.csv", lambda f: csv.writer(f).writerows([header, *table]))
    examples, skipped = load_labelled(path)
    assert [(ex.text.replace("\r\n", "\n"), ex.label) for ex in examples] == rows and skipped == 0


@settings(max_examples=80, **SETTINGS)
@given(rows=st.lists(st.tuples(TSV_TEXT, TSV_LABEL), min_size=1, max_size=8))
def test_tsv_with_a_header_reads_back_what_was_written(folder, rows):
    path = _written(folder, "rows.tsv", lambda f: f.write("".join(f"{t}\t{lab}\n" for t, lab in
                                                                   [("text", "label"), *rows])))
    examples, _ = load_labelled(path)
    assert [(ex.text, ex.label) for ex in examples] == rows


@settings(max_examples=60, **SETTINGS)
@given(rows=st.lists(st.tuples(TSV_TEXT.map(lambda t: t + "\tand a tab"), st.sampled_from(["ham", "spam"])),
                     min_size=2, max_size=8))
def test_headerless_tsv_keeps_tabs_in_the_text(folder, rows):
    """After the first row: that one decides header or not, so with a third field it is refused as a header
    naming other columns (tests/finetune/test_classify.py), as is a first row whose label no other row has."""
    rows[0] = ("first row, no tab", rows[0][1])
    assume(rows[0][1] in [lab for _, lab in rows[1:]])
    path = _written(folder, "bare.tsv", lambda f: f.write("".join(f"{lab}\t{t}\n" for t, lab in rows)))
    examples, _ = load_labelled(path)
    assert [(ex.text, ex.label) for ex in examples] == rows


@settings(max_examples=60, **SETTINGS)
@given(rows=st.lists(st.tuples(st.text(_UNICODE, min_size=1).filter(str.strip),
                               st.one_of(st.integers(-10**6, 10**6), CSV_LABEL)), min_size=1, max_size=8),
       jsonl=st.booleans())
def test_labelled_json_and_jsonl_read_back_what_json_wrote(folder, rows, jsonl):
    records = [{"text": t, "label": lab} for t, lab in rows]
    if jsonl:
        path = _written(folder, "rows.jsonl", lambda f: f.write("".join(json.dumps(r) + "\n" for r in records)))
    else:
        path = _written(folder, "rows.json", lambda f: json.dump(records, f, ensure_ascii=False))
    examples, _ = load_labelled(path)
    assert [(ex.text, ex.label) for ex in examples] == [(t, str(lab).strip()) for t, lab in rows]


_ANY_TEXT = st.text()  # JSON escapes even lone surrogates, so every str survives json.dumps / json.loads
ALPACA = st.fixed_dictionaries(
    {"instruction": _ANY_TEXT.filter(str.strip), "input": _ANY_TEXT, "output": _ANY_TEXT},
    optional={"id": st.integers(), "family": _ANY_TEXT})


@settings(max_examples=80, **SETTINGS)
@given(records=st.lists(ALPACA, min_size=1, max_size=6), jsonl=st.booleans())
def test_instruction_records_read_back_what_json_wrote(folder, records, jsonl):
    if jsonl:
        path = _written(folder, "data.jsonl", lambda f: f.write("".join(json.dumps(r) + "\n" for r in records)))
    else:
        path = _written(folder, "data.json", lambda f: json.dump(records, f))
    assert load_records(path, progress=False) == records


@settings(max_examples=40, **SETTINGS)
@given(turns=st.lists(st.tuples(_ANY_TEXT.filter(str.strip), _ANY_TEXT), min_size=1, max_size=4),
       system=st.one_of(st.none(), _ANY_TEXT))
def test_chat_messages_become_one_record_per_assistant_turn(folder, turns, system):
    messages = ([{"role": "system", "content": system}] if system is not None else [])
    for user, assistant in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    path = _written(folder, "chat.jsonl", lambda f: f.write(json.dumps({"messages": messages}) + "\n"))
    records = load_records(path, progress=False)
    assert [(r["instruction"], r["output"]) for r in records] == turns
    assert [len(r.get("history", [])) for r in records] == list(range(len(turns)))


# --- malformed input: a UserError of one line, or a successful read, and nothing else -----------------------

_SUFFIXES = (".csv", ".tsv", ".txt", ".jsonl", ".json")


def _user_error_or_success(read) -> None:
    try:
        read()
    except UserError as exc:
        assert "\n" not in str(exc) and str(exc).strip(), repr(str(exc))


@settings(max_examples=120, **SETTINGS)
@given(data=st.binary(max_size=300), suffix=st.sampled_from(_SUFFIXES))
def test_random_bytes_are_read_or_refused_with_a_user_error(folder, data, suffix):
    path = folder / f"random{suffix}"
    path.write_bytes(data)
    _user_error_or_success(lambda: load_labelled(path))
    if suffix in (".json", ".jsonl"):
        _user_error_or_success(lambda: load_records(path, progress=False))


@settings(max_examples=120, **SETTINGS)
@given(records=st.lists(ALPACA, min_size=1, max_size=4), cut=st.floats(0, 1, exclude_max=True),
       suffix=st.sampled_from([".json", ".jsonl"]))
def test_truncated_json_is_read_or_refused_with_a_user_error(folder, records, cut, suffix):
    text = json.dumps(records) if suffix == ".json" else "".join(json.dumps(r) + "\n" for r in records)
    path = folder / f"cut{suffix}"
    path.write_text(text[: int(len(text) * cut)], encoding="utf-8")
    _user_error_or_success(lambda: load_records(path, progress=False))
    labelled = path.with_name(f"cut-labelled{suffix}")
    labelled.write_text(text[: int(len(text) * cut)].replace('"output"', '"label"').replace('"input"', '"text"'),
                        encoding="utf-8")
    _user_error_or_success(lambda: load_labelled(labelled))


@pytest.mark.parametrize("content", ["[" * 100_000, '{"a":' * 50_000, "1" * 5000, '[{"instruction": 1' + "0" * 5000])
@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_json_that_breaks_the_parser_itself_is_a_user_error(folder, content, suffix):
    """Nesting past the recursion limit and integers past Python's 4300-digit limit raise RecursionError and
    ValueError from json.loads, not JSONDecodeError."""
    path = folder / f"deep{suffix}"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match=str(path)):
        load_records(path, progress=False)
    with pytest.raises(UserError, match=str(path)):
        load_labelled(path)
