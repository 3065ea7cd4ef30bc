"""The keys under which pytest-lora keeps its state in pytest's stash.

A leaf: the session, the fixtures, the gate's confirming rerun and the xdist controller's hooks
all reach the same objects through these keys without importing one another.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from .results.recorder import Recorder
    from .session import LoraSession

SESSION_KEY = pytest.StashKey["LoraSession"]()  # config.stash: the plugin's session state
RECORDER_KEY = pytest.StashKey["Recorder"]()  # item.stash: the test's lora_bench recorder
RECORD_KEY = pytest.StashKey[dict]()  # item.stash: the record a test delivered (the gate's confirming rerun reads it)
