"""The llama.cpp runner: a pool of `llama_cpp.Llama` instances behind the Backend protocol.

Each instance serves one request at a time, in a worker thread; requests beyond the pool
wait in a bounded queue, and past that bound get 503 with a Retry-After. A request's n choices
run one after another on the instance it acquired. A grammar (response_format, a required tool
call) constrains decoding through a logits processor that masks what llguidance disallows.

Long prompts are tokenized in pieces cut before special tokens (`_cut_pattern`): llama.cpp's
special-token pass is quadratic in the number of special tokens in one text (for each special
token of the vocabulary, each fragment so far searches to the end of the whole text), so a
20,000-message chat took 8 s to tokenize and 100,000 messages 200 s (llama-cpp-python also
tokenizes twice past n_ctx_train tokens). Pieces of 2 KiB make it linear, with the same
tokens: 0.9 s and 4.5 s, llama.cpp's own cost per fragment.

Embeddings come from instances in llama.cpp's embedding mode (`Llama(embedding=True)`, with
the pooling type fixed when the context is made): for `task: embed` the pool holds only
those; for `task: generate` one is made on the first embedding request, beside the pool, with
a thread of its own, so chat keeps its instances. Inputs are packed several to a decode, each
its own sequence id, and every input must fit one ubatch (llama.cpp pools per ubatch), so an
embedding instance's batch is its whole context.
"""

from __future__ import annotations

import asyncio
import codecs
import ctypes
import logging
import os
import random
import re
import threading
import time
import warnings
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
from llguidance.llamacpp import lltokenizer_from_vocab

from backends import embeddings as emb
from backends.generation import GenerationDelta, GenerationRequest, SamplingParams, TokenLogprob
from backends.grammar import Constraint, GrammarCompiler, allowed_tokens, bitmask_width
from backends.llamacpp.cpu_variants import load_cpu_backend
from backends.llamacpp.options import LlamaCppOptions
from backends.local import LocalBackend
from backends.models import resolve_model
from backends.protocol import EmbeddingRequest, InvalidRequest, LoadReport, Overloaded
from backends.stop import StopMatcher

log = logging.getLogger("turnout.llamacpp")

# What llama.cpp's tokenizer carves out of a text as special tokens (its cache_special_tokens).
_SPECIAL_ATTRS = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED | llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN
TOKENIZE_PIECE_CHARS = 2048  # longer texts are tokenized in pieces of about this size (1-2 KiB measured best)
# Embedding inputs are packed into one decode up to this many tokens (a longer input still
# decodes alone, up to the context): the packed sequences share one unified KV, and attention
# over it (masked per sequence) grows with the square of the packed length.
_PACK_TOKENS = 512  # measured: 238 tokens/s packed to 512, 132 packed to 4096 (SmolLM2, 2 cores)

