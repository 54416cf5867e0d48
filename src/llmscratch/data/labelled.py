"""Labelled text for classification: (text, label) pairs from TSV / CSV / JSONL files or the SMS spam download,
plus the book's preparation steps — labels to ids, balancing by undersampling, a seeded train/val/test split.

Formats (chosen by file suffix):
  * `.tsv` / `.txt` — tab-separated, one record per line, no quoting (a quote is part of the text). With a header
    row naming the text and label columns, or headerless as `label<TAB>text` (the SMS Spam Collection's layout).
  * `.csv` — RFC 4180 CSV (quoted fields may hold commas and newlines); header row, or headerless `label,text`.
  * `.jsonl` — one JSON object per line; `.json` — a JSON array of objects.
A first row counts as a header when it holds the text or the label column name. A headerless file's first row
is data; when its label would be a class of one among classes that all recur, the row is refused as a header
with other column names (add a `label<TAB>text` / `label,text` header above it if it really is data).
"""

from __future__ import annotations

import csv
import hashlib
import io
import random
import zipfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from llmscratch.data.files import parse_json_items, read_text_file
from llmscratch.errors import UserError

#: Named data sets `load_labelled` accepts besides a path.
SMS_SPAM = "sms-spam"
SMS_SPAM_URL = "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip"
# sha256 of the `SMSSpamCollection` file inside the zip (the book renames it to SMSSpamCollection.tsv). The
# zip itself is not pinned: archive metadata may change upstream while the data file stays the same.
SMS_SPAM_TSV_SHA256 = "7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d"
LABELLED_SOURCES = (SMS_SPAM,)

_FORMATS = {".tsv": "tsv", ".txt": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".json": "json"}


@dataclass(frozen=True)
class Example:
    """One labelled text; `where` ("file:line") points back at its source for error messages."""

    text: str
    label: str
    where: str = ""


# ---------------------------------------------------------------------------------------------------------
# reading


def fetch_sms_spam(progress: bool = True) -> Path:
    """The SMS Spam Collection TSV in the cache: download the UCI zip once, extract `SMSSpamCollection` and
    check its sha256."""
    from llmscratch.download import cache_dir, download

    folder = cache_dir() / "sms-spam"
    tsv = folder / "SMSSpamCollection.tsv"
    if tsv.is_file() and hashlib.sha256(tsv.read_bytes()).hexdigest() == SMS_SPAM_TSV_SHA256:
        return tsv
    archive = download(SMS_SPAM_URL, folder / "sms+spam+collection.zip", None, name=SMS_SPAM, progress=progress)
    try:
        with zipfile.ZipFile(archive) as zf:
            data = zf.read("SMSSpamCollection")
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        archive.unlink(missing_ok=True)  # a damaged download must not be reused
        raise UserError(f"{archive}: not the UCI SMS Spam Collection zip ({exc}); run again to re-download, or "
                        "pass the extracted SMSSpamCollection file with --data PATH") from None
    got = hashlib.sha256(data).hexdigest()
    if got != SMS_SPAM_TSV_SHA256:
        archive.unlink(missing_ok=True)
        raise UserError(f"{SMS_SPAM_URL}: SMSSpamCollection in the zip has sha256 {got}, expected "
                        f"{SMS_SPAM_TSV_SHA256}; the file changed upstream: pass a local copy with --data PATH")
    from llmscratch.fileio import atomic_write_bytes

    atomic_write_bytes(tsv, data)
    return tsv


def _read_text(path: Path) -> str:
    text = read_text_file(path)
    if not text.strip():
        raise UserError(f"{path}: file is empty; it needs one labelled text per row")
    return text


def _columns_from_header(path: Path, header: list[str], text_column: str, label_column: str):
    """(text index, label index) from a header row, or None when the row is data (headerless file)."""
    names = [h.strip() for h in header]
    if text_column not in names and label_column not in names:
        return None
    missing = [c for c in (text_column, label_column) if c not in names]
    if missing:
        option = "--text-column" if missing[0] == text_column else "--label-column"
        raise UserError(f"{path}:1: header has no column {missing[0]!r} (columns: {', '.join(names)}); "
                        f"name the right one with {option}")
    return names.index(text_column), names.index(label_column)


