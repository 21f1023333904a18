"""The gateway's live state: backends, the current policy snapshot (gateway.snapshot),
telemetry sinks, and policy reloads that build a whole new snapshot and swap it in at once,
without dropping requests in flight."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import signal
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backends.protocol import Backend
from gateway.access_log import write_access_log
from gateway.dispatch import Dispatcher
from gateway.loop_lag import monitor_loop_lag
from gateway.metrics import GatewayMetrics
from gateway.outcome import RequestOutcome
from gateway.policy_file import load_config
from gateway.ratelimit import Limiter, LimiterMetrics
from gateway.registry import BackendRegistry
from gateway.samples import Sample, append_sample
from gateway.snapshot import Snapshot, build_access, check_restart_only, sample_log_path
from gateway.tracing import Tracing
from policies.schema import Config, ConfigError

log = logging.getLogger("turnout.runtime")

WATCH_INTERVAL_S = 1.0
RETIRE_GRACE_S = 600.0  # how long a removed backend may finish its streams before it is closed
LIMITER_GRACE_S = 30.0  # how long a replaced limiter stays open for the settlements of requests in flight


def policy_digest(config: Config) -> str:
    """A short hash of the policy as validated (defaults filled in): equal digests, equal policies."""
    return hashlib.sha256(config.model_dump_json().encode()).hexdigest()[:12]


@dataclass(frozen=True)
class ReloadOutcome:
    """One reload attempt, as the console shows it: when (wall clock), why, whether it
    applied, and the error text when it was rejected."""

    at: float
    reason: str
    applied: bool
    message: str


class GatewayRuntime:
    """Everything a request needs that outlives it."""

    def __init__(
        self,
        config: Config,
        registry: BackendRegistry,
        metrics: GatewayMetrics,
        limiter_metrics: LimiterMetrics,
        tracing: Tracing,
        config_path: Path | None = None,
    ) -> None:
        self.registry = registry
        self.metrics = metrics
        self.limiter_metrics = limiter_metrics
        self.tracing = tracing
        self.config_path = config_path
        self.started_config = config  # what the process was started with: host and port stay
        authenticator, limiter = build_access(config, limiter_metrics)
        dispatcher = Dispatcher(config, registry.backends, on_admission_wait=metrics.observe_admission_wait)
        self.snapshot = Snapshot(config, authenticator, limiter, dispatcher, sample_log_path(config))
        self._config_mtime = config_path.stat().st_mtime if config_path else 0.0
        self._reload_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        # The policy serving now (digest, how many applied so far, since when) and the last
        # reload attempt, applied or rejected: for the console (gateway.console).
        self.policy_version = policy_digest(config)
        self.policy_generation = 1
        self.policy_applied_at = time.time()
        self.last_reload: ReloadOutcome | None = None

    # -- telemetry ---------------------------------------------------------------------------

    def record(self, outcome: RequestOutcome) -> None:
        """A finished request: to Prometheus, the access log and, in an experiment, the sample log."""
        self.metrics.observe(outcome)
        server = self.snapshot.config.server
        if server.access_log:
            write_access_log(outcome, log_prompts=server.log_prompts)
        if outcome.experiment and outcome.variant:
            self.write_sample(outcome, shadow=False)

    def write_sample(self, outcome: RequestOutcome, *, shadow: bool) -> None:
        sample = Sample(
            experiment=outcome.experiment or "",
            variant=outcome.variant or "",
            status=outcome.status,
            e2e_s=outcome.e2e_s or 0.0,
            ttft_s=outcome.ttft_s,
            tpot_s=outcome.tpot_s,
            prompt_tokens=outcome.prompt_tokens,
            completion_tokens=outcome.completion_tokens,
            ts=time.time(),
            shadow=shadow,
            stream=outcome.stream,  # a whole answer has no TPOT of its own (gateway.ab.report)
        )
        # A file append, off the event loop.
        asyncio.get_running_loop().run_in_executor(None, append_sample, self.snapshot.sample_log, sample)

    @property
    def background_tasks(self) -> int:
        """How many background tasks (shadow copies, retirements) are running."""
        return len(self._tasks)

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run a coroutine in the background, keeping a reference until it ends."""
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- reloads -----------------------------------------------------------------------------

    async def reload(self, reason: str) -> tuple[bool, str]:
        """Re-read the policy file and build a whole new snapshot from it; swap it in only when
        every part was built (new backends started first). An invalid policy, or one that
        changes what needs a restart, is logged with what is wrong, counted, and the old
        snapshot keeps serving. Either way the attempt is kept in `last_reload`."""
        applied, message = await self._reload(reason)
        self.last_reload = ReloadOutcome(time.time(), reason, applied, message)
        return applied, message

    async def _reload(self, reason: str) -> tuple[bool, str]:
        if self.config_path is None:
            return False, "this gateway runs the embedded default config; start it with --config FILE to reload"
        async with self._reload_lock:
            path = self.config_path
            previous = self.snapshot
            limiter: Limiter | None = None
            try:
                self._config_mtime = path.stat().st_mtime
                config = load_config(path)
                check_restart_only(self.started_config, config)
                authenticator, limiter = build_access(config, self.limiter_metrics, previous)
                retired = await self.registry.update(config)
                dispatcher = Dispatcher(
                    config,
                    self.registry.backends,
                    previous=previous.dispatcher,
                    on_admission_wait=self.metrics.observe_admission_wait,
                )
            except (ConfigError, OSError, ValueError) as exc:
                if limiter is not None and limiter is not previous.limiter:
                    self.spawn(limiter.close())
                self.metrics.reloads.labels("failure").inc()
                log.error("policy reload (%s) rejected, the previous policy keeps serving:\n%s", reason, exc)
                return False, str(exc)
            # Requests in flight keep the snapshot they started with.
            self.snapshot = Snapshot(config, authenticator, limiter, dispatcher, sample_log_path(config))
            self.policy_version = policy_digest(config)
            self.policy_generation += 1
            self.policy_applied_at = time.time()
            if limiter is not previous.limiter:
                self.spawn(self._retire_limiter(previous.limiter))
            for backend in retired:
                self.spawn(self._retire(backend))
            self._scrape_remote_backends()
            self.metrics.reloads.labels("success").inc()
            log.info("policy reloaded (%s): %d backends, %d models", reason, len(config.backends), len(dispatcher.routes))
            return True, "reloaded"

    async def _retire(self, backend: Backend) -> None:
        """Close a backend the new policy dropped, once its requests are done."""
        deadline = time.monotonic() + RETIRE_GRACE_S
        while self.snapshot.dispatcher.in_flight(backend.name) > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        await backend.close()

    async def _retire_limiter(self, limiter: Limiter) -> None:
        """Close a replaced limiter once the requests that reserved from it have settled (or
        at shutdown, whichever is first)."""
        try:
            await asyncio.sleep(LIMITER_GRACE_S)
        finally:
            await limiter.close()

    async def watch(self) -> None:
        """Reload when the policy file changes on disk, while `server.watch_config` is on
        (polled: works on every filesystem, including Kubernetes ConfigMap volumes, whose
        updates are symlink swaps)."""
        assert self.config_path is not None
        while True:
            await asyncio.sleep(WATCH_INTERVAL_S)
            if not self.snapshot.config.server.watch_config:
                continue
            try:
                mtime = self.config_path.stat().st_mtime
            except OSError:
                continue  # mid-swap; look again next time
            if mtime != self._config_mtime:
                await self.reload("file changed")

    def _scrape_remote_backends(self) -> None:
        """Scrape each remote backend's /metrics every 500 ms (start new ones, stop removed)."""
        tracker = self.snapshot.dispatcher.tracker
        wanted = {b.name: b.scrape_url() for b in self.snapshot.config.backends if b.scrape_url()}
        scraped = tracker.scraped()
        for name in scraped - set(wanted):
            tracker.stop_scraping(name)
        for name, url in wanted.items():
            if name not in scraped:
                tracker.start_scraping(name, url)  # type: ignore[arg-type]

    def start_background(self) -> None:
        """Load scrapes of remote backends; the file watcher and the SIGHUP handler (where
        there is a config file to reload); the event-loop lag monitor."""
        self._scrape_remote_backends()
        self.spawn(monitor_loop_lag(self.metrics.loop_lag.observe))
        if self.config_path is None:
            return
        self.spawn(self.watch())
        try:
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, lambda: self.spawn(self.reload("SIGHUP")))
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or no SIGHUP here
            log.debug("no SIGHUP handler installed")

    async def stop_background(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.snapshot.dispatcher.tracker.aclose()
        await self.snapshot.limiter.close()

    def admin_key(self) -> str | None:
        name = self.snapshot.config.server.admin_key_env
        return os.environ.get(name) if name else None