Emit = Callable[[GenerationDelta | BaseException], None]


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity: a container's cpuset or `taskset`), the
    default `n_threads`; os.cpu_count() counts the host's, and threads beyond the usable CPUs
    make ggml's spinning barriers crawl."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class LlamaCppBackend(LocalBackend):
    """GGUF models on llama.cpp (CPU here; Metal or CUDA where llama-cpp-python was built so)."""

    supports_logprobs = True  # read from the last eval's logits (`_token_logprob`)

    def __init__(self, name: str, model: str, model_id: str | None = None, task: str = "generate", **options: Any) -> None:
        opts = LlamaCppOptions.from_dict(options)  # unknown options fail at config load
        self.name = name
        self.model = model
        self.model_id = model_id or model
        self.task = task
        self.matryoshka = opts.matryoshka
        self._pooling_option = opts.pooling
        self.instances = opts.instances
        self.max_queue = opts.max_queue
        self._llama_args: dict[str, Any] = {
            "n_ctx": opts.n_ctx,
            "n_threads": opts.n_threads or usable_cpus(),
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
        self._eog: list[int] = []  # end-of-generation tokens: what a complete grammar allows next
        self._compiler: GrammarCompiler | None = None
        self._compiler_lock = threading.Lock()  # prepare runs in several threads at once
        self._cut: re.Pattern[str] | None = None  # where a long text may be cut for tokenizing
        self.cpu_variant = ""  # the ggml CPU variant in use, once started
        self.pooling: emb.Pooling = emb.DEFAULT_POOLING  # resolved against the GGUF at start
        self._path: Path | None = None
        # Embedding-mode instances, their queue and threads: the pool itself for task embed,
        # else one made on first use (under the lock).
        self._embedders: list[llama_cpp.Llama] = []
        self._embed_free: asyncio.Queue[llama_cpp.Llama] | None = None
        self._embed_executor: ThreadPoolExecutor | None = None
        self._embed_lock = asyncio.Lock()

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        # The CPU variant of ggml for this host, chosen before the first Llama (AMX only
        # where the kernel grants its tile state).
        self.cpu_variant = load_cpu_backend()
        path = self._path = resolve_model(self.model)
        self.pooling = emb.resolve_pooling(self._pooling_option, await asyncio.to_thread(_gguf_pooling, path))
        load = self._load_embedder if self.task == "embed" else self._load
        self._pool = [await asyncio.to_thread(load, path) for _ in range(self.instances)]
        self._free = asyncio.Queue()
        for llm in self._pool:
            self._free.put_nowait(llm)
        self._executor = ThreadPoolExecutor(max_workers=self.instances, thread_name_prefix=f"llamacpp-{self.name}")
        if self.task == "embed":
            self._embedders, self._embed_free, self._embed_executor = self._pool, self._free, self._executor
        first = self._pool[0]
        self._template = first.metadata.get("tokenizer.chat_template")
        self._bos_text = self._token_text(first, first.token_bos())
        self._eos_text = self._token_text(first, first.token_eos())
        self._cut, self.max_token_bytes, self._eog = await asyncio.to_thread(_scan_vocab, first)
        log.info("%s: loaded %s x%d (n_ctx=%d)", self.name, path.name, self.instances, first.n_ctx())

    def _load(self, path: Path) -> llama_cpp.Llama:
        return llama_cpp.Llama(model_path=str(path), **self._llama_args)

    def _load_embedder(self, path: Path) -> llama_cpp.Llama:
        """An instance in embedding mode with the backend's pooling; its batch is its whole
        context, since llama.cpp pools each sequence within one ubatch."""
        n_ctx = self._llama_args["n_ctx"]
        args = {**self._llama_args, "n_batch": n_ctx, "n_ubatch": n_ctx}
        return llama_cpp.Llama(model_path=str(path), embedding=True, pooling_type=emb.LLAMA_POOLING_TYPE[self.pooling], **args)

    async def close(self) -> None:
        for executor in {self._executor, self._embed_executor} - {None}:
            executor.shutdown(wait=True, cancel_futures=True)  # type: ignore[union-attr]
        for llm in {*self._pool, *self._embedders}:
            llm.close()
        self._pool, self._embedders = [], []

    # -- what LocalBackend needs -----------------------------------------------------------

    @property
    def context_window(self) -> int:
        return self._pool[0].n_ctx()

    def tokenize(self, text: str) -> list[int]:
        """Special tokens parsed; a long text in pieces cut before special tokens (linear, where
        llama.cpp's pass over the whole text is quadratic), with the same tokens."""
        vocab = self._pool[0]._model.vocab  # noqa: SLF001 - read-only: safe beside a generating thread
        # A template that writes the BOS text itself must not get a second BOS.
        add_bos = not (self._bos_text and text.startswith(self._bos_text))
        if self._cut is None or len(text) <= TOKENIZE_PIECE_CHARS:
            return _tokenize_bytes(vocab, text.encode(), add_bos)
        tokens: list[int] = []
        start = 0
        while start < len(text):
            cut = self._cut.search(text, start + TOKENIZE_PIECE_CHARS)
            end = cut.start() if cut else len(text)
            tokens += _tokenize_bytes(vocab, text[start:end].encode(), add_bos and start == 0)
            start = end
        return tokens

    def detokenize(self, token_ids: list[int]) -> str:
        return self._pool[0].detokenize(token_ids).decode("utf-8", errors="replace")

    def chat_template(self) -> tuple[str | None, str, str]:
        return self._template, self._bos_text, self._eos_text

    def grammar_compiler(self) -> GrammarCompiler:
        """llguidance's view of the model's vocabulary (about 0.3 s for SmolLM2's 49k tokens),
        built on first use, once, whichever of prepare's threads gets there first. Every
        end-of-generation token counts as its EOS: a complete grammar allows any of them."""
        if self._compiler is None:
            with self._compiler_lock:
                if self._compiler is None:
                    first = self._pool[0]
                    vocab = first._model.vocab  # noqa: SLF001 - read-only: safe beside a generating thread
                    # llguidance asks each token's attributes through a deprecated alias: one
                    # warning per token (49k) otherwise.
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", DeprecationWarning)
                        tokenizer = lltokenizer_from_vocab(vocab, n_vocab=first.n_vocab(), eos_token=self._eog)
                    self._compiler = GrammarCompiler(tokenizer)
        return self._compiler

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
                if item.final:
                    return
        finally:
            # Runs on disconnect too (no awaits here): the worker sees the flag after at
            # most one more token and hands the instance back.
            cancel.set()

    # -- embeddings --------------------------------------------------------------------------------

    @property
    def embedding_size(self) -> int:
        return self._pool[0].n_embd()

    def check_embedding_tokens(self, request: EmbeddingRequest, tokenized: list[list[int]]) -> None:
        emb.check_vocabulary(request, tokenized, self._pool[0].n_vocab())

    async def embed_tokens(self, inputs: list[list[int]]) -> list[np.ndarray]:
        """Pooled by llama.cpp on an embedding instance, in its thread. Cancelling the wait
        stops the work at the next decode; the instance goes back once its thread is done."""
        free, executor = await self._embedder()
        llm = await self._acquire(free)
        started = time.monotonic()
        cancel = threading.Event()
        future = asyncio.get_running_loop().run_in_executor(executor, self._embed_sync, llm, inputs, cancel)

        def release(done: asyncio.Future[Any]) -> None:
            if not done.cancelled():
                done.exception()  # read here: a cancelled caller never reads it
            self._running -= 1
            self._mean_duration_s = 0.8 * self._mean_duration_s + 0.2 * (time.monotonic() - started)
            free.put_nowait(llm)

        future.add_done_callback(release)
        try:
            return await asyncio.shield(future)
        finally:
            cancel.set()

    async def _embedder(self) -> tuple[asyncio.Queue[llama_cpp.Llama], ThreadPoolExecutor]:
        """The embedding instances' queue and threads; for task generate, the one embedding
        instance is loaded now if this is the first embedding request."""
        if self._embed_free is None:
            async with self._embed_lock:
                if self._embed_free is None:
                    assert self._path is not None, "backend not started"
                    llm = await asyncio.to_thread(self._load_embedder, self._path)
                    self._embedders = [llm]
                    self._embed_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"llamacpp-{self.name}-embed")
                    free: asyncio.Queue[llama_cpp.Llama] = asyncio.Queue()
                    free.put_nowait(llm)
                    self._embed_free = free
                    log.info("%s: loaded an embedding instance (%s pooling)", self.name, self.pooling)
        assert self._embed_executor is not None
        return self._embed_free, self._embed_executor

    @staticmethod
    def _embed_sync(llm: llama_cpp.Llama, inputs: list[list[int]], cancel: threading.Event) -> list[np.ndarray]:
        """Decode the inputs packed several to a batch (one sequence id each, up to the batch's
        tokens and sequences) and read each sequence's pooled vector. Raises _Cancelled when
        `cancel` is set between decodes (nobody awaits the answer then)."""
        ctx, batch = llm._ctx, llm._batch  # noqa: SLF001 - llama-cpp-python's embed() takes text only
        n_embd, n_batch, n_seq_max = llm.n_embd(), llm.n_batch, llm.context_params.n_seq_max
        vectors: list[np.ndarray] = []
        count = tokens = 0

        def decode() -> None:
            nonlocal count, tokens
            if cancel.is_set():
                raise _Cancelled
            ctx.kv_cache_clear()  # every decode starts from an empty cache
            ctx.decode(batch)
            for seq in range(count):
                row = llama_cpp.llama_get_embeddings_seq(ctx.ctx, seq)
                vectors.append(np.ctypeslib.as_array(row, shape=(n_embd,)).copy())
            batch.reset()
            count = tokens = 0

        batch.reset()
        for item in inputs:
            if count and (tokens + len(item) > min(n_batch, _PACK_TOKENS) or count >= n_seq_max):
                decode()
            batch.add_sequence(item, count, True)  # every token an output: pooling reads them
            count += 1
            tokens += len(item)
        if count:
            decode()
        return vectors

    # -- internals -----------------------------------------------------------------------------

    async def _acquire(self, free: asyncio.Queue[llama_cpp.Llama] | None = None) -> llama_cpp.Llama:
        """An idle instance (of `free`; default: the pool), waiting in a bounded queue for one;
        503 when the queue is full."""
        free = free if free is not None else self._free
        assert free is not None, "backend not started"
        if free.empty() and self._waiting >= self.max_queue:
            retry = self._mean_duration_s * (self._waiting + 1) / self.instances
            raise Overloaded(
                f"backend {self.name!r} is at capacity ({self._running} running, {self._waiting} waiting)",
                retry_after=retry,
            )
        self._waiting += 1
        try:
            llm = await free.get()
        finally:
            self._waiting -= 1
        self._running += 1
        return llm

    def _generate_sync(
        self, llm: llama_cpp.Llama, request: GenerationRequest, cancel: threading.Event, emit: Emit
    ) -> GenerationDelta | None:
        """Generate the request's choices one after another in the worker thread, emitting
        one delta per token; returns the very last one (`final` set) for the caller to hand
        over once the instance is free, or None when cancelled."""
        n = request.sampling.n
        base = request.constraint
        # One mask row for the whole request, refilled before each token of each choice.
        bitmask = np.zeros((1, bitmask_width(llm.n_vocab())), dtype=np.int32) if base is not None else None
        for index in range(n):
            if cancel.is_set():
                return None
            # Every choice but the last steps a copy: the request's own constraint stays at
            # the grammar's start until then.
            constraint = base.copy() if base is not None and index < n - 1 else base
            last = self._generate_choice(llm, request, index, constraint, bitmask, cancel, emit)
            if last is None:
                return None
            if index == n - 1:
                last.final = True
                return last
            emit(last)
        return None  # n < 1: prepare never makes one

    def _generate_choice(
        self,
        llm: llama_cpp.Llama,
        request: GenerationRequest,
        index: int,
        constraint: Constraint | None,
        bitmask: np.ndarray | None,
        cancel: threading.Event,
        emit: Emit,
    ) -> GenerationDelta | None:
        """One choice, emitting a delta per token; returns its last delta (with the finish
        reason), or None when cancelled."""
        sp = request.sampling
        seed = sp.seed + index if sp.seed is not None else random.getrandbits(31)
        llm.set_seed(seed & 0xFFFFFFFF)  # llama.cpp's seed is a uint32
        stops = StopMatcher(sp.stop)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stop_ids = set(sp.stop_token_ids)
        vocab = llm._model.vocab  # noqa: SLF001 - llama-cpp-python exposes no public EOG check
        # A grammar allows an end token only once it is complete: then it ends the answer even
        # with ignore_eos (the grammar allows nothing else).
        ends = not sp.ignore_eos or constraint is not None
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
            logits_processor=_logits_processors(sp, constraint, bitmask),
        )
        count = 0
        finish = "length"
        bias = _bias_arrays(sp) if sp.logprobs is not None and sp.logit_bias else None
        try:
            for token in tokens:
                if cancel.is_set():
                    return None
                if (ends and llama_cpp.llama_vocab_is_eog(vocab, token)) or token in stop_ids:
                    finish = "stop"
                    break
                # Before the generator's next step: its mask is filled from the advanced state,
                # and the context still holds this token's logits (for logprobs).
                if constraint is not None and not constraint.accept(token):
                    raise RuntimeError(f"the grammar refused token {token}, which its own mask allowed")
                count += 1
                lp = None if sp.logprobs is None else [self._token_logprob(llm, token, sp.logprobs, bias)]
                text, hit = stops.feed(decoder.decode(llm.detokenize([token])))
                if hit:
                    return GenerationDelta(text, [token], "stop", lp, index)
                # A finished grammar allows only an end token next: spare the step that samples it.
                done = constraint is not None and constraint.finished
                if done or count >= sp.max_tokens:
                    rest = decoder.decode(b"", final=True) + stops.flush()
                    return GenerationDelta(text + rest, [token], "stop" if done else "length", lp, index)
                emit(GenerationDelta(text, [token], logprobs=lp, index=index))
        finally:
            tokens.close()
        return GenerationDelta(decoder.decode(b"", final=True) + stops.flush(), [], finish, index=index)

    def _token_logprob(
        self, llm: llama_cpp.Llama, token: int, k: int, bias: tuple[np.ndarray, np.ndarray] | None
    ) -> TokenLogprob:
        """The sampled token's log-probability and the k likeliest tokens', from the logits of
        the eval that produced it (the context's last output row), as the paged engine reports
        them: log-softmax of the model's logits with logit_bias added, before penalties,
        temperature, truncation and grammar (vLLM's default, "raw" logprobs)."""
        n_vocab = llm.n_vocab()
        row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
        logits = row.astype(np.float64)  # a copy: the context's buffer is left as it was
        if bias is not None:
            logits[bias[0]] += bias[1]
        top = logits.max()
        logp = logits - (top + np.log(np.exp(logits - top).sum()))
        alternatives: list[tuple[str, float]] = []
        if k > 0:
            k = min(k, n_vocab)
            ids = np.argpartition(-logp, k - 1)[:k]
            ids = ids[np.lexsort((ids, -logp[ids]))]  # likeliest first; ties by id, as greedy picks
            alternatives = [(self._token_text(llm, int(i)), float(logp[i])) for i in ids]
        return TokenLogprob(token, self._token_text(llm, token), float(logp[token]), alternatives)

    @staticmethod
    def _token_text(llm: llama_cpp.Llama, token: int) -> str:
        if token < 0:
            return ""
        return llm.detokenize([token], special=True).decode("utf-8", errors="replace")


