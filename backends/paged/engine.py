"""The synchronous engine core: add_request / step / abort, driven by a plain Python loop.

A step asks the scheduler for a plan, runs one forward pass over the flattened batch (prefill
chunks and decodes together), samples for the sequences that reached their end, and turns new
tokens into text deltas (stop strings held back, stop tokens and limits checked)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from backends.generation import GenerationDelta, GenerationRequest, TokenLogprob
from backends.paged.attention import TorchPagedAttention
from backends.paged.block_manager import BlockManager
from backends.paged.config import ModelConfig
from backends.paged.kv_cache import KVCache, num_blocks_for_budget
from backends.paged.loader import ModelSource, load_config_and_tokenizer, load_weights
from backends.paged.memory_profile import profile_num_blocks
from backends.paged.model import LlamaModel, TorchOps
from backends.paged.options import EngineOptions
from backends.paged.sampler import SamplerState, sample_batch, sample_tokens_device
from backends.paged.scheduler import ScheduledSeq, Scheduler
from backends.paged.sequence import PENDING, Sequence, SeqStatus
from backends.paged.step_inputs import StepInputs, build_step_inputs, to_device
from backends.paged.tokenizer import IncrementalDetokenizer, Tokenizer
from backends.paged.weights import ModelWeights
from backends.protocol import ContextLengthExceeded, InvalidRequest
from backends.stop import StopMatcher

@dataclass
class _SeqRuntime:
    """What the engine keeps per sequence besides the scheduler's view."""

    sampler: SamplerState
    detok: IncrementalDetokenizer
    stops: StopMatcher
    stop_ids: frozenset[int]


@dataclass
class StepOutput:
    request_id: str
    delta: GenerationDelta


@dataclass
class EngineCounters:
    prompt_tokens: int = 0
    generation_tokens: int = 0
    steps: int = 0
    requests_finished: int = 0
    requests_aborted: int = 0
    step_time_s: float = 0.0
    graph_steps: int = 0  # decode steps replayed from a CUDA graph
    extra: dict[str, float] = field(default_factory=dict)


@dataclass
class StepInfo:
    """What the last step ran (benchmarks read it to split prefill from decode time)."""

    num_prefill_tokens: int
    num_decodes: int
    context_tokens: int  # tokens of KV the step's attention read, summed over sequences
    graph: bool


def split_prefills_decodes(scheduled: list[ScheduledSeq]) -> tuple[list[ScheduledSeq], list[ScheduledSeq]]:
    """(prefill chunks, decodes). A decode computes a sequence's last token (and samples); a
    one-token chunk cut short by the step's budget is a prefill chunk, not a decode."""
    prefills, decodes = [], []
    for s in scheduled:
        (decodes if s.num_tokens == 1 and s.samples else prefills).append(s)
    return prefills, decodes


@dataclass
class _InFlight:
    """A step whose sampled tokens are still on the device (async scheduling)."""

    entries: list[tuple[Sequence, int]]  # (sequence, index of its PENDING output token), by row
    tokens: torch.Tensor  # [n] int64 on the device: the next step's inputs
    host: torch.Tensor  # pinned [>= n] int64 the tokens are copied into
    event: Any  # torch.cuda.Event recorded after that copy (None on CPU)


