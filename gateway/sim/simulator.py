"""`turnout sim`: a discrete-event simulation of a pool of serving replicas behind the
gateway, to compare routing strategies on the same workload.

The routing decisions are made by the very code the gateway runs: the strategies of
policies/routing.py, the admission queue of policies/admission.py, and the LoadTracker of
gateway/load_tracker.py (on the simulation's clock), which sees each replica's LoadReport
the way the gateway does: a scrape every 500 ms, the `endpoint-load-metrics` header when a
response starts, and its own reservations in between. The replicas are modelled in
gateway/sim/engine.py and the workloads in gateway/sim/workloads.py; docs/routing.md states
the model's assumptions.

    turnout sim                       # every workload, every strategy; prints and plots
    turnout sim --workload multiturn --load 0.8 --out docs/figures

The router hashes at most `--route-blocks` leading blocks of a prompt (default 512 = 8,192
tokens, what the published figures in docs/benchmarks.md used: their command passes no
such flag). That is more than a gateway hashes by default: a route's
`prefix_hashing.max_blocks` is 64 (1,024 tokens) unless the policy sets it; pass
`--route-blocks 64` to simulate a gateway on its defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from gateway.load_tracker import LoadTracker, Reservation
from gateway.sim.engine import EngineCosts, SimReplica, SimRequest
from gateway.sim.workloads import WORKLOADS, build_workload
from policies.admission import AdmissionConfig, AdmissionQueue, Priority, Ticket, Verdict
from policies.routing import CacheAwareStrategy, ReplicaState, RequestFeatures, Strategy, make_strategy

BASELINES = ["round_robin", "least_load"]
STRATEGIES = [*BASELINES, "kv_pressure", "prefix_affinity", "cache_aware", "oracle"]
# Leading blocks the simulated router hashes per request: a route's `prefix_hashing.max_blocks`
# (the gateway's default is 64; the published figures used this value, see the docstring).
ROUTE_BLOCKS = 512


class OracleStrategy(CacheAwareStrategy):
    """cache_aware's cost, with the engines' real cache contents instead of the router's
    estimate: the best any router of this shape could know. Simulation only."""

    name = "oracle"  # type: ignore[misc]

    def __init__(self, replicas: dict[str, SimReplica], **params: object) -> None:
        super().__init__(**params)  # type: ignore[arg-type]
        self.replicas = replicas

    def matched_blocks(self, replica: ReplicaState, hashes: Sequence[int]) -> int:
        return self.replicas[replica.name].cached_prefix_blocks(list(hashes))

    def served(self, replica: str, hashes: Sequence[int]) -> None:
        pass  # it reads the caches themselves


def make_sim_strategy(name: str, replicas: dict[str, SimReplica], costs: EngineCosts, seed: int, route_blocks: int = ROUTE_BLOCKS) -> Strategy:
    """The strategy under test, with the parameters ops would set for this pool: the
    router's prefix index sized to a replica's KV blocks, hashing `route_blocks` blocks."""
    prefix = {"max_prefixes_per_replica": costs.kv_blocks, "max_blocks": route_blocks}
    if name == "oracle":
        return OracleStrategy(replicas, default_max_running=costs.max_running, **prefix)
    if name == "cache_aware":
        return make_strategy(name, default_max_running=costs.max_running, **prefix)
    if name == "prefix_affinity":
        return make_strategy(name, **prefix)
    if name == "weighted":
        return make_strategy(name, seed=seed)
    return make_strategy(name)


@dataclass
class RunResult:
    """One strategy on one workload. Latencies in seconds; rates in 0..1."""

    workload: str
    strategy: str
    requests: int  # arrivals in the measurement window
    completed: int
    ttft_p50: float
    ttft_p99: float
    ttft_p99_interactive: float
    ttft_p99_batch: float
    throughput_tok_s: float
    prefix_hit_rate: float
    shed_rate: float
    shed_by_reason: dict[str, int] = field(default_factory=dict)
    mean_queue_wait_s: float = 0.0
    per_replica_requests: list[int] = field(default_factory=list)
    utilization: float = 0.0  # fraction of the run the replicas' GPUs were stepping
    wall_s: float = 0.0


@dataclass(frozen=True)
class SimConfig:
    replicas: int = 4
    load: float = 0.8
    duration_s: float = 200.0  # sessions start during this window
    warmup_s: float = 50.0  # arrivals before this are not measured (caches and queues fill)
    seed: int = 0
    scrape_interval_s: float = 0.5
    route_blocks: int = ROUTE_BLOCKS  # leading blocks hashed per request (prefix_hashing.max_blocks)
    costs: EngineCosts = EngineCosts()
    admission: AdmissionConfig = AdmissionConfig(max_queue=4096, default_deadline_s=30.0)


_STEP_END, _ARRIVAL, _SCRAPE = 0, 1, 2  # event kinds; at equal times, in this order


class Simulation:
    """One run: a workload through the gateway's admission and routing onto replicas."""

    def __init__(self, config: SimConfig, requests: list[SimRequest], strategy: str) -> None:
        self.cfg = config
        self.requests = [dataclasses.replace(r) for r in requests]  # runs must not share state
        self.now = 0.0
        self.replicas = [SimReplica(i, config.costs) for i in range(config.replicas)]
        self.by_name = {r.name: r for r in self.replicas}
        self.names = [r.name for r in self.replicas]
        self.strategy_name = strategy
        self.strategy = make_sim_strategy(strategy, self.by_name, config.costs, config.seed, config.route_blocks)
        self.tracker = LoadTracker(clock=lambda: self.now, default_block_size=config.costs.block_size)
        self.admission = AdmissionQueue(config.admission)
        self._events: list[tuple[float, int, int, int]] = []
        self._order = 0
        self._tickets: dict[int, Ticket] = {}  # request id -> its slot
        self._queued: dict[int, SimRequest] = {}  # ticket seq -> request waiting for a slot
        self._reservations: dict[int, Reservation] = {}
        self._open = 0  # requests admitted and not finished

    # -- events ----------------------------------------------------------------------------

    def _push(self, t: float, kind: int, payload: int) -> None:
        self._order += 1
        heapq.heappush(self._events, (t, kind, self._order, payload))

    def _limit(self) -> int:
        return self.tracker.pool_capacity(self.names) or self.cfg.replicas * self.cfg.costs.max_running

    def run(self) -> RunResult:
        started = time.perf_counter()
        for i, r in enumerate(self.requests):
            self._push(r.arrival, _ARRIVAL, i)
        for i in range(len(self.replicas)):
            self.tracker.observe(self.names[i], self.replicas[i].report(0.0))
            self._push(self.cfg.scrape_interval_s * (i + 1) / len(self.replicas), _SCRAPE, i)
        remaining = len(self.requests)
        while self._events:
            t, kind, _, payload = heapq.heappop(self._events)
            self.now = t
            if kind == _ARRIVAL:
                remaining -= 1
                self._arrive(self.requests[payload])
            elif kind == _STEP_END:
                self._step_end(self.replicas[payload])
            elif kind == _SCRAPE:
                self.tracker.observe(self.names[payload], self.replicas[payload].report(t))
                if remaining or self._open or self.admission.depth:
                    self._push(t + self.cfg.scrape_interval_s, _SCRAPE, payload)
        return self._result(time.perf_counter() - started)

    def _arrive(self, req: SimRequest) -> None:
        decision = self.admission.offer(self.now, self._limit(), Priority(req.priority), req.deadline_s)
        if decision.verdict is Verdict.ADMIT:
            self._dispatch(req, decision.ticket)
        elif decision.verdict is Verdict.QUEUE:
            self._queued[decision.ticket.seq] = req
        else:
            req.shed = decision.reason.value if decision.reason else "rejected"

    def _dispatch(self, req: SimRequest, ticket: Ticket) -> None:
        bs = self.cfg.costs.block_size
        features = RequestFeatures(
            model="sim", prompt_tokens=req.prompt_tokens, max_tokens=req.max_tokens, priority=req.priority,
            prefix_hashes=req.hashes[: min(req.prompt_tokens // bs, self.cfg.route_blocks)],
        )  # fmt: skip
        name = self.strategy.choose(features, self.tracker.replica_states(self.names))
        replica = self.by_name[name]
        req.replica = replica.index
        self._tickets[req.id] = ticket
        self._reservations[req.id] = self.tracker.reserve(name, req.prompt_tokens, req.max_tokens)
        self._open += 1
        replica.enqueue(req)
        if not replica.busy:
            self._start_step(replica)

    def _start_step(self, replica: SimReplica) -> None:
        duration = replica.plan_step()
        if not replica._plan and not replica.decoding:
            # Nothing runs and the queue's head cannot get blocks even from an empty cache.
            req = replica.waiting.popleft().req
            req.shed = "too_large"
            self._finish(req)
            if not replica.has_work():
                replica.busy = False
                return
            duration = replica.plan_step()
        replica.busy = True
        replica.busy_s += duration
        self._push(self.now + duration, _STEP_END, replica.index)

    def _step_end(self, replica: SimReplica) -> None:
        firsts, done = replica.finish_step(self.now)
        if firsts:
            # A streamed response's headers leave with its first token, load header included.
            self.tracker.observe(replica.name, replica.report(self.now))
        for req in done:
            self._finish(req)
        if replica.has_work():
            self._start_step(replica)
        else:
            replica.busy = False

    def _finish(self, req: SimRequest) -> None:
        self._open -= 1
        self.tracker.release(self._reservations.pop(req.id))
        self.admission.release(self._tickets.pop(req.id), self.now)
        admitted, expired = self.admission.pump(self.now, self._limit())
        for t in expired:
            self._queued.pop(t.seq).shed = "deadline_expired"
        for t in admitted:
            self._dispatch(self._queued.pop(t.seq), t)

    # -- results ---------------------------------------------------------------------------

    def _result(self, wall_s: float) -> RunResult:
        window = [r for r in self.requests if r.arrival >= self.cfg.warmup_s and r.arrival <= self.cfg.duration_s]
        served = [r for r in window if r.first_token_at is not None]
        ttft = np.array([r.first_token_at - r.arrival for r in served]) if served else np.array([np.nan])

        def p99(kind_filter: int) -> float:
            xs = [r.first_token_at - r.arrival for r in served if r.priority == kind_filter]
            return float(np.percentile(xs, 99)) if xs else float("nan")

        done = [r for r in self.requests if r.finished_at is not None and r.shed is None]
        span = max(r.finished_at for r in done) - min(r.arrival for r in self.requests) if done else 1.0
        queries = sum(r.prefix_queries for r in self.replicas)
        hits = sum(r.prefix_hits for r in self.replicas)
        shed = [r for r in window if r.shed is not None]
        reasons: dict[str, int] = {}
        for r in shed:
            reasons[r.shed or ""] = reasons.get(r.shed or "", 0) + 1
        per_replica = [0] * len(self.replicas)
        for r in self.requests:
            if r.replica is not None:
                per_replica[r.replica] += 1
        return RunResult(
            workload="", strategy=self.strategy_name, requests=len(window), completed=len(served),
            ttft_p50=float(np.percentile(ttft, 50)), ttft_p99=float(np.percentile(ttft, 99)),
            ttft_p99_interactive=p99(int(Priority.INTERACTIVE)), ttft_p99_batch=p99(int(Priority.BATCH)),
            throughput_tok_s=sum(r.output_tokens for r in done) / span,
            prefix_hit_rate=hits / queries if queries else 0.0,
            shed_rate=len(shed) / len(window) if window else 0.0, shed_by_reason=reasons,
            mean_queue_wait_s=self.admission.wait_sum_s / max(1, self.admission.wait_count),
            per_replica_requests=per_replica, wall_s=wall_s,
            utilization=sum(r.busy_s for r in self.replicas) / (len(self.replicas) * span),
        )  # fmt: skip


def _p90_ttft(workload: str, config: SimConfig, load: float) -> float:
    requests = build_workload(workload, load=load, replicas=config.replicas, duration_s=config.duration_s, seed=config.seed + 1, costs=config.costs)
    sim = Simulation(config, requests, "round_robin")
    sim.run()
    # Interactive requests only: a batch job's TTFT is not what the SLO protects.
    window = [r for r in sim.requests if config.warmup_s <= r.arrival <= config.duration_s and r.priority == Priority.INTERACTIVE]
    # A shed request counts as an infinite TTFT: it did not meet any SLO.
    ttfts = [r.first_token_at - r.arrival if r.first_token_at is not None and r.shed is None else float("inf") for r in window]
    if not ttfts:
        return float("inf")
    with np.errstate(invalid="ignore"):  # inf - inf inside percentile's interpolation
        return float(np.percentile(ttfts, 90))


def round_robin_capacity(workload: str, config: SimConfig, iterations: int = 5) -> float:
    """The pool's capacity under round_robin, in no-cache load units, by a TTFT SLO (as
    DistServe defines goodput): the highest load at which round_robin keeps its p90 TTFT
    within max(1 s, 2 x its p90 at 20% no-cache load), measured on interactive requests over
    the same duration as the run (a shorter run would miss how long sessions' contexts grow). `--load 0.8` then means 80% of what
    the pool serves within that SLO with the baseline router.

    Measuring raw saturation throughput instead overstates capacity: an overloaded engine
    runs full batches, which it never does at the loads one operates at."""
    cal = config
    slo = max(1.0, 2.0 * _p90_ttft(workload, cal, 0.2))
    lo, hi = 0.2, 4.0
    for _ in range(iterations):
        mid = (lo * hi) ** 0.5  # bisect on a log scale: the range spans a decade
        if _p90_ttft(workload, cal, mid) <= slo:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass
class WorkloadRun:
    workload: str
    nocache_load: float  # the offered load in no-cache units
    results: list[RunResult]


def run_workload(workload: str, strategies: Sequence[str], config: SimConfig, basis: str = "round_robin") -> WorkloadRun:
    """Every strategy on one workload (built once, so all see the same requests)."""
    load = config.load * round_robin_capacity(workload, config) if basis == "round_robin" else config.load
    requests = build_workload(workload, load=load, replicas=config.replicas, duration_s=config.duration_s, seed=config.seed, costs=config.costs)
    out = []
    for name in strategies:
        result = Simulation(config, requests, name).run()
        result.workload = workload
        out.append(result)
    return WorkloadRun(workload, load, out)


def _run_job(job: tuple[str, tuple[str, ...], SimConfig, str]) -> WorkloadRun:
    return run_workload(*job)


# ---------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------


def format_table(results: list[RunResult]) -> str:
    """A plain-text table of one workload's results."""
    head = f"{'strategy':<16}{'ttft p50':>10}{'ttft p99':>10}{'p99 inter':>11}{'p99 batch':>11}{'tok/s':>9}{'hit rate':>10}{'shed':>8}{'busy':>7}  per-replica requests"
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(
            f"{r.strategy:<16}{_ms(r.ttft_p50):>10}{_ms(r.ttft_p99):>10}{_ms(r.ttft_p99_interactive):>11}{_ms(r.ttft_p99_batch):>11}"
            f"{r.throughput_tok_s:>9.0f}{r.prefix_hit_rate:>10.1%}{r.shed_rate:>8.1%}{r.utilization:>7.0%}  {r.per_replica_requests}"
        )
    return "\n".join(lines)


def _ms(seconds: float) -> str:
    if seconds != seconds:  # nan
        return "-"
    return f"{seconds * 1000:.0f}ms" if seconds < 10 else f"{seconds:.1f}s"


def target_check(results: list[RunResult], strategy: str = "cache_aware") -> dict[str, float]:
    """Issue 7's targets on one workload: p99 TTFT of round_robin over `strategy`'s, and
    `strategy`'s hit rate relative to the oracle's."""
    by = {r.strategy: r for r in results}
    out: dict[str, float] = {}
    if strategy in by and "round_robin" in by:
        out["p99_ttft_improvement_vs_round_robin"] = by["round_robin"].ttft_p99 / by[strategy].ttft_p99
    if strategy in by and "oracle" in by and by["oracle"].prefix_hit_rate > 0:
        out["hit_rate_vs_oracle"] = by[strategy].prefix_hit_rate / by["oracle"].prefix_hit_rate
    return out


def plot(results: list[RunResult], path: str, title: str) -> None:
    """Four panels per workload: TTFT p50/p99, throughput, prefix hit rate, shed rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r.strategy for r in results]
    x = np.arange(len(names))
    colors = ["#999999" if n in BASELINES else "#4c72b0" if n != "oracle" else "#55a868" for n in names]
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    ax = axes[0]
    ax.bar(x - 0.2, [r.ttft_p50 * 1000 for r in results], 0.4, label="p50", color=colors, alpha=0.5)
    ax.bar(x + 0.2, [r.ttft_p99 * 1000 for r in results], 0.4, label="p99", color=colors)
    ax.set_yscale("log")
    ax.set_title("TTFT p50 (light) / p99 (dark), ms")
    panels = [
        (axes[1], [r.throughput_tok_s for r in results], "throughput, output tok/s"),
        (axes[2], [r.prefix_hit_rate * 100 for r in results], "prefix-cache hit rate, %"),
        (axes[3], [r.shed_rate * 100 for r in results], "shed, % of requests"),
    ]
    for axis, values, label in panels:
        axis.bar(x, values, 0.6, color=colors)
        axis.set_title(label)
        axis.set_ylim(0, max(1.0, max(values) * 1.1))  # an all-zero panel still reads as zero
    for axis in axes:
        axis.set_xticks(x, names, rotation=35, ha="right", fontsize=8)
        axis.grid(axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="turnout sim", description="Simulate routing strategies on a pool of replicas.")
    p.add_argument("--workload", action="append", choices=sorted(WORKLOADS), help="repeatable; default: all")
    p.add_argument("--strategy", action="append", help=f"repeatable; default: {', '.join(STRATEGIES)}")
    p.add_argument("--replicas", type=int, default=4)
    p.add_argument("--load", type=float, default=0.8, help="offered load as a fraction of capacity (see --load-basis)")
    p.add_argument(
        "--load-basis", choices=["round_robin", "nocache"], default="round_robin",
        help="capacity = what round_robin sustains (measured), or the pool's work with no prefix caching",
    )  # fmt: skip
    p.add_argument("--duration", type=float, default=200.0, help="seconds during which sessions start")
    p.add_argument("--warmup", type=float, default=50.0, help="seconds of arrivals not measured")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kv-blocks", type=int, default=EngineCosts.kv_blocks, help="KV blocks per replica (16 tokens each)")
    p.add_argument(
        "--route-blocks", type=int, default=ROUTE_BLOCKS,
        help=f"leading blocks the router hashes per request (default {ROUTE_BLOCKS}; a gateway route's prefix_hashing.max_blocks defaults to 64)",
    )  # fmt: skip
    p.add_argument("--out", default="sim-out", help="directory for the PNG figures")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="workloads simulated in parallel")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `turnout sim`; returns the exit status."""
    args = parse_args(argv)
    workloads = args.workload or list(WORKLOADS)
    strategies = tuple(args.strategy or STRATEGIES)
    unknown = [s for s in strategies if s != "oracle" and s not in _known_strategies()]
    if unknown:
        print(f"turnout sim: unknown strategies {unknown}", file=sys.stderr)
        return 2
    costs = dataclasses.replace(EngineCosts(), kv_blocks=args.kv_blocks)
    config = SimConfig(replicas=args.replicas, load=args.load, duration_s=args.duration, warmup_s=args.warmup, seed=args.seed, costs=costs,
                       route_blocks=args.route_blocks)
    started = time.perf_counter()
    jobs = [(w, strategies, config, args.load_basis) for w in workloads]
    if args.jobs > 1 and len(jobs) > 1:
        import multiprocessing

        with multiprocessing.get_context("fork" if sys.platform != "win32" else "spawn").Pool(min(args.jobs, len(jobs))) as pool:
            all_results = pool.map(_run_job, jobs)
    else:
        all_results = [_run_job(j) for j in jobs]
    if not args.no_plot:
        os.makedirs(args.out, exist_ok=True)
    for run in all_results:
        workload, results = run.workload, run.results
        print(f"\n== {workload}: {WORKLOADS[workload]}")
        print(
            f"   {config.replicas} replicas, load {config.load:.0%} of {args.load_basis} capacity "
            f"(= {run.nocache_load:.2f} in no-cache units), {results[0].requests} requests measured, seed {config.seed}, router hashes <= {config.route_blocks} blocks"
        )
        print(format_table(results))
        checks = target_check(results)
        if checks:
            print("   cache_aware: " + ", ".join(f"{k} = {v:.2f}" for k, v in checks.items()))
        if not args.no_plot:
            path = os.path.join(args.out, f"sim-{workload}.png")
            plot(results, path, f"turnout sim --workload {workload}: {config.replicas} replicas, load {config.load:.0%} of {args.load_basis} capacity, seed {config.seed}")
            print(f"   figure: {path}")
    print(f"\nsimulated in {time.perf_counter() - started:.1f} s")
    return 0


def _known_strategies() -> list[str]:
    from policies.routing import strategy_names

    return strategy_names()


if __name__ == "__main__":
    raise SystemExit(main())
