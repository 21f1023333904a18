"""The simulator's workloads: sessions of requests with real shared prefixes.

A workload is built in two passes. First the sessions' shapes (prompt and output lengths,
gaps between a session's requests) are drawn; their total cost with no prefix caching
(`EngineCosts.demand_s`) fixes the session arrival rate that makes the offered load the
requested fraction of the pool's capacity. Then token ids are drawn for every segment and
each request gets the chained block hashes of its prompt + output (`prefix_block_hashes`,
the same function the gateway uses), so prefixes are shared exactly where the workload
shares text: system prompts, conversation history, documents, batch instructions.

Everything derives from one seed.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from gateway.sim.engine import EngineCosts, SimRequest
from policies.admission import Priority
from policies.routing import prefix_block_hashes

VOCAB = 50_000


@dataclass
class _Turn:
    new_tokens: int  # tokens this request adds to the session's shared text before asking
    output: int
    gap_s: float  # after the previous request of the session (0 for the first)
    branch: bool = False  # the prompt is base + these tokens only (not the whole history)


@dataclass
class _Session:
    base: tuple[str, int]  # (shared segment key, length): a system prompt, a document...
    turns: list[_Turn]
    priority: Priority = Priority.INTERACTIVE
    deadline_s: float = 10.0
    kind: str = "chat"
    max_tokens: int = 1024
    start: float = 0.0
    extra_base: tuple[str, int] | None = None  # a second shared segment after the first
    tokens: list[int] = field(default_factory=list)


def _lognormal(rng: random.Random, median: float, sigma: float, lo: int, hi: int) -> int:
    return int(min(hi, max(lo, rng.lognormvariate(math.log(median), sigma))))


def _prompt_lengths(s: _Session) -> list[tuple[int, int]]:
    """(prompt tokens, output tokens) of each request of the session."""
    base = s.base[1] + (s.extra_base[1] if s.extra_base else 0)
    out = []
    history = base
    for t in s.turns:
        if t.branch:
            out.append((base + t.new_tokens, t.output))
        else:
            history += t.new_tokens
            out.append((history, t.output))
            history += t.output
    return out


def session_demand(s: _Session, costs: EngineCosts) -> float:
    """GPU-seconds the session costs with no prefix caching."""
    return sum(costs.demand_s(p, o) for p, o in _prompt_lengths(s))


# -- session shapes --------------------------------------------------------------------


def _poisson(rng: random.Random) -> _Session:
    prompt = _lognormal(rng, 800, 0.7, 32, 8000)
    return _Session(base=(f"u{rng.getrandbits(48)}", prompt), turns=[_Turn(0, _lognormal(rng, 200, 0.7, 8, 1024), 0.0)], kind="single")


SYSTEM_PROMPTS = [(f"sys{i}", 600 + 200 * i) for i in range(8)]  # 600..2000 tokens


def _multiturn(rng: random.Random) -> _Session:
    # A few apps dominate (Zipf-like), as in any shared gateway.
    app = rng.choices(range(len(SYSTEM_PROMPTS)), weights=[1 / (i + 1) for i in range(len(SYSTEM_PROMPTS))])[0]
    n = min(12, 1 + int(rng.expovariate(1 / 5)))
    turns = []
    for i in range(n):
        output = _lognormal(rng, 250, 0.6, 16, 1024)
        # Reading the answer, then typing: the gap counts the previous answer's generation.
        gap = 0.0 if i == 0 else turns[-1].output * 0.02 + rng.expovariate(1 / 5.0)
        turns.append(_Turn(_lognormal(rng, 120, 0.8, 8, 2000), output, gap))
    return _Session(base=SYSTEM_PROMPTS[app], turns=turns, kind="chat")


def _longdoc(rng: random.Random) -> _Session:
    doc = rng.randint(6000, 14000)
    n = rng.randint(8, 24)
    turns = [_Turn(_lognormal(rng, 60, 0.5, 8, 400), _lognormal(rng, 120, 0.6, 8, 512), 0.0 if i == 0 else rng.expovariate(1 / 3.0), branch=True) for i in range(n)]
    return _Session(base=("docqa-instructions", 200), extra_base=(f"doc{rng.getrandbits(48)}", doc), turns=turns, kind="doc", deadline_s=20.0)


def _batch_job(rng: random.Random) -> _Session:
    doc = rng.randint(1000, 3000)
    turn = _Turn(doc, _lognormal(rng, 300, 0.4, 32, 1024), 0.0, branch=True)
    return _Session(base=("batch-summarize-instructions", 400), turns=[turn], priority=Priority.BATCH, deadline_s=120.0, kind="batch")


WORKLOADS: dict[str, str] = {
    "poisson": "independent requests, no shared prefixes (prefix-aware routing cannot help; must not hurt)",
    "multiturn": "multi-turn chats on 8 apps' shared system prompts (600-2000 tokens), ~6 turns each",
    "longdoc": "long documents (6k-14k tokens), 8-24 questions each",
    "bursty": "interactive multi-turn chat (60% of load) beside bursts of batch summarisation jobs (35%)",
}


# -- building --------------------------------------------------------------------------


def _schedule(shapes: Callable[[random.Random], _Session], rng: random.Random, rate_per_s: float, duration_s: float) -> list[_Session]:
    sessions = []
    t = rng.expovariate(rate_per_s)
    while t < duration_s:
        s = shapes(rng)
        s.start = t
        sessions.append(s)
        t += rng.expovariate(rate_per_s)
    return sessions


def _rate_for(shape: Callable[[random.Random], _Session], share: float, load: float, replicas: int, costs: EngineCosts, seed: int) -> float:
    pilot_rng = random.Random(seed ^ 0x5EED)
    pilot = [shape(pilot_rng) for _ in range(400)]
    mean = sum(session_demand(s, costs) for s in pilot) / len(pilot)
    return share * load * replicas / mean


def build_workload(name: str, *, load: float, replicas: int, duration_s: float, seed: int, costs: EngineCosts) -> list[SimRequest]:
    """The workload's requests in arrival order. `load` is offered work / pool capacity with
    no prefix caching (see EngineCosts.demand_s)."""
    rng = random.Random(seed)
    sessions: list[_Session] = []
    if name == "poisson":
        sessions = _schedule(_poisson, rng, _rate_for(_poisson, 1.0, load, replicas, costs, seed), duration_s)
    elif name == "multiturn":
        sessions = _schedule(_multiturn, rng, _rate_for(_multiturn, 1.0, load, replicas, costs, seed), duration_s)
    elif name == "longdoc":
        sessions = _schedule(_longdoc, rng, _rate_for(_longdoc, 1.0, load, replicas, costs, seed), duration_s)
    elif name == "bursty":
        sessions = _schedule(_multiturn, rng, _rate_for(_multiturn, 0.60, load, replicas, costs, seed), duration_s)
        batch_rate = _rate_for(_batch_job, 0.35, load, replicas, costs, seed)
        period = 30.0
        for burst_at in np.arange(period / 2, duration_s, period):
            for _ in range(max(1, int(round(batch_rate * period)))):
                s = _batch_job(rng)
                s.start = float(burst_at) + rng.uniform(0.0, 1.0)  # a job runner fires them at once
                sessions.append(s)
    else:
        raise ValueError(f"unknown workload {name!r}; known: {', '.join(WORKLOADS)}")
    return _materialise(sessions, costs.block_size, np.random.default_rng(seed))


def _materialise(sessions: list[_Session], block_size: int, nrng: np.random.Generator) -> list[SimRequest]:
    shared: dict[str, list[int]] = {}

    def segment(key: str, n: int) -> list[int]:
        if key not in shared:
            shared[key] = nrng.integers(0, VOCAB, size=n).tolist()
        return shared[key]

    requests: list[SimRequest] = []
    for s in sessions:
        base = list(segment(*s.base))
        if s.extra_base is not None:
            base += segment(*s.extra_base)
        base_hashes = prefix_block_hashes(base, block_size)
        history = list(base)
        history_hashes = base_hashes
        t = s.start
        for turn in s.turns:
            t += turn.gap_s
            new = nrng.integers(0, VOCAB, size=turn.new_tokens).tolist()
            answer = nrng.integers(0, VOCAB, size=turn.output).tolist()
            if turn.branch:
                tokens = base + new + answer
                prompt = len(base) + len(new)
                hashes = prefix_block_hashes(tokens, block_size, known=base_hashes)
            else:
                tokens = history + new + answer
                prompt = len(history) + len(new)
                hashes = prefix_block_hashes(tokens, block_size, known=history_hashes)
                history, history_hashes = tokens, hashes
            requests.append(
                SimRequest(
                    id=0, arrival=t, prompt_tokens=prompt, output_tokens=turn.output, max_tokens=max(s.max_tokens, turn.output),
                    hashes=hashes, priority=int(s.priority), deadline_s=s.deadline_s, kind=s.kind,
                )  # fmt: skip
            )
    requests.sort(key=lambda r: r.arrival)
    for i, r in enumerate(requests):
        r.id = i
    return requests
