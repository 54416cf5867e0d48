"""The labelled-data reader's header rule: a first row naming other columns is refused, not read as a fake class.
(The reader's other behaviour is tested with the classification stage, in tests/finetune/test_classify.py.)"""

from __future__ import annotations

import csv

import pytest

from llmscratch.data.labelled import load_labelled
from llmscratch.errors import UserError

ROWS = [("ham", "see you at 5"), ("spam", "WIN a prize, now"), ("ham", "ok"), ("spam", "free entry")]


def _write(path, header, rows, sep):
    """CSV through the csv module (quoting the commas in ROWS), TSV as plain lines."""
    with open(path, "w", encoding="utf-8", newline="") as f:
        csv.writer(f, delimiter=sep, lineterminator="\n").writerows([header, *rows] if header else rows)
    return path


@pytest.mark.parametrize(("name", "sep", "shown_sep"), [("a.csv", ",", ","), ("a.tsv", "\t", "<TAB>")])
def test_header_with_other_names_is_refused_naming_file_header_and_options(tmp_path, name, sep, shown_sep):
    path = _write(tmp_path / name, ("category", "message"), ROWS, sep)
    with pytest.raises(UserError) as err:
        load_labelled(path)
    message = str(err.value)
    assert message.startswith(f"{path}:1: the first row ('category', 'message') looks like a header")
    assert "--text-column" in message and "--label-column" in message
    assert f"label{shown_sep}text" in message and "\n" not in message


def test_the_same_header_named_with_the_options_reads_every_row(tmp_path):
    path = _write(tmp_path / "a.csv", ("category", "message"), ROWS, ",")
    examples, skipped = load_labelled(path, text_column="message", label_column="category")
    assert [(ex.label, ex.text) for ex in examples] == ROWS and skipped == 0


@pytest.mark.parametrize("rows", [ROWS, ROWS[:2], [("rare", "only one"), ("ham", "a"), ("spam", "b")],
                                  [("a", "x"), ("b", "y"), ("a", "z")]])
def test_headerless_files_still_read_as_label_then_text(tmp_path, rows):
    """The rule fires only where the first row would be the one single-example class among recurring ones."""
    for name, sep in (("h.csv", ","), ("h.tsv", "\t")):
        examples, _ = load_labelled(_write(tmp_path / name, None, rows, sep))
        assert [(ex.label, ex.text) for ex in examples] == rows


def test_a_rare_first_row_of_data_is_read_once_a_header_row_says_so(tmp_path):
    rows = [("rare", "only one"), *ROWS]
    with pytest.raises(UserError, match="looks like a header"):
        load_labelled(_write(tmp_path / "r.tsv", None, rows, "\t"))
    examples, _ = load_labelled(_write(tmp_path / "r.tsv", ("label", "text"), rows, "\t"))
    assert [(ex.label, ex.text) for ex in examples] == rows
