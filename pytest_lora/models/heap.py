"""What the cycle collector walks while the suites run.

``build.free_memory`` collects cycles after every base and every measured phase, so that a model's
memory is returned before the next is measured. A full collection walks every object alive: with
torch, transformers and peft imported that is over half a million objects, 0.3 s a collection,
2.6 s of a 7 s run of four tiny bases. What is alive when the first test starts (the modules, the
collected items, the session) lives to the end of the run, so it is collected once and then
frozen (``gc.freeze``: moved to a generation the collector never walks) until the tests are done.
No model is frozen: none is built before the first test, and nothing frozen is garbage.

A freeze made before the run (a conftest's, or the run that started this one in its own process)
is left to whoever made it: thawing it at the end of the run would thaw their objects too.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def long_lived_frozen() -> Iterator[None]:
    """For the block: everything alive at its start is out of the cycle collector's sight."""
    if gc.get_freeze_count():
        yield  # frozen already, by someone who will thaw it
        return
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
