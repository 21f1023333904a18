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
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

from backends.protocol import (
    Backend,
    ChatCompletionRequest,
    CompletionRequest,
    ContextLengthExceeded,
    Embeds,
    InvalidRequest,
    ModelNotFound,
    Passthrough,
    PushesLoad,
)
from gateway.admission import AdmissionController
from gateway.load_tracker import LoadTracker
from policies.circuit import CircuitBoard, CircuitConfig
from policies.experiments import Experiment, experiments_by_model
from policies.retry import Backoff, Outcome, RetryPolicy, classify, counts_against_backend
from policies.routing import (
    CacheAwareStrategy,
    NoReplicaAvailable,
    PrefixAffinityStrategy,
    ReplicaState,
    RequestFeatures,
    Strategy,
    make_strategy,
)
from gateway.tracing import Tracing
from policies.schema import Config, RouteConfig

log = logging.getLogger("turnout.dispatch")

PREFIX_STRATEGIES = (PrefixAffinityStrategy, CacheAwareStrategy)  # they need the prompt's prefix hashes

T = TypeVar("T")


@dataclass
class Route:
    """A route's live parts: its pool, strategy instance (which may hold a prefix index),
    retry policy and admission queue."""

    config: RouteConfig
    strategy: Strategy
    retry: RetryPolicy
    admission: AdmissionController | None

    @property
    def uses_prefixes(self) -> bool:
        return isinstance(self.strategy, PREFIX_STRATEGIES)


class Lease:
    """A call in flight on one backend: its KV reservation in the load tracker and its
    admission slot. `release()` when the answer is done (once; later calls do nothing)."""

    __slots__ = ("backend", "name", "_reservation", "_tracker", "_on_release")

    def __init__(self, name: str, backend: Backend, tracker: LoadTracker, features: RequestFeatures) -> None:
        self.name = name
        self.backend = backend
        self._tracker = tracker
        self._reservation = tracker.reserve(name, features.prompt_tokens, features.max_tokens or 0)
        self._on_release: Callable[[], None] | None = None

    def release(self) -> None:
        self._tracker.release(self._reservation)  # idempotent
        if self._on_release is not None:
            done, self._on_release = self._on_release, None
            done()

    def pass_slot(self, to: Lease) -> None:
        """Move this call's admission slot to `to`: a stream resumed on another backend
        keeps its place (gateway.resume)."""
        to._on_release, self._on_release = self._on_release, None


