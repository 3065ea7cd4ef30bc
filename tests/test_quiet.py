"""The library lines pytest-lora silences (``quiet.py``) are silenced where they are emitted, and
only those: the same loggers' other messages still reach the user."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pytest_lora import quiet

IMPORTS = """
import logging
logging.basicConfig()  # every record to stderr, as a user's logging setup or pytest's log capture would
import pytest_lora  # installs the filters, as loading the plugin does
import bitsandbytes, torchao  # noqa: F401  (each logs its lines here at import)
for name, _, _ in pytest_lora.quiet.LOG_MESSAGES:
    logging.getLogger(name).warning("still shown: %s", name)
"""


@pytest.mark.slow
def test_importing_the_libraries_prints_only_what_a_user_should_see():
    """torchao's failed CUDA extensions, its missing Triton and torch's register_constant lines
    (280 columns each) are gone; a message of the same loggers is not."""
    pytest.importorskip("torchao")
    done = subprocess.run([sys.executable, "-c", IMPORTS], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    shown = [name for name, _, _ in quiet.LOG_MESSAGES if any(line.endswith(f"still shown: {name}") for line in lines)]
    assert shown == [name for name, _, _ in quiet.LOG_MESSAGES] and len(lines) == len(shown), done.stderr