class LLMEngine:
    """The engine. Not thread-safe: one thread drives it (see async_engine)."""

    def __init__(self, config: ModelConfig, weights: ModelWeights, tokenizer: Tokenizer, options: EngineOptions) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.options = options
        self.device = weights.embed.device
        self.dtype = weights.embed.dtype
        bs = options.block_size
        kind = options.kernel_kind(self.device)
        if kind == "triton":
            from backends.paged.attention import TritonPagedAttention
            from backends.paged.triton_ops import TritonOps

            attention: object = TritonPagedAttention(config.num_heads, config.num_kv_heads, config.head_dim)
            ops: object = TritonOps()
        else:
            attention, ops = TorchPagedAttention(config.num_heads, config.num_kv_heads, config.head_dim), TorchOps()
        self.kernels = kind
        max_positions = min(options.max_model_len or config.max_position_embeddings, config.max_position_embeddings)
        self.model = LlamaModel(config, weights, max_positions, attention=attention, ops=ops)
        if options.num_blocks is not None:
            num_blocks = options.num_blocks
        elif self.device.type == "cuda":
            # vLLM's recipe: run the largest step once, then give the KV pool what is left of
            # gpu_memory_utilization after weights, that step's activations and the graphs.
            num_blocks = profile_num_blocks(self.model, config, options, self.dtype)
        else:
            num_blocks = num_blocks_for_budget(config, bs, self.dtype, int(options.kv_cache_gib * (1 << 30)))
        self.max_model_len = min(max_positions, num_blocks * bs)
        self.cache = KVCache(config, num_blocks, bs, self.dtype, self.device)
        self.block_manager = BlockManager(num_blocks, bs, enable_prefix_caching=options.enable_prefix_caching, watermark=options.watermark)
        self.scheduler = Scheduler(
            self.block_manager,
            max_num_seqs=options.max_num_seqs,
            max_num_batched_tokens=options.max_num_batched_tokens,
            enable_chunked_prefill=options.enable_chunked_prefill,
        )
        self.graphs = None
        if self.device.type == "cuda" and kind == "triton" and not options.enforce_eager:
            from backends.paged.cuda_graphs import DecodeGraphRunner

            self.graphs = DecodeGraphRunner(
                self.model,
                self.cache,
                max_batch=min(options.cuda_graph_max_batch or options.max_num_seqs, options.max_num_seqs),
                max_blocks_per_seq=-(-self.max_model_len // bs),
                max_context=self.max_model_len,
                splits_for=lambda b, ctx: attention.decode_splits(b, ctx, self.device),
            )
            self.graphs.capture()
        self.last_step: StepInfo | None = None
        self.async_scheduling = options.async_scheduling if options.async_scheduling is not None else self.device.type == "cuda"
        self._inflight: _InFlight | None = None
        pin = self.device.type == "cuda"
        # Two host buffers (and events) for sampled tokens, used in turn: one step's copy
        # lands while the previous one's is read.
        self._token_host = [torch.zeros(options.max_num_seqs, dtype=torch.int64, pin_memory=pin) for _ in range(2)]
        self._token_events = [torch.cuda.Event() if pin else None for _ in range(2)]
        self._token_next = 0
        self.seqs: dict[str, Sequence] = {}
        self.counters = EngineCounters()

    @classmethod
    def from_model(cls, model: str, **options: Any) -> LLMEngine:
        """Load `model` (GGUF path or store name, HF directory, or dummy:<shape>)."""
        opts = EngineOptions.from_dict(options)
        if opts.num_threads:
            torch.set_num_threads(opts.num_threads)
        source = ModelSource.parse(model)
        config, tokenizer = load_config_and_tokenizer(source)
        device = opts.torch_device()
        weights = load_weights(source, config, opts.torch_dtype(device), device, seed=opts.seed)
        return cls(config, weights, tokenizer, opts)

    # -- requests ------------------------------------------------------------------------------

    def validate(self, request: GenerationRequest) -> None:
        """Raise InvalidRequest / ContextLengthExceeded for a request that can never run.
        Reads only immutable state, so any thread may call it."""
        s = request.sampling
        if s.json_mode:
            raise InvalidRequest("response_format json_object is not supported by the paged backend", param="response_format")
        if not request.prompt_tokens:
            raise InvalidRequest("the prompt is empty", param="prompt")
        if s.max_tokens < 1:
            raise InvalidRequest("max_tokens must be at least 1", param="max_tokens")
        bad = [t for t in request.prompt_tokens if not 0 <= t < self.config.vocab_size]
        if bad:
            raise InvalidRequest(f"token id {bad[0]} is outside the vocabulary", param="prompt")
        total = len(request.prompt_tokens) + s.max_tokens
        if total > self.max_model_len:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{total} tokens ({len(request.prompt_tokens)} in the messages, {s.max_tokens} in the completion).",
                param="max_tokens",
            )

    def add_request(self, request: GenerationRequest) -> None:
        self.validate(request)
        if request.request_id in self.seqs:
            raise InvalidRequest(f"duplicate request id {request.request_id!r}")
        s = request.sampling
        seq = Sequence(request.request_id, list(request.prompt_tokens), s, priority=request.priority)
        stop_ids = set(s.stop_token_ids)
        if not s.ignore_eos:
            stop_ids.update(self.tokenizer.eos_token_ids)
        seq.state = _SeqRuntime(
            sampler=SamplerState.create(s, seq.prompt_ids, "cpu"),
            detok=IncrementalDetokenizer(self.tokenizer, seq.prompt_ids),
            stops=StopMatcher(s.stop),
            stop_ids=frozenset(stop_ids),
        )
        self.seqs[request.request_id] = seq
        self.scheduler.add(seq)
        self.counters.prompt_tokens += len(seq.prompt_ids)

    def abort(self, request_id: str) -> bool:
        """Drop a request and free its blocks now. False if it is unknown or already done."""
        seq = self.seqs.pop(request_id, None)
        if seq is None:
            return False
        self.scheduler.remove(seq)
        self.counters.requests_aborted += 1
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or self._inflight is not None

    # -- one step ------------------------------------------------------------------------------

    def step(self) -> list[StepOutput]:
        """Run one scheduler step; return the deltas of the sequences that produced tokens.
        With async scheduling those are mostly the previous step's (see _step_async)."""
        if self.async_scheduling:
            t0 = time.perf_counter()
            outputs = self._step_async()
            self.counters.step_time_s += time.perf_counter() - t0
            return outputs
        t0 = time.perf_counter()
        plan = self.scheduler.schedule()
        if not plan.scheduled:
            return []
        prefills, decodes = split_prefills_decodes(plan.scheduled)
        ordered = prefills + decodes
        samplers = [s for s in ordered if s.samples]  # before num_computed moves
        inp = build_step_inputs(prefills, decodes, self.options.block_size)
        logits = self._run_model(inp)
        for s in ordered:
            s.seq.num_computed += s.num_tokens
            self.block_manager.commit_full_blocks(s.seq)
        outputs: list[StepOutput] = []
        if samplers:
            # The step's one device -> host sync happens here.
            results = sample_batch(logits, [s.seq.state.sampler for s in samplers])
            for s, r in zip(samplers, results):
                outputs.append(self._append_token(s.seq, r))
        self.counters.steps += 1
        self.counters.step_time_s += time.perf_counter() - t0
        return outputs

    def _run_model(self, inp: StepInputs) -> torch.Tensor:
        """Forward the step; return float32 logits of its sample rows, in row order."""
        graph = self.graphs is not None and self.graphs.can_run(inp)
        self.last_step = StepInfo(inp.num_prefill_tokens, inp.num_decodes, int(inp.context_lens.sum()), graph)
        if graph:
            self.counters.graph_steps += 1
            return self.graphs.run(inp)
        splits = 1
        if inp.num_decodes and hasattr(self.model.attn, "decode_splits"):
            splits = self.model.attn.decode_splits(inp.num_decodes, max(inp.decode_context_lens), self.device)
        input_ids, positions, meta = to_device(inp, self.device, splits)
        hidden = self.model.forward(input_ids, positions, meta, self.cache)
        if not inp.sample_rows:
            return hidden.new_empty((0, self.config.vocab_size), dtype=torch.float32)
        if len(inp.sample_rows) != hidden.shape[0]:
            rows = torch.tensor(inp.sample_rows, dtype=torch.long)
            hidden = hidden.index_select(0, rows.to(self.device, non_blocking=True))
        return self.model.logits(hidden)

    def _step_async(self) -> list[StepOutput]:
        """One step with the host work overlapped with the GPU's (vLLM's async scheduling).

        Step N is scheduled and launched while step N-1 may still run on the device: each
        sequence that samples gets a PENDING placeholder token (so the scheduler's counts are
        right), and a decode whose last token is N-1's placeholder reads it from N-1's token
        tensor on the device. After the launch, N-1's tokens are read back (the only sync,
        normally already complete) and processed: detokenization, stops, deltas, prefix-cache
        hashes. A sequence that N-1 finished (a stop) may have run one wasted row in N; its row
        is ignored. A sequence whose next token is certainly its last (max_tokens, context
        end) is not scheduled again. Steps that need the host's sampler (seeds, penalties,
        bias, logprobs, truncation) process N-1 and then N at once."""
        prev, self._inflight = self._inflight, None
        plan = self.scheduler.schedule()
        if not plan.scheduled:
            return self._resolve(prev) if prev is not None else []
        prefills, decodes = split_prefills_decodes(plan.scheduled)
        ordered = prefills + decodes
        samplers = [s for s in ordered if s.samples]  # before num_computed moves
        inp = build_step_inputs(prefills, decodes, self.options.block_size)
        if prev is not None:
            self._feed_from_device(inp, prefills, decodes, prev)
        logits = self._run_model(inp)
        for s in ordered:
            s.seq.num_computed += s.num_tokens
        entries = self._add_placeholders(samplers)
        sampled = {id(s) for s in samplers}
        for s in prefills:
            if id(s) not in sampled:  # a sequence that sampled commits when its token is read back
                self.block_manager.commit_full_blocks(s.seq)
        self.counters.steps += 1
        states = [s.seq.state.sampler for s in samplers]
        tokens = sample_tokens_device(logits, states) if samplers else None
        if tokens is not None:
            k = self._token_next
            self._token_next = 1 - k
            host, event = self._token_host[k], self._token_events[k]
            host[: len(entries)].copy_(tokens, non_blocking=True)
            if event is not None:
                event.record()
            outputs = self._resolve(prev) if prev is not None else []
            self._inflight = _InFlight(entries, tokens, host, event)
            return outputs
        outputs = self._resolve(prev) if prev is not None else []
        if entries:
            # The host sampler needs the tokens N-1 produced (penalties): sample after them.
            live = [i for i, (seq, _) in enumerate(entries) if seq.status is not SeqStatus.FINISHED]
            if live:
                rows = logits if len(live) == len(entries) else logits.index_select(0, torch.tensor(live, device=logits.device))
                results = sample_batch(rows, [states[i] for i in live])
                for i, r in zip(live, results):
                    seq, idx = entries[i]
                    outputs.append(self._accept(seq, idx, r.token_id, r))
        return outputs

    def _feed_from_device(self, inp: StepInputs, prefills: list[ScheduledSeq], decodes: list[ScheduledSeq], prev: _InFlight) -> None:
        """Point the decode rows whose last token is still on the device at prev's tokens."""
        rows: Any = None
        base = inp.num_prefill_tokens
        for j, s in enumerate(decodes):
            seq = s.seq
            if seq.num_pending:
                assert seq.num_pending == 1 and seq.output_ids[-1] == PENDING, "a placeholder older than the last step"
                if rows is None:
                    rows = np.full(len(inp.input_ids), -1, dtype=np.int64)
                rows[base + j] = seq.pending_row
        for s in prefills:
            assert not s.seq.num_pending, "a prefill chunk over a token still on the device"
        if rows is not None:
            inp.prev_tokens, inp.prev_rows = prev.tokens, rows

    def _add_placeholders(self, samplers: list[ScheduledSeq]) -> list[tuple[Sequence, int]]:
        entries = []
        for row, s in enumerate(samplers):
            seq = s.seq
            idx = len(seq.output_ids)
            seq.output_ids.append(PENDING)
            seq.num_pending += 1
            seq.pending_row = row
            if idx + 1 >= seq.sampling.max_tokens or len(seq.prompt_ids) + idx + 1 >= self.max_model_len:
                seq.final_pending = True  # finishes with "length" whatever the token is
            entries.append((seq, idx))
        return entries

    def _resolve(self, rec: _InFlight) -> list[StepOutput]:
        """Read back a launched step's tokens and process them."""
        if rec.event is not None:
            rec.event.synchronize()
        tokens = rec.host[: len(rec.entries)].tolist()
        outputs = []
        for (seq, idx), token in zip(rec.entries, tokens):
            if seq.status is SeqStatus.FINISHED:  # finished by an earlier token, or aborted
                continue
            outputs.append(self._accept(seq, idx, token, None))
        return outputs

    def _accept(self, seq: Sequence, idx: int, token: int, r: Any) -> StepOutput:
        """Fill in placeholder idx with its sampled token, then process it."""
        seq.output_ids[idx] = token
        seq.num_pending -= 1
        self.block_manager.commit_full_blocks(seq, seq.num_tokens - seq.num_pending)
        return self._process_token(seq, idx, token, r)

    def _append_token(self, seq: Sequence, r: Any) -> StepOutput:
        seq.output_ids.append(r.token_id)
        return self._process_token(seq, len(seq.output_ids) - 1, r.token_id, r)

    def _process_token(self, seq: Sequence, idx: int, token: int, r: Any) -> StepOutput:
        """Sampler history, detokenization, stops and the delta for output token idx."""
        rt: _SeqRuntime = seq.state
        rt.sampler.output_ids.append(token)
        self.counters.generation_tokens += 1
        finish: str | None = None
        text = ""
        logprobs = None
        if token in rt.stop_ids:
            finish = "stop"  # the stop token's own text is not part of the output
        else:
            piece = rt.detok.add(token)
            text, hit = rt.stops.feed(piece)
            if hit:
                finish = "stop"
            if r is not None and r.logprob is not None:
                tt = self.tokenizer.token_text
                logprobs = [TokenLogprob(token, tt(token), r.logprob, [(tt(i), lp) for i, lp in r.top])]
        if finish is None and (idx + 1 >= seq.sampling.max_tokens or len(seq.prompt_ids) + idx + 1 >= self.max_model_len):
            finish = "length"
        if finish is not None:
            if finish == "length" or token in rt.stop_ids:
                text += rt.stops.flush()
            self.seqs.pop(seq.request_id, None)
            self.scheduler.remove(seq)
            self.counters.requests_finished += 1
        return StepOutput(seq.request_id, GenerationDelta(text=text, token_ids=[token], finish_reason=finish, logprobs=logprobs))

    # -- observability ---------------------------------------------------------------------------

    def stats(self) -> dict[str, float]:
        """Plain numbers under vLLM-compatible names; the gateway exports them."""
        bm = self.block_manager
        return {
            "vllm:kv_cache_usage_perc": bm.usage(),
            "vllm:num_requests_running": float(len(self.scheduler.running)),
            "vllm:num_requests_waiting": float(len(self.scheduler.waiting)),
            "vllm:prefix_cache_queries": float(bm.prefix_queries),
            "vllm:prefix_cache_hits": float(bm.prefix_hits),
            "vllm:num_preemptions": float(self.scheduler.num_preemptions),
            "vllm:prompt_tokens": float(self.counters.prompt_tokens),
            "vllm:generation_tokens": float(self.counters.generation_tokens),
            "turnout:paged_kv_free_blocks": float(bm.num_free_blocks),
            "turnout:paged_kv_total_blocks": float(bm.num_blocks),
            "turnout:paged_steps": float(self.counters.steps),
        }

    def generate_sync(self, requests: list[GenerationRequest]) -> dict[str, list[int]]:
        """Run requests to completion on this thread; return output token ids by request id.
        (Tests and benchmarks.)"""
        out: dict[str, list[int]] = {r.request_id: [] for r in requests}
        for r in requests:
            self.add_request(r)
        while self.has_unfinished():
            for o in self.step():
                out.setdefault(o.request_id, []).extend(o.delta.token_ids)
        return out
