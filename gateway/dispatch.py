"""From a model alias to an answer: pick a backend of the route's pool with its strategy,
call it, retry on another backend before the first byte, fall back to other aliases in order,
and keep each backend's circuit breaker.

The decisions (which backend, whether to retry, when to eject) are the pure functions in
policies/; this module only applies them to live calls.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from backends.protocol import Backend, ModelNotFound, UpstreamError
from policies.circuit import CircuitBoard, CircuitConfig
from policies.experiments import Experiment, experiments_by_model
from policies.retry import Backoff, Outcome, RetryPolicy, classify, counts_against_backend
from policies.routing import NoReplicaAvailable, ReplicaState, RequestFeatures, Strategy, make_strategy
from gateway.tracing import Tracing
from policies.schema import Config, RouteConfig

log = logging.getLogger("turnout.dispatch")

T = TypeVar("T")


@dataclass
class Route:
    """A route's live parts: its pool, strategy instance, retry policy and deadlines."""

    config: RouteConfig
    strategy: Strategy
    retry: RetryPolicy


class Lease:
    """A call in flight on one backend; `release()` when its answer is done (once)."""

    __slots__ = ("backend", "name", "_counts", "_released")

    def __init__(self, name: str, backend: Backend, counts: dict[str, int]) -> None:
        self.name = name
        self.backend = backend
        self._counts = counts
        self._released = False
        counts[name] = counts.get(name, 0) + 1

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._counts[self.name] -= 1


class Dispatcher:
    """One policy's routing state. A reload builds a new Dispatcher; calls in flight keep
    the one they started with (and the backends it holds)."""

    def __init__(
        self,
        config: Config,
        backends: Mapping[str, Backend],
        *,
        in_flight: dict[str, int] | None = None,
        board: CircuitBoard | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.backends = backends
        self.weights = {b.name: b.weight for b in config.backends}
        # Shared across reloads, so counts and ejections survive a policy change.
        self.in_flight = in_flight if in_flight is not None else {}
        circuit = config.circuit
        self.board = board or CircuitBoard(
            CircuitConfig(failure_threshold=circuit.failures, window_s=circuit.window_s, cooldown_s=circuit.cooldown_s)
        )
        self.clock = clock
        self.rng = rng or random.Random()
        self.routes = {alias: self._route(config.route(alias)) for alias in config.aliases()}
        self.experiments: dict[str, Experiment] = experiments_by_model(config.experiments)

    def _route(self, cfg: RouteConfig) -> Route:
        retries = cfg.retries
        backoff = Backoff(base_s=retries.backoff_base_s, max_s=max(retries.backoff_max_s, retries.backoff_base_s))
        return Route(cfg, make_strategy(cfg.strategy, **cfg.strategy_params), RetryPolicy(retries.max_retries, backoff))

    def route(self, alias: str) -> Route:
        try:
            return self.routes[alias]
        except KeyError:
            raise ModelNotFound(f"The model '{alias}' does not exist or you do not have access to it.", param="model") from None

    def replicas(self, pool: Sequence[str], skip: set[str] = frozenset()) -> list[ReplicaState]:  # type: ignore[assignment]
        """What the strategy sees of each backend of a pool, now."""
        now = self.clock()
        return [
            ReplicaState(
                name=name,
                weight=self.weights.get(name, 1.0),
                in_flight=self.in_flight.get(name, 0),
                load=self.backends[name].load(),
                available=name not in skip and self.board.available(name, now),
            )
            for name in pool
        ]

    async def call(
        self,
        alias: str,
        attempt: Callable[[Backend, Route], Awaitable[T]],
        features: RequestFeatures,
        pool: Sequence[str] | None = None,
        tracing: Tracing | None = None,
        span: Any = None,
    ) -> tuple[Lease, T]:
        """Run `attempt` on a backend for `alias` (or the given `pool`, an experiment's
        variant), with retries and then each fallback alias. Returns the lease, still held:
        the caller releases it when the answer is done (a stream, later). With `tracing`,
        each routing decision is a child span of `span`."""
        chain = [alias, *self.route(alias).config.fallbacks]
        last: BaseException | None = None
        for position, name in enumerate(chain):
            route = self.route(name)
            members = list(pool) if pool is not None and position == 0 else route.config.backends
            try:
                return await self._try_pool(route, members, attempt, features, tracing, span)
            except NoReplicaAvailable as exc:
                last = exc
            except Exception as exc:
                if classify(exc) not in (Outcome.CONNECT_ERROR, Outcome.TIMEOUT, Outcome.SERVER_ERROR, Outcome.OVERLOADED):
                    raise  # the request itself is wrong: another alias would say the same
                last = exc
            if position + 1 < len(chain):
                log.warning("model %r: pool failed (%s); falling back to %r", name, last, chain[position + 1])
        assert last is not None
        raise last

    async def _try_pool(
        self,
        route: Route,
        members: Sequence[str],
        attempt: Callable[[Backend, Route], Awaitable[T]],
        features: RequestFeatures,
        tracing: Tracing | None,
        span: Any,
    ) -> tuple[Lease, T]:
        tried: set[str] = set()
        attempts = 0
        while True:
            replicas = self.replicas(members, tried)
            if tried and not any(r.eligible() for r in replicas):
                replicas = self.replicas(members)  # every backend tried once: allow a second go
            if tracing is not None and span is not None:
                with tracing.span("turnout.route", span, **{"turnout.strategy": route.config.strategy}) as decision:
                    name = route.strategy.choose(features, replicas)
                    decision.set_attribute("turnout.backend", name)
            else:
                name = route.strategy.choose(features, replicas)
            now = self.clock()
            breaker = self.board.breaker(name)
            breaker.begin(now)
            lease = Lease(name, self.backends[name], self.in_flight)
            attempts += 1
            try:
                result = await attempt(lease.backend, route)
            except BaseException as exc:
                lease.release()
                outcome = classify(exc)
                if counts_against_backend(outcome):
                    breaker.record_failure(self.clock())
                if not route.retry.should_retry(outcome, attempts_made=attempts, first_byte_sent=False):
                    raise
                tried.add(name)
                log.info("backend %r failed (%s: %s); retrying", name, outcome.value, exc)
                await asyncio.sleep(route.retry.backoff.delay(attempts, self.rng))
                continue
            breaker.record_success(self.clock())
            return lease, result

    def healthy(self) -> bool:
        """Ready when every alias has at least one backend that is up."""
        return all(any(r.eligible() for r in self.replicas(route.config.backends)) for route in self.routes.values())


# -- deadlines -----------------------------------------------------------------------------------
# asyncio.timeout arms one timer per await (no task per chunk): cheap enough for every token.


async def first_item(stream: AsyncIterator[T], timeout_s: float) -> T:
    """The stream's first item within the deadline; the stream is closed on any failure."""
    try:
        async with asyncio.timeout(timeout_s):
            return await anext(stream)
    except BaseException:
        await _aclose(stream)
        raise


async def until_deadline(first: T, rest: AsyncIterator[T], deadline: float) -> AsyncIterator[T]:
    """`first`, then `rest`, cut off with an in-band error at `deadline` (the loop's clock)."""
    try:
        yield first
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    item = await anext(rest)
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise UpstreamError("The generation exceeded the route's total timeout.") from None
            yield item
    finally:
        await _aclose(rest)


async def _aclose(stream: Any) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()
