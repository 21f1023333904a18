"""PagedBackend: the gateway's Backend protocol over the paged engine.

Config:  backends: [{name: gpu-a, kind: paged, model: smollm2-135m, options: {kv_cache_gib: 2}}]
The gateway calls PagedBackend(name=..., model=..., **options), then `await start()`.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np

from backends import embeddings as emb
from backends.generation import GenerationDelta, GenerationRequest
from backends.grammar import GrammarCompiler
from backends.local import LocalBackend
from backends.paged.async_engine import AsyncEngine, EngineDeadError, OutputSink
from backends.paged.config import ModelConfig
from backends.paged.engine import LLMEngine
from backends.paged.loader import ModelSource, load_config_and_tokenizer
from backends.paged.options import EngineOptions
from backends.paged.pooling import PoolingRequest
from backends.paged.tokenizer import Tokenizer
from backends.protocol import EmbeddingRequest, LoadReport


def _model_id(model: str) -> str:
    """The id clients use: the name as configured, a file's stem for a path."""
    if model.endswith(".gguf") or "/" in model:
        return Path(model).stem if model.endswith(".gguf") else Path(model).name
    return model


class PagedBackend(LocalBackend):
    """An in-process PagedAttention engine serving one model."""

    supports_logprobs = True

    def __init__(
        self,
        name: str,
        model: str,
        model_id: str | None = None,
        task: str = "generate",
        on_rank_failure: Callable[[str], None] | None = None,
        **options: Any,
    ) -> None:
        """`on_rank_failure(reason)`: called when a tensor-parallel rank other than 0 exits
        while the engine runs (the engine worker exits then, to be restarted whole)."""
        self.name = name
        self._on_rank_failure = on_rank_failure
        self.model = model
        self.model_id = model_id or _model_id(model)
        self.task = task
        self.options = EngineOptions.from_dict(options)  # unknown options fail at config load
        self.matryoshka = self.options.matryoshka
        self._source = ModelSource.parse(model)
        # Shape and tokenizer are cheap; weights and the KV pool wait for start().
        self._config: ModelConfig
        self._tokenizer: Tokenizer
        self._config, self._tokenizer = load_config_and_tokenizer(self._source)
        self.engine: LLMEngine | None = None
        self._async: AsyncEngine | None = None
        self._grammar: GrammarCompiler | None = None
        self._grammar_lock = threading.Lock()  # prepare runs in several threads at once
        # The option's pooling, else the GGUF's own, else the default (the llama.cpp runner's too).
        self.pooling: emb.Pooling = emb.resolve_pooling(self.options.pooling, self._config.pooling)

    # -- LocalBackend's hooks -----------------------------------------------------------------

    @property
    def context_window(self) -> int:
        if self.engine is not None:
            return self.engine.max_model_len
        return min(self.options.max_model_len or self._config.max_position_embeddings, self._config.max_position_embeddings)

    def tokenize(self, text: str) -> list[int]:
        return self._tokenizer.encode(text)

    def detokenize(self, token_ids: list[int]) -> str:
        return self._tokenizer.decode(token_ids)

    def chat_template(self) -> tuple[str | None, str, str]:
        t = self._tokenizer
        return t.chat_template, t.bos_text, t.eos_text

    def grammar_compiler(self) -> GrammarCompiler:
        """The vocabulary for llguidance, built on first use (up to a second), for the
        model's logits width (config.vocab_size), then kept."""
        with self._grammar_lock:
            if self._grammar is None:
                self._grammar = self._tokenizer.grammar_compiler(self._config.vocab_size)
            return self._grammar

    async def start(self) -> None:
        if self._async is not None:
            return
        # The shape and tokenizer read in __init__ are reused: a GGUF's metadata is parsed once.
        self.engine = await asyncio.to_thread(
            LLMEngine.from_model, self._source, self.options, config=self._config, tokenizer=self._tokenizer, task=self.task,
            on_rank_failure=self._on_rank_failure,
        )  # fmt: skip
        self._async = AsyncEngine(self.engine)
        self._async.start()

    async def close(self) -> None:
        if self._async is not None:
            await asyncio.to_thread(self._async.shutdown)
            self._async = None
        if self.engine is not None:
            await asyncio.to_thread(self.engine.close)  # tensor-parallel ranks, if any

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        return self._engine().generate(request)

    def submit(self, request: GenerationRequest, sink: OutputSink, token: Any) -> None:
        """Outputs straight to `sink`, on the engine thread (an engine worker's pipe)."""
        self._engine().submit(request, sink, token)

    def abort_request(self, request_id: str) -> None:
        self._engine().abort_nowait(request_id)

    # -- embeddings ------------------------------------------------------------------------------

    @property
    def embedding_size(self) -> int:
        return self._config.hidden_size

    def check_embedding_tokens(self, request: EmbeddingRequest, tokenized: list[list[int]]) -> None:
        emb.check_vocabulary(request, tokenized, self._config.vocab_size)

    async def embed_tokens(self, inputs: list[list[int]]) -> list[np.ndarray]:
        """Pooled through the engine: prefill-only sequences batched with everything else."""
        out = await self._engine().embed(PoolingRequest(uuid.uuid4().hex, inputs, self.pooling))
        return out.vectors

    def _engine(self) -> AsyncEngine:
        if self._async is None:
            raise EngineDeadError(f"backend {self.name!r} is not started")
        return self._async

    # -- load and metrics ----------------------------------------------------------------------

    def load(self) -> LoadReport:
        """From the live block pool and scheduler queues."""
        if self.engine is None or self._async is None:
            return LoadReport(healthy=False, block_size=self.options.block_size, max_running=self.options.max_num_seqs)
        bm = self.engine.block_manager
        return LoadReport(
            kv_usage=bm.usage(),
            kv_free_blocks=bm.num_free_blocks,
            block_size=bm.block_size,
            running=len(self.engine.scheduler.running),
            waiting=len(self.engine.scheduler.waiting) + self._async.pending_adds,
            max_running=self.options.max_num_seqs,
            prefix_cache_hit_rate=bm.prefix_hits / bm.prefix_queries if bm.prefix_queries else 0.0,
            healthy=self._async.healthy,
        )

    def stats(self) -> dict[str, float]:
        """vLLM-compatible metric names -> values (gauges and monotonic counters)."""
        if self.engine is None:
            return {}
        s = self.engine.stats()
        if self._async is not None:
            a = self._async
            s["vllm:num_requests_waiting"] += a.pending_adds
            # The engine thread's wall time, by where it went (the step itself: paged_step_seconds).
            s["turnout:paged_idle_seconds"] = a.idle_seconds()
            s["turnout:paged_deliver_seconds"] = a.deliver_s
            s["turnout:paged_drain_seconds"] = a.drain_s
            s["turnout:paged_loop_seconds"] = a.loop_seconds()
        return s