class _Cancelled(Exception):
    """An embedding request whose caller left: its work stopped between decodes."""


def _gguf_pooling(path: Path) -> emb.Pooling | None:
    """The pooling type a GGUF states (`{arch}.pooling_type`), read with the vocabulary only
    (no weights); None where it states none."""
    # Quiet, as every Llama(verbose=False) of this runner sets it anyway (llama.cpp logs the
    # whole vocabulary's summary otherwise).
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        return None
    try:
        buf = ctypes.create_string_buffer(64)

        def meta(key: str) -> str | None:
            n = llama_cpp.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
            return buf.value.decode() if n >= 0 else None

        arch = meta("general.architecture")
        return emb.gguf_pooling(meta(f"{arch}.pooling_type")) if arch else None
    finally:
        llama_cpp.llama_model_free(model)


def _tokenize_bytes(vocab: llama_cpp.llama_vocab_p, data: bytes, add_special: bool) -> list[int]:
    """llama.cpp's tokens of `data`, special tokens parsed, in one pass: the buffer is sized
    from the text (llama-cpp-python's sizes it n_ctx_train and, past that, tokenizes twice)."""
    cap = len(data) + 8  # a token covers at least one byte, but BOS, EOS and SPM's space prefix
    buf = (llama_cpp.llama_token * cap)()
    n = llama_cpp.llama_tokenize(vocab, data, len(data), buf, cap, add_special, True)
    if n < 0:
        cap = -n
        buf = (llama_cpp.llama_token * cap)()
        n = llama_cpp.llama_tokenize(vocab, data, len(data), buf, cap, add_special, True)
        if n < 0:
            raise RuntimeError(f"llama.cpp could not tokenize {len(data)} bytes")
    return buf[:n]


