"""The synchronous engine core: add_request / step / abort, driven by a plain Python loop.

A step is a one-way pipeline over four parts, each in its own module:

    Scheduler.schedule()             which sequences run, how many tokens each (scheduler)
    ModelRunner.execute(plan)        inputs, forward pass, sampling launched (model_runner)
    Scheduler.update_from_output()   tokens appended, blocks committed, stops, frees (scheduler)
    OutputProcessor.process()        text deltas, stop strings (output_processor)

With async scheduling (on by default on CUDA) a step whose tokens were sampled on the device
is collected one step later, after the next one has been launched, so the host's work for
step N overlaps the device's for step N+1.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from backends.generation import GenerationRequest, output_budget
from backends.paged.block_manager import BlockManager
from backends.paged.config import ModelConfig
from backends.paged.loader import ModelSource, load_config_and_tokenizer, load_weights
from backends.paged.model import LlamaModel
from backends.paged.model_runner import LaunchedStep, ModelRunner, StepInfo
from backends.paged.options import EngineOptions
from backends.paged.output_processor import OutputProcessor, StepOutput
from backends.paged.sampler import SamplerState
from backends.paged.scheduler import Scheduler, SchedulerOutput
from backends.paged.sequence import Sequence
from backends.paged.tokenizer import Tokenizer
from backends.paged.weights import ModelWeights
from backends.protocol import InvalidRequest

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
    extra: dict[str, float] = field(default_factory=dict)


class LLMEngine:
    """The engine. Not thread-safe: one thread drives it (see async_engine)."""

    def __init__(self, config: ModelConfig, weights: ModelWeights, tokenizer: Tokenizer, options: EngineOptions) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.options = options
        self.runner = ModelRunner(config, weights, options)
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
        self.seqs: dict[str, Sequence] = {}
        self.counters = EngineCounters()

    @classmethod
    def from_model(
        cls,
        model: str | ModelSource,
        options: EngineOptions | None = None,
        *,
        config: ModelConfig | None = None,
        tokenizer: Tokenizer | None = None,
        **option_values: Any,
    ) -> LLMEngine:
        """Load `model` (GGUF path or store name, HF directory, dummy:<shape>, or an already
        parsed ModelSource) and build the engine: the one way every caller builds one.

        Options come as an EngineOptions or as keywords. `config` and `tokenizer`, when given,
        were read from the same source already (PagedBackend reads them before start())."""
        if options is not None and option_values:
            raise TypeError("pass engine options as an EngineOptions or as keywords, not both")
        opts = options if options is not None else EngineOptions.from_dict(option_values)
        if opts.num_threads:
            torch.set_num_threads(opts.num_threads)
        source = model if isinstance(model, ModelSource) else ModelSource.parse(model)
        if config is None or tokenizer is None:
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
        if s.json_schema is not None:
            raise InvalidRequest("response_format json_schema is not supported by the paged backend", param="response_format")
        if not request.prompt_tokens:
            raise InvalidRequest("the prompt is empty", param="prompt")
        if s.max_tokens < 1:
            raise InvalidRequest("max_tokens must be at least 1", param="max_tokens")
        bad = [t for t in request.prompt_tokens if not 0 <= t < self.config.vocab_size]
        if bad:
            raise InvalidRequest(f"token id {bad[0]} is outside the vocabulary", param="prompt")
        output_budget(len(request.prompt_tokens), s.max_tokens, self.max_model_len)

    def add_request(self, request: GenerationRequest) -> None:
        """Validate a request and queue it for the scheduler."""
        self.validate(request)
        if request.request_id in self.seqs:
            raise InvalidRequest(f"duplicate request id {request.request_id!r}")
        s = request.sampling
        stop_ids = set(s.stop_token_ids)
        if not s.ignore_eos:
            stop_ids.update(self.tokenizer.eos_token_ids)
        seq = Sequence(request.request_id, list(request.prompt_tokens), s, priority=request.priority, stop_token_ids=frozenset(stop_ids))
        seq.sampler = SamplerState.create(s, seq.prompt_ids, "cpu")
        self.outputs.add(seq)
        self.seqs[request.request_id] = seq
        self.scheduler.add(seq)
        self.counters.prompt_tokens += len(seq.prompt_ids)

    def abort(self, request_id: str) -> bool:
        """Drop a request and free its blocks now. False if it is unknown or already done."""
        seq = self.seqs.pop(request_id, None)
        if seq is None:
            return False
        self.scheduler.remove(seq)
        self.outputs.remove(request_id)
        self.counters.requests_aborted += 1
        return True

    def has_unfinished(self) -> bool:
        """Whether a step has anything to do (queued or running work, or a step in flight)."""
        return self.scheduler.has_work() or self._inflight is not None

    # -- one step ------------------------------------------------------------------------------

    def step(self) -> list[StepOutput]:
        """Plan, launch, and hand back the deltas of the sequences that produced tokens. With
        async scheduling those are mostly the previous step's: a step sampled on the device is
        collected after the next one has been launched."""
        t0 = time.perf_counter()
        prev, self._inflight = self._inflight, None
        plan = self.scheduler.schedule()
        if not plan.scheduled:
            return self._finish(prev) if prev is not None else []
        launched = self._run_model(plan)
        if self.runner.last_step is not None and self.runner.last_step.graph:
            self.counters.graph_steps += 1
        self.scheduler.update_after_launch(plan)
        outputs = self._finish(prev) if prev is not None else []
        if self.async_scheduling and launched.on_device:
            self._inflight = launched
        else:
            # Sync scheduling, or rows that need the host sampler: their penalties read the
            # previous step's tokens, just collected, so this step is collected after them.
            outputs += self._finish(launched)
        self.counters.steps += 1
        self.counters.step_time_s += time.perf_counter() - t0
        return outputs

    def _run_model(self, plan: SchedulerOutput) -> LaunchedStep:
        """The step's one call into the model runner (benchmarks wrap it to time the device)."""
        return self.runner.execute(plan)

    def _finish(self, launched: LaunchedStep) -> list[StepOutput]:
        """Collect a launched step's tokens and turn them into progress and deltas."""
        tokens = self.scheduler.update_from_output(self.runner.collect(launched))
        self.counters.generation_tokens += len(tokens)
        outputs, stopped = self.outputs.process(tokens)
        for seq in stopped:
            self.scheduler.remove(seq)  # a stop string: finished here, not by the scheduler
        for out in outputs:
            if out.delta.finish_reason is not None:
                self.seqs.pop(out.request_id, None)
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
