"""The ``pytest-lora`` console script: ``fetch`` gets a model onto this machine (``fetch``);
``estimate`` says what a fine-tune's step holds, from the architecture on the meta device
(``estimate``); every other command reads results files (``cli``), which imports nothing that
builds a model."""

from __future__ import annotations

import sys
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["fetch"]:
        from .fetch import main as fetch

        return fetch(arguments[1:])
    if arguments[:1] == ["estimate"]:
        from .estimate import main as estimate

        return estimate(arguments[1:])
    from .cli import main as results

    return results(arguments)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
