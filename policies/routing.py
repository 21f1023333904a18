"""Routing strategies: given a request and a pool's replicas, name the replica to call.

Pure: no I/O, no clocks; randomness comes from an injected `random.Random`. The gateway
builds a `ReplicaState` per backend of the pool (its weight from the policy, its in-flight
count, its last LoadReport, and `available` = circuit closed/probe allowed and healthy),
then asks the route's strategy. kv_pressure, prefix_affinity and cache_aware (below) join
through `register_strategy` and need nothing more than what `RequestFeatures` carries.
"""

from __future__ import annotations

import abc
import bisect
import hashlib
import math
import random
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from backends.protocol import LoadReport, Overloaded


@dataclass(frozen=True)
class RequestFeatures:
    """What a strategy may know about a request (computed once by the gateway)."""

    model: str  # the alias the client asked for
    prompt_tokens: int = 0  # exact count where tokenized, else an estimate (bytes / 4)
    max_tokens: int | None = None
    priority: int = 0
    sticky_key: str | None = None  # session / tenant key for affinity-style strategies
    # Hashes of the prompt's leading blocks (hash-chained, as the paged engine's prefix
    # cache computes them): prefix_affinity will match them against replicas' caches.
    prefix_hashes: tuple[int, ...] = ()


@dataclass
class ReplicaState:
    """One backend of a pool as the router sees it at decision time."""

    name: str
    weight: float = 1.0
    in_flight: int = 0
    load: LoadReport | None = None
    available: bool = True

    def eligible(self) -> bool:
        """Can take traffic: available, not drained (weight 0), not self-reported unhealthy."""
        if not self.available or self.weight <= 0:
            return False
        return self.load is None or self.load.healthy


class NoReplicaAvailable(Overloaded):
    """Every replica of the pool is ejected, drained or unhealthy.

    An `Overloaded` (503 + Retry-After): the system, not the caller, is the problem, and the
    gateway may still try the route's fallbacks before answering with it.
    """

    code = "no_backend_available"

    def __init__(self, model: str, replicas: Sequence[ReplicaState], *, retry_after: float = 1.0) -> None:
        names = ", ".join(r.name for r in replicas) or "none configured"
        super().__init__(f"no backend is available for model '{model}' (pool: {names})", retry_after=retry_after)
        self.model = model


def eligible(request: RequestFeatures, replicas: Sequence[ReplicaState]) -> list[ReplicaState]:
    """The replicas that may take traffic, in the given order; raises when there are none."""
    out = [r for r in replicas if r.eligible()]
    if not out:
        raise NoReplicaAvailable(request.model, replicas)
    return out


class Strategy(abc.ABC):
    """Picks one replica of a pool. Instances hold per-route state (counters, RNG) and are
    called from the event loop only, so they need no locks."""

    name: ClassVar[str]

    @abc.abstractmethod
    def choose(self, request: RequestFeatures, replicas: Sequence[ReplicaState]) -> str:
        """The name of the replica to call. Raises `NoReplicaAvailable` when none is eligible."""


_STRATEGIES: dict[str, Callable[..., Strategy]] = {}


def register_strategy(name: str) -> Callable[[type[Strategy]], type[Strategy]]:
    """Class decorator: make a strategy constructible by name from a policy file."""

    def deco(cls: type[Strategy]) -> type[Strategy]:
        if name in _STRATEGIES:
            raise ValueError(f"strategy {name!r} is already registered")
        cls.name = name
        _STRATEGIES[name] = cls
        return cls

    return deco


def strategy_names() -> list[str]:
    """Names a policy may use, sorted (for error messages and the schema)."""
    return sorted(_STRATEGIES)


def make_strategy(name: str, **params: Any) -> Strategy:
    """Build the strategy a route names, e.g. `make_strategy("weighted", seed=7)`."""
    try:
        factory = _STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown routing strategy {name!r}; known: {', '.join(strategy_names())}") from None
    try:
        return factory(**params)
    except (TypeError, ValueError) as exc:  # an option it does not take, or a bad value: say which strategy
        raise ValueError(f"strategy {name!r}: {exc}") from exc


