"""Collect the docstrings of the Python standard library into a JSON file (a standalone script).

`llmscratch.data.corpora` runs this file in a child interpreter (``python -I -B _stdlib_docs.py OUT``) rather
than importing hundreds of modules into the caller: imports leave state behind (signal handlers, readline's
terminal codes, atexit hooks, ~50 MB of module objects), a few write to stdout or the C-level file
descriptors, and a crash in an extension module must not take the training process with it. The child's
stdout and stderr go nowhere the user sees.

This file imports nothing from llmscratch so that it runs in isolated mode, where neither the project nor
the current directory is on ``sys.path`` (a stray ``random.py`` in the working directory cannot shadow
the stdlib). Output: ``{"modules": [[name, [docstring, ...]], ...], "topics": [[key, text], ...]}``,
all in sorted order so the corpus is identical on every run.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import json
import pkgutil
import sys
import warnings

# Top-level modules never imported: they have side effects on import (`this` prints the Zen, `antigravity`
# opens a browser, lib2to3 writes a grammar pickle next to its source), are GUI or test scaffolding, or are
# read separately (pydoc_data).
SKIP_TOP_LEVEL = frozenset(
    {
        "antigravity",
        "this",
        "idlelib",
        "tkinter",
        "turtle",
        "turtledemo",
        "test",
        "lib2to3",
        "pydoc_data",
        "xxlimited",
        "xxlimited_35",
        "xxsubtype",
    }
)
# Submodule name parts never imported: `__main__` runs a program on import, test packages are not prose.
SKIP_PARTS = frozenset({"__main__", "test", "tests", "idle_test"})
# Packages whose submodules are generated boilerplate (one near-identical docstring per codec).
NO_SUBMODULES = frozenset({"encodings"})


def _quiet_import(name: str, sink: io.StringIO):
    try:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            return importlib.import_module(name)
    except BaseException:  # noqa: BLE001 - an import may raise anything, SystemExit included
        return None


def _skip(name: str) -> bool:
    parts = name.split(".")
    if parts[0] in SKIP_TOP_LEVEL or parts[0].startswith("_"):
        return True
    return any(part in SKIP_PARTS or part.startswith("_") for part in parts[1:])


def _modules() -> list:
    """Import every public stdlib module and submodule in sorted order; those that fail are left out."""
    sink = io.StringIO()
    found = []
    pending = sorted(name for name in sys.stdlib_module_names if not _skip(name))
    while pending:
        name = pending.pop(0)
        module = _quiet_import(name, sink)
        if module is None:
            continue
        found.append(module)
        path = getattr(module, "__path__", None)
        if path is not None and name not in NO_SUBMODULES:
            children = sorted(f"{name}.{info.name}" for info in pkgutil.iter_modules(path))
            # depth first, so a package's submodules follow it
            pending[:0] = [child for child in children if not _skip(child)]
        sink.seek(0)
        sink.truncate()
    return found


def _doc(obj) -> str | None:
    try:
        doc = inspect.getdoc(obj)
    except Exception:  # noqa: BLE001 - exotic descriptors can raise from __doc__
        return None
    return doc.strip() if isinstance(doc, str) and doc.strip() else None


def _docstrings(module) -> list[str]:
    """The module docstring, then those of its own public classes (with their methods) and functions."""
    docs = []
    if (doc := _doc(module)) is not None:
        docs.append(doc)
    for name, value in sorted(vars(module).items()):
        if name.startswith("_") or getattr(value, "__module__", None) != module.__name__:
            continue  # private, or re-exported from another module (documented there)
        if not (inspect.isclass(value) or inspect.isfunction(value) or inspect.isbuiltin(value)):
            continue
        if (doc := _doc(value)) is not None:
            docs.append(doc)
        if inspect.isclass(value):
            for member_name, member in sorted(vars(value).items()):
                if member_name.startswith("_"):
                    continue
                is_member = callable(member) or isinstance(member, (property, classmethod, staticmethod))
                if is_member and (doc := _doc(member)) is not None:
                    docs.append(doc)
    return docs


def collect() -> dict:
    warnings.simplefilter("ignore")  # deprecated modules (distutils, cgi, ...) warn on import
    modules = [[module.__name__, _docstrings(module)] for module in _modules()]
    from pydoc_data.topics import topics  # the language reference's help() texts

    return {"modules": modules, "topics": sorted(topics.items())}


if __name__ == "__main__":
    result = collect()
    with open(sys.argv[1], "w", encoding="utf-8") as out:
        json.dump(result, out)