def _scan_vocab(llm: llama_cpp.Llama) -> tuple[re.Pattern[str] | None, int, list[int]]:
    """(where a long text may be cut for tokenizing, the most bytes one token stands for, the
    end-of-generation tokens). Once per model load: a few tens of ms for a 50k vocabulary."""
    vocab = llm._model.vocab  # noqa: SLF001 - llama-cpp-python exposes no public vocab handle
    buf = ctypes.create_string_buffer(256)
    longest = 1
    specials: dict[bytes, int] = {}
    eog: list[int] = []
    for token in range(llama_cpp.llama_vocab_n_tokens(vocab)):
        if llama_cpp.llama_vocab_is_eog(vocab, token):
            eog.append(token)
        # A negative length: the piece is longer than the buffer, by that many bytes in all.
        longest = max(longest, abs(llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, True)))
        attr = llama_cpp.llama_vocab_get_attr(vocab, token)
        if attr & _SPECIAL_ATTRS:
            text = llama_cpp.llama_vocab_get_text(vocab, token) or b""
            longest = max(longest, len(text))  # special tokens match their text
            specials[text] = specials.get(text, 0) | attr
    # A model that appends EOS would get one after every piece.
    cut = None if llama_cpp.llama_vocab_get_add_eos(vocab) else _cut_pattern(specials)
    return cut, longest, eog


