"""What ``pytest --lora-bench`` runs when it is given no path: the suites shipped with the plugin,
and the user's own suite directories (``--lora-suites``) next to them.

The built-in suites live in the repository's ``suites/`` and are installed as the package
``pytest_lora.suites``, so the same files run from a checkout, an editable install and a wheel.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import pytest

from .options import Setting

@functools.lru_cache(maxsize=None)
def builtin_suites() -> Path:
    """The directory of the suites shipped with the plugin."""
    spec = importlib.util.find_spec("pytest_lora.suites")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(__file__).resolve().parents[1] / "suites"  # a source checkout on sys.path, not installed


def suite_paths(setting: Setting) -> list[Path]:
    """The built-in suites, then each directory the ``suites`` option names (checked to exist)."""
    paths = [builtin_suites()]
    for text in str(setting.value or "").split(","):
        if not text.strip():
            continue
        path = setting.path(text.strip())
        if not path.is_dir():
            raise pytest.UsageError(f"{setting.describe()}: {text.strip()!r} is not a directory ({path}); allowed: directories of test files")
        paths.append(path)
    return paths
