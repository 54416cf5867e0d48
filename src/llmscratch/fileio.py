"""Atomic file writes (the one place that knows the temp-file-and-rename dance), file digests, and the check that
a file name read from another file stays inside its folder."""

from __future__ import annotations

import errno
import hashlib
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath, PureWindowsPath

from llmscratch.errors import UserError


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp_path)` and rename the result to `path`.

    A crash mid-write leaves the old file (or none) at `path`, never a truncated one that loads as garbage.
    The file gets the usual 0644 mode rather than mkstemp's 0600, so a shared run folder stays readable.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)  # after writing: some writers (safetensors) replace the file they are given
        os.replace(tmp, path)
    except BaseException as exc:
        fault = None if isinstance(exc, (OSError, KeyboardInterrupt, SystemExit)) else _os_fault(exc, path)
        Path(tmp).unlink(missing_ok=True)
        if fault is not None:
            raise fault from exc
        raise


def _os_fault(exc: BaseException, path: Path) -> OSError | None:
    """The operating-system fault behind a writer's own exception, as an OSError for `path`, or None. Native
    writers hide it: safetensors says "...I/O error: No space left on device (os error 28)", and torch.save on
    a full disk only "unexpected pos 704 vs 598" — so a disk found full while the temporary file still holds
    its bytes is taken as the reason."""
    found = re.search(r"os error (\d+)", str(exc))
    code = int(found.group(1)) if found else None
    if code is None:
        try:
            stat = os.statvfs(path.parent)
        except OSError:
            return None
        free = stat.f_bfree if os.geteuid() == 0 else stat.f_bavail  # root may fill the reserved blocks too
        code = errno.ENOSPC if free * stat.f_frsize < 1 << 20 else None
    return OSError(code, os.strerror(code), str(path)) if code is not None else None


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda p: p.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def sha256_of(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks (never the whole file in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def safe_child(folder: str | Path, name: object, source: str | Path) -> Path:
    """`folder / name` for a file name read from the file `source` (a shard index, a listing), checked to stay
    inside `folder`; UserError naming `source` and `name` otherwise.

    `name` must be a non-empty relative path without `..` (as a POSIX or a Windows path: a name written on one
    system is read on the other) and no folder on its way may lead out of `folder` through a symlink. The file
    itself may be a symlink: Hugging Face's cache links every file of a snapshot folder into its blobs/ folder.
    """
    folder = Path(folder)
    if not isinstance(name, str) or "\0" in name or not PurePosixPath(name).parts:
        raise UserError(f"{source}: {name!r} is not a file name; the file is damaged: re-download or fix it")
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    if posix.is_absolute() or windows.anchor or ".." in posix.parts or ".." in windows.parts:
        raise UserError(f"{source}: file name {name!r} points outside {folder} (absolute, or with '..'); only "
                        "names inside the folder are read or written — the file is damaged or not trustworthy")
    child = folder / posix
    root = folder.resolve()
    if not child.parent.resolve().is_relative_to(root):
        raise UserError(f"{source}: file name {name!r} leads outside {folder} through a symlinked folder; "
                        "only names inside the folder are read or written")
    return child
