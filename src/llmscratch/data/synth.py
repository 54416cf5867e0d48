"""Procedural instruction data with verifiable answers: a judge-free test of instruction tuning.

Each family poses one kind of task whose answer is computed, so `llmscratch eval tasks` can score exact
match. Answers are short and built from pieces a small BPE knows (digits, common lowercase words, single
letters), so a few-million-parameter model can learn the *procedure* in minutes.

Two groups of families:
  * the default, core set (arithmetic, unit_conversion, comparison, counting, first_letter): the answer is one
    or two tokens from a small closed set (digits, letters) computed from the prompt;
  * copying families (long_arithmetic, word_reversal, spelling, sorting, capitalization, last_word,
    repeat_word): the answer copies several words or digits out of the prompt. That needs in-context copying
    (induction heads), which a tiny model pretrained for minutes on a CPU does not have (the quickstart model
    copies none of a repeated word list, and tuning does not teach it: benchmarks/RESULTS.md, "What a model this
    small does not learn in minutes"). They are here for larger models (GPT-2 weights and up): opt in with
    `--families`.

The test split is held out for real, not just re-drawn:
  * word families draw test items only from a held-out quarter of the word list: the model never saw those
    words in any training example;
  * number families hold out operands: no test sum or difference (nor, for two-digit sums, the swapped twin),
    no test comparison of that pair, conversion of that number between those units or set of numbers appears
    in training.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

from llmscratch.errors import UserError

# Common lowercase English words (3-7 letters), hand-picked so a BPE trained on English prose splits each into
# a few known pieces.
WORDS = """
able acid actor add age air alarm album alert alive alley amber angle angry ankle apple april arena arm army
arrow art aside atom attic aunt autumn award baby back bacon badge bag baker ball band bank barn base basic
basket bath beach bean bear beard bed bee beef bell belt bench berry bike bird black blade blank blue board
boat body bone bonus book boot border bottle bowl box brain brave bread brick bridge brief bright broad brown
brush bucket build bulb bus butter button cabin cable cake calm camel camera camp candle candy canvas cap
car card cargo carpet carrot cart case castle cat cave cell chain chair chalk charm cheap check cheese cherry
chest chief child chip circle city claim class clay clean clerk cliff clock cloud coach coast coat coffee coin
cold color comet cook copper coral corn cotton couch count cousin cover cow crab craft crane cream crew
crowd crown cup curve cycle daily dance dark date dawn deer delta desk diary dish doctor dog doll door dough
dragon drama dream dress drink drum duck dust eagle early earth east echo edge egg elbow empty engine entry
equal error event exit fabric face fact farm fast father feast fence ferry field film final finger fire fish
flag flame flash flat flock floor flour flower fluid flute focus fog folder food foot forest fork fox frame
fresh frog front frost fruit fuel game garden gate gem ghost giant gift glass globe glove goat gold golf
grain grape grass green guard guest guide guitar habit hair hammer hand happy harbor hat hawk heart heavy
hedge hill honey hook horse host hotel house human ice idea image index ink iron island ivory jacket jam
jar jeans jelly jewel joke judge juice jump kettle key kid king kite kitten knee knife label lace ladder
lake lamp laser lawn layer leaf lemon lesson letter level lever light lily limit lion liquid list lizard
loaf lock logic lunch magic magnet mail main map maple marble market mask meadow meal medal melon menu
metal milk mint mirror model money monkey month moon motor mouse mouth movie mud music nail name napkin
needle nest net night noble noise north nose note novel nurse oak ocean olive onion orange orbit oven owl
pack page paint palace palm pan panel paper parade park party pasta path peach peak pear pen pencil pepper
piano picnic piece pig pillow pilot pine pipe pizza plain planet plant plate plum pocket poem pond pool
port potato powder prince prize pump puppy queen quiet rabbit radio rain ranch raven razor record red
reef ribbon rice ring river road robot rock rocket roof room root rope rose round ruby rug ruler sail salad
salt sand scarf school scout sea seed shadow shape sheep shelf shell ship shirt shoe shore silk silver
sister sky sleep slope smile smoke snake snow soap sock sofa soil song soup space spark spice spider
spoon spring square stage stair star steam steel stone storm story stove straw stream street sugar suit
summer sun swan sweet table tail tea teacher tent theory ticket tiger timber toast token tomato tool tooth
torch tower town toy track train tray tree truck trumpet tulip tunnel turkey turtle uncle union valley
van vase velvet village violin voice wagon wall walnut water wave wheat wheel whale window wing winter wire
wolf wood wool world yard yellow yogurt zebra zone
""".split()

WORD_TEST_FRACTION = 0.25

# (from, to, factor): converting `from` → `to` multiplies by factor; the reverse divides.
UNITS = [("kilometers", "meters", 1000), ("meters", "centimeters", 100), ("centimeters", "millimeters", 10),
         ("kilograms", "grams", 1000), ("liters", "milliliters", 1000)]


def _record(instruction: str, input_text: str, output: str) -> dict:
    return {"instruction": instruction, "input": input_text, "output": output}


def _split_words(seed: int) -> dict[str, list[str]]:
    """The word list split once per seed: {"test": a held-out quarter, "train": the rest}."""
    words = sorted(set(WORDS))
    random.Random(seed).shuffle(words)
    n_test = round(len(words) * WORD_TEST_FRACTION)
    return {"test": sorted(words[:n_test]), "train": sorted(words[n_test:])}


# A family is a function (rng, the split's words) → (key, record); `key` identifies the instance for the held-out
# checks. Its name is the family's name.

# --- core families: short answers a few-million-parameter model learns in minutes ---------------------------
def arithmetic(rng: random.Random, words: list[str]) -> tuple[tuple, dict]:
    # A two-digit number plus or minus a one-digit one: every units-digit fact (and carry) also occurs in
    # training with other tens, so unseen pairs are reachable digit by digit.
    a, b = rng.randint(10, 99), rng.randint(1, 9)
    op = rng.choice("+-")
    return (op, a, b), _record(f"What is {a} {op} {b}?", "", str(a + b if op == "+" else a - b))


def unit_conversion(rng: random.Random, words: list[str]) -> tuple[tuple, dict]:
    big, small, factor = rng.choice(UNITS)
    n = rng.randint(1, 99)
    if rng.random() < 0.5:
        return (big, small, n), _record(f"Convert {n} {big} to {small}.", "", str(n * factor))
    return (small, big, n), _record(f"Convert {n * factor} {small} to {big}.", "", str(n))


def comparison(rng: random.Random, words: list[str]) -> tuple[tuple, dict]:
    a, b = rng.sample(range(100), 2)
    kind = rng.choice(("larger", "smaller"))
    answer = max(a, b) if kind == "larger" else min(a, b)
    return (kind, min(a, b), max(a, b)), _record(f"Which number is {kind}, {a} or {b}?", "", str(answer))


def counting(rng: random.Random, words: list[str]) -> tuple[tuple, dict]:
    w = rng.sample(words, rng.randint(2, 7))
    return tuple(w), _record("How many words are in the list?", " ".join(w), str(len(w)))


def first_letter(rng: random.Random, words: list[str]) -> tuple[tuple, dict]:
    (w,) = rng.sample(words, 1)
    return (w,), _record("What is the first letter of the word?", w, w[0])


# --- copying families: the answer copies several words or digits from the prompt. They need in-context copying
# (induction heads), which a model pretrained for minutes on a CPU does not have yet -------------------------
def long_arithmetic(rng: random.Random, words: list[str]) -> tuple[tuple, dict]:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    if rng.random() < 0.5:
        # A test sum is held out together with its swapped twin: a + b and b + a are one fact.
        return ("+", min(a, b), max(a, b)), _record(f"What is {a} + {b}?", "", str(a + b))
    a, b = max(a, b), min(a, b)
    return ("-", a, b), _record(f"What is {a} - {b}?", "", str(a - b))


def word_reversal(rng: random.Random, words: list[str]) -> tuple[tuple, dict]:
    w = rng.sample(words, rng.randint(3, 5))
    return tuple(w), _record("Reverse the order of the words.", " ".join(w), " ".join(reversed(w)))


def spelling(rng: random.Random, words: list[str]) -> tuple[tuple, dict]:
    (w,) = rng.sample(words, 1)
    return (w,), _record("Spell the word with a space between the letters.", w, " ".join(w))


def sorting(rng: random.Random, words: list[str]) -> tuple[tuple, dict]:
    nums = rng.sample(range(100), rng.randint(3, 5))
    return tuple(sorted(nums)), _record("Sort the numbers from smallest to largest.",
                                        ", ".join(map(str, nums)), ", ".join(map(str, sorted(nums))))


def capitalization(rng: random.Random, words: list[str]) -> tuple[tuple, dict]:
    w = rng.sample(words, rng.randint(2, 4))
    return tuple(w), _record("Capitalize the first letter of each word.", " ".join(w),
                             " ".join(x[0].upper() + x[1:] for x in w))


def last_word(rng: random.Random, words: list[str]) -> tuple[tuple, dict]:
    w = rng.sample(words, rng.randint(2, 5))
    return tuple(w), _record("What is the last word?", " ".join(w), w[-1])


def repeat_word(rng: random.Random, words: list[str]) -> tuple[tuple, dict]:
    (w,) = rng.sample(words, 1)
    return (w,), _record("Repeat the word three times.", w, " ".join([w] * 3))


Family = Callable[[random.Random, list[str]], tuple[tuple, dict]]
_ALL: dict[str, Family] = {f.__name__: f for f in (
    arithmetic, unit_conversion, comparison, counting, first_letter, long_arithmetic, word_reversal, spelling,
    sorting, capitalization, last_word, repeat_word)}

#: The default set: answers that need no copying of several words from the prompt (see the module docstring).
FAMILIES: tuple[str, ...] = ("arithmetic", "unit_conversion", "comparison", "counting", "first_letter")
#: Every family, the copying ones included (opt in with `families=`).
ALL_FAMILIES: tuple[str, ...] = tuple(_ALL)


def _draw(family: Family, rng: random.Random, words: dict[str, list[str]], n_train: int, n_test: int,
          name: str) -> tuple[list[dict], list[dict]]:
    """(train, test) records of one family: `n_test` distinct test instances first, then `n_train` training
    records, none of them a test instance."""
    train, test = [], []
    test_keys: set = set()
    tries = 0
    while len(test_keys) < n_test:
        key, record = family(rng, words["test"])
        tries += 1
        if tries > 200 * n_test:
            raise UserError(f"family {name}: cannot draw {n_test} distinct test items; lower --n-test")
        if key not in test_keys:
            test_keys.add(key)
            test.append({**record, "family": name})
    while len(train) < n_train:
        key, record = family(rng, words["train"])
        if key not in test_keys:
            train.append({**record, "family": name})
    return train, test


def synth_instructions(n_train: int = 2000, n_test: int = 100, families: list[str] | None = None,
                       seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, test) records, each with a `family` field. Test items are distinct; no test instance (see the
    module docstring for what counts as one) occurs in training. Train items may repeat (small families)."""
    names = list(families or FAMILIES)
    unknown = [n for n in names if n not in _ALL]
    if unknown:
        raise UserError(f"--families {','.join(unknown)}: unknown task famil{'y' if len(unknown) == 1 else 'ies'}; "
                        f"choose from {', '.join(_ALL)}")
    if n_train < 1 or n_test < 1:
        raise UserError(f"--n-train and --n-test must be positive, got {n_train} and {n_test}")
    words = _split_words(seed)
    train, test = [], []
    for f_index, name in enumerate(names):
        rng = random.Random(seed * 1_000_003 + f_index)
        family_train, family_test = _draw(_ALL[name], rng, words, n_train, n_test, name)
        train += family_train
        test += family_test
    random.Random(seed).shuffle(train)
    return train, test


def write_records(records: list[dict], path: str | Path) -> None:
    """Records as JSONL (`.jsonl`) or a JSON list (`.json`), atomically."""
    import json

    from llmscratch.fileio import atomic_write_text

    path = Path(path)
    if path.suffix == ".jsonl":
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    else:
        text = json.dumps(records, indent=1, ensure_ascii=False) + "\n"
    atomic_write_text(path, text)
