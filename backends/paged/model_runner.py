"""The model runner: one scheduler plan in, one forward pass and its sampled tokens out.

It owns everything on the device: the decoder and its kernels, the KV pool (sized here, by a
profiling pass on CUDA), the decode CUDA graphs, each step's inputs and the sampler calls.
It reads the plan's sequences and leaves their progress (computed counts, output tokens,
finishing) to the scheduler, which gets the `RunnerOutput` that `collect` returns; the one
thing it keeps on a sequence is its own sampler state (`Sequence.sampler`: seeded generator,
penalty history).

A step is launched in two calls, `launch_forward` (inputs and forward pass) and
`launch_sampling` (grammar masks, then the sampling kernels), and collected in a third
(`collect`), so that the engine can plan and launch the next step while the device still runs
this one (async scheduling): the ids sampled on the device stay there as the next step's
inputs, and are copied into a pinned host buffer that `collect` reads after an event, the
step's one sync. The forward pass needs only the last step's ids (on the device); the
sampling of a step with grammar-constrained rows needs the grammars moved past those ids,
which is why the engine launches it apart, after collecting the last step.

Grammar-constrained rows: `launch_sampling` fills the step's int32 token bitmask (llguidance,
on its thread pool with the GIL released) while the device computes the forward pass, copies
it over (from a pinned buffer on CUDA) and unpacks it there; both sampling paths draw from the
masked logits. A row whose sequence finished after the forward pass was launched gets no mask
(its token is dropped at collect).

Tensor parallelism (`tp`): every rank has a runner over its share of the model and its own KV
pool (sized as one rank's, then the smallest of the ranks' taken by all, so block ids mean the
same everywhere). Rank 0's runner is the engine's: `forward` sends each step's inputs to the
other ranks first (`TensorParallel.send_step`), whose loop (tp_worker) hands them to
`run_forward`, the part every rank runs, collectives included. Sampling stays on rank 0.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from backends.grammar import bitmask_width, fill_bitmasks
from backends.paged.attention import TorchPagedAttention
from backends.paged.config import ModelConfig
from backends.paged.kv_cache import KVCache, num_blocks_for_budget
from backends.paged.memory_profile import profile_num_blocks
from backends.paged.model import LlamaModel, TorchOps
from backends.paged.options import EngineOptions
from backends.paged.parallel import TensorParallel
from backends.paged.sampler import Sample, sample_batch, sample_tokens_device, unpack_bitmask
from backends.paged.scheduler import ScheduledSeq, SchedulerOutput
from backends.paged.sequence import PENDING, Sequence, SeqStatus
from backends.paged.step_inputs import StepInputs, build_step_inputs, host_to_device, to_device
from backends.paged.weights import ModelWeights


@dataclass
class StepInfo:
    """What the last step ran (benchmarks read it to split prefill from decode time)."""

    num_prefill_tokens: int
    num_decodes: int
    context_tokens: int  # tokens of KV the step's attention read, summed over sequences
    graph: bool


@dataclass
class RunnerOutput:
    """A step's sampled tokens, one per sequence that sampled and is still live, in row order."""

    seqs: list[Sequence]
    token_ids: list[int]
    samples: list[Sample | None]  # the host sampler's results (logprobs); None for device rows


@dataclass
class LaunchedStep:
    """A step whose forward pass has been launched (`launch_forward`), then its sampling
    (`launch_sampling`): on the device where every row allows it, else at collect on the host."""

    rows: list[Sequence]  # the sequences that sample, by logits row
    constrained: bool  # some row has a grammar: its sampling waits for the masks
    logits: torch.Tensor | None  # until sampled on the device; kept for the host sampler
    tokens: torch.Tensor | None = None  # [n] int64 on the device; None: the host sampler decides at collect
    host: torch.Tensor | None = None  # pinned [>= n] int64 the device tokens are copied into
    event: Any = None  # torch.cuda.Event recorded after that copy (None on CPU)
    allowed: torch.Tensor | None = None  # bool [n, V] on the device: the grammars' masks (None: no grammar)
    sampled: bool = False  # launch_sampling has run

    @property
    def deferrable(self) -> bool:
        """Whether collecting it can wait until the next step is launched: its tokens were
        decided on the device (the next forward pass reads them there)."""
        return self.tokens is not None


def split_prefills_decodes(scheduled: list[ScheduledSeq]) -> tuple[list[ScheduledSeq], list[ScheduledSeq]]:
    """(prefill chunks, decodes). A decode computes a sequence's last token (and samples); a
    one-token chunk cut short by the step's budget is a prefill chunk, not a decode."""
    decodes = [s for s in scheduled if s.num_tokens == 1 and s.samples]
    if len(decodes) == len(scheduled):  # a pure decode step, the steady state
        return [], decodes
    return [s for s in scheduled if not (s.num_tokens == 1 and s.samples)], decodes


