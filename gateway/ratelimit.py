"""The rate limiter: RPM and TPM per key and per tenant, in-process or shared through Redis.

One decision per request covers every bucket that applies (key RPM/TPM, tenant RPM/TPM):
in-process it is a call to `policies.ratelimit.decide`; over Redis it is one EVALSHA of
the mirror Lua script (one round trip, atomic across replicas; the script also checks the
key's revocation when keys live in Redis).

Tokens are reserved up front (a prompt estimate plus max_tokens) and reconciled with the
usage the backend reports when the response ends, streamed or not, off the request path.

Redis down or slower than `redis.timeout_ms`: `fail_mode: open` serves the request
unlimited (logged, counted), `closed` answers 503 with Retry-After. After a failure the
limiter skips Redis for DOWN_BACKOFF_S, then tries again: recovery needs no restart.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Literal

from prometheus_client import CollectorRegistry, Counter

from backends.protocol import APIError
from policies.ratelimit import LUA_SCRIPT, Decision, Rate, adjust, decide
from policies.schema import LimitSpec

log = logging.getLogger("turnout.ratelimit")

DOWN_BACKOFF_S = 0.5  # after a Redis failure, apply the fail mode without calling Redis
FAIL_LOG_EVERY_S = 10.0
REDIS_CONNECTIONS = 64  # per gateway process


@dataclass(frozen=True)
class Bucket:
    """One limit as the stores see it: where its state lives and its rate."""

    key: str
    tokens: bool  # False: counts requests
    rate: Rate
    scope: str  # "key" | "tenant", for messages


def buckets_for(
    prefix: str, key_id: str, tenant: str, key: LimitSpec, tenant_spec: LimitSpec, burst_seconds: float
) -> tuple[Bucket, ...]:
    out = []
    for scope, name, spec in (("key", key_id, key), ("tenant", tenant, tenant_spec)):
        if spec.rpm:
            out.append(Bucket(f"{prefix}rl:{scope}:{name}:rpm", False, Rate.per_minute(spec.rpm, burst_seconds), scope))
        if spec.tpm:
            out.append(Bucket(f"{prefix}rl:{scope}:{name}:tpm", True, Rate.per_minute(spec.tpm, burst_seconds), scope))
    return tuple(out)


# -- errors the routes turn into responses -------------------------------------------------


class RateLimited(APIError):
    """429: the caller is over its own limit."""

    status = 429
    code = "rate_limit_exceeded"

    def __init__(
        self,
        kind: Literal["requests", "tokens"],
        limit: int,
        retry_after: float,
        scope: str,
        headers: list[tuple[bytes, bytes]],
    ) -> None:
        super().__init__(
            f"Rate limit reached for {kind} per minute ({scope} limit {limit}). "
            f"Please try again in {_duration(retry_after)}."
        )
        self.type = kind  # OpenAI's type for a rate-limit error: what ran out
        self.kind = kind
        self.retry_after = retry_after
        self.headers = headers  # x-ratelimit-*: AuthMiddleware adds them to the response

    def response_headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, math.ceil(self.retry_after))), "retry-after-ms": str(math.ceil(self.retry_after * 1000))}


class LimiterUnavailable(APIError):
    """503: the shared store cannot be reached and `fail_mode` is closed."""

    status = 503
    code = "service_unavailable"
    retry_after = 1.0

    def response_headers(self) -> dict[str, str]:
        return {"Retry-After": str(math.ceil(self.retry_after))}


class KeyRevoked(Exception):
    """The store says the key is revoked or gone (checked in the same round trip)."""


class StoreError(Exception):
    """The store failed or was too slow."""


# -- stores -----------------------------------------------------------------------------------


class InProcessStore:
    """Bucket state in this process's memory (one event loop: decisions are atomic)."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self.clock = clock
        self.tats: dict[str, float] = {}

    async def take(self, buckets: tuple[Bucket, ...], costs: list[float], record_key: str | None) -> Decision:
        now = self.clock()
        d = decide([self.tats.get(b.key) for b in buckets], [b.rate for b in buckets], costs, now)
        for b, tat in zip(buckets, d.tats):
            if tat is not None:
                self.tats[b.key] = tat
        if len(self.tats) > 100_000:  # forget full buckets: their state is implied
            self.tats = {k: v for k, v in self.tats.items() if v > now}
        return d

    async def adjust(self, buckets: tuple[Bucket, ...], deltas: list[float]) -> None:
        now = self.clock()
        for b, delta in zip(buckets, deltas):
            self.tats[b.key] = adjust(self.tats.get(b.key), b.rate, delta, now)

    async def close(self) -> None:
        pass


