"""Tensor parallelism: one rank's share of the model, and the collectives that join the shares.

Megatron-style splitting of a Llama decoder over N ranks (`tensor_parallel_size`):

- attention: each rank holds num_heads / N query heads and the KV heads they read: a share of
  num_kv_heads / N when N divides them, else (N > num_kv_heads) the one KV head its query
  heads use, replicated on N / num_kv_heads ranks. qkv is split by rows (column-parallel), o
  by columns (row-parallel): each rank's o output is a partial sum, all-reduced.
- MLP: gate and up split by rows and kept fused per rank, down by columns; one all-reduce.
- embedding and lm_head: vocab-parallel. The vocabulary is padded to a multiple of N; each rank
  holds a slice of rows. A lookup gives zeros outside the rank's slice, then an all-reduce; the
  lm_head gives each rank its slice of the logits, all-gathered (every rank then has the full
  row; only rank 0 samples).

`ShardLayout` is the arithmetic (which rows and heads are this rank's); `TensorParallel` is a
rank's process groups and the collectives on them: the model's (NCCL on CUDA, gloo on the CPU)
and a gloo control group on which rank 0 sends each step's inputs to the others, so that their
idle wait for the next step is a blocking host receive, never a GPU collective spinning (and
timing out) while nothing runs. torch.distributed is the transport throughout.
"""

from __future__ import annotations

import datetime
import inspect
import os
import pickle
import struct
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from backends.paged.config import ModelConfig

if TYPE_CHECKING:
    from backends.paged.step_inputs import StepInputs

# Ranks 1..N-1 wait on the control group for the next step for as long as the engine idles;
# gloo's default 30 minutes would end them. Rank 0's death ends them through their stdin instead.
CONTROL_TIMEOUT = datetime.timedelta(days=3650)
# The first broadcast of a step message: length header + the pickled step, one collective for
# typical steps (a second one carries what does not fit).
CONTROL_CHUNK = 16 << 10
_LEN = struct.Struct("<q")


