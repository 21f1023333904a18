"""One step's model inputs, built on the host with numpy (no per-token Python loops, no
per-sequence device tensors), then moved to the device in a handful of copies.

Layout: prefill sequences (more than one new token) first, then decodes (one new token).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from backends.paged.attention import AttentionMetadata
from backends.paged.scheduler import ScheduledSeq


@dataclass
class StepInputs:
    """Host arrays for one step."""

    input_ids: np.ndarray  # [T] int64
    positions: np.ndarray  # [T] int64
    slot_mapping: np.ndarray  # [T] int64
    block_tables: np.ndarray  # [S, W] int32
    context_lens: np.ndarray  # [S] int32
    query_starts: np.ndarray  # [P + 1] int32
    sample_rows: list[int]  # rows whose hidden state yields the next token
    num_prefills: int
    num_prefill_tokens: int
    num_decodes: int
    max_query_len: int
    prefill_query_lens: list[int]
    prefill_context_lens: list[int]
    decode_context_lens: list[int]
    # Async scheduling: rows whose input id is the previous step's sampled token, still on the
    # device: prev_rows[row] indexes prev_tokens (-1: input_ids[row] holds the id).
    prev_tokens: torch.Tensor | None = None
    prev_rows: np.ndarray | None = None

    @property
    def is_pure_decode(self) -> bool:
        return self.num_prefills == 0


def _block_tables(tables: list[list[int]]) -> np.ndarray:
    """The sequences' block tables as one int32 array [S, W], zero-padded, W a multiple of 16.

    Filled with one scatter of the concatenated tables rather than a row assignment per
    sequence (a few microseconds each, at batch 256 a visible part of the host's step).
    Padded to a multiple of 16: the width is the Triton kernels' block-table stride, and Triton
    compiles a separate variant for strides that are (not) multiples of 16; one width class
    means no compilation in the middle of serving."""
    lens = list(map(len, tables))
    longest = max(lens)
    width = -(-longest // 16) * 16
    out = np.zeros((len(tables), width), dtype=np.int32)
    flat: list[int] = []
    for bt in tables:
        flat += bt
    if not flat:
        return out
    values = np.array(flat, dtype=np.int32)
    if min(lens) == longest:  # every table as long (a steady decode batch): one block copy
        out[:, :longest] = values.reshape(len(tables), longest)
    else:
        n = np.asarray(lens)
        rows = np.repeat(np.arange(len(tables)), n)
        cols = np.arange(len(flat)) - np.repeat(np.cumsum(n) - n, n)  # index within its row
        out[rows, cols] = values
    return out


def build_step_inputs(prefills: list[ScheduledSeq], decodes: list[ScheduledSeq], block_size: int) -> StepInputs:
    """Host arrays for a step that runs `prefills` (chunks) then `decodes` (one token each)."""
    ordered = prefills + decodes
    S, P, D = len(ordered), len(prefills), len(decodes)
    tables = _block_tables([s.seq.block_table for s in ordered])

    ids_parts: list[np.ndarray] = []
    pos_parts: list[np.ndarray] = []
    qlens: list[int] = []
    pctx: list[int] = []
    sample_rows: list[int] = []
    row = 0
    for s in prefills:
        seq, start, n = s.seq, s.seq.num_computed, s.num_tokens
        ids_parts.append(np.asarray(seq.token_slice(start, start + n), dtype=np.int64))
        pos_parts.append(np.arange(start, start + n, dtype=np.int64))
        qlens.append(n)
        pctx.append(start + n)
        row += n
        if s.samples:
            sample_rows.append(row - 1)
    num_prefill_tokens = row
    dctx: list[int] = []
    if D:
        dseqs = [s.seq for s in decodes]
        dpos = np.fromiter([seq.num_computed for seq in dseqs], dtype=np.int64, count=D)
        # A decode computes the token at position num_computed, the sequence's last: its last
        # output (PENDING under async scheduling: the runner points the row at the device's id),
        # or the prompt's last for a sequence that has no output yet.
        ids_parts.append(np.fromiter([seq.output_ids[-1] if seq.output_ids else seq.prompt_ids[-1] for seq in dseqs], dtype=np.int64, count=D))
        pos_parts.append(dpos)
        dctx = (dpos + 1).tolist()
        # Every decode samples (its one new token is the sequence's last).
        sample_rows.extend(range(num_prefill_tokens, num_prefill_tokens + D))
    if P:
        input_ids = np.concatenate(ids_parts)
        positions = np.concatenate(pos_parts)
        seq_of_token = np.repeat(np.arange(S), qlens + [1] * D)
        context_lens = np.asarray(pctx + dctx, dtype=np.int32)
    elif D:  # a pure decode step: one token per sequence, nothing to concatenate or repeat
        input_ids, positions = ids_parts[0], pos_parts[0]
        seq_of_token = np.arange(D)
        context_lens = (positions + 1).astype(np.int32)
    else:
        input_ids = positions = seq_of_token = np.zeros(0, dtype=np.int64)
        context_lens = np.zeros(0, dtype=np.int32)
    # Each token's slot: its block (looked up in its sequence's table row) * block_size + offset.
    blocks = tables[seq_of_token, positions // block_size].astype(np.int64)
    slot_mapping = blocks * block_size + positions % block_size
    query_starts = np.zeros(P + 1, dtype=np.int32)
    if P:
        np.cumsum(qlens, out=query_starts[1:])
    return StepInputs(
        input_ids=input_ids,
        positions=positions,
        slot_mapping=slot_mapping,
        block_tables=tables,
        context_lens=context_lens,
        query_starts=query_starts,
        sample_rows=sample_rows,
        num_prefills=P,
        num_prefill_tokens=num_prefill_tokens,
        num_decodes=D,
        max_query_len=max(qlens) if qlens else 1,
        prefill_query_lens=qlens,
        prefill_context_lens=pctx,
        decode_context_lens=dctx,
    )


def to_device(inp: StepInputs, device: torch.device, decode_splits: int = 1) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """(input_ids, positions, metadata) on `device` for an eager forward."""

    def dev(a: np.ndarray) -> torch.Tensor:
        return host_to_device(torch.from_numpy(a), device)

    meta = AttentionMetadata(
        slot_mapping=dev(inp.slot_mapping),
        block_tables=dev(inp.block_tables),
        context_lens=dev(inp.context_lens),
        query_starts=dev(inp.query_starts),
        num_prefills=inp.num_prefills,
        num_prefill_tokens=inp.num_prefill_tokens,
        num_decodes=inp.num_decodes,
        max_query_len=inp.max_query_len,
        prefill_query_lens=inp.prefill_query_lens,
        prefill_context_lens=inp.prefill_context_lens,
        decode_context_lens=inp.decode_context_lens,
        decode_splits=decode_splits,
    )
    input_ids = dev(inp.input_ids)
    if inp.prev_rows is not None:
        input_ids = patch_input_ids(input_ids, inp.prev_tokens, dev(inp.prev_rows))
    return input_ids, dev(inp.positions), meta


def host_to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without waiting for the device: on CUDA staged through pinned
    memory (torch's caching host allocator) and copied asynchronously. A copy from pageable
    memory may make the driver wait for the stream's queued work, under async scheduling the
    step in flight, which is the overlap async scheduling is for; `torch.tensor(..., device=)`
    always waits. On the CPU, `t` itself."""
    if device.type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def patch_input_ids(input_ids: torch.Tensor, prev_tokens: torch.Tensor, prev_rows: torch.Tensor) -> torch.Tensor:
    """input_ids with row r replaced by prev_tokens[prev_rows[r]] where prev_rows[r] >= 0
    (all on the device: no sync)."""
    gathered = prev_tokens.index_select(0, prev_rows.clamp(min=0))
    return torch.where(prev_rows >= 0, gathered, input_ids)
