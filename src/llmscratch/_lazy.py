"""Names a package re-exports but imports only on first use (a module-level `__getattr__`, PEP 562).

The command line imports `llmscratch.cli`, which runs `llmscratch/__init__.py` first; were that to import the
model, every command — `--help` and a mistyped option included — would wait for PyTorch to import
(seconds) before printing a line.
"""

from __future__ import annotations

import importlib
import sys
import types


class _LazyPackage(types.ModuleType):
    """A package whose re-exported names win over its submodules of the same name.

    `llmscratch.generate` is both a function the package exports and the submodule it lives in. Importing a
    submodule makes Python set it as an attribute of its package, which would hide the function once any code
    ran `from llmscratch.generate import ...`; the eager `from ... import` this replaces bound the function
    after the submodule. Here such an attribute is not set, and the name resolves through `__getattr__`.
    """

    def __setattr__(self, name: str, value: object) -> None:
        if isinstance(value, types.ModuleType) and name in self.__dict__.get("_lazy_homes", ()):
            return
        super().__setattr__(name, value)

    def __getattr__(self, name: str) -> object:  # called only for names not (yet) in the module
        homes = self.__dict__.get("_lazy_homes", {})
        if name not in homes:
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(homes[name]), name)
        super().__setattr__(name, value)  # found once; later lookups skip this method
        return value

    def __dir__(self) -> list[str]:
        return sorted({*self.__dict__, *self.__dict__.get("_lazy_homes", {})})


def make_lazy(package: str, homes: dict[str, str]) -> None:
    """Let `package` import each name in `homes` from the module `homes[name]` on first access."""
    module = sys.modules[package]
    module.__dict__["_lazy_homes"] = homes
    module.__class__ = _LazyPackage
