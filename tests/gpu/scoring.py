"""Logits from the engine's real serving path, teacher-forced, and the measures the GPU tests
compare them with. Device-agnostic (the CPU runs it too), so the helpers are unit-tested
where there is no GPU (tests/unit/paged/test_gpu_scoring.py).

`forced_logits` runs prompts through `LLMEngine.step` as served (batched and chunked prefill,
CUDA-graph decodes, async scheduling) but replaces the sampler's choice with the next token of
a script, so two engines (bf16 and FP8, say) or an engine and transformers are compared at the
same positions even where their own greedy choices would part.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch

import backends.paged.model_runner as runner_module
from backends.generation import GenerationRequest, SamplingParams


@contextmanager
def _forcing(engine: Any, scripts: dict[str, list[int]], rows: dict[str, list[torch.Tensor]]) -> Iterator[None]:
    """Within the block, the engine's device sampler records each row's logits and returns
    the script's next token for it instead of its own choice."""
    real = runner_module.sample_tokens_device
    owner: dict[int, str] = {}  # id(SamplerState) -> request id

    def forced(logits: torch.Tensor, states: list, allowed: torch.Tensor | None = None) -> torch.Tensor:
        if not owner:
            owner.update({id(g.seqs[0].sampler): rid for rid, g in engine.requests.items()})
        ids = []
        for row, state in zip(logits, states):
            rid = owner[id(state)]
            k = len(rows[rid])
            # Copied now (also on the CPU, where .cpu() would be a view): a graph's output
            # buffer is overwritten by its next replay.
            rows[rid].append(row.to("cpu", torch.float32, copy=True))
            ids.append(scripts[rid][k])
        return torch.tensor(ids, dtype=torch.int64, device=logits.device)

    runner_module.sample_tokens_device = forced
    try:
        yield
    finally:
        runner_module.sample_tokens_device = real


def forced_logits(engine: Any, prompts: list[list[int]], scripts: list[list[int]]) -> list[torch.Tensor]:
    """For each prompt, the float32 logits [len(script), vocab] the engine computed at the
    prompt's last position and after each of the script's tokens but the last, with the
    script's tokens fed back as if sampled. Every request runs in one batch."""
    assert len(prompts) == len(scripts)
    names = [f"forced{i}" for i in range(len(prompts))]
    by_id = dict(zip(names, scripts))
    rows: dict[str, list[torch.Tensor]] = {rid: [] for rid in names}
    reqs = [
        GenerationRequest(rid, p, SamplingParams(max_tokens=len(s), temperature=0.0, ignore_eos=True))
        for rid, p, s in zip(names, prompts, scripts)
    ]
    with _forcing(engine, by_id, rows):
        out = engine.generate_sync(reqs)
    for rid, script in by_id.items():
        assert out[rid] == script, f"{rid}: the engine did not follow its script"
        assert len(rows[rid]) == len(script)
    return [torch.stack(rows[rid]) for rid in names]


def hf_forced_logits(hf_model: Any, prompts: list[list[int]], scripts: list[list[int]]) -> list[torch.Tensor]:
    """transformers' logits at the same positions as `forced_logits` (one forward pass over
    prompt + script each), float32 on the CPU."""
    device = next(hf_model.parameters()).device
    out = []
    with torch.inference_mode():
        for p, s in zip(prompts, scripts):
            full = torch.tensor([p + s], device=device)
            logits = hf_model(full).logits[0, len(p) - 1 : len(p) - 1 + len(s)]
            out.append(logits.float().cpu())
    return out


def hf_greedy(hf_model: Any, prompt: list[int], n: int) -> list[int]:
    """transformers' greedy continuation of `prompt`, exactly n tokens (no EOS stop), with its
    KV cache, as the CPU integration test decodes."""
    device = next(hf_model.parameters()).device
    ids = torch.tensor([prompt], device=device)
    past, got = None, []
    with torch.inference_mode():
        for _ in range(n):
            r = hf_model(input_ids=ids, past_key_values=past, use_cache=True)
            past = r.past_key_values
            nxt = int(r.logits[0, -1].argmax())
            got.append(nxt)
            ids = torch.tensor([[nxt]], device=device)
    return got


@dataclass
class LogitsDiff:
    """How far logits `got` are from `ref` over the same positions (rows)."""

    positions: int
    rel_l2: float  # ||got - ref|| / ||ref|| over all positions together
    rel_l2_mean: float  # per position, averaged
    rel_l2_p90: float
    rel_l2_max: float
    top1_agreement: float  # fraction of positions where the argmax is the same

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def logits_diff(got: list[torch.Tensor], ref: list[torch.Tensor]) -> LogitsDiff:
    """Relative L2 distances and top-1 agreement of `got` against `ref` (lists of [n, V])."""
    g, r = torch.cat(got).float(), torch.cat(ref).float()
    assert g.shape == r.shape, (g.shape, r.shape)
    per = (g - r).norm(dim=-1) / r.norm(dim=-1)
    return LogitsDiff(
        positions=int(g.shape[0]),
        rel_l2=float((g - r).norm() / r.norm()),
        rel_l2_mean=float(per.mean()),
        rel_l2_p90=float(per.quantile(0.9)),
        rel_l2_max=float(per.max()),
        top1_agreement=float((g.argmax(-1) == r.argmax(-1)).float().mean()),
    )


def release(engine: Any) -> None:
    """Give an engine's device memory back now (KV pool, graphs, weights)."""
    import gc

    engine.cache.k.clear()
    engine.cache.v.clear()
    engine.graphs = None
    engine.model = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
