"""The llama.cpp runner: a pool of `llama_cpp.Llama` instances behind the Backend protocol.

Each instance serves one request at a time, in a worker thread; requests beyond the pool
wait in a bounded queue, and past that bound get 503 with a Retry-After.
"""

from __future__ import annotations

import asyncio
import codecs
import logging
import os
import random
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np

from backends.generation import GenerationDelta, GenerationRequest, SamplingParams
from backends.llamacpp.cpu_variants import load_cpu_backend
from backends.llamacpp.options import LlamaCppOptions
from backends.local import LocalBackend
from backends.models import resolve_model
from backends.protocol import InvalidRequest, LoadReport, Overloaded
from backends.stop import StopMatcher

log = logging.getLogger("turnout.llamacpp")

Emit = Callable[[GenerationDelta | BaseException], None]


class LlamaCppBackend(LocalBackend):
    """GGUF models on llama.cpp (CPU here; Metal or CUDA where llama-cpp-python was built so)."""

    def __init__(self, name: str, model: str, model_id: str | None = None, **options: Any) -> None:
        opts = LlamaCppOptions.from_dict(options)  # unknown options fail at config load
        self.name = name
        self.model = model
        self.model_id = model_id or model
        self.instances = opts.instances
        self.max_queue = opts.max_queue
        self._llama_args: dict[str, Any] = {
            "n_ctx": opts.n_ctx,
            "n_threads": opts.n_threads or os.cpu_count() or 1,
            "n_batch": opts.n_batch,
            "n_gpu_layers": opts.n_gpu_layers,
            "verbose": False,
        }
        self._pool: list[llama_cpp.Llama] = []
        self._free: asyncio.Queue[llama_cpp.Llama] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._waiting = 0
        self._running = 0
        self._mean_duration_s = 1.0  # moving average, for Retry-After
        self._template: str | None = None
        self._bos_text = ""
        self._eos_text = ""
        self._json_grammar: llama_cpp.LlamaGrammar | None = None
        self.cpu_variant = ""  # the ggml CPU variant in use, once started

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        # The CPU variant of ggml for this host, chosen before the first Llama (AMX only
        # where the kernel grants its tile state).
        self.cpu_variant = load_cpu_backend()
        path = resolve_model(self.model)
        self._pool = [await asyncio.to_thread(self._load, path) for _ in range(self.instances)]
        self._free = asyncio.Queue()
        for llm in self._pool:
            self._free.put_nowait(llm)
        self._executor = ThreadPoolExecutor(max_workers=self.instances, thread_name_prefix=f"llamacpp-{self.name}")
        first = self._pool[0]
        self._template = first.metadata.get("tokenizer.chat_template")
        self._bos_text = self._token_text(first, first.token_bos())
        self._eos_text = self._token_text(first, first.token_eos())
        log.info("%s: loaded %s x%d (n_ctx=%d)", self.name, path.name, self.instances, first.n_ctx())

    def _load(self, path: Path) -> llama_cpp.Llama:
        return llama_cpp.Llama(model_path=str(path), **self._llama_args)

    async def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
        for llm in self._pool:
            llm.close()
        self._pool = []

    # -- what LocalBackend needs -----------------------------------------------------------

    @property
    def context_window(self) -> int:
        return self._pool[0].n_ctx()

    def tokenize(self, text: str) -> list[int]:
        llm = self._pool[0]  # the vocabulary is read-only: safe beside a generating thread
        # A template that writes the BOS text itself must not get a second BOS.
        add_bos = not (self._bos_text and text.startswith(self._bos_text))
        return llm.tokenize(text.encode(), add_bos=add_bos, special=True)

    def detokenize(self, token_ids: list[int]) -> str:
        return self._pool[0].detokenize(token_ids).decode("utf-8", errors="replace")

    def chat_template(self) -> tuple[str | None, str, str]:
        return self._template, self._bos_text, self._eos_text

    def load(self) -> LoadReport:
        return LoadReport(
            running=self._running,
            waiting=self._waiting,
            max_running=self.instances,
            healthy=bool(self._pool),
        )

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        if request.sampling.logit_bias:
            vocab = self._pool[0].n_vocab()
            bad = [t for t in request.sampling.logit_bias if not 0 <= t < vocab]
            if bad:
                raise InvalidRequest(f"logit_bias names token ids outside the vocabulary: {bad}", param="logit_bias")
        llm = await self._acquire()
        loop = asyncio.get_running_loop()
        out: asyncio.Queue[GenerationDelta | BaseException] = asyncio.Queue()
        cancel = threading.Event()
        started = time.monotonic()

        def emit(item: GenerationDelta | BaseException) -> None:
            try:
                loop.call_soon_threadsafe(out.put_nowait, item)
            except RuntimeError:  # the loop closed under us at shutdown
                cancel.set()

        def release() -> None:
            self._running -= 1
            self._mean_duration_s = 0.8 * self._mean_duration_s + 0.2 * (time.monotonic() - started)
            assert self._free is not None
            self._free.put_nowait(llm)

        def finish(last: GenerationDelta | BaseException | None) -> None:
            # The instance goes back before the last delta reaches the consumer: a request
            # sent once this answer is done must never find the instance still busy.
            release()
            if last is not None:
                out.put_nowait(last)

        def work() -> None:
            last: GenerationDelta | BaseException | None = None
            try:
                last = self._generate_sync(llm, request, cancel, emit)
            except BaseException as exc:  # surfaced to the awaiting request
                last = exc
            finally:
                try:
                    loop.call_soon_threadsafe(finish, last)
                except RuntimeError:
                    pass

        loop.run_in_executor(self._executor, work)
        try:
            while True:
                item = await out.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason:
                    return
        finally:
            # Runs on disconnect too (no awaits here): the worker sees the flag after at
            # most one more token and hands the instance back.
            cancel.set()

    # -- internals -----------------------------------------------------------------------------

    async def _acquire(self) -> llama_cpp.Llama:
        """An idle instance, waiting in a bounded queue for one; 503 when the queue is full."""
        assert self._free is not None, "backend not started"
        if self._free.empty() and self._waiting >= self.max_queue:
            retry = self._mean_duration_s * (self._waiting + 1) / self.instances
            raise Overloaded(
                f"backend {self.name!r} is at capacity ({self._running} running, {self._waiting} waiting)",
                retry_after=retry,
            )
        self._waiting += 1
        try:
            llm = await self._free.get()
        finally:
            self._waiting -= 1
        self._running += 1
        return llm

    def _generate_sync(
        self, llm: llama_cpp.Llama, request: GenerationRequest, cancel: threading.Event, emit: Emit
    ) -> GenerationDelta | None:
        """Generate in the worker thread, emitting one delta per token; returns the last
        one (with its finish reason) for the caller to hand over once the instance is free,
        or None when cancelled."""
        sp = request.sampling
        llm.set_seed(sp.seed if sp.seed is not None else random.getrandbits(31))
        stops = StopMatcher(sp.stop)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stop_ids = set(sp.stop_token_ids)
        vocab = llm._model.vocab  # noqa: SLF001 - llama-cpp-python exposes no public EOG check
        # Evaluate the whole prompt every time: reusing the previous request's KV prefix takes
        # another kernel path (one-token vs batched matmuls), and greedy answers then depended
        # on what the instance ran before. The same request gets the same answer.
        llm.reset()
        tokens = llm.generate(
            request.prompt_tokens,
            top_k=max(sp.top_k, 0),
            top_p=sp.top_p,
            min_p=sp.min_p,
            temp=sp.temperature,
            repeat_penalty=sp.repetition_penalty,
            frequency_penalty=sp.frequency_penalty,
            presence_penalty=sp.presence_penalty,
            logits_processor=_bias_processor(sp) if sp.logit_bias else None,
            grammar=self._grammar() if sp.json_mode else None,
        )
        count = 0
        finish = "length"
        try:
            for token in tokens:
                if cancel.is_set():
                    return None
                is_end = not sp.ignore_eos and llama_cpp.llama_vocab_is_eog(vocab, token)
                if is_end or token in stop_ids:
                    finish = "stop"
                    break
                count += 1
                text, hit = stops.feed(decoder.decode(llm.detokenize([token])))
                if hit:
                    return GenerationDelta(text, [token], "stop")
                if count >= sp.max_tokens:
                    return GenerationDelta(text + decoder.decode(b"", final=True) + stops.flush(), [token], "length")
                emit(GenerationDelta(text, [token]))
        finally:
            tokens.close()
        return GenerationDelta(decoder.decode(b"", final=True) + stops.flush(), [], finish)

    def _grammar(self) -> llama_cpp.LlamaGrammar:
        if self._json_grammar is None:
            from llama_cpp.llama_grammar import JSON_GBNF

            self._json_grammar = llama_cpp.LlamaGrammar.from_string(JSON_GBNF, verbose=False)
        return self._json_grammar

    @staticmethod
    def _token_text(llm: llama_cpp.Llama, token: int) -> str:
        if token < 0:
            return ""
        return llm.detokenize([token], special=True).decode("utf-8", errors="replace")


def _bias_processor(sp: SamplingParams) -> llama_cpp.LogitsProcessorList:
    ids = np.array(list(sp.logit_bias), dtype=np.int64)
    values = np.array(list(sp.logit_bias.values()), dtype=np.float32)

    def add_bias(_: Any, scores: np.ndarray) -> np.ndarray:
        scores[ids] += values
        return scores

    return llama_cpp.LogitsProcessorList([add_bias])