class RedisStore:
    """Bucket state in Redis, one EVALSHA per decision (redis-py reloads the script after
    a Redis restart)."""

    def __init__(self, client: Any) -> None:
        import redis

        self.client = client
        self.script = client.register_script(LUA_SCRIPT)
        self._errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError, asyncio.TimeoutError)

    async def _run(self, mode: str, buckets: tuple[Bucket, ...], costs: list[float], record_key: str | None) -> list[Any]:
        keys = [b.key for b in buckets]
        args: list[Any] = [mode, "0", ""]
        if record_key:
            keys.append(record_key)
            args[1] = "1"
        for b, cost in zip(buckets, costs):
            args += [repr(b.rate.interval), repr(b.rate.tau), cost]
        try:
            return await self.script(keys=keys, args=args)
        except self._errors as exc:
            raise StoreError(f"{type(exc).__name__}: {exc}") from exc

    async def take(self, buckets: tuple[Bucket, ...], costs: list[float], record_key: str | None) -> Decision:
        out = await self._run("take", buckets, costs, record_key)
        if int(out[0]) == -1:
            raise KeyRevoked()
        states = tuple(
            _BucketState(int(out[3 + 2 * i]), float(out[4 + 2 * i])) for i in range(len(buckets))
        )
        denied = int(out[2])
        return Decision(int(out[0]) == 1, float(out[1]), denied - 1 if denied else None, states, ())  # type: ignore[arg-type]

    async def adjust(self, buckets: tuple[Bucket, ...], deltas: list[float]) -> None:
        await self._run("adjust", buckets, deltas, None)

    async def close(self) -> None:
        await self.client.aclose()


@dataclass(frozen=True)
class _BucketState:
    remaining: int
    reset_after: float


def redis_client(url: str, timeout_ms: float) -> Any:
    """An asyncio Redis client that gives up after timeout_ms. It retries once, at once, on
    a connection error only: a pooled connection that a restarted Redis closed is replaced
    without failing the request; a slow Redis is never waited for twice."""
    import redis.asyncio as aredis
    from redis.backoff import NoBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.retry import Retry

    timeout = timeout_ms / 1000.0
    # A blocking pool: past REDIS_CONNECTIONS concurrent calls, a call waits (up to the
    # timeout) for a connection instead of failing at once as redis-py's default pool does.
    pool = aredis.BlockingConnectionPool.from_url(
        url,
        max_connections=REDIS_CONNECTIONS,
        timeout=timeout,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        decode_responses=True,
    )
    return aredis.Redis.from_pool(pool)  # closing the client closes the pool


# -- the limiter ------------------------------------------------------------------------------


class LimiterMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.limited = Counter("turnout_ratelimited_requests", "Requests refused with 429.", ["kind"], registry=registry)
        self.store_errors = Counter(
            "turnout_ratelimit_store_errors", "Rate-limit store calls that failed or timed out.", registry=registry
        )
        self.fail_open = Counter(
            "turnout_ratelimit_fail_open", "Requests served unlimited because the store was down.", registry=registry
        )
        self.fail_closed = Counter(
            "turnout_ratelimit_fail_closed", "Requests refused with 503 because the store was down.", registry=registry
        )