def _cut_pattern(specials: dict[bytes, int]) -> re.Pattern[str] | None:
    """The special tokens before which a text may be cut, its pieces tokenized apart and their
    tokens joined, giving the whole text's tokens: llama.cpp tokenizes the plain text between
    special tokens fragment by fragment anyway. Safe are those that no other special token
    contains or overlaps at either end, that do not overlap themselves (every occurrence is
    then carved out as a token in the whole text too), and that strip no whitespace before
    themselves (LSTRIP would reach into the previous piece)."""
    texts = [t for t in specials if t]
    joined = b"\x00".join(texts)
    suffixes = {t[-k:] for t in texts for k in range(1, len(t))}  # proper ones
    prefixes = {t[:k] for t in texts for k in range(1, len(t))}
    safe: list[str] = []
    for text in texts:
        if specials[text] & llama_cpp.LLAMA_TOKEN_ATTR_LSTRIP or b"\x00" in text:
            continue
        if joined.count(text) > 1:  # inside another special token (or a duplicate)
            continue
        if any(text[:k] in suffixes or text[-k:] in prefixes for k in range(1, len(text))):
            continue
        try:
            safe.append(text.decode())
        except UnicodeDecodeError:
            continue
    if not safe:
        return None
    return re.compile("|".join(re.escape(t) for t in sorted(safe, key=len, reverse=True)))