@dataclass(frozen=True)
class ShardLayout:
    """Rank `rank` of `size`: the slices of heads, intermediate rows and vocabulary it holds."""

    rank: int
    size: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int

    @classmethod
    def for_model(cls, config: ModelConfig, rank: int, size: int) -> ShardLayout:
        return cls(rank, size, config.num_heads, config.num_kv_heads, config.intermediate_size, config.vocab_size)

    @property
    def heads(self) -> range:
        """The query heads this rank computes."""
        n = self.num_heads // self.size
        return range(self.rank * n, (self.rank + 1) * n)

    @property
    def kv_heads(self) -> range:
        """The KV heads this rank holds: its share, or the one its query heads read (replicated)."""
        if self.size <= self.num_kv_heads:
            n = self.num_kv_heads // self.size
            return range(self.rank * n, (self.rank + 1) * n)
        first = self.rank // (self.size // self.num_kv_heads)
        return range(first, first + 1)

    @property
    def intermediate(self) -> range:
        """The MLP's intermediate channels (gate, up rows; down columns) of this rank."""
        n = self.intermediate_size // self.size
        return range(self.rank * n, (self.rank + 1) * n)

    @property
    def vocab_per_rank(self) -> int:
        """Rows of the padded vocabulary each rank holds (embedding and lm_head)."""
        return -(-self.vocab_size // self.size)

    @property
    def vocab(self) -> range:
        """The token ids whose rows this rank holds (the last rank's range may end past the
        vocabulary: those rows are zero padding)."""
        n = self.vocab_per_rank
        return range(self.rank * n, (self.rank + 1) * n)

    def local_config(self, config: ModelConfig) -> ModelConfig:
        """The shape this rank's decoder and KV pool see: its heads and intermediate channels.
        The vocabulary stays whole: the logits are gathered to full width."""
        if self.size == 1:
            return config
        return replace(
            config, num_heads=len(self.heads), num_kv_heads=len(self.kv_heads), intermediate_size=len(self.intermediate)
        )


class TensorParallel:
    """One rank's view of the tensor-parallel group: its layout and the collectives.

    Made by `init_tensor_parallel` on every rank; the model calls `embed`, `all_reduce` and
    `gather_vocab`; rank 0's model runner `send_step` and every runner `broadcast`; the other
    ranks' loop (tp_worker) `recv_step`."""

    def __init__(self, layout: ShardLayout, control: Any) -> None:
        self.layout = layout
        self.rank = layout.rank
        self.size = layout.size
        self.control = control  # gloo group for the step messages
        # Set by rank 0's watcher (tp_launch) when another rank exited: steps fail fast with it.
        self.failure: str | None = None
        # torch 2.13 deprecates all_gather_into_tensor for all_gather_single; older ones lack the latter.
        self._gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        self._head = torch.zeros(CONTROL_CHUNK, dtype=torch.uint8)  # a step message's first chunk

    # -- the model's collectives ---------------------------------------------------------------

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum a row-parallel layer's partial outputs over the ranks, in place."""
        dist.all_reduce(x)
        return x

    def embed(self, weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Vocab-parallel embedding lookup: each rank gives its rows (zeros for ids outside
        its slice), summed over the ranks."""
        start, n = self.rank * self.layout.vocab_per_rank, weight.shape[0]
        local = ids - start
        inside = (local >= 0) & (local < n)
        h = weight.index_select(0, torch.where(inside, local, torch.zeros_like(local)))
        h.masked_fill_(~inside[:, None], 0)
        return self.all_reduce(h)

    def gather_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """Every rank's slice of the logits [T, V / N], all-gathered into [T, V] (the padding
        columns dropped)."""
        T, n = logits.shape
        out = logits.new_empty((self.size * T, n))
        self._gather(out, logits.contiguous())
        full = out.view(self.size, T, n).permute(1, 0, 2).reshape(T, self.size * n)
        return full[:, : self.layout.vocab_size]

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's tensor into every rank's `x` (the last step's sampled ids, on the device)."""
        dist.broadcast(x, src=0)
        return x

    # -- rank 0 -> the other ranks: each step's inputs ------------------------------------------

    def send_step(self, inp: StepInputs | None) -> None:
        """Rank 0: send a step's inputs (None: stop) to the other ranks. The ids sampled on the
        device (async scheduling) are not in the message: the runner broadcasts them on the
        device; the message says how many there are."""
        if self.failure is not None:
            raise RuntimeError(f"tensor parallelism: {self.failure}")
        message: Any = None
        if inp is not None:
            prev = inp.prev_tokens
            message = (replace(inp, prev_tokens=None), 0 if prev is None else int(prev.shape[0]))
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        head_np = self._head.numpy()
        _LEN.pack_into(head_np, 0, len(data))
        first = min(len(data), CONTROL_CHUNK - _LEN.size)
        head_np[_LEN.size : _LEN.size + first] = np.frombuffer(data, dtype=np.uint8, count=first)
        dist.broadcast(self._head, src=0, group=self.control)  # gloo: done with the buffer on return
        if first < len(data):
            rest = torch.frombuffer(bytearray(data[first:]), dtype=torch.uint8)
            dist.broadcast(rest, src=0, group=self.control)

    def recv_step(self) -> tuple[StepInputs, int] | None:
        """Ranks 1..N-1: the next step's inputs and how many device-sampled ids rank 0 will
        broadcast for it; None when rank 0 stops the group."""
        dist.broadcast(self._head, src=0, group=self.control)
        head_np = self._head.numpy()
        (length,) = _LEN.unpack_from(head_np, 0)
        first = min(length, CONTROL_CHUNK - _LEN.size)
        data = head_np[_LEN.size : _LEN.size + first].tobytes()
        if first < length:
            rest = torch.empty(length - first, dtype=torch.uint8)
            dist.broadcast(rest, src=0, group=self.control)
            data += rest.numpy().tobytes()
        return pickle.loads(data)

    def barrier(self) -> None:
        """Wait on the control group until every rank is here (after loading weights, which
        may take minutes: the model's first collective then waits for no one)."""
        dist.barrier(group=self.control)

    def min_int(self, value: int) -> int:
        """The smallest of every rank's `value` (each rank's KV pool size: the pool all use)."""
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.control)
        return int(t.item())


def cpu_threads_per_rank(size: int) -> int:
    """Intra-op threads for each of `size` ranks on the CPU when `num_threads` is not set:
    the cores shared out. torch's default (every core, in each rank) has the ranks' OpenMP
    threads spin against each other and against gloo (a decode step of dummy:tiny on two cores:
    43 ms, against 9 ms with one thread a rank)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // size)


def init_tensor_parallel(
    config: ModelConfig, rank: int, size: int, store: Any, device: torch.device, timeout: datetime.timedelta
) -> TensorParallel:
    """Join the group on `store` (a TCPStore on 127.0.0.1 that rank 0 serves): the default
    process group (NCCL on CUDA, gloo on the CPU) for the model's collectives, then the gloo
    control group. Every rank calls this, in the same order."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs: dict[str, Any] = {}
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if "device_id" in inspect.signature(dist.init_process_group).parameters:
            kwargs["device_id"] = device  # NCCL set up now, bound to this GPU, not lazily mid-step
    dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=timeout, **kwargs)
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    return TensorParallel(ShardLayout.for_model(config, rank, size), control)


def destroy_tensor_parallel() -> None:
    """Leave the process groups (a no-op when none is up)."""
    if dist.is_initialized():
        dist.destroy_process_group()
