"""Reading the files every data module takes in, with errors that name the file and the line or record at fault:
text as UTF-8, JSON lists and JSONL of records, and a record's string fields.
"""

from __future__ import annotations

import json
from pathlib import Path

from llmscratch.errors import UserError, one_line

__all__ = ["parse_json_items", "read_json_items", "read_json_objects", "read_text_file", "string_field"]

JSONL_SUFFIXES = (".jsonl", ".ndjson")


def read_text_file(path: Path, missing: str | None = None) -> str:
    """The file's text as UTF-8 (a leading BOM dropped, CRLF turned into LF); UserError if it is not. `missing`:
    the error's advice when there is no such file."""
    if missing is not None and not path.is_file():
        raise UserError(f"{path}: {missing}")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({one_line(exc.strerror or exc)})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(
            f"{path}: not UTF-8 text (byte {exc.start} is 0x{data[exc.start]:02x}); convert it, e.g. "
            f"iconv -f LATIN1 -t UTF-8, or leave it out"
        ) from None
    return text.replace("\r\n", "\n")


def parse_json_items(path: Path, text: str, jsonl: bool, hint: str | None = None) -> list[tuple[str, object]]:
    """(where, item) for each item of `text`, the contents of `path`: JSONL (one JSON value a line, blank lines
    skipped; `where` is "file:N") or a JSON list (`where` is "file: record N", counted from 1). `hint`: what to
    do when a JSON file holds something other than a list."""
    if jsonl:
        items: list[tuple[str, object]] = []
        for n, line in enumerate(text.split("\n"), 1):
            if line.strip():
                items.append((f"{path}:{n}", _loads(line, path, n, "; JSONL needs one complete object per line")))
        return items
    data = _loads(text, path)
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list of records, got {type(data).__name__}; "
                        f"{hint or 'use a list of objects, or JSONL (one object per line)'}")
    return [(f"{path}: record {i}", obj) for i, obj in enumerate(data, 1)]


def _loads(text: str, path: Path, line: int | None = None, advice: str = "") -> object:
    """`json.loads(text)`; a UserError naming the file and line (`line`, for one line of a file) if it fails."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}:{line or exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno}){advice}") \
            from None
    except (ValueError, RecursionError) as exc:  # a number of over 4300 digits; arrays nested ~1000 deep
        raise UserError(f"{path}{f':{line}' if line else ''}: unreadable JSON ({one_line(exc)}); fix or "
                        "regenerate the file") from None


def read_json_items(path: Path, hint: str | None = None, missing: str | None = None) -> list[tuple[str, object]]:
    """`parse_json_items` of the file at `path`: JSONL by extension (.jsonl, .ndjson), a JSON list for .json, and
    for any other name whichever the text is (a JSON list starts with '['). `missing`: see `read_text_file`."""
    text = read_text_file(path, missing)
    suffix = path.suffix.lower()
    jsonl = suffix in JSONL_SUFFIXES or (suffix != ".json" and not text.lstrip().startswith("["))
    return parse_json_items(path, text, jsonl, hint)


def read_json_objects(path: Path, hint: str | None = None, missing: str | None = None) -> list[tuple[str, dict]]:
    """`read_json_items`, each of which must be a JSON object."""
    items = read_json_items(path, hint, missing)
    for where, obj in items:
        if not isinstance(obj, dict):
            raise UserError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    return items  # type: ignore[return-value]


def string_field(obj: dict, key: str, where: str, missing: str | None = None) -> str:
    """`obj[key]`, which must be a string. An absent (or null) key reads as "" when `missing` is None, else it is
    a UserError that ends with `missing` (which keys the record needs)."""
    value = obj.get(key)
    if value is None:
        if missing is not None:
            raise UserError(f"{where}: missing key {key!r}; {missing}")
        return ""
    if not isinstance(value, str):
        raise UserError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    return value