def _bias_arrays(sp: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
    return np.array(list(sp.logit_bias), dtype=np.int64), np.array(list(sp.logit_bias.values()), dtype=np.float32)


def _logits_processors(
    sp: SamplingParams, constraint: Constraint | None, bitmask: np.ndarray | None
) -> llama_cpp.LogitsProcessorList | None:
    """logit_bias, then the grammar's mask (-inf for every token it disallows), as llama.cpp's
    first sampler stage, on the logits of every token in id order; None when neither applies.
    The mask comes after the bias: a token the grammar forbids stays forbidden, however biased."""
    processors: list[Callable[[Any, np.ndarray], np.ndarray]] = []
    if sp.logit_bias:
        ids, values = _bias_arrays(sp)

        def add_bias(_: Any, scores: np.ndarray) -> np.ndarray:
            scores[ids] += values
            return scores

        processors.append(add_bias)
    if constraint is not None:
        assert bitmask is not None

        def mask(_: Any, scores: np.ndarray) -> np.ndarray:
            constraint.fill(bitmask, 0)  # about 30 us with unpacking, for 49k tokens
            scores[~allowed_tokens(bitmask[0], len(scores))] = -np.inf
            return scores

        processors.append(mask)
    return llama_cpp.LogitsProcessorList(processors) if processors else None
