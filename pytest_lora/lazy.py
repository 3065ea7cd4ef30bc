"""Modules that load on first use, so that collecting the suites imports no heavy library.

``pytest --lora-bench --co`` imports every suite module to list its tests; a suite that imported
peft (and with it transformers) at the top would make that take seconds. A suite writes
``peft = lazy_import("peft")`` instead: the name is bound at once, and the module is imported
when a test first uses one of its attributes.

pytest's collection looks at every name of a test module (``__test__``, ``__class__``, its own
private markers), so neither dunder nor other underscore names load the module: they are
answered as missing. The standard library's ``LazyLoader`` loads on any attribute, those
included, which would import everything during collection.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType
from typing import Any


class LazyModule:
    """Stands for a module until one of its public attributes is used."""

    def __init__(self, name: str):
        object.__setattr__(self, "_name", name)

    def __getattr__(self, attribute: str) -> Any:
        if attribute.startswith("_"):
            raise AttributeError(attribute)
        return getattr(self._load(), attribute)

    def __setattr__(self, attribute: str, value: Any) -> None:
        setattr(self._load(), attribute, value)

    def _load(self) -> ModuleType:
        return importlib.import_module(self._name)

    def __repr__(self) -> str:
        return f"<lazily imported module {self._name!r}>"


def lazy_import(name: str) -> LazyModule:
    """A stand-in for the module ``name``, imported on first use of a public attribute."""
    if importlib.util.find_spec(name) is None:  # a misspelt name fails here, at collection, not in a test
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    return LazyModule(name)
