"""xdist's scheduling by group, with the groups the workers name: each base's tests on one worker.

xdist's ``--dist loadgroup`` finds a test's group in a suffix its workers append to the test's id
(``@<group>``). pytest 9.2 builds ids that such an edit no longer changes (pytest-xdist issue
#1386): the suffix is lost and every test is its own group, so each worker builds every base.
Here the groups travel in the workers' journals instead (``journal``: the ``groups`` event, written
before a worker reports its collection), and the controller schedules with xdist's own
``LoadScopeScheduling``, one scope per group. Imported only by the xdist hook, so loading the
plugin never imports xdist.

A test whose worker died in it is not run again: the config that killed one worker (the kernel's
OOM killer, a CUDA fault) would kill the next. It is recorded as ``error``; the rest of its base's
tests go to another worker.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from xdist.scheduler import LoadScopeScheduling


class BaseScheduling(LoadScopeScheduling):
    """One scope per group (``shard.group_of``: a base, or a module), as the workers collected them."""

    def __init__(self, config: Any, log: Any, groups: Callable[[], Mapping[str, str]]):
        super().__init__(config, log)
        self._groups = groups

    def _split_scope(self, nodeid: str) -> str:
        return self._groups().get(nodeid) or super()._split_scope(nodeid)

    def remove_node(self, node: Any) -> str | None:
        crashitem = super().remove_node(node)
        for scope, work_unit in list(self.workqueue.items()):
            if crashitem in work_unit:
                work_unit[crashitem] = True  # done: it is not sent to the next worker
            if all(work_unit.values()):
                del self.workqueue[scope]
        return crashitem