@register_strategy("weighted")
class WeightedStrategy(Strategy):
    """Random choice in proportion to weight among eligible replicas.

    Weights are relative (90/10 and 0.9/0.1 mean the same). An ejected replica's share goes
    to the others in proportion to their weights.
    """

    def __init__(self, rng: random.Random | None = None, seed: int | None = None) -> None:
        if rng is not None and seed is not None:
            raise TypeError("give rng or seed, not both")
        self.rng = rng if rng is not None else random.Random(seed)

    def choose(self, request: RequestFeatures, replicas: Sequence[ReplicaState]) -> str:
        candidates = eligible(request, replicas)
        cumulative: list[float] = []
        total = 0.0
        for r in candidates:
            total += r.weight
            cumulative.append(total)
        point = self.rng.random() * total
        # bisect_right: a point exactly on a boundary belongs to the next replica, so every
        # replica owns a half-open interval [start, end) of width = its weight.
        index = min(bisect.bisect_right(cumulative, point), len(candidates) - 1)
        return candidates[index].name


@register_strategy("round_robin")
class RoundRobinStrategy(Strategy):
    """Smooth weighted round robin (nginx's): with equal weights, plain rotation; with
    weights 2:1, the cycle A B A (spread out, never A A in a burst when avoidable).

    Deterministic: no RNG. State survives replicas coming and going: an ejected replica
    simply stops accumulating credit.
    """

    def __init__(self) -> None:
        self._credit: dict[str, float] = {}

    def choose(self, request: RequestFeatures, replicas: Sequence[ReplicaState]) -> str:
        candidates = eligible(request, replicas)
        total = sum(r.weight for r in candidates)
        best: ReplicaState | None = None
        for r in candidates:
            self._credit[r.name] = self._credit.get(r.name, 0.0) + r.weight
            if best is None or self._credit[r.name] > self._credit[best.name]:
                best = r
        assert best is not None
        self._credit[best.name] -= total
        # Forget replicas no longer in the pool (a reload removed them).
        known = {r.name for r in replicas}
        for name in [n for n in self._credit if n not in known]:
            del self._credit[name]
        return best.name


@register_strategy("least_load")
class LeastLoadStrategy(Strategy):
    """Fewest requests in flight from this gateway; ties go to the higher weight, then to
    the first name in sort order (deterministic, so tests and simulations reproduce)."""

    def choose(self, request: RequestFeatures, replicas: Sequence[ReplicaState]) -> str:
        candidates = eligible(request, replicas)
        return min(candidates, key=lambda r: (r.in_flight, -r.weight, r.name)).name



# ---------------------------------------------------------------------------
# KV- and prefix-aware routing
# ---------------------------------------------------------------------------
#
# The three strategies below read what `ReplicaState.load` says about a replica's KV cache
# (the gateway's LoadTracker has already subtracted the blocks it reserved since that
# report, and set `load` to None once a report is stale) and what `RequestFeatures` says of
# the request (prompt tokens, max_tokens, prefix block hashes).
#
# One hard rule is shared by all three (`kv_candidates`): a replica that is known not to
# have room for the prompt is never chosen while another replica is known to have room, or
# is not known at all. "Room" is counted in the replica's own block size.

# Prompt hashing for prefix affinity. The gateway of a remote pool has no tokenizer, so it
# hashes text: one block = block_size * CHARS_PER_TOKEN characters (~4 characters per token
# in English BPE vocabularies). Those chunk hashes never equal the engine's token-block
# hashes, and need not: affinity only needs "same leading text -> same leading hashes" at the
# gateway, so that requests sharing a prefix are sent to the replica whose engine already
# cached that prefix in its own token blocks. A chunk boundary that falls mid-token costs at
# most one block of precision at the point where two prompts diverge.
CHARS_PER_TOKEN = 4