def _pooled_chunks(prefills: list[ScheduledSeq]) -> list[tuple[Sequence, int, int, int]]:
    """(sequence, first row, rows, first position) of each embedding chunk in the step, in
    build_step_inputs' layout (prefill chunks first, in order)."""
    chunks, row = [], 0
    for s in prefills:
        if s.seq.pooling is not None:
            chunks.append((s.seq, row, s.num_tokens, s.seq.num_computed))
        row += s.num_tokens
    return chunks


class ModelRunner:
    """The device half of the engine. Not thread-safe: the engine's thread drives it."""

    def __init__(
        self, config: ModelConfig, weights: ModelWeights, options: EngineOptions, *, decode_graphs: bool = True, tp: TensorParallel | None = None
    ) -> None:
        self.config = config  # the whole model's (vocabulary width, grammar masks)
        self.tp = tp if tp is not None and tp.size > 1 else None
        # The shape this rank computes: its heads, KV heads and MLP channels.
        local = self.tp.layout.local_config(config) if self.tp else config
        self.local_config = local
        self.options = options
        self.device = weights.embed.device
        self.dtype = weights.embed.dtype
        # The pool's dtype, which sizes it: `kv_cache_dtype: fp8` gets twice a bf16 pool's blocks.
        self.kv_cache_dtype = options.kv_cache_torch_dtype(self.dtype)
        bs = options.block_size
        self.kernels = options.kernel_kind(self.device)
        if self.kernels == "triton":
            from backends.paged.attention import TritonPagedAttention
            from backends.paged.triton_ops import TritonOps

            attention: Any = TritonPagedAttention(local.num_heads, local.num_kv_heads, local.head_dim)
            ops: Any = TritonOps()
        else:
            attention, ops = TorchPagedAttention(local.num_heads, local.num_kv_heads, local.head_dim), TorchOps()
        max_positions = min(options.max_model_len or config.max_position_embeddings, config.max_position_embeddings)
        self.model: LlamaModel | None = LlamaModel(local, weights, max_positions, attention=attention, ops=ops, tp=self.tp)
        if options.num_blocks is not None:
            num_blocks = options.num_blocks
        elif self.device.type == "cuda":
            # vLLM's recipe: run the largest step once, then give the KV pool what is left of
            # gpu_memory_utilization after weights, that step's activations and the graphs.
            # Every rank profiles its own GPU (the same step, so the collectives pair up).
            num_blocks = profile_num_blocks(self.model, local, options, self.kv_cache_dtype)
        else:
            num_blocks = num_blocks_for_budget(local, bs, self.kv_cache_dtype, int(options.kv_cache_gib * (1 << 30)))
        if self.tp:
            num_blocks = self.tp.min_int(num_blocks)  # one scheduler allocates for every rank's pool
        self.num_blocks = num_blocks
        self.max_model_len = min(max_positions, num_blocks * bs)
        self.cache = KVCache(local, num_blocks, bs, self.kv_cache_dtype, self.device)
        self.graphs: Any = None  # a DecodeGraphRunner, or None: every step runs eagerly
        # `decode_graphs` off: an embedding model never decodes, so no graphs are captured.
        if self.device.type == "cuda" and self.kernels == "triton" and not options.enforce_eager and decode_graphs:
            from backends.paged.cuda_graphs import DecodeGraphRunner

            self.graphs = DecodeGraphRunner(
                self.model,
                self.cache,
                max_batch=min(options.cuda_graph_max_batch or options.max_num_seqs, options.max_num_seqs),
                max_blocks_per_seq=-(-self.max_model_len // bs),
                max_context=self.max_model_len,
                splits_for=lambda b, ctx: attention.decode_splits(b, ctx, self.device),
                capture_error_mode="thread_local" if self.tp else "global",
            )
            try:
                self.graphs.capture()
            except RuntimeError as exc:
                if self.tp:  # the collectives inside the graphs are what is new here
                    raise RuntimeError(
                        f"capturing the decode CUDA graphs with tensor_parallel_size {self.tp.size} failed ({exc}); "
                        "set enforce_eager: true to run without them"
                    ) from exc
                raise
        self.last_step: StepInfo | None = None
        # Seconds `collect` waited for the device's tokens: near 0 while the host bounds the
        # step (the device finished first), the step's device time beyond the host's otherwise.
        self.sync_wait_s = 0.0
        pin = self.device.type == "cuda"
        # Two host buffers (and events) for sampled tokens, used in turn: one step's copy
        # lands while the previous one's is read.
        self._token_host = [torch.zeros(options.max_num_seqs, dtype=torch.int64, pin_memory=pin) for _ in range(2)]
        self._token_events = [torch.cuda.Event() if pin else None for _ in range(2)]
        self._token_next = 0
        # The last launched step's device-sampled ids and each sampling sequence's row in them:
        # a decode whose last token is still PENDING reads its input id from there.
        self._last_tokens: torch.Tensor | None = None
        self._last_rows: dict[Sequence, int] = {}
        # Grammar bitmasks [max_num_seqs, W] int32, pinned on CUDA, made on first use; the event
        # marks the last copy out of it, which must be done before the buffer is refilled.
        self._mask_host: torch.Tensor | None = None
        self._mask_event: Any = None

    # -- one step --------------------------------------------------------------------------------

    def launch_forward(self, plan: SchedulerOutput) -> LaunchedStep:
        """Build the plan's inputs and launch its forward pass; its sampling is left to
        `launch_sampling`. Call before the scheduler moves the plan's sequences on
        (update_after_launch): the inputs are read from them, and after the last step's
        `launch_sampling`: decodes fed from the device read its ids."""
        prefills, decodes = split_prefills_decodes(plan.scheduled)
        rows = [s.seq for s in prefills if s.samples] + [s.seq for s in decodes]  # every decode samples
        inp = build_step_inputs(prefills, decodes, self.options.block_size)
        self._feed_from_device(inp, prefills, decodes)
        logits = self.forward(inp, _pooled_chunks(prefills))
        constrained = any([seq.constraint is not None for seq in rows])
        return LaunchedStep(rows, constrained, logits if rows else None)

    def launch_sampling(self, step: LaunchedStep) -> None:
        """Launch a step's sampling after its forward pass: its grammars' masks filled (call
        this once each grammar has taken every earlier token of its sequence), then on the
        device where every row allows it, with the copy of the ids to the host. Rows the device
        cannot decide keep the logits for `collect`."""
        assert not step.sampled, "a step samples once"
        step.sampled = True
        rows = step.rows
        if not rows:
            self._last_tokens, self._last_rows = None, {}
            return
        assert step.logits is not None
        if step.constrained:
            step.allowed = self._grammar_mask(rows)  # host work while the device runs the forward pass
        tokens = sample_tokens_device(step.logits, [seq.sampler for seq in rows], step.allowed)
        if tokens is None:  # the host sampler decides at collect
            self._last_tokens, self._last_rows = None, {}
            return
        k = self._token_next
        self._token_next = 1 - k
        host, event = self._token_host[k], self._token_events[k]
        host[: len(rows)].copy_(tokens, non_blocking=True)
        if event is not None:
            event.record()
        self._last_tokens, self._last_rows = tokens, dict(zip(rows, range(len(rows))))
        step.tokens, step.host, step.event, step.logits = tokens, host, event, None

    def _grammar_mask(self, rows: list[Sequence]) -> torch.Tensor:
        """The allowed tokens (bool [len(rows), V] on the device) of a step with constrained
        rows. Unconstrained rows, and rows whose sequence has finished since the step was
        launched (their grammar may be done or broken), allow every token."""
        constrained = [
            (seq.constraint, i) for i, seq in enumerate(rows) if seq.constraint is not None and seq.status is not SeqStatus.FINISHED
        ]
        vocab = self.config.vocab_size
        if self._mask_host is None:
            pin = self.device.type == "cuda"
            self._mask_host = torch.zeros((self.options.max_num_seqs, bitmask_width(vocab)), dtype=torch.int32, pin_memory=pin)
            self._mask_event = torch.cuda.Event() if pin else None
        elif self._mask_event is not None:
            self._mask_event.synchronize()  # the previous step's copy has left the buffer
        host = self._mask_host[: len(rows)]
        bits = host.numpy()
        if len(constrained) < len(rows):
            bits.fill(-1)  # all bits set: every token allowed
        fill_bitmasks(constrained, bits)
        if self._mask_event is None:
            return unpack_bitmask(host, vocab)  # on the CPU: done before the buffer is reused
        device_bits = host.to(self.device, non_blocking=True)
        self._mask_event.record()
        return unpack_bitmask(device_bits, vocab)

    def collect(self, step: LaunchedStep) -> RunnerOutput:
        """The launched step's tokens for its sequences that are still live: read back from
        the device (waiting for the copy), or sampled on the host now. The host sampler runs
        this late on purpose: penalties need the tokens of the step before, collected first."""
        assert step.sampled, "launch_sampling comes before collect"
        finished = SeqStatus.FINISHED
        rows = step.rows
        live = [i for i, seq in enumerate(rows) if seq.status is not finished]
        all_live = len(live) == len(rows)  # the common case: no row to drop
        seqs = rows if all_live else [rows[i] for i in live]
        samples: list[Sample | None]
        if step.tokens is not None:
            if step.event is not None:
                t0 = time.perf_counter()
                step.event.synchronize()
                self.sync_wait_s += time.perf_counter() - t0
            ids = step.host[: len(rows)].tolist()
            token_ids = ids if all_live else [ids[i] for i in live]
            samples = [None] * len(live)
        elif seqs:
            assert step.logits is not None
            logits, allowed = step.logits, step.allowed
            if len(live) < len(step.rows):
                index = torch.tensor(live, device=logits.device)
                logits = logits.index_select(0, index)
                allowed = None if allowed is None else allowed.index_select(0, index)
            results = sample_batch(logits, [seq.sampler for seq in seqs], allowed)
            token_ids = [r.token_id for r in results]
            samples = list(results)
        else:
            token_ids, samples = [], []
        for seq, token in zip(seqs, token_ids):
            if seq.sampler.needs_history:  # penalty history, read only by the host sampler's penalties
                seq.sampler.output_ids.append(token)
        return RunnerOutput(seqs, token_ids, samples)

    def forward(self, inp: StepInputs, pooled: list[tuple[Sequence, int, int, int]] | None = None) -> torch.Tensor:
        """Run the step's model; return float32 logits of its sample rows, in row order.
        `pooled`: (embedding sequence, first row, rows, first position) of each embedding
        chunk, whose hidden rows are added to the sequence's pooled state (in float32).
        Under tensor parallelism the other ranks get the step first and run it alongside."""
        if self.tp:
            self.tp.send_step(inp)
        return self.run_forward(inp, pooled)

    def run_forward(self, inp: StepInputs, pooled: list[tuple[Sequence, int, int, int]] | None = None) -> torch.Tensor:
        """`forward` without sending the step: what every tensor-parallel rank runs for it
        (ranks 1..N-1 from their loop, tp_worker), in the same order of collectives."""
        assert self.model is not None, "the runner's model was released"
        if self.tp and inp.prev_rows is not None:
            # Ids sampled on rank 0's device last step: broadcast on the device, no host sync.
            assert inp.prev_tokens is not None
            inp.prev_tokens = self.tp.broadcast(inp.prev_tokens.contiguous())
        graph = self.graphs is not None and self.graphs.can_run(inp)
        self.last_step = StepInfo(inp.num_prefill_tokens, inp.num_decodes, int(inp.context_lens.sum()), graph)
        if graph:
            return self.graphs.run(inp)
        splits = 1
        if inp.num_decodes and hasattr(self.model.attn, "decode_splits"):
            splits = self.model.attn.decode_splits(inp.num_decodes, max(inp.decode_context_lens), self.device)
        input_ids, positions, meta = to_device(inp, self.device, splits)
        hidden = self.model.forward(input_ids, positions, meta, self.cache)
        for seq, row, n, start in pooled or ():
            assert seq.pooling is not None
            seq.pooling.add(hidden[row : row + n].float(), start)
        if not inp.sample_rows:
            return hidden.new_empty((0, self.config.vocab_size), dtype=torch.float32)
        if len(inp.sample_rows) != hidden.shape[0]:
            rows = host_to_device(torch.tensor(inp.sample_rows, dtype=torch.long), self.device)
            hidden = hidden.index_select(0, rows)
        return self.model.logits(hidden)

    def _feed_from_device(self, inp: StepInputs, prefills: list[ScheduledSeq], decodes: list[ScheduledSeq]) -> None:
        """Point the decode rows whose last token is still on the device at the last step's ids."""
        last = self._last_rows
        pending = [(j, s.seq) for j, s in enumerate(decodes) if s.seq.num_pending]
        for s in prefills:
            assert not s.seq.num_pending, "a prefill chunk over a token still on the device"
        if not pending:
            return
        for _, seq in pending:
            assert seq.num_pending == 1 and seq.output_ids[-1] == PENDING, "a placeholder older than the last step"
        rows = np.full(len(inp.input_ids), -1, dtype=np.int64)
        base = inp.num_prefill_tokens
        rows[[base + j for j, _ in pending]] = [last[seq] for _, seq in pending]
        inp.prev_tokens, inp.prev_rows = self._last_tokens, rows
