"""The gateway's live state: backends, the current policy's dispatcher, telemetry sinks, and
policy reloads that swap the dispatcher without dropping requests in flight."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from backends.protocol import Backend
from gateway.ab_report import Sample, append_sample, default_log_path
from gateway.access_log import write_access_log
from gateway.dispatch import Dispatcher
from gateway.metrics import GatewayMetrics
from gateway.outcome import RequestOutcome
from gateway.registry import BackendRegistry
from gateway.tracing import Tracing
from policies.schema import Config, ConfigError, parse_config

log = logging.getLogger("turnout.runtime")

WATCH_INTERVAL_S = 1.0
RETIRE_GRACE_S = 600.0  # how long a removed backend may finish its streams before it is closed


class GatewayRuntime:
    """Everything a request needs that outlives it."""

    def __init__(
        self,
        config: Config,
        registry: BackendRegistry,
        metrics: GatewayMetrics,
        tracing: Tracing,
        config_path: Path | None = None,
    ) -> None:
        self.config = config
        self.registry = registry
        self.metrics = metrics
        self.tracing = tracing
        self.config_path = config_path
        self.dispatcher = Dispatcher(config, registry.backends, on_admission_wait=metrics.observe_admission_wait)
        self.sample_log = Path(config.server.sample_log) if config.server.sample_log else default_log_path()
        self._config_mtime = config_path.stat().st_mtime if config_path else 0.0
        self._reload_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    # -- telemetry ---------------------------------------------------------------------------

    def record(self, outcome: RequestOutcome) -> None:
        """A finished request: to Prometheus, the access log and, in an experiment, the sample log."""
        self.metrics.observe(outcome)
        if self.config.server.access_log:
            write_access_log(outcome, log_prompts=self.config.server.log_prompts)
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
        )
        # A file append, off the event loop.
        asyncio.get_running_loop().run_in_executor(None, append_sample, self.sample_log, sample)

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run a coroutine in the background, keeping a reference until it ends."""
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- reloads -----------------------------------------------------------------------------

    async def reload(self, reason: str) -> tuple[bool, str]:
        """Re-read the policy file. A valid one applies (new backends started first); an
        invalid one is logged with file, line and field, counted, and the old one keeps serving."""
        if self.config_path is None:
            return False, "this gateway runs the embedded default config; start it with --config FILE to reload"
        async with self._reload_lock:
            path = self.config_path
            try:
                self._config_mtime = path.stat().st_mtime
                config = parse_config(path.read_text(), source=str(path))
                if config.server != self.config.server or config.auth != self.config.auth:
                    log.warning("policy reload: changes to `server` and `auth` apply at the next restart")
                retired = await self.registry.update(config)
                dispatcher = Dispatcher(
                    config,
                    self.registry.backends,
                    previous=self.dispatcher,
                    on_admission_wait=self.metrics.observe_admission_wait,
                )
            except (ConfigError, OSError, ValueError) as exc:
                self.metrics.reloads.labels("failure").inc()
                log.error("policy reload (%s) rejected, the previous policy keeps serving:\n%s", reason, exc)
                return False, str(exc)
            self.config = config
            self.dispatcher = dispatcher  # requests in flight keep the dispatcher they started with
            for backend in retired:
                self.spawn(self._retire(backend))
            self._scrape_remote_backends()
            self.metrics.reloads.labels("success").inc()
            log.info("policy reloaded (%s): %d backends, %d models", reason, len(config.backends), len(dispatcher.routes))
            return True, "reloaded"

    async def _retire(self, backend: Backend) -> None:
        """Close a backend the new policy dropped, once its requests are done."""
        deadline = time.monotonic() + RETIRE_GRACE_S
        while self.dispatcher.in_flight(backend.name) > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        await backend.close()

    async def watch(self) -> None:
        """Reload when the policy file changes on disk (polled: works on every filesystem,
        including Kubernetes ConfigMap volumes, whose updates are symlink swaps)."""
        assert self.config_path is not None
        while True:
            await asyncio.sleep(WATCH_INTERVAL_S)
            try:
                mtime = self.config_path.stat().st_mtime
            except OSError:
                continue  # mid-swap; look again next time
            if mtime != self._config_mtime:
                await self.reload("file changed")

    def _scrape_remote_backends(self) -> None:
        """Scrape each remote backend's /metrics every 500 ms (start new ones, stop removed)."""
        tracker = self.dispatcher.tracker
        wanted = {b.name: b.scrape_url() for b in self.config.backends if b.scrape_url()}
        scraped = tracker.scraped()
        for name in scraped - set(wanted):
            tracker.stop_scraping(name)
        for name, url in wanted.items():
            if name not in scraped:
                tracker.start_scraping(name, url)  # type: ignore[arg-type]

    def start_background(self) -> None:
        """Load scrapes of remote backends; the file watcher and the SIGHUP handler (where
        there is a config file to reload)."""
        self._scrape_remote_backends()
        if self.config_path is None:
            return
        if self.config.server.watch_config:
            self.spawn(self.watch())
        try:
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, lambda: self.spawn(self.reload("SIGHUP")))
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or no SIGHUP here
            log.debug("no SIGHUP handler installed")

    async def stop_background(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.dispatcher.tracker.aclose()

    def admin_key(self) -> str | None:
        name = self.config.server.admin_key_env
        return os.environ.get(name) if name else None