class Dispatcher:
    """One policy's routing state. A reload builds a new Dispatcher from the old one: the
    load picture, circuit breakers and (for unchanged routes) strategies carry over; calls
    in flight keep the dispatcher they started with."""

    def __init__(
        self,
        config: Config,
        backends: Mapping[str, Backend],
        *,
        previous: Dispatcher | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        on_admission_wait: Callable[[str, float], None] | None = None,
    ) -> None:
        self.config = config
        self.backends = backends
        self.weights = {b.name: b.weight for b in config.backends}
        self.served_model = {b.name: b.model for b in config.backends}  # what each backend serves (stream resume)
        circuit = config.circuit
        self.tracker = previous.tracker if previous else LoadTracker(clock=clock)
        self.board = previous.board if previous else CircuitBoard(
            CircuitConfig(failure_threshold=circuit.failures, window_s=circuit.window_s, cooldown_s=circuit.cooldown_s)
        )
        self.clock = clock
        self.rng = rng or random.Random()
        self.on_admission_wait = on_admission_wait
        old_routes = previous.routes if previous else {}
        self.routes = {alias: self._route(config.route(alias), old_routes.get(alias)) for alias in config.aliases()}
        self.experiments: dict[str, Experiment] = experiments_by_model(config.experiments)
        # Capabilities, asked once per policy (an isinstance on a Protocol costs microseconds).
        self.passthrough: dict[str, Passthrough] = {n: b for n, b in backends.items() if isinstance(b, Passthrough)}
        self.embedders = frozenset(n for n, b in backends.items() if isinstance(b, Embeds))
        self.embed_only = frozenset(b.name for b in config.backends if b.task == "embed")
        self._polled = {n for n, b in backends.items() if not isinstance(b, PushesLoad)}  # asked with load()
        for name, backend in backends.items():
            if isinstance(backend, PushesLoad):  # remote: reports ride on its responses
                backend.on_load_report = partial(self.tracker.observe, name)

    def _route(self, cfg: RouteConfig, old: Route | None) -> Route:
        if old is not None and old.config == cfg:
            return old  # keeps the strategy's state (prefix index, round-robin credit) and queue
        retries = cfg.retries
        backoff = Backoff(base_s=retries.backoff_base_s, max_s=max(retries.backoff_max_s, retries.backoff_base_s))
        admission = None
        if cfg.admission is not None:
            section, pool = cfg.admission, cfg.backends
            fallback_limit = sum(self.backends[n].load().max_running for n in pool)

            def limit() -> int:
                return section.limit or self.tracker.pool_capacity(pool) or fallback_limit

            wait_hook = partial(self.on_admission_wait, cfg.model) if self.on_admission_wait else None
            admission = AdmissionController(limit, section.max_queue, section.default_deadline_s, on_wait=wait_hook)
        strategy = make_strategy(cfg.strategy, **cfg.strategy_params)
        return Route(cfg, strategy, RetryPolicy(retries.max_retries, backoff), admission)

    def route(self, alias: str) -> Route:
        try:
            return self.routes[alias]
        except KeyError:
            raise ModelNotFound(f"The model '{alias}' does not exist or you do not have access to it.", param="model") from None

    def max_tokens_ceiling(self, alias: str) -> tuple[int | None, bool]:
        """The most tokens a request for `alias` may ask to generate, and whether that is
        the route's own `max_tokens` (True) or the smallest context length its backends
        report (False; None when none reports one: no ceiling)."""
        route = self.routes[alias]
        if route.config.max_tokens is not None:
            return route.config.max_tokens, True
        windows = [card.max_model_len for name in route.config.backends for card in self.backends[name].models()[:1]]
        known = [w for w in windows if w]
        return (min(known) if known else None), False

    def check_output_limit(self, request: ChatCompletionRequest | CompletionRequest) -> None:
        """A 400 naming the param when max_tokens (or max_completion_tokens) is over the
        route's ceiling, before anything is reserved or dispatched: an upstream would
        otherwise be asked for, and relay, whatever a client writes there. An unknown
        model is left to `call` (its 404)."""
        asked = [("max_tokens", request.max_tokens)]
        if isinstance(request, ChatCompletionRequest):
            asked.insert(0, ("max_completion_tokens", request.max_completion_tokens))
        asked = [(param, n) for param, n in asked if n is not None]
        if not asked or request.model not in self.routes:
            return
        ceiling, configured = self.max_tokens_ceiling(request.model)
        if ceiling is None:
            return
        for param, n in asked:
            if n <= ceiling:
                continue
            if configured:
                raise InvalidRequest(
                    f"{param} is too large: {n}. This model supports at most {ceiling} completion tokens, whereas you provided {n}.",
                    param=param,
                    code="invalid_value",
                )
            # Over the whole context window, whatever the prompt: the engines' words and code.
            raise ContextLengthExceeded(
                f"This model's maximum context length is {ceiling} tokens. However, you requested "
                f"{n} in the completion alone ({param}). Please reduce the length of the completion.",
                param=param,
            )

    def check_serves(self, alias: str, kind: str) -> None:
        """A 400 when the route's backends do not serve `kind` of request: embeddings from a
        pool with no backend that embeds, a chat or completion from a pool of `task: embed`
        backends. An unknown model is left to `call` (its 404)."""
        route = self.routes.get(alias)
        if route is None:
            return
        pool = route.config.backends
        if kind == "embeddings":
            if not any(name in self.embedders for name in pool):
                raise InvalidRequest(f"The model '{alias}' does not serve embeddings.", param="model", code="model_not_supported")
        elif all(name in self.embed_only for name in pool):
            raise InvalidRequest(
                f"The model '{alias}' is an embedding model: it serves /v1/embeddings only.", param="model", code="model_not_supported"
            )

    def in_flight(self, name: str) -> int:
        return self.tracker.in_flight(name)

    def replicas(self, pool: Sequence[str], skip: set[str] = frozenset()) -> list[ReplicaState]:  # type: ignore[assignment]
        """What the strategy sees of each backend of a pool, now: the last load report
        (bridged with this gateway's own reservations since), in-flight count, circuit."""
        now = self.clock()
        states = []
        for name in pool:
            if name in self._polled:
                self.tracker.observe(name, self.backends[name].load())  # local: always current, and cheap
            available = name not in skip and self.board.available(name, now)
            states.append(self.tracker.replica_state(name, weight=self.weights.get(name, 1.0), available=available))
        return states

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
        variant): wait for an admission slot where the route has a queue, then try the pool
        with retries and then each fallback alias. Returns the lease, still held: the caller
        releases it when the answer is done (a stream, later). With `tracing`, the admission
        wait and each routing decision are child spans of `span`."""
        primary = self.route(alias)
        slot = None
        if primary.admission is not None:
            batch = features.priority > 0
            section = primary.config.admission
            assert section is not None
            deadline = section.batch_deadline_s if batch else section.default_deadline_s
            with _span(tracing, "turnout.admission", span):
                slot = await primary.admission.acquire("batch" if batch else "interactive", deadline)
        try:
            lease, result = await self._call_chain(alias, attempt, features, pool, tracing, span)
        except BaseException:
            if slot is not None:
                primary.admission.release(slot)  # type: ignore[union-attr]
            raise
        if slot is not None:
            lease._on_release = partial(primary.admission.release, slot)  # type: ignore[union-attr]
        return lease, result

    async def _call_chain(
        self,
        alias: str,
        attempt: Callable[[Backend, Route], Awaitable[T]],
        features: RequestFeatures,
        pool: Sequence[str] | None,
        tracing: Tracing | None,
        span: Any,
    ) -> tuple[Lease, T]:
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
        failure: BaseException | None = None  # the last attempt's error, once there was one
        while True:
            replicas = self.replicas(members, tried)
            if tried and not any(r.eligible() for r in replicas):
                replicas = self.replicas(members)  # every backend tried once: allow a second go
            with _span(tracing, "turnout.route", span, **{"turnout.strategy": route.config.strategy}) as decision:
                try:
                    name = route.strategy.choose(features, replicas)
                except NoReplicaAvailable:
                    if failure is not None:
                        raise failure from None  # what went wrong tells the client more
                    raise
                if decision is not None:
                    decision.set_attribute("turnout.backend", name)
            breaker = self.board.breaker(name)
            breaker.begin(self.clock())
            lease = Lease(name, self.backends[name], self.tracker, features)
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
                failure = exc
                tried.add(name)
                log.info("backend %r failed (%s: %s); retrying", name, outcome.value, exc)
                await asyncio.sleep(route.retry.backoff.delay(attempts, self.rng))
                continue
            breaker.record_success(self.clock())
            return lease, result

    async def resume(
        self,
        alias: str,
        attempt: Callable[[Backend, Route], Awaitable[T]],
        features: RequestFeatures,
        members: Sequence[str],
        failed: frozenset[str],
        tracing: Tracing | None = None,
        span: Any = None,
    ) -> tuple[Lease, T]:
        """Run `attempt`, a failed stream's continuation, on a backend of `members` that serves
        the model the `failed` ones served, and is not one of them. No admission (the stream
        keeps its slot) and no fallback aliases (another model would not continue the text)."""
        models = {self.served_model[name] for name in failed}
        candidates = [n for n in members if n not in failed and self.served_model.get(n) in models]
        if not candidates:
            raise NoReplicaAvailable(f"no other backend of model {alias!r} serves {', '.join(sorted(models))}")
        return await self._try_pool(self.route(alias), candidates, attempt, features, tracing, span)

    def healthy(self) -> bool:
        """Ready when every alias has at least one backend that is up."""
        return all(any(r.eligible() for r in self.replicas(route.config.backends)) for route in self.routes.values())


def _span(tracing: Tracing | None, name: str, parent: Any, **attributes: Any) -> Any:
    if tracing is None or parent is None:
        return nullcontext(None)
    return tracing.span(name, parent, **attributes)
