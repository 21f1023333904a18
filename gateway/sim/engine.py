"""The simulator's model of one serving replica: a paged KV cache with hash-chained prefix
caching and LRU eviction, a continuous-batching scheduler with chunked prefill, and a step
cost model calibrated to an H100 serving an 8B model.

The model mirrors backends/paged (block_manager.py, scheduler.py) where it matters to
routing: blocks are matched by chained hash, a prompt always computes at least its last
token, freed sequences put their tail blocks into the LRU before their shared prefix, the
waiting queue is FCFS with head-of-line blocking on KV, and the per-step token budget is
shared between decode tokens (first) and prefill chunks. One simplification, stated in
docs/routing.md: a sequence takes the blocks for its whole length (prompt + output) when it
is admitted, so the engine never preempts.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from backends.protocol import LoadReport


@dataclass(frozen=True)
class EngineCosts:
    """Step cost and capacity of one replica (defaults: an 8B bf16 model on one H100).

    A step costs `step_fixed_s` (reading the 16 GB of weights at ~3.3 TB/s, plus launch
    overhead) + `decode_token_s` per decoding sequence + `kv_read_s_per_token` per context
    token of every decoding sequence (128 KiB of K/V per token for Llama-3-8B, read at
    ~3 TB/s) + `prefill_token_s` per prefill token (~10k tokens/s), inflated by
    attention's growth with the token's position (x2 at `attention_scale` tokens).
    A decode step of 64 sequences at 2k context: ~12 ms; 128 at 4k: ~32 ms.
    """

    step_fixed_s: float = 0.005
    decode_token_s: float = 0.00003
    kv_read_s_per_token: float = 4.4e-8
    prefill_token_s: float = 0.0001
    attention_scale: float = 32768.0
    kv_blocks: int = 16384  # 256k tokens: ~32 GiB of KV at 128 KiB/token
    block_size: int = 16
    max_running: int = 128
    max_batched_tokens: int = 2048
    watermark: float = 0.01

    def prefill_s(self, start: int, tokens: int) -> float:
        """Time to prefill `tokens` tokens at positions start.. (the attention term uses the
        chunk's mean position)."""
        if tokens <= 0:
            return 0.0
        mean_pos = start + tokens / 2
        return tokens * self.prefill_token_s * (1.0 + mean_pos / self.attention_scale)

    def step_s(self, decoding: int, context_tokens: int, prefill_s: float) -> float:
        """One engine step's duration."""
        return self.step_fixed_s + decoding * self.decode_token_s + context_tokens * self.kv_read_s_per_token + prefill_s

    def demand_s(self, prompt: int, output: int, reference_batch: int = 64) -> float:
        """GPU-seconds one request costs with no prefix caching, its decode steps shared by
        a batch of `reference_batch`: the unit in which the simulator states load."""
        decode = output * (self.step_fixed_s / reference_batch + self.decode_token_s + (prompt + output / 2) * self.kv_read_s_per_token)
        return self.prefill_s(0, prompt) + decode


@dataclass
class SimRequest:
    """One request of a workload. `hashes` are the chained block hashes of its prompt +
    output tokens (full blocks only): the prompt's are what a gateway with a tokenizer
    would compute, the output's are what the engine caches once the answer is generated."""

    id: int
    arrival: float
    prompt_tokens: int
    output_tokens: int
    max_tokens: int
    hashes: tuple[int, ...]
    priority: int = 0  # policies.admission.Priority
    deadline_s: float = 30.0
    kind: str = "chat"
    # Filled in by the run.
    replica: int | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    shed: str | None = None


@dataclass
class _Seq:
    req: SimRequest
    prefill_pos: int  # prompt tokens computed (cached ones included)
    shared: list[int] = field(default_factory=list)  # hashes whose blocks it references
    private: int = 0  # blocks it holds that carry no registered hash
    hashed_upto: int = 0  # blocks [0, hashed_upto) have been offered to the cache
    finish_step: int = 0


class SimReplica:
    """One replica's engine. Driven by the simulator: `plan_step` then `finish_step`."""

    def __init__(self, index: int, costs: EngineCosts) -> None:
        self.index = index
        self.name = f"replica-{index}"
        self.c = costs
        self.waiting: deque[_Seq] = deque()
        self.prefilling: list[_Seq] = []
        self.decoding = 0
        self.context_tokens = 0  # sum over decoding sequences
        self._finish: list[tuple[int, int, _Seq]] = []  # (finish step, id, seq)
        self.steps = 0
        self.busy = False
        self._plan: list[tuple[_Seq, int]] = []
        self._planned_decoding = 0
        # KV cache: hashed blocks in use (ref counts), hashed blocks free (LRU), unhashed in use.
        self.ref: dict[int, int] = {}
        self.lru: OrderedDict[int, None] = OrderedDict()
        self.private = 0
        self.watermark_blocks = max(1, int(costs.watermark * costs.kv_blocks))
        self.prefix_queries = 0
        self.prefix_hits = 0
        self.busy_s = 0.0

    # -- what routers see ----------------------------------------------------------------

    @property
    def in_use(self) -> int:
        return self.private + len(self.ref)

    @property
    def running(self) -> int:
        return len(self.prefilling) + self.decoding

    def report(self, now: float) -> LoadReport:
        """The LoadReport the node would publish now."""
        free = self.c.kv_blocks - self.in_use  # cached-but-unreferenced blocks count as free
        return LoadReport(
            kv_usage=self.in_use / self.c.kv_blocks,
            kv_free_blocks=free,
            block_size=self.c.block_size,
            running=self.running,
            waiting=len(self.waiting),
            max_running=self.c.max_running,
            prefix_cache_hit_rate=self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0,
            timestamp=now,
        )

    def cached_prefix_blocks(self, hashes: tuple[int, ...] | list[int]) -> int:
        """Leading blocks of `hashes` in this replica's cache right now (the oracle's view)."""
        n = 0
        for h in hashes:
            if h not in self.ref and h not in self.lru:
                break
            n += 1
        return n

    # -- the scheduler -------------------------------------------------------------------

    def enqueue(self, req: SimRequest) -> None:
        self.waiting.append(_Seq(req, 0))

    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.decoding)

    def _try_admit(self, seq: _Seq) -> bool:
        req = seq.req
        bs = self.c.block_size
        hashes = req.hashes
        # At least one prompt token is computed (its logits give the first output token).
        matchable = min((req.prompt_tokens - 1) // bs, len(hashes))
        m = 0
        from_lru = 0
        while m < matchable:
            h = hashes[m]
            if h in self.ref:
                pass
            elif h in self.lru:
                from_lru += 1
            else:
                break
            m += 1
        total = -(-(req.prompt_tokens + req.output_tokens) // bs)
        new = total - m
        if new + from_lru > self.c.kv_blocks - self.in_use - self.watermark_blocks:
            return False
        for h in hashes[:m]:
            if h in self.lru:
                del self.lru[h]
                self.ref[h] = 1
            else:
                self.ref[h] += 1
        evict = new - (self.c.kv_blocks - self.in_use - len(self.lru))
        for _ in range(max(0, evict)):
            self.lru.popitem(last=False)
        self.private += new
        seq.shared = list(hashes[:m])
        seq.hashed_upto = m
        seq.private = new
        seq.prefill_pos = m * bs
        self.prefix_queries += req.prompt_tokens
        self.prefix_hits += m * bs
        return True

    def plan_step(self) -> float:
        """Choose this step's work (admitting from the queue) and return its duration."""
        budget = self.c.max_batched_tokens - self.decoding
        plan: list[tuple[_Seq, int]] = []
        prefill_s = 0.0
        for seq in self.prefilling:
            if budget <= 0:
                break
            take = min(seq.req.prompt_tokens - seq.prefill_pos, budget)
            plan.append((seq, take))
            prefill_s += self.c.prefill_s(seq.prefill_pos, take)
            budget -= take
        while self.waiting and budget > 0 and self.running < self.c.max_running:
            seq = self.waiting[0]
            if not self._try_admit(seq):
                break  # FCFS: the head waits for blocks, the others wait behind it
            self.waiting.popleft()
            self.prefilling.append(seq)
            take = min(seq.req.prompt_tokens - seq.prefill_pos, budget)
            plan.append((seq, take))
            prefill_s += self.c.prefill_s(seq.prefill_pos, take)
            budget -= take
        self._plan = plan
        self._planned_decoding = self.decoding
        return self.c.step_s(self.decoding, self.context_tokens, prefill_s)

    def finish_step(self, now: float) -> tuple[list[SimRequest], list[SimRequest]]:
        """Apply the planned step's effects at its end time `now`. Returns (requests that
        got their first token, requests that finished)."""
        firsts: list[SimRequest] = []
        done: list[SimRequest] = []
        self.steps += 1
        self.context_tokens += self._planned_decoding
        while self._finish and self._finish[0][0] <= self.steps:
            _, _, seq = heapq.heappop(self._finish)
            self.decoding -= 1
            self.context_tokens -= seq.req.prompt_tokens + seq.req.output_tokens
            self._complete(seq, now)
            done.append(seq.req)
        for seq, take in self._plan:
            seq.prefill_pos += take
            if seq.prefill_pos < seq.req.prompt_tokens:
                continue
            self.prefilling.remove(seq)
            req = seq.req
            req.first_token_at = now
            firsts.append(req)
            self._register(seq, seq.req.prompt_tokens // self.c.block_size)
            if req.output_tokens <= 1:
                self._complete(seq, now)
                done.append(req)
            else:
                self.decoding += 1
                self.context_tokens += req.prompt_tokens + 1
                seq.finish_step = self.steps + req.output_tokens - 1
                heapq.heappush(self._finish, (seq.finish_step, req.id, seq))
        self._plan = []
        return firsts, done

    def _register(self, seq: _Seq, upto_blocks: int) -> None:
        """Give hashes to the sequence's blocks that became full and computed (the engine's
        commit_full_blocks); a hash another sequence already registered stays theirs."""
        hashes = seq.req.hashes
        upto = min(upto_blocks, len(hashes))
        for i in range(seq.hashed_upto, upto):
            h = hashes[i]
            if h in self.ref or h in self.lru or seq.private <= 0:
                continue  # computed concurrently elsewhere: ours stays an unhashed private block
            self.ref[h] = 1
            seq.private -= 1
            self.private -= 1
            seq.shared.append(h)
        seq.hashed_upto = max(seq.hashed_upto, upto)

    def _complete(self, seq: _Seq, now: float) -> None:
        req = seq.req
        self._register(seq, (req.prompt_tokens + req.output_tokens) // self.c.block_size)
        req.finished_at = now
        # Tail first into the LRU, so the shared prefix is evicted last.
        for h in reversed(seq.shared):
            n = self.ref[h] - 1
            if n:
                self.ref[h] = n
            else:
                del self.ref[h]
                self.lru[h] = None
        self.private -= seq.private
        seq.shared = []
        seq.private = 0