def _rows_to_examples(path: Path, rows, text_column: str, label_column: str, fmt: str) -> list[Example]:
    """`rows` yields (line number, fields); the first decides header or headerless `label, text`."""
    examples: list[Example] = []
    columns, first_row = None, None
    for i, (line, fields) in enumerate(rows):
        if i == 0:
            columns = _columns_from_header(path, fields, text_column, label_column)
            if columns is not None:
                continue
            first_row = fields
            if len(fields) != 2:
                raise UserError(f"{path}:{line}: no header row naming columns {text_column!r} and "
                                f"{label_column!r}, and {len(fields)} field(s) instead of the headerless "
                                f"layout label{'<TAB>' if fmt == 'tsv' else ','}text; add a header row or pass "
                                "--text-column/--label-column")
            columns = (1, 0)
        t, lab = columns
        if columns == (1, 0) and fmt == "tsv" and len(fields) > 2:  # label, then text: the text may hold tabs
            fields = [fields[0], "\t".join(fields[1:])]
        if len(fields) <= max(t, lab):
            raise UserError(f"{path}:{line}: {len(fields)} field(s), expected at least {max(t, lab) + 1}; "
                            f"fix the row (a {fmt.upper()} row per record)")
        examples.append(Example(fields[t], fields[lab].strip(), f"{path}:{line}"))
    if first_row is not None:
        _refuse_unnamed_header(first_row, examples, text_column, label_column, fmt)
    return examples


def _refuse_unnamed_header(first_row: list[str], examples: list[Example], text_column: str, label_column: str,
                           fmt: str) -> None:
    """UserError when the first row of a headerless file looks like a header with other column names: read as
    `label, text` it would be the only class with a single example while every other class recurs, e.g.
    `category,message` above rows of ham and spam (it would train a fake class "category")."""
    counts = Counter(ex.label for ex in examples)
    first = examples[0]
    others = [n for label, n in counts.items() if label != first.label]
    if counts[first.label] == 1 and others and min(others) >= 2:
        sep = "<TAB>" if fmt == "tsv" else ","
        shown = ", ".join(repr(field[:40]) for field in first_row)
        raise UserError(f"{first.where}: the first row ({shown}) looks like a header naming neither "
                        f"{text_column!r} nor {label_column!r}; pass --text-column and --label-column with its "
                        f"column names, or, if it is data, add the header row label{sep}text above it")


def _tsv_rows(text: str):
    for n, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            yield n, line.split("\t")


def _csv_rows(path: Path, text: str):
    reader = csv.reader(io.StringIO(text), strict=True)
    try:
        for fields in reader:
            if any(f.strip() for f in fields):
                # line_num is where the record ends; a quoted field may span lines
                yield reader.line_num, fields
    except csv.Error as exc:
        raise UserError(f"{path}:{reader.line_num}: malformed CSV ({exc}); quote fields that hold commas, "
                        "quotes or newlines") from None


def _json_examples(path: Path, text: str, fmt: str, text_column: str, label_column: str) -> list[Example]:
    examples = []
    for at, record in parse_json_items(path, text, fmt == "jsonl", "use a JSON list of objects (or .jsonl, one "
                                       "object per line)"):
        if not isinstance(record, dict):
            raise UserError(f"{at}: expected a JSON object with keys {text_column!r} and {label_column!r}, "
                            f"got {type(record).__name__}")
        for key, option in ((text_column, "--text-column"), (label_column, "--label-column")):
            if key not in record:
                raise UserError(f"{at}: no key {key!r} (keys: {', '.join(map(str, record)) or 'none'}); "
                                f"name the right one with {option}")
        value, label = record[text_column], record[label_column]
        if not isinstance(value, str):
            raise UserError(f"{at}: {text_column!r} must be a string, got {type(value).__name__}")
        if isinstance(label, bool) or not isinstance(label, (str, int)):
            raise UserError(f"{at}: {label_column!r} must be a string or an integer, got {label!r}")
        examples.append(Example(value, str(label).strip(), at))
    return examples


def load_labelled(src: str | Path, text_column: str = "text", label_column: str = "label",
                  progress: bool = True) -> tuple[list[Example], int]:
    """Read labelled texts from `src` (`sms-spam` or a .tsv/.txt/.csv/.jsonl/.json file).

    Returns (examples, skipped): rows whose text is empty or blank are skipped and counted; a row without a
    label, a malformed row, a missing column or key, or a file with no examples raise UserError naming the
    file and line.
    """
    if str(src) == SMS_SPAM:
        path = fetch_sms_spam(progress=progress)
    else:
        path = Path(src).expanduser()
        if not path.is_file():
            hint = f"a file, or {', '.join(LABELLED_SOURCES)}"
            raise UserError(f"{src}: no such file ({'it is a folder' if path.is_dir() else 'not found'}); "
                            f"pass {hint}")
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UserError(f"{path}: unknown format {path.suffix or '(no suffix)'!r}; use .tsv, .csv, .jsonl or "
                        ".json (rename the file if its content is one of them)")
    text = _read_text(path)
    if fmt == "tsv":
        examples = _rows_to_examples(path, _tsv_rows(text), text_column, label_column, fmt)
    elif fmt == "csv":
        examples = _rows_to_examples(path, _csv_rows(path, text), text_column, label_column, fmt)
    else:
        examples = _json_examples(path, text, fmt, text_column, label_column)
    for ex in examples:
        if not ex.label:
            raise UserError(f"{ex.where}: empty label; every row needs a {label_column!r} value")
    kept = [ex for ex in examples if ex.text.strip()]
    if not kept:
        raise UserError(f"{path}: no labelled texts found ({len(examples)} row(s), all with empty text)")
    return kept, len(examples) - len(kept)