class Limiter:
    def __init__(self, store: InProcessStore | RedisStore, fail_mode: str, metrics: LimiterMetrics) -> None:
        self.store = store
        self.fail_open = fail_mode == "open"
        self.metrics = metrics
        self._down_until = 0.0
        self._last_log = -math.inf
        self._tasks: set[asyncio.Task[None]] = set()

    async def acquire(
        self,
        buckets: tuple[Bucket, ...],
        tokens: int,
        prompt_estimate: int,
        record_key: str | None,
        peek: bool = False,
    ) -> TokenReservation | None:
        """Take 1 request and `tokens` tokens from every bucket; a TokenReservation to settle later.

        A reservation larger than a bucket's capacity is capped at the capacity (it passes
        when the bucket is full; reconciliation charges the rest). `peek`: take nothing,
        never deny (headers, and the revocation check). None when the store is down and the
        fail mode is open. Raises RateLimited, LimiterUnavailable or KeyRevoked."""
        if peek:
            costs = [0] * len(buckets)
        else:
            costs = [min(tokens, math.floor(b.rate.capacity)) if b.tokens else 1 for b in buckets]
        if self._down_until and time.monotonic() < self._down_until:
            return self._store_down(None)
        try:
            decision = await self.store.take(buckets, costs, record_key)
        except StoreError as exc:
            self._down_until = time.monotonic() + DOWN_BACKOFF_S
            self.metrics.store_errors.inc()
            return self._store_down(exc)
        if self._down_until:
            self._down_until = 0.0
            log.warning("rate-limit store is back")
        headers = _headers(buckets, decision)
        if not decision.allowed:
            b = buckets[decision.denied_by]  # type: ignore[index]
            kind: Literal["requests", "tokens"] = "tokens" if b.tokens else "requests"
            self.metrics.limited.labels(kind).inc()
            raise RateLimited(kind, b.rate.limit, decision.retry_after, b.scope, headers)
        return TokenReservation(self, buckets, costs, prompt_estimate, headers)

    def _store_down(self, exc: Exception | None) -> None:
        now = time.monotonic()
        if exc is not None and now - self._last_log >= FAIL_LOG_EVERY_S:
            self._last_log = now
            action = "serving requests unlimited (fail_mode: open)" if self.fail_open else "refusing requests with 503 (fail_mode: closed)"
            log.error("rate-limit store unavailable (%s); %s", exc, action)
        if self.fail_open:
            self.metrics.fail_open.inc()
            return None
        self.metrics.fail_closed.inc()
        raise LimiterUnavailable("Rate limiting is unavailable; please retry shortly.")

    def settle(self, reservation: TokenReservation, used: int) -> None:
        """Charge or refund the difference between reserved and used tokens, in the background."""
        pairs = [(b, used - c) for b, c in zip(reservation.buckets, reservation.costs) if b.tokens and used != c]
        if not pairs:
            return
        task = asyncio.get_running_loop().create_task(self._adjust(tuple(p[0] for p in pairs), [p[1] for p in pairs]))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _adjust(self, buckets: tuple[Bucket, ...], deltas: list[float]) -> None:
        try:
            await self.store.adjust(buckets, deltas)
        except StoreError as exc:
            self.metrics.store_errors.inc()
            log.warning("could not reconcile token usage: %s", exc)

    async def close(self) -> None:
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=1.0)
        await self.store.close()


class TokenReservation:
    """A request's reservation: its rate-limit headers, and how to settle its tokens."""

    __slots__ = ("limiter", "buckets", "costs", "prompt_estimate", "headers", "done")

    def __init__(
        self,
        limiter: Limiter,
        buckets: tuple[Bucket, ...],
        costs: list[float],
        prompt_estimate: int,
        headers: list[tuple[bytes, bytes]],
    ) -> None:
        self.limiter = limiter
        self.buckets = buckets
        self.costs = costs
        self.prompt_estimate = prompt_estimate
        self.headers = headers
        self.done = False

    def settle(self, used: int | None) -> None:
        """Reconcile with `used` tokens (None: unknown, keep the reservation). Once."""
        if self.done:
            return
        self.done = True
        if used is not None:
            self.limiter.settle(self, used)


class NoReservation:
    """Nothing to meter: no limits apply, or the store is down and fail_mode is open."""

    headers: list[tuple[bytes, bytes]] = []

    def settle(self, used: int | None) -> None:
        pass


NO_RESERVATION = NoReservation()


# -- OpenAI's headers ---------------------------------------------------------------------------


def _duration(seconds: float) -> str:
    """OpenAI's reset format: `20ms`, `1.5s`, `6m0s`."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    if seconds < 60:
        return f"{math.ceil(seconds * 100) / 100:g}s"
    minutes, rest = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{rest}s"


def _headers(buckets: tuple[Bucket, ...], decision: Decision) -> list[tuple[bytes, bytes]]:
    """x-ratelimit-{limit,remaining,reset}-{requests,tokens} of the tightest bucket of each kind."""
    out = []
    for tokens, suffix in ((False, b"requests"), (True, b"tokens")):
        tightest = None
        for b, state in zip(buckets, decision.buckets):
            if b.tokens == tokens and (tightest is None or state.remaining < tightest[1].remaining):
                tightest = (b, state)
        if tightest is not None:
            b, state = tightest
            out += [
                (b"x-ratelimit-limit-" + suffix, str(b.rate.limit).encode()),
                (b"x-ratelimit-remaining-" + suffix, str(state.remaining).encode()),
                (b"x-ratelimit-reset-" + suffix, _duration(state.reset_after).encode()),
            ]
    return out
