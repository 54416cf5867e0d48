"""Synthetic instruction tasks: every answer recomputed independently from the question text, and the test split
held out (no test word in any training record of the word families, no test operands in training)."""

import re
from collections import Counter

import pytest

from llmscratch.data.synth import ALL_FAMILIES, FAMILIES, synth_instructions
from llmscratch.errors import UserError

FACTORS = {("kilometers", "meters"): 1000, ("meters", "centimeters"): 100, ("centimeters", "millimeters"): 10,
           ("kilograms", "grams"): 1000, ("liters", "milliliters"): 1000}


def solve(r: dict) -> str:
    """An independent solver that reads only the instruction and input text."""
    fam, text, inp = r["family"], r["instruction"], r["input"]
    if fam in ("arithmetic", "long_arithmetic"):
        a, op, b = re.fullmatch(r"What is (\d+) ([+-]) (\d+)\?", text).groups()
        return str(int(a) + int(b) if op == "+" else int(a) - int(b))
    if fam == "comparison":
        kind, a, b = re.fullmatch(r"Which number is (larger|smaller), (\d+) or (\d+)\?", text).groups()
        return str((max if kind == "larger" else min)(int(a), int(b)))
    if fam == "unit_conversion":
        n, src, dst = re.fullmatch(r"Convert (\d+) (\w+) to (\w+)\.", text).groups()
        if (src, dst) in FACTORS:
            return str(int(n) * FACTORS[src, dst])
        factor = FACTORS[dst, src]
        assert int(n) % factor == 0
        return str(int(n) // factor)
    words = inp.split(" ")
    if fam == "word_reversal":
        return " ".join(words[::-1])
    if fam == "spelling":
        return " ".join(list(inp))
    if fam == "sorting":
        return ", ".join(str(n) for n in sorted(int(x) for x in inp.split(", ")))
    if fam == "capitalization":
        return " ".join(w.capitalize() for w in words)
    if fam == "counting":
        return str(len(words))
    if fam == "first_letter":
        return inp[:1]
    if fam == "last_word":
        return words[-1]
    if fam == "repeat_word":
        return " ".join([inp] * 3)
    raise AssertionError(fam)


@pytest.fixture(scope="module")
def data():
    return synth_instructions(n_train=300, n_test=40, families=list(ALL_FAMILIES), seed=7)


def test_every_answer_is_correct(data):
    train, test = data
    for r in train + test:
        assert r["output"] == solve(r), r


def test_sizes_families_and_distinct_test_items(data):
    train, test = data
    assert Counter(r["family"] for r in train) == {f: 300 for f in ALL_FAMILIES}
    assert Counter(r["family"] for r in test) == {f: 40 for f in ALL_FAMILIES}
    keys = [(r["instruction"], r["input"]) for r in test]
    assert len(set(keys)) == len(keys)


def test_test_split_is_held_out(data):
    train, test = data
    word_fams = {"word_reversal", "spelling", "capitalization", "counting", "first_letter", "last_word", "repeat_word"}
    train_words = {w for r in train if r["family"] in word_fams for w in r["input"].split()}
    test_words = {w for r in test if r["family"] in word_fams for w in r["input"].split()}
    assert test_words and not test_words & train_words  # the model never saw a test word in training

    def arithmetic_fact(r):
        a, op, b = re.fullmatch(r"What is (\d+) ([+-]) (\d+)\?", r["instruction"]).groups()
        return (op, *sorted((int(a), int(b)))) if op == "+" else (op, int(a), int(b))

    def pair(r):
        kind, a, b = re.fullmatch(r"Which number is (larger|smaller), (\d+) or (\d+)\?", r["instruction"]).groups()
        return kind, *sorted((int(a), int(b)))

    def conversion(r):
        n, src, dst = re.fullmatch(r"Convert (\d+) (\w+) to (\w+)\.", r["instruction"]).groups()
        return src, dst, int(n)

    def number_set(r):
        return tuple(sorted(int(x) for x in r["input"].split(", ")))

    for fam, key in (("arithmetic", arithmetic_fact), ("long_arithmetic", arithmetic_fact), ("comparison", pair),
                     ("unit_conversion", conversion), ("sorting", number_set)):
        train_keys = {key(r) for r in train if r["family"] == fam}
        test_keys = {key(r) for r in test if r["family"] == fam}
        assert len(test_keys) == 40 and not test_keys & train_keys, fam


def test_seeded_and_default_families(data):
    assert synth_instructions(n_train=300, n_test=40, families=list(ALL_FAMILIES), seed=7) == data
    assert synth_instructions(n_train=300, n_test=40, families=list(ALL_FAMILIES), seed=8)[1] != data[1]
    train, test = synth_instructions(n_train=3, n_test=2)
    assert {r["family"] for r in test} == set(FAMILIES) and len(train) == 3 * len(FAMILIES)


def test_family_subset_and_bad_arguments():
    train, test = synth_instructions(n_train=5, n_test=3, families=["spelling"], seed=0)
    assert {r["family"] for r in train + test} == {"spelling"}
    with pytest.raises(UserError, match="--families poetry: unknown task family"):
        synth_instructions(families=["poetry"])
    with pytest.raises(UserError, match="must be positive"):
        synth_instructions(n_train=0)
