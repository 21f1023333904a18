"""Which loaded models to unload so that another fits the memory budget.

Pure: the caller says what is loaded (memory, last use, whether requests are running on it)
and gets back names to unload, least recently used first. Busy models are never chosen; when
the incoming model does not fit even then, the caller loads it anyway (as Ollama does for a
model bigger than the budget) rather than fail a request that the machine may well serve.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Resident:
    """A loaded model as the budget sees it."""

    name: str
    memory_bytes: int
    last_used: float  # any monotonic clock; larger is more recent
    busy: bool  # requests in flight: not to be unloaded


def evictions(loaded: Sequence[Resident], incoming_bytes: int, budget_bytes: int | None) -> list[str]:
    """Names to unload, in order, so that `incoming_bytes` more fits `budget_bytes`."""
    if budget_bytes is None:
        return []
    used = sum(r.memory_bytes for r in loaded)
    out: list[str] = []
    for resident in sorted((r for r in loaded if not r.busy), key=lambda r: r.last_used):
        if used + incoming_bytes <= budget_bytes:
            break
        out.append(resident.name)
        used -= resident.memory_bytes
    return out
