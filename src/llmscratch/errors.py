"""The project's one exception for user mistakes and bad input.

Library code raises :class:`UserError` with a message that names the file, field or value at fault and
says what to do. The CLI prints it as a single line on stderr and exits with code 2; tracebacks are for
bugs, not for a missing file.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path


class UserError(Exception):
    """A mistake the user can fix (bad path, unknown preset, malformed file...)."""


def one_line(reason: object, empty: str = "unknown error") -> str:
    """`reason` (an exception, a server's message, bytes) as one line of an error message; `empty` if blank."""
    if isinstance(reason, bytes):
        reason = reason.decode("utf-8", "replace")
    return " ".join(str(reason).split()) or empty


_OS_HINTS = {
    errno.ENOSPC: "free some disk space and run again (a run resumes from its last complete checkpoint, which a "
                  "failed save never replaces)",
    errno.EDQUOT: "free some of your disk quota and run again",
    errno.EACCES: "choose a path you can write to, or fix its permissions",
    errno.EPERM: "choose a path you can write to, or fix its permissions",
    errno.EROFS: "the file system is read-only: choose another path",
    errno.EISDIR: "give a file path, not a folder",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.ELOOP: "the path is a loop of symbolic links: choose another path",
    errno.ENAMETOOLONG: "choose a shorter path",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n)",
}


def os_error_line(exc: OSError) -> str:
    """An operating-system fault (disk full, permission denied, a folder where a file was expected...) as one
    line: the path, the system's reason, and what to do."""
    where = f"{exc.filename}: " if exc.filename else ""
    if exc.filename2:
        where = f"{exc.filename} -> {exc.filename2}: "
    reason = exc.strerror or one_line(exc)
    hint = _OS_HINTS.get(exc.errno)
    return where + reason + (f"; {hint}" if hint else "")


def read_json(path: str | Path, hint: str = "") -> object:
    """The parsed contents of the JSON file at `path`; a `UserError` naming the file when it is not valid JSON
    (or not UTF-8), with `hint` (what to do) after the parser's message. Callers check the file exists and
    the structure they expect themselves: those messages differ by file."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, a 5000-digit number, [[[[…
        raise UserError(f"{path}: not valid JSON ({one_line(exc)}){hint}") from None


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
