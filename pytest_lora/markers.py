"""The suites' markers, and the short names that may stand for them.

Each suite carries a namespaced marker (``lora_memory``), so that a project's own ``memory``
marker never turns its tests into skipped "benchmark suites". The short name (``-m memory``)
selects the suite too, but only where it captures nothing of the project's: not when the project
registers that marker, and not when any of its collected tests uses it. Then the run says where
the suite went.
"""

from __future__ import annotations

import pytest

from .report import catalog


def suite_markers() -> dict[str, str]:
    """Each suite's marker and what it measures, from the catalog (read when asked, so that a
    suite added to ``catalog.SUITES`` is known everywhere at once)."""
    return {suite.marker: suite.about for suite in catalog.SUITES}
MATRIX_MARKER = (
    "lora_matrix(**keys)",
    "replace keys of the matrix for one test, e.g. lora_matrix(quant=['nf4'], ranks=[8]); "
    "quantized=True / False keeps only quantized / full-precision bases",
)


def short(marker: str) -> str:
    return marker.removeprefix("lora_")


def suite_of(item: pytest.Item) -> str | None:
    """The benchmark suite an item belongs to (``memory`` for ``lora_memory``), if any."""
    return next((short(name) for name in suite_markers() if item.get_closest_marker(name)), None)


class SuiteMarkers:
    """Registers the markers, gives suite tests their short aliases, explains a withheld one."""

    def __init__(self, config: pytest.Config):
        registered = {line.split(":", 1)[0].split("(", 1)[0].strip() for line in config.getini("markers")}
        self.aliases = {short(marker): marker for marker in suite_markers() if short(marker) not in registered}
        for marker, text in suite_markers().items():
            config.addinivalue_line("markers", f"{marker}: benchmark suite: {text} (runs with --lora-bench)")
        config.addinivalue_line("markers", ": ".join(MATRIX_MARKER))
        for alias, marker in self.aliases.items():
            config.addinivalue_line("markers", f"{alias}: alias of {marker}, pytest-lora's suite (where no test of yours uses the name)")

    def mark(self, items: list[pytest.Item]) -> None:
        """Give suite tests their short marker when none of the project's tests uses it."""
        for item in items:
            if not suite_of(item):
                for mark in item.iter_markers():
                    self.aliases.pop(mark.name, None)  # the project's own marker: the alias would capture it
        for item in items:
            suite = suite_of(item)
            if suite in self.aliases:
                item.add_marker(suite)

    def notes(self, expression: str) -> list[str]:
        """A line for each short name in ``-m`` that selects the project's marker, not the suite."""
        words = expression.replace("(", " ").replace(")", " ").split()
        return [
            f"lora: -m {short(marker)} selects this project's own marker; pytest-lora's suite is -m {marker}"
            for marker in suite_markers()
            if short(marker) not in self.aliases and short(marker) in words
        ]
