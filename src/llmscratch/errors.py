"""The project's one exception for user mistakes and bad input.

Library code raises :class:`UserError` with a message that names the file, field or value at fault and
says what to do. The CLI prints it as a single line on stderr and exits with code 2; tracebacks are for
bugs, not for a missing file.
"""

from __future__ import annotations

import json
from pathlib import Path


class UserError(Exception):
    """A mistake the user can fix (bad path, unknown preset, malformed file...)."""


def one_line(reason: object, empty: str = "unknown error") -> str:
    """`reason` (an exception, a server's message, bytes) as one line of an error message; `empty` if blank."""
    if isinstance(reason, bytes):
        reason = reason.decode("utf-8", "replace")
    return " ".join(str(reason).split()) or empty


def read_json(path: str | Path, hint: str = "") -> object:
    """The parsed contents of the JSON file at `path`; a `UserError` naming the file when it is not valid JSON
    (or not UTF-8), with `hint` (what to do) after the parser's message. Callers check the file exists and
    the structure they expect themselves: those messages differ by file."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc}){hint}") from None


def read_json_object(path: str | Path, missing: str, expected: str) -> dict:
    """The JSON object in the file at `path`; a `UserError` naming the file, with `missing` when there is no
    such file and `expected` (what the object should hold) when it is valid JSON but not an object."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {missing}")
    data = read_json(path)
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected {expected}")
    return data
