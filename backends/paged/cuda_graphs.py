"""CUDA graphs for decode steps at bucketed batch sizes.

A decode step of a small model is hundreds of short kernels; launched one by one from Python
the CPU is the bottleneck. Each bucket's forward + logits is captured once into a graph that
reads static input buffers; a step copies its inputs into those buffers (one pinned-host ->
device copy each) and replays the smallest graph that holds its batch. Rows past the real
batch are padding: slot -1 (the K/V write skips them) and context length 1 over whatever block
id is left in their table row (always a valid block), and their logits are never read.

Under tensor parallelism the captured forward holds the step's collectives (NCCL all-reduces
and the logits' all-gather): every rank captures the same buckets in the same order and, for
a step, replays the same bucket, so the collectives pair up as in an eager step.
"""

from __future__ import annotations

import logging

import torch

from backends.paged.attention import AttentionMetadata
from backends.paged.kv_cache import KVCache
from backends.paged.model import LlamaModel
from backends.paged.step_inputs import StepInputs, patch_input_ids

log = logging.getLogger(__name__)


def graph_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to 32, every 16 up to 128, every 32 beyond; max_batch last."""
    sizes = [1, 2, 4]
    b = 8
    while b < max_batch:
        sizes.append(b)
        b += 8 if b < 32 else (16 if b < 128 else 32)
    sizes.append(max_batch)
    return sorted({s for s in sizes if s <= max_batch})


class DecodeGraphRunner:
    """Captured decode graphs over static input buffers; `run` replays one."""

    def __init__(
        self,
        model: LlamaModel,
        cache: KVCache,
        max_batch: int,
        max_blocks_per_seq: int,
        max_context: int,
        splits_for: object,
        capture_error_mode: str = "global",
    ) -> None:
        """`capture_error_mode` "thread_local" under tensor parallelism: the NCCL watchdog
        thread may query earlier collectives' events while a graph is captured, which the
        default mode ("global", any thread) would count against the capture."""
        dev = model.device
        self._capture_error_mode = capture_error_mode
        self.model = model
        self.cache = cache
        self.max_batch = max_batch
        max_blocks_per_seq = -(-max_blocks_per_seq // 16) * 16  # as wide as any step's table
        self.max_blocks = max_blocks_per_seq
        self.buckets = graph_buckets(max_batch)
        self._splits_for = splits_for  # (batch, max_context) -> split-K factor
        self._max_context = max_context
        i64, i32 = torch.int64, torch.int32
        self.ids = torch.zeros(max_batch, dtype=i64, device=dev)
        self.pos = torch.zeros(max_batch, dtype=i64, device=dev)
        self.slots = torch.full((max_batch,), -1, dtype=i64, device=dev)
        self.ctx = torch.ones(max_batch, dtype=i32, device=dev)
        self.tables = torch.zeros((max_batch, max_blocks_per_seq), dtype=i32, device=dev)
        self._query_starts = torch.zeros(1, dtype=i32, device=dev)
        self.src = torch.zeros(max_batch, dtype=i64, device=dev)  # rows fed from the last step's tokens
        # Pinned host staging: ids, positions, slots and source rows in one int64 buffer;
        # context lens and the block table in int32 ones. Two sets, used in turn: with async
        # scheduling the host fills the next step's set while the last one's copies may not
        # have run yet; an event per set says when its copies are done.
        pin = dev.type == "cuda"
        self._stages = [
            (
                torch.zeros(4 * max_batch, dtype=i64, pin_memory=pin),
                torch.zeros(max_batch, dtype=i32, pin_memory=pin),
                torch.zeros(max_batch * max_blocks_per_seq, dtype=i32, pin_memory=pin),
            )
            for _ in range(2)
        ]
        self._stage_events = [torch.cuda.Event() if pin else None for _ in range(2)]
        self._stage_next = 0
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None

    def _meta(self, b: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slots[:b],
            block_tables=self.tables[:b],
            context_lens=self.ctx[:b],
            query_starts=self._query_starts,
            num_prefills=0,
            num_prefill_tokens=0,
            num_decodes=b,
            decode_splits=self._splits_for(b, self._max_context),
        )

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first so the smaller ones reuse its memory pool."""
        self.pool = torch.cuda.graph_pool_handle()
        for b in sorted(self.buckets, reverse=True):
            meta = self._meta(b)

            def fwd(b: int = b, meta: AttentionMetadata = meta) -> torch.Tensor:
                return self.model.logits(self.model.forward(self.ids[:b], self.pos[:b], meta, self.cache))

            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # compile the Triton kernels and warm cuBLAS outside the capture
                    fwd()
            torch.cuda.current_stream().wait_stream(stream)
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self.pool, capture_error_mode=self._capture_error_mode):
                out = fwd()
            self._graphs[b] = (g, out)
        torch.cuda.synchronize()
        log.info("captured decode CUDA graphs for batch sizes %s", self.buckets)

    def bucket_for(self, batch: int) -> int | None:
        for b in self.buckets:
            if b >= batch:
                return b
        return None

    def can_run(self, inp: StepInputs) -> bool:
        return inp.is_pure_decode and 0 < inp.num_decodes <= self.max_batch and inp.block_tables.shape[1] <= self.max_blocks

    def run(self, inp: StepInputs) -> torch.Tensor:
        """Logits [B, vocab] (float32) of a pure-decode step, by graph replay."""
        B = inp.num_decodes
        b = self.bucket_for(B)
        assert b is not None and self._graphs, "no captured graph for this batch"
        W = inp.block_tables.shape[1]
        mb = self.max_batch
        k = self._stage_next
        self._stage_next = 1 - k
        t64, t32, tbt = self._stages[k]
        event = self._stage_events[k]
        if event is not None:
            event.synchronize()  # this set's previous copies have run (normally long ago)
        h64 = t64.numpy()
        h64[:B] = inp.input_ids  # PENDING (-1) in rows fed from the last step, patched below
        h64[B:b] = 0  # padding rows read a valid embedding row
        h64[mb : mb + B] = inp.positions
        h64[2 * mb : 2 * mb + b] = -1  # padding rows write nowhere
        h64[2 * mb : 2 * mb + B] = inp.slot_mapping
        h32 = t32.numpy()
        h32[:b] = 1
        h32[:B] = inp.context_lens
        hbt = tbt[: B * W].view(B, W)
        hbt.numpy()[:] = inp.block_tables
        self.ids[:b].copy_(t64[:b], non_blocking=True)
        self.pos[:b].copy_(t64[mb : mb + b], non_blocking=True)
        self.slots[:b].copy_(t64[2 * mb : 2 * mb + b], non_blocking=True)
        self.ctx[:b].copy_(t32[:b], non_blocking=True)
        self.tables[:B, :W].copy_(hbt, non_blocking=True)
        if inp.prev_rows is not None:
            h64[3 * mb : 3 * mb + B] = inp.prev_rows
            self.src[:B].copy_(t64[3 * mb : 3 * mb + B], non_blocking=True)
            self.ids[:B].copy_(patch_input_ids(self.ids[:B], inp.prev_tokens, self.src[:B]))
        if event is not None:
            event.record()
        graph, out = self._graphs[b]
        graph.replay()
        return out[:B]
