"""Event-loop lag: how late the loop wakes a task that sleeps a fixed interval. Anything that
holds the loop (or the GIL) for long delays every request on it, /healthz included; the lag
shows it on /metrics as `turnout_event_loop_lag_seconds`."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

LAG_INTERVAL_S = 0.1  # one sample every 100 ms: ten a second, nothing measurable in cost


async def monitor_loop_lag(observe: Callable[[float], None], interval_s: float = LAG_INTERVAL_S) -> None:
    """Sleep `interval_s` again and again, and `observe` how late each wake-up came (seconds,
    0 when on time). Runs until cancelled."""
    loop = asyncio.get_running_loop()
    while True:
        start = loop.time()
        await asyncio.sleep(interval_s)
        observe(max(0.0, loop.time() - start - interval_s))
