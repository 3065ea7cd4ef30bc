"""The rule behind ``make test``'s coverage gate: every line of ``pytest_lora/measure/`` and
``pytest_lora/models/`` runs in the tests, and a line that can't (it needs a GPU host's real CUDA
or NVML) says why where it is excluded."""

from __future__ import annotations

import re
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


def test_make_test_gates_on_full_coverage_of_measure_and_models():
    makefile = (Path(__file__).parents[1] / "Makefile").read_text()
    assert "COVERED := pytest_lora/measure,pytest_lora/models" in makefile and "--fail-under=100" in makefile