_ROOT_HASH = 0  # the chain's parent for the first block (a fixed value: stable across processes)


def _chain(parent: int, payload: bytes) -> int:
    # blake2b, not hash(): Python's str hash is salted per process, and gateways running
    # side by side must agree on the same prompt's hashes.
    digest = hashlib.blake2b(parent.to_bytes(8, "little") + payload, digest_size=8).digest()
    return int.from_bytes(digest, "little")


def prefix_block_hashes(
    prompt: Sequence[int] | str,
    block_size: int,
    max_blocks: int | None = None,
    *,
    chars_per_token: int = CHARS_PER_TOKEN,
    known: Sequence[int] = (),
) -> tuple[int, ...]:
    """Hash-chained hashes of the prompt's full leading blocks (the last, partial block is
    not hashed, as the engine's prefix cache does not cache it either).

    `prompt` is token ids (block = `block_size` tokens) or text (block = `block_size *
    chars_per_token` characters). Hash i covers blocks 0..i, so equal hashes mean equal
    whole prefixes. `known` are the already computed hashes of this prompt's first blocks
    (a conversation that grew): only the blocks after them are hashed.
    """
    if block_size < 1:
        raise ValueError("block_size must be >= 1")
    if isinstance(prompt, str):
        width = block_size * chars_per_token
        n = len(prompt) // width
    else:
        width = block_size
        n = len(prompt) // width
    if max_blocks is not None:
        n = min(n, max_blocks)
    out = list(known[:n])
    parent = out[-1] if out else _ROOT_HASH
    for i in range(len(out), n):
        chunk = prompt[i * width : (i + 1) * width]
        if isinstance(chunk, str):
            payload = chunk.encode("utf-8")
        else:
            payload = array("q", chunk).tobytes()
        parent = _chain(parent, payload)
        out.append(parent)
    return tuple(out)


def chat_prefix_text(messages: Iterable[tuple[str, str]]) -> str:
    """The text a chat request's prefix hashes are computed over: each (role, content)
    pair with separators that cannot be confused with content boundaries."""
    return "".join(f"{role}\x1f{content}\x1e" for role, content in messages)


