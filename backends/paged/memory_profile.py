"""Size the GPU KV pool from what is left after a profiling pass (vLLM's gpu_memory_utilization).

The pass runs the largest step the scheduler can plan (max_num_batched_tokens new tokens of
prefill, logits for max_num_seqs rows) over a throwaway cache and records the allocator's
peak. The pool then gets total * gpu_memory_utilization minus what is in use now (weights,
the CUDA context, other processes), minus that activation peak, minus a reserve for the CUDA
graphs' private memory (decode logits of the largest batch and a margin).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from backends.generation import SamplingParams
from backends.paged.config import ModelConfig
from backends.paged.kv_cache import KVCache, bytes_per_block
from backends.paged.model import LlamaModel
from backends.paged.scheduler import ScheduledSeq
from backends.paged.sequence import Sequence
from backends.paged.step_inputs import build_step_inputs, to_device

log = logging.getLogger(__name__)

_GRAPH_MARGIN = 512 << 20


@torch.inference_mode()
def peak_step_bytes(model: LlamaModel, config: ModelConfig, block_size: int, max_tokens: int, max_seqs: int, max_len: int, dtype: torch.dtype) -> int:
    """Activation bytes at the peak of the largest step (the throwaway cache, of the KV pool's
    `dtype`, not counted)."""
    dev = model.device
    seq_len = max(1, min(max_tokens, max_len))
    n_seqs = math.ceil(max_tokens / seq_len)
    cache = KVCache(config, n_seqs * math.ceil(seq_len / block_size) + 1, block_size, dtype, dev)
    scheduled = []
    next_block = 0
    for i in range(n_seqs):
        n = min(seq_len, max_tokens - i * seq_len)
        seq = Sequence(f"profile-{i}", [1] * n, SamplingParams(max_tokens=1))
        nb = math.ceil(n / block_size)
        seq.block_table = list(range(next_block, next_block + nb))
        next_block += nb
        scheduled.append(ScheduledSeq(seq, n))
    inp = build_step_inputs([s for s in scheduled if s.num_tokens > 1], [s for s in scheduled if s.num_tokens == 1], block_size)
    torch.cuda.synchronize(dev)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev)
    input_ids, positions, meta = to_device(inp, dev)
    hidden = model.forward(input_ids, positions, meta, cache)
    rows = torch.arange(max_seqs, device=dev) % hidden.shape[0]
    logits = model.logits(hidden.index_select(0, rows))
    logits.argmax(-1)
    torch.cuda.synchronize(dev)
    peak = torch.cuda.max_memory_allocated(dev) - base
    del cache, hidden, logits, meta, input_ids, positions
    torch.cuda.empty_cache()
    return max(0, peak)


def profile_num_blocks(model: LlamaModel, config: ModelConfig, options: Any, dtype: torch.dtype) -> int:
    """KV blocks of the pool's `dtype` (the cache's, not the weights': FP8 blocks are half a
    bf16 block's bytes) that fit in gpu_memory_utilization of the device after a profiling pass."""
    dev = model.device
    bs = options.block_size
    max_len = min(options.max_model_len or config.max_position_embeddings, config.max_position_embeddings)
    peak = peak_step_bytes(model, config, bs, options.max_num_batched_tokens, options.max_num_seqs, max_len, dtype)
    free, total = torch.cuda.mem_get_info(dev)
    in_use = total - free
    graph_reserve = 0 if options.enforce_eager else options.max_num_seqs * config.vocab_size * 8 + _GRAPH_MARGIN
    budget = int(total * options.gpu_memory_utilization) - in_use - peak - graph_reserve
    per_block = bytes_per_block(config, bs, dtype)
    blocks = max(1, budget // per_block)
    log.info(
        "KV pool: %d blocks of %s (%.2f GiB); device %.1f GiB, in use %.2f GiB, step peak %.2f GiB, graph reserve %.2f GiB",
        blocks, str(dtype).removeprefix("torch."), blocks * per_block / 2**30, total / 2**30, in_use / 2**30, peak / 2**30, graph_reserve / 2**30,
    )  # fmt: skip
    if budget < per_block:
        raise RuntimeError(
            f"no GPU memory left for the KV cache: gpu_memory_utilization={options.gpu_memory_utilization} of "
            f"{total / 2**30:.1f} GiB, {in_use / 2**30:.1f} GiB in use, a step needs {peak / 2**30:.2f} GiB"
        )
    return blocks
