"""The memory budget over the local models' worker processes: before a model loads, the
least recently used idle ones are unloaded until it fits (policies.residency decides)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from backends.worker.backend import LocalModelBackend, WorkerBackend
from policies.residency import Resident, evictions

log = logging.getLogger("turnout.residency")

GIB = 1 << 30


class ModelResidency:
    """Shared by every local backend of a gateway; `budget_bytes` follows policy reloads."""

    def __init__(self, budget_gib: float | None, backends: Callable[[], Iterable[object]]) -> None:
        self.budget_bytes = int(budget_gib * GIB) if budget_gib else None
        self._backends = backends

    def set_budget(self, budget_gib: float | None) -> None:
        self.budget_bytes = int(budget_gib * GIB) if budget_gib else None

    def workers(self) -> list[LocalModelBackend]:
        """The local backends (owned or shared), for `turnout ps` and the budget."""
        return [b for b in self._backends() if isinstance(b, LocalModelBackend)]

    async def before_load(self, incoming: WorkerBackend) -> None:
        """Unload what must go for `incoming` to fit the budget."""
        loaded = {b.name: b for b in self.workers() if isinstance(b, WorkerBackend) and b.loaded and b is not incoming}
        residents = [Resident(b.name, b.memory_bytes(), b.last_used, b.in_flight > 0) for b in loaded.values()]
        for name in evictions(residents, incoming.memory_bytes(), self.budget_bytes):
            log.info("unloading %s to make room for %s (memory budget %d MiB)", name, incoming.name, (self.budget_bytes or 0) >> 20)
            await loaded[name].unload()