def _blocks(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


def request_blocks(request: RequestFeatures, block_size: int, default_max_tokens: int) -> tuple[int, int]:
    """(blocks for the prompt, blocks for prompt + max_tokens) in a replica's block size."""
    max_tokens = request.max_tokens if request.max_tokens is not None else default_max_tokens
    prompt = max(1, request.prompt_tokens)
    return _blocks(prompt, block_size), _blocks(prompt + max_tokens, block_size)


def knows_kv(replica: ReplicaState) -> bool:
    """Whether the replica's (fresh) report describes a paged KV cache."""
    return replica.load is not None and replica.load.block_size > 0


def prompt_fits(request: RequestFeatures, replica: ReplicaState, default_max_tokens: int = 256) -> bool | None:
    """True / False when the replica's reported free blocks can / cannot hold the prompt;
    None when the replica reports no KV cache or no fresh report."""
    if not knows_kv(replica):
        return None
    assert replica.load is not None
    prompt_blocks, _ = request_blocks(request, replica.load.block_size, default_max_tokens)
    return replica.load.kv_free_blocks >= prompt_blocks


def kv_candidates(request: RequestFeatures, replicas: Sequence[ReplicaState], default_max_tokens: int = 256) -> list[ReplicaState]:
    """The eligible replicas a KV-aware strategy may pick from.

    Known to hold the prompt, plus the unknown ones; if none is either, every eligible
    replica (nothing fits anywhere: the engines will queue the request, the strategy picks
    the least bad). So a replica known to be too full is never chosen while another one
    might hold the prompt.
    """
    candidates = eligible(request, replicas)
    fits = [r for r in candidates if prompt_fits(request, r, default_max_tokens) is not False]
    return fits or candidates


def kv_usage_after(request: RequestFeatures, replica: ReplicaState, default_max_tokens: int = 256) -> float | None:
    """Fraction of the replica's KV blocks in use once this request has all of its blocks
    (prompt + max_tokens); above 1 when it would not fit. None when unknown."""
    if not knows_kv(replica):
        return None
    load = replica.load
    assert load is not None
    _, need = request_blocks(request, load.block_size, default_max_tokens)
    if load.kv_usage >= 1.0 or load.kv_free_blocks <= 0:
        return 1.0 + need / max(1, need)  # full: capacity unknown, but worse than any fit
    capacity = load.kv_free_blocks / (1.0 - load.kv_usage)
    return 1.0 - (load.kv_free_blocks - need) / capacity


def queue_pressure(replica: ReplicaState, default_max_running: int = 64) -> float:
    """Requests ahead of a new one, relative to what the replica runs at once: (running +
    waiting) / max_running from its report, the gateway's in-flight count when unknown."""
    load = replica.load
    if load is None:
        return replica.in_flight / default_max_running
    cap = max(1, load.max_running)
    # The report may predate requests this gateway sent since: take the larger view.
    return max(load.running + load.waiting, replica.in_flight) / cap


def _check_weight(name: str, value: float) -> float:
    if value < 0:
        raise ValueError(f"{name} must be >= 0")
    return float(value)


@register_strategy("kv_pressure")
class KvPressureStrategy(Strategy):
    """Lowest pressure after this request:

        kv_weight * KV usage after prompt + max_tokens
        + waiting_weight * waiting / max_running + running_weight * running / max_running

    among the replicas known to have room for the prompt (`kv_candidates`). A replica with
    a fresh KV report beats one without: with no report among the candidates, the fewest
    in flight wins. Ties: fewest in flight, then name (deterministic).
    """

    def __init__(
        self,
        kv_weight: float = 1.0,
        waiting_weight: float = 1.0,
        running_weight: float = 0.25,
        default_max_tokens: int = 256,
    ) -> None:
        self.kv_weight = _check_weight("kv_weight", kv_weight)
        self.waiting_weight = _check_weight("waiting_weight", waiting_weight)
        self.running_weight = _check_weight("running_weight", running_weight)
        self.default_max_tokens = default_max_tokens

    def score(self, request: RequestFeatures, replica: ReplicaState) -> float:
        """The pressure a replica would be under with this request (lower is better)."""
        load = replica.load
        usage = kv_usage_after(request, replica, self.default_max_tokens)
        assert load is not None and usage is not None
        cap = max(1, load.max_running)
        return self.kv_weight * usage + self.waiting_weight * load.waiting / cap + self.running_weight * load.running / cap

    def choose(self, request: RequestFeatures, replicas: Sequence[ReplicaState]) -> str:
        candidates = kv_candidates(request, replicas, self.default_max_tokens)
        known = [r for r in candidates if knows_kv(r)]
        if not known:
            return min(candidates, key=lambda r: (r.in_flight, -r.weight, r.name)).name
        return min(known, key=lambda r: (self.score(request, r), r.in_flight, r.name)).name


class PrefixIndex:
    """The router's picture of which prefixes each replica holds: per replica, a bounded
    LRU of the prefix block hashes it routed there.

    A request's hashes are recorded last block first, so a prompt's shared leading blocks
    are the most recently used and are evicted last (as the engine frees a sequence's tail
    blocks into its LRU first). Size it near the replica's KV capacity in blocks: the
    engine cannot have kept more than that.
    """

    def __init__(self, max_per_replica: int = 16384) -> None:
        if max_per_replica < 1:
            raise ValueError("max_prefixes_per_replica must be >= 1")
        self.max_per_replica = max_per_replica
        self._lru: dict[str, OrderedDict[int, None]] = {}

    def match(self, replica: str, hashes: Sequence[int]) -> int:
        """Leading blocks of `hashes` this replica served (the longest recorded prefix)."""
        lru = self._lru.get(replica)
        if not lru:
            return 0
        n = 0
        for h in hashes:
            if h not in lru:
                break
            n += 1
        return n

    def record(self, replica: str, hashes: Sequence[int]) -> None:
        """Remember that `replica` now holds these prefix blocks."""
        lru = self._lru.setdefault(replica, OrderedDict())
        for h in reversed(hashes):
            lru[h] = None
            lru.move_to_end(h)
        while len(lru) > self.max_per_replica:
            lru.popitem(last=False)

    def forget(self, replica: str) -> None:
        """Drop a replica's entries (it restarted, or left the pool)."""
        self._lru.pop(replica, None)

    def size(self, replica: str) -> int:
        return len(self._lru.get(replica, ()))


def replica_load(replica: ReplicaState) -> int:
    """Requests at the replica for bounded-load purposes: the larger of this gateway's
    in-flight count and the replica's own running + waiting."""
    reported = replica.load.running + replica.load.waiting if replica.load is not None else 0
    return max(replica.in_flight, reported)


def bounded_load_cap(loads: Sequence[int], load_factor: float) -> int:
    """Mirrokni, Thorup & Zadimoghaddam (2018): with the new request counted, no replica may
    hold more than ceil(c * mean load). Since the least loaded replica is always at or below
    the mean, some replica is always under the cap."""
    return math.ceil(load_factor * (sum(loads) + 1) / max(1, len(loads)))


def _rendezvous(key: int, name: str) -> int:
    """Highest-random-weight (rendezvous) hashing: a consistent hash that needs no ring;
    removing a replica only moves the keys it owned."""
    return _chain(key, name.encode("utf-8"))


class _PrefixAware(Strategy):
    """Shared by prefix_affinity and cache_aware: the prefix index, its parameters, the
    bookkeeping after each choice."""

    def __init__(self, *, max_prefixes_per_replica: int, max_blocks: int | None, default_max_tokens: int) -> None:
        self.index = PrefixIndex(max_prefixes_per_replica)
        self.max_blocks = max_blocks
        self.default_max_tokens = default_max_tokens

    def hashes(self, request: RequestFeatures) -> tuple[int, ...]:
        h = request.prefix_hashes
        return h if self.max_blocks is None else h[: self.max_blocks]

    def matched_blocks(self, replica: ReplicaState, hashes: Sequence[int]) -> int:
        """Cached leading blocks a replica holds for this request (the router's estimate;
        the simulator's oracle overrides this with the engine's real cache)."""
        return self.index.match(replica.name, hashes)

    def served(self, replica: str, hashes: Sequence[int]) -> None:
        self.index.record(replica, hashes)


@register_strategy("prefix_affinity")
class PrefixAffinityStrategy(_PrefixAware):
    """Send a request where its prefix was served, within a load bound.

    Among the replicas under the bounded-load cap (`load_factor` x mean load, Mirrokni et
    al.) and with room for the prompt: the one that served the longest leading run of the
    request's prefix blocks; ties (including "nobody served it") go by rendezvous hashing on
    the chain hash of the prefix up to `hash_blocks` blocks past the longest match, so one
    prefix has one home and, when
    that home is over the cap, one stable second choice. A hot prefix thus spills to its
    next replicas instead of melting its home. Requests without prefix hashes go to the
    least loaded replica.
    """

    def __init__(
        self,
        load_factor: float = 1.25,
        hash_blocks: int = 4,
        max_prefixes_per_replica: int = 16384,
        max_blocks: int | None = 512,
        default_max_tokens: int = 256,
    ) -> None:
        if load_factor < 1.0:
            raise ValueError("load_factor must be >= 1 (1 = perfectly even)")
        if hash_blocks < 1:
            raise ValueError("hash_blocks must be >= 1")
        super().__init__(max_prefixes_per_replica=max_prefixes_per_replica, max_blocks=max_blocks, default_max_tokens=default_max_tokens)
        self.load_factor = load_factor
        self.hash_blocks = hash_blocks

    def choose(self, request: RequestFeatures, replicas: Sequence[ReplicaState]) -> str:
        candidates = kv_candidates(request, replicas, self.default_max_tokens)
        hashes = self.hashes(request)
        loads = {r.name: replica_load(r) for r in candidates}
        if not hashes:
            return min(candidates, key=lambda r: (loads[r.name], r.in_flight, r.name)).name
        cap = bounded_load_cap(list(loads.values()), self.load_factor)
        under = [r for r in candidates if loads[r.name] + 1 <= cap] or candidates
        matched = {r.name: self.matched_blocks(r, hashes) for r in under}
        # Break ties by rendezvous on the prefix up to `hash_blocks` past the longest match:
        # prompts that share only a common preamble (one system prompt, one instruction)
        # still get distinct, stable homes by what follows it.
        key = hashes[min(max(matched.values()) + self.hash_blocks, len(hashes)) - 1]
        best = max(under, key=lambda r: (matched[r.name], _rendezvous(key, r.name)))
        self.served(best.name, hashes)
        return best.name


@register_strategy("cache_aware")
class CacheAwareStrategy(_PrefixAware):
    """Cached-prefix overlap against load, as a weighted sum (llm-d's scorer weights;
    SGLang's cache-aware router makes the same trade with thresholds):

        score = prefix_weight * matched blocks / prompt blocks
              - load_weight   * (running + waiting) / max_running
              - kv_weight     * KV usage after prompt + max_tokens

    The highest score wins among the replicas with room for the prompt; with `load_factor`
    set, only among those under the bounded-load cap as well (a guard against one hot
    prefix). Ties: rendezvous hash of the first block, so equal replicas split prefixes
    consistently. The default weights make a full prefix match worth about one
    max_running's worth of queue: enough to keep a conversation on its replica, not enough
    to queue behind a saturated one.
    """

    def __init__(
        self,
        prefix_weight: float = 1.0,
        load_weight: float = 1.0,
        kv_weight: float = 0.5,
        load_factor: float | None = 1.5,
        max_prefixes_per_replica: int = 16384,
        max_blocks: int | None = 512,
        default_max_tokens: int = 256,
        default_max_running: int = 64,
    ) -> None:
        if load_factor is not None and load_factor < 1.0:
            raise ValueError("load_factor must be >= 1 (1 = perfectly even), or null for no cap")
        super().__init__(max_prefixes_per_replica=max_prefixes_per_replica, max_blocks=max_blocks, default_max_tokens=default_max_tokens)
        self.prefix_weight = _check_weight("prefix_weight", prefix_weight)
        self.load_weight = _check_weight("load_weight", load_weight)
        self.kv_weight = _check_weight("kv_weight", kv_weight)
        self.load_factor = load_factor
        self.default_max_running = default_max_running

    def score(self, request: RequestFeatures, replica: ReplicaState, hashes: Sequence[int]) -> float:
        """The replica's score for this request (higher is better)."""
        overlap = self.matched_blocks(replica, hashes) / len(hashes) if hashes else 0.0
        usage = kv_usage_after(request, replica, self.default_max_tokens)
        return (
            self.prefix_weight * overlap
            - self.load_weight * queue_pressure(replica, self.default_max_running)
            - self.kv_weight * (usage if usage is not None else 0.5)  # unknown: middling
        )

    def choose(self, request: RequestFeatures, replicas: Sequence[ReplicaState]) -> str:
        candidates = kv_candidates(request, replicas, self.default_max_tokens)
        if self.load_factor is not None:
            loads = {r.name: replica_load(r) for r in candidates}
            cap = bounded_load_cap(list(loads.values()), self.load_factor)
            candidates = [r for r in candidates if loads[r.name] + 1 <= cap] or candidates
        hashes = self.hashes(request)
        key = hashes[0] if hashes else _ROOT_HASH
        best = max(candidates, key=lambda r: (self.score(request, r, hashes), _rendezvous(key, r.name)))
        if hashes:
            self.served(best.name, hashes)
        return best.name
