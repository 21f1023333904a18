"""The synchronous engine core: add_request / step / abort, driven by a plain Python loop.

A step is a one-way pipeline over four parts, each in its own module:

    Scheduler.schedule()               which sequences run, how many tokens each (scheduler)
    ModelRunner.launch_forward(plan)   inputs, forward pass launched (model_runner)
    ModelRunner.launch_sampling(step)  grammar masks, sampling launched (model_runner)
    Scheduler.update_from_output()     tokens appended, grammars advanced, stops, frees (scheduler)
    OutputProcessor.process()          text deltas, stop strings (output_processor)

With async scheduling (on by default on CUDA) a step whose tokens were sampled on the device
is collected one step later, after the next one has been launched, so the host's work for
step N overlaps the device's for step N+1. `step()` runs, for step N+1 with step N in flight:

    plan N+1 -> launch_forward(N+1)      reads N's ids on the device; no grammar needs them
             -> launch_sampling(N+1)     here at once when no row of N+1 has a grammar
             -> collect N                N's ids read back; update_from_output feeds them to
                                         the grammars (`Constraint.accept`)
             -> launch_sampling(N+1)     here instead with grammar rows: their masks filled on
                                         the host while the device runs N+1's forward pass,
                                         then uploaded and applied
             -> process N                N's deltas: text, stop strings
             -> N+1 stays in flight      (collected now instead when the host sampler decides
                                         its tokens, or without async scheduling)

Those two places of `launch_sampling` are the one split in the pipeline: a step's forward pass
needs only the last step's ids, its sampling the grammars moved past them. A row whose
sequence finished at step N samples unmasked (a stop token, its length, a refused token) or
masked (a stop string, found in `process N` after), and its token is dropped at collect, as any
finished sequence's is. The CPU path, without async scheduling by default, makes the same calls
with nothing in flight.

A request with n > 1 runs as n sequences (a SequenceGroup): choice i is seeded seed + i and
has its own copy of the grammar; the others share choice 0's prompt KV (see scheduler).

An embedding request (`PoolingRequest`) runs as one prefill-only sequence per input, in one
group: the runner pools each chunk's hidden rows as the forward pass is launched, the
scheduler finishes and frees each input after its last chunk (`finish_pooled`), and the
request's one `EmbeddingOutput` comes in the step its last input finished.

With `tensor_parallel_size` N > 1 this engine is rank 0: `from_model` starts ranks 1..N-1
(tp_launch) and each loads its share of the weights; the scheduler, sampling and outputs run
here alone, and the runner sends every step's inputs to the other ranks (model_runner).
`close()` stops them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from backends.embeddings import PoolState
from backends.generation import GenerationRequest, SamplingParams, output_budget
from backends.paged.block_manager import BlockManager
from backends.paged.config import ModelConfig
from backends.paged.fp8 import check_fp8_support
from backends.paged.loader import ModelSource, load_config_and_tokenizer, load_weights
from backends.paged.model import LlamaModel
from backends.paged.model_runner import LaunchedStep, ModelRunner, StepInfo
from backends.paged.options import EngineOptions
from backends.paged.output_processor import OutputProcessor, StepOutput
from backends.paged.parallel import cpu_threads_per_rank
from backends.paged.pooling import EmbeddingOutput, PoolingRequest
from backends.paged.sampler import SamplerState
from backends.paged.scheduler import SampledToken, Scheduler, SchedulerOutput
from backends.paged.sequence import Sequence, SequenceGroup
from backends.paged.tokenizer import Tokenizer
from backends.paged.tp_launch import RankGroup
from backends.paged.weights import ModelWeights
from backends.protocol import ContextLengthExceeded, InvalidRequest

__all__ = ["EngineCounters", "LLMEngine", "StepInfo", "StepOutput"]


@dataclass
class EngineCounters:
    """Monotonic counts since the engine started."""

    prompt_tokens: int = 0
    generation_tokens: int = 0
    steps: int = 0
    requests_finished: int = 0
    requests_aborted: int = 0
    step_time_s: float = 0.0
    graph_steps: int = 0  # decode steps replayed from a CUDA graph
    # Tokens the model computed: prompt (and recomputed) chunks, and one-token decodes.
    prefill_tokens: int = 0
    decode_tokens: int = 0
    extra: dict[str, float] = field(default_factory=dict)


class LLMEngine:
    """The engine. Not thread-safe: one thread drives it (see async_engine)."""

    def __init__(
        self,
        config: ModelConfig,
        weights: ModelWeights,
        tokenizer: Tokenizer,
        options: EngineOptions,
        *,
        task: str = "generate",
        ranks: RankGroup | None = None,
    ) -> None:
        if options.tensor_parallel_size > 1 and ranks is None:
            raise ValueError("a tensor-parallel engine is built by LLMEngine.from_model, which starts its ranks")
        self.config = config
        self.tokenizer = tokenizer
        self.options = options
        self.task = task  # "embed": an embedding model, which never decodes (no decode graphs)
        self.ranks = ranks  # tensor parallelism: ranks 1..N-1, stopped by close()
        self.runner = ModelRunner(config, weights, options, decode_graphs=task != "embed", tp=ranks.tp if ranks else None)
        self.device = self.runner.device
        self.dtype = self.runner.dtype
        self.kernels = self.runner.kernels
        self.max_model_len = self.runner.max_model_len
        self.block_manager = BlockManager(
            self.runner.num_blocks, options.block_size, enable_prefix_caching=options.enable_prefix_caching, watermark=options.watermark
        )
        self.scheduler = Scheduler(
            self.block_manager,
            max_num_seqs=options.max_num_seqs,
            max_num_batched_tokens=options.max_num_batched_tokens,
            enable_chunked_prefill=options.enable_chunked_prefill,
            max_model_len=self.max_model_len,
        )
        self.outputs = OutputProcessor(tokenizer)
        self.async_scheduling = options.async_scheduling if options.async_scheduling is not None else self.device.type == "cuda"
        self._inflight: LaunchedStep | None = None  # async scheduling: launched, not collected
        self.requests: dict[str, SequenceGroup] = {}
        self.counters = EngineCounters()

    @classmethod
    def from_model(
        cls,
        model: str | ModelSource,
        options: EngineOptions | None = None,
        *,
        config: ModelConfig | None = None,
        tokenizer: Tokenizer | None = None,
        task: str = "generate",
        on_rank_failure: Callable[[str], None] | None = None,
        **option_values: Any,
    ) -> LLMEngine:
        """Load `model` (GGUF path or store name, HF directory, dummy:<shape>, or an already
        parsed ModelSource) and build the engine: the one way every caller builds one.

        Options come as an EngineOptions or as keywords. `config` and `tokenizer`, when given,
        were read from the same source already (PagedBackend reads them before start()).
        `task` "embed": an embedding model (policies' BackendConfig.task). With
        `tensor_parallel_size` > 1 the other ranks are started here (call `close()` to stop
        them); `on_rank_failure(reason)` is called if one of them exits while the engine runs."""
        if options is not None and option_values:
            raise TypeError("pass engine options as an EngineOptions or as keywords, not both")
        opts = options if options is not None else EngineOptions.from_dict(option_values)
        threads = opts.num_threads
        if not threads and opts.tensor_parallel_size > 1 and opts.torch_device().type == "cpu":
            threads = cpu_threads_per_rank(opts.tensor_parallel_size)  # the ranks share the cores
        if threads:
            torch.set_num_threads(threads)
        source = model if isinstance(model, ModelSource) else ModelSource.parse(model)
        if config is None or tokenizer is None:
            config, tokenizer = load_config_and_tokenizer(source)
        opts.check_tensor_parallel(num_heads=config.num_heads, num_kv_heads=config.num_kv_heads, intermediate_size=config.intermediate_size)
        device = opts.torch_device()
        if opts.quantization == "fp8":
            check_fp8_support(device)  # before the weights load: a GPU without FP8 fails in seconds
        if opts.tensor_parallel_size == 1:
            weights = load_weights(source, config, opts.torch_dtype(device), device, seed=opts.seed, quantization=opts.quantization)
            return cls(config, weights, tokenizer, opts, task=task)
        ranks = RankGroup.start(source.kind, source.location, config, opts, task, on_failure=on_rank_failure)
        try:
            weights = load_weights(
                source, config, opts.torch_dtype(device), device, seed=opts.seed, quantization=opts.quantization, shard=ranks.tp.layout
            )  # fmt: skip
            ranks.tp.barrier()  # every rank has its weights: the start-up's collectives begin
            return cls(config, weights, tokenizer, opts, task=task, ranks=ranks)
        except BaseException:
            ranks.close(kill=True)  # mid start-up: the others are inside collectives, not waiting for steps
            raise

    def close(self) -> None:
        """Stop the other tensor-parallel ranks and leave their group (nothing to do on one
        rank). The engine runs no step after this."""
        if self.ranks is not None:
            self.ranks.close()

    # -- requests ------------------------------------------------------------------------------

    def validate(self, request: GenerationRequest | PoolingRequest) -> None:
        """Raise InvalidRequest / ContextLengthExceeded for a request that can never run.
        Reads only immutable state, so any thread may call it."""
        if isinstance(request, PoolingRequest):
            self._validate_pooling(request)
            return
        s = request.sampling
        if s.grammar is not None and request.constraint is None:
            # Compiled against the vocabulary in LocalBackend.prepare; never run unconstrained.
            raise InvalidRequest("the request's grammar was not compiled for this model", param="response_format")
        if s.n < 1:
            raise InvalidRequest("n must be at least 1", param="n")
        if not request.prompt_tokens:
            raise InvalidRequest("the prompt is empty", param="prompt")
        if s.max_tokens < 1:
            raise InvalidRequest("max_tokens must be at least 1", param="max_tokens")
        bad = [t for t in request.prompt_tokens if not 0 <= t < self.config.vocab_size]
        if bad:
            raise InvalidRequest(f"token id {bad[0]} is outside the vocabulary", param="prompt")
        output_budget(len(request.prompt_tokens), s.max_tokens, self.max_model_len)

    def _validate_pooling(self, request: PoolingRequest) -> None:
        if not request.inputs:
            raise InvalidRequest("input must not be empty", param="input")
        for i, tokens in enumerate(request.inputs):
            if not tokens:
                raise InvalidRequest(f"input {i} is empty", param=f"input.{i}")
            if len(tokens) > self.max_model_len:
                raise ContextLengthExceeded(
                    f"This model's maximum context length is {self.max_model_len} tokens. However, input {i} has {len(tokens)} tokens.",
                    param=f"input.{i}",
                )
            bad = next((t for t in tokens if not 0 <= t < self.config.vocab_size), None)
            if bad is not None:
                raise InvalidRequest(f"token id {bad} is outside the vocabulary", param=f"input.{i}")

    def add_request(self, request: GenerationRequest | PoolingRequest) -> None:
        """Validate a request and queue its choices (an embedding request: its inputs) for
        the scheduler."""
        if isinstance(request, PoolingRequest):
            self._add_pooling(request)
            return
        self.validate(request)
        if request.request_id in self.requests:
            raise InvalidRequest(f"duplicate request id {request.request_id!r}")
        s = request.sampling
        stop_ids = set(s.stop_token_ids)
        # EOS ends a constrained sequence even with ignore_eos: a complete grammar allows nothing else.
        if not s.ignore_eos or request.constraint is not None:
            stop_ids.update(self.tokenizer.eos_token_ids)
        prompt = list(request.prompt_tokens)  # shared by the choices: never mutated
        seqs: list[Sequence] = []
        for i in range(s.n):
            params = s if i == 0 or s.seed is None else replace(s, seed=s.seed + i)
            constraint = request.constraint if i == 0 or request.constraint is None else request.constraint.copy()
            seq = Sequence(
                request.request_id, prompt, params, priority=request.priority, stop_token_ids=frozenset(stop_ids),
                index=i, parent=seqs[0] if seqs else None, constraint=constraint,
            )  # fmt: skip
            seq.sampler = SamplerState.create(params, prompt, "cpu")
            seqs.append(seq)
        self.requests[request.request_id] = SequenceGroup(request.request_id, seqs)
        for seq in seqs:
            self.outputs.add(seq)
            self.scheduler.add(seq)
        self.counters.prompt_tokens += len(prompt)

    def _add_pooling(self, request: PoolingRequest) -> None:
        """One prefill-only sequence per input, all in one group; no sampler, no text state."""
        self.validate(request)
        if request.request_id in self.requests:
            raise InvalidRequest(f"duplicate request id {request.request_id!r}")
        params = SamplingParams(max_tokens=1)  # never read: an embedding input samples nothing
        seqs = [
            Sequence(request.request_id, list(tokens), params, priority=request.priority, index=i, pooling=PoolState(request.pooling, len(tokens)))
            for i, tokens in enumerate(request.inputs)
        ]
        self.requests[request.request_id] = SequenceGroup(request.request_id, seqs)
        for seq in seqs:
            self.scheduler.add(seq)
            self.counters.prompt_tokens += seq.num_tokens

    def abort(self, request_id: str) -> bool:
        """Drop a request, every choice of it, and free their blocks now. False if it is
        unknown or already done."""
        group = self.requests.pop(request_id, None)
        if group is None:
            return False
        for seq in group.seqs:
            self.scheduler.remove(seq)
            self.outputs.remove(seq)
        self.counters.requests_aborted += 1
        return True

    def has_unfinished(self) -> bool:
        """Whether a step has anything to do (queued or running work, or a step in flight)."""
        return self.scheduler.has_work() or self._inflight is not None

    # -- one step ------------------------------------------------------------------------------

    def step(self) -> list[StepOutput]:
        """Plan, launch, and hand back the deltas of the sequences that produced tokens. With
        async scheduling those are mostly the previous step's: a step sampled on the device is
        collected after the next one has been launched (see the module docstring)."""
        t0 = time.perf_counter()
        prev, self._inflight = self._inflight, None
        plan = self.scheduler.schedule()
        if not plan.scheduled:
            return self._finish(prev) if prev is not None else []
        launched = self._run_model(plan)
        if not launched.constrained:
            self._run_sampling(launched)  # nothing to wait for
        info = self.runner.last_step
        if info is not None:
            self.counters.graph_steps += int(info.graph)
            self.counters.prefill_tokens += info.num_prefill_tokens
            self.counters.decode_tokens += info.num_decodes
        self.scheduler.update_after_launch(plan)
        pooled = self._finish_pooled(plan)
        tokens = self._collect(prev) if prev is not None else []
        if launched.constrained:
            self._run_sampling(launched)  # the grammars have taken every earlier token now
        outputs = pooled + self._process(tokens)
        if self.async_scheduling and launched.deferrable:
            self._inflight = launched
        else:
            # Sync scheduling, or rows that need the host sampler (their penalties read the
            # previous step's tokens, just collected, so this step is collected after them).
            outputs += self._finish(launched)
        self.counters.steps += 1
        self.counters.step_time_s += time.perf_counter() - t0
        return outputs

    def _finish_pooled(self, plan: SchedulerOutput) -> list[StepOutput]:
        """Free the embedding inputs whose last chunk this step launched; the output of each
        request whose inputs are all done (its vectors read back: the step's one sync then)."""
        outputs = []
        for seq in self.scheduler.finish_pooled(plan):
            group = self.requests.get(seq.request_id)
            if group is None:
                continue
            group.num_unfinished -= 1
            if group.num_unfinished == 0:
                del self.requests[seq.request_id]
                self.counters.requests_finished += 1
                vectors = [s.pooling.result().float().cpu().numpy() for s in group.seqs if s.pooling is not None]
                tokens = sum(s.num_tokens for s in group.seqs)
                outputs.append(StepOutput(seq.request_id, EmbeddingOutput(vectors, tokens)))
        return outputs

    def _run_model(self, plan: SchedulerOutput) -> LaunchedStep:
        """Launch a step's forward pass (benchmarks wrap this and `_run_sampling` to time the device)."""
        return self.runner.launch_forward(plan)

    def _run_sampling(self, launched: LaunchedStep) -> None:
        """Launch a step's sampling, after its forward pass (and, with grammar rows, the
        collection of the step before)."""
        self.runner.launch_sampling(launched)

    def _finish(self, launched: LaunchedStep) -> list[StepOutput]:
        """Collect a launched step's tokens and turn them into progress and deltas."""
        return self._process(self._collect(launched))

    def _collect(self, launched: LaunchedStep) -> list[SampledToken]:
        """A launched step's tokens, read back (or host-sampled) and recorded as progress."""
        tokens = self.scheduler.update_from_output(self.runner.collect(launched))
        self.counters.generation_tokens += len(tokens)
        return tokens

    def _process(self, tokens: list[SampledToken]) -> list[StepOutput]:
        """Deltas for collected tokens; finishes the sequences a stop string ended."""
        outputs, stopped = self.outputs.process(tokens)
        for seq in stopped:
            self.scheduler.remove(seq)  # a stop string: finished here, not by the scheduler
        for out in outputs:
            if out.delta.finish_reason is not None:
                group = self.requests[out.request_id]
                group.num_unfinished -= 1
                if group.num_unfinished == 0:  # the request's last choice: its last delta
                    out.delta.final = True
                    del self.requests[out.request_id]
                    self.counters.requests_finished += 1
        return outputs

    # -- the runner's parts (benchmarks and tests reach them through the engine) ---------------

    @property
    def model(self) -> LlamaModel | None:
        return self.runner.model

    @model.setter
    def model(self, model: LlamaModel | None) -> None:
        self.runner.model = model  # None releases the weights (the benchmark's peer reuses the memory)

    @property
    def cache(self) -> Any:
        return self.runner.cache

    @property
    def graphs(self) -> Any:
        return self.runner.graphs

    @graphs.setter
    def graphs(self, graphs: Any) -> None:
        self.runner.graphs = graphs

    @property
    def last_step(self) -> StepInfo | None:
        return self.runner.last_step

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
            "turnout:paged_sync_wait_seconds": self.runner.sync_wait_s,
            "turnout:paged_step_seconds": self.counters.step_time_s,
            "turnout:paged_prefill_tokens": float(self.counters.prefill_tokens),
            "turnout:paged_decode_tokens": float(self.counters.decode_tokens),
            "turnout:paged_graph_steps": float(self.counters.graph_steps),
        }

    def generate_choices(self, requests: list[GenerationRequest]) -> dict[str, list[list[int]]]:
        """Run requests (and any already added) to completion on this thread; return each
        choice's output token ids by request id. (Tests and benchmarks.)"""
        out: dict[str, list[list[int]]] = {r.request_id: [[] for _ in range(r.sampling.n)] for r in requests}
        for r in requests:
            self.add_request(r)
        while self.has_unfinished():
            for o in self.step():
                if isinstance(o.delta, EmbeddingOutput):
                    continue  # an embedding request's (embed_sync returns them)
                choices = out.setdefault(o.request_id, [])
                while len(choices) <= o.delta.index:
                    choices.append([])
                choices[o.delta.index].extend(o.delta.token_ids)
        return out

    def embed_sync(self, requests: list[PoolingRequest]) -> dict[str, list[Any]]:
        """Run embedding requests (and any already added) to completion on this thread;
        return each one's pooled vectors by request id. (Tests and benchmarks.)"""
        out: dict[str, list[Any]] = {}
        for r in requests:
            self.add_request(r)
        while self.has_unfinished():
            for o in self.step():
                if isinstance(o.delta, EmbeddingOutput):
                    out[o.request_id] = o.delta.vectors
        return out

    def generate_sync(self, requests: list[GenerationRequest]) -> dict[str, list[int]]:
        """generate_choices for requests of one choice: output token ids by request id."""
        return {rid: choices[0] for rid, choices in self.generate_choices(requests).items()}
