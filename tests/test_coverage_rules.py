"""The rule behind ``make test``'s coverage gate: every line of ``pytest_lora/measure/`` and
``pytest_lora/models/`` runs in the tests, and a line that can't (it needs a GPU host's real CUDA
or NVML) says why where it is excluded."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "pytest_lora"
GATED = [path for folder in ("measure", "models") for path in sorted((PACKAGE / folder).glob("*.py"))]
PRAGMA = re.compile(r"#\s*pragma:\s*no cover(?P<reason>.*)$")


def exclusions() -> list[tuple[str, int, str]]:
    found = []
    for path in GATED:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            match = PRAGMA.search(line)
            if match:
                found.append((f"{path.relative_to(PACKAGE.parent)}:{number}", number, match.group("reason")))
    return found


@pytest.mark.parametrize("where, line, reason", exclusions(), ids=lambda v: str(v))
def test_every_excluded_line_says_why(where, line, reason):
    assert re.match(r"\s*-\s*\S.{10,}", reason), f"{where}: '# pragma: no cover' needs ' - the reason' (a GPU host only, ...)"


def test_make_test_gates_on_full_coverage_of_measure_and_models_in_every_worker():
    """The gate is over both packages, measured in every xdist worker (each process its own data
    file, started through coverage's subprocess patch) and joined before the report."""
    root = Path(__file__).parents[1]
    run = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["coverage"]["run"]
    assert run["source_pkgs"] == ["pytest_lora.measure", "pytest_lora.models"]
    assert run["parallel"] is True and run["patch"] == ["subprocess"]
    makefile = (root / "Makefile").read_text()
    assert "coverage run -m pytest $(XDIST)" in makefile and "XDIST ?= -n auto" in makefile
    assert makefile.index("coverage combine") < makefile.index("--fail-under=100")