# ---------------------------------------------------------------------------------------------------------
# preparing


def label_mapping(examples: Sequence[Example], source: str = "data") -> dict[str, int]:
    """Label string -> class id, ids in sorted label order (so the mapping does not depend on row order)."""
    labels = sorted({ex.label for ex in examples})
    if len(labels) < 2:
        raise UserError(f"{source}: the label column has only one class ({labels[0]!r} in all {len(examples)} "
                        "rows); classification needs at least two")
    return {label: i for i, label in enumerate(labels)}


def class_counts(examples: Sequence[Example]) -> dict[str, int]:
    return dict(sorted(Counter(ex.label for ex in examples).items()))


def balance(examples: Sequence[Example], seed: int) -> list[Example]:
    """Undersample every class to the size of the smallest one (the book's `create_balanced_dataset`); a seeded
    random subset of each class is kept, in the original row order."""
    by_class: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        by_class.setdefault(ex.label, []).append(i)
    n = min(len(ix) for ix in by_class.values())
    rng = random.Random(seed)
    keep = sorted(i for label in sorted(by_class) for i in rng.sample(by_class[label], n))
    return [examples[i] for i in keep]


def split(examples: Sequence[Example], fractions: Sequence[float] = (0.7, 0.1), seed: int = 123,
          ) -> tuple[list[Example], list[Example], list[Example]]:
    """Shuffle with `seed`, then cut train / validation / test; the test split gets the remainder (the book's
    `random_split`: 70 / 10 / 20 by default)."""
    train_f, val_f = fractions
    if not (0 < train_f < 1 and 0 <= val_f < 1 and train_f + val_f < 1):
        raise UserError(f"split fractions {train_f}/{val_f} must be positive and leave room for a test split")
    order = list(examples)
    random.Random(seed).shuffle(order)
    n_train = int(len(order) * train_f)
    n_val = int(len(order) * val_f)
    return order[:n_train], order[n_train:n_train + n_val], order[n_train + n_val:]


# ---------------------------------------------------------------------------------------------------------
# tokens


def pad_token_id(tokenizer) -> int:
    """The id that fills short sequences: `<|pad|>` if the tokenizer has one, else end-of-text (GPT-2 has no pad
    token, so the book pads with 50256), else 0. Its value never reaches a prediction: padding goes on the right,
    attention is causal and the class is read at the last real token."""
    specials = getattr(tokenizer, "special_tokens", {})
    for name in ("<|pad|>", "<|endoftext|>"):
        if name in specials:
            return specials[name]
    return 0


@dataclass(frozen=True)
class Encoded:
    """Token ids of one example (already truncated) and its class id."""

    ids: list[int]
    label: int


def encode_examples(tokenizer, examples: Sequence[Example], label_to_id: dict[str, int], max_length: int,
                    ) -> tuple[list[Encoded], int]:
    """Tokenize each text (special-token strings in it stay plain text), cut to its first `max_length` tokens,
    and map its label to an id. Returns (encoded, number truncated)."""
    if max_length <= 0:
        raise UserError(f"max_length must be positive, got {max_length}")
    out, truncated = [], 0
    for ex in examples:
        if ex.label not in label_to_id:
            raise UserError(f"{ex.where or 'example'}: label {ex.label!r} is not one of "
                            f"{', '.join(label_to_id)}")
        ids = tokenizer.encode(ex.text, allowed_special="none")
        if len(ids) > max_length:
            ids, truncated = ids[:max_length], truncated + 1
        out.append(Encoded(ids, label_to_id[ex.label]))
    return out, truncated


def collate_labelled(batch: Sequence[Encoded], pad_id: int, device=None):
    """(idx (B, T), lengths (B,), labels (B,)): ids right-padded with `pad_id` to the batch's longest sequence.

    Padding to the batch rather than to the data set's longest text (as the book does) gives the same
    predictions — the class is read at each sequence's last real token and causal attention never looks right —
    and is several times faster on short texts such as SMS messages.
    """
    import torch

    lengths = [len(e.ids) for e in batch]
    if min(lengths) == 0:
        raise UserError("an example has no tokens; every text needs at least one token")
    idx = torch.full((len(batch), max(lengths)), pad_id, dtype=torch.long)
    for row, e in enumerate(batch):
        idx[row, :len(e.ids)] = torch.tensor(e.ids, dtype=torch.long)
    lengths_t = torch.tensor(lengths, dtype=torch.long)
    labels = torch.tensor([e.label for e in batch], dtype=torch.long)
    if device is not None:
        idx, lengths_t, labels = idx.to(device), lengths_t.to(device), labels.to(device)
    return idx, lengths_t, labels
