"""Next-token selection with OpenAI's sampling parameters.

Each request carries its own torch.Generator (seeded from `seed`, or randomly), and every
row is sampled on its own, so a seeded request draws the same tokens whatever else shares
the batch. Logprobs are those of the model's distribution after logit_bias and penalties,
before temperature and truncation (vLLM's default, "raw" processed logprobs), and before a
grammar's mask (as the llama.cpp runner reports them).

A grammar's mask comes as a bool [B, V] tensor of allowed tokens (`unpack_bitmask`, on the
device); both sampling paths take it and draw from the masked logits (`mask_logits`).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

import torch

from backends.generation import SamplingParams
from backends.paged.step_inputs import host_to_device


@dataclass
class SamplerState:
    """Per-request sampling state."""

    params: SamplingParams
    generator: torch.Generator
    prompt_ids: list[int]
    output_ids: list[int] = field(default_factory=list)
    # How the device path decides this request's rows, fixed by its parameters: "greedy",
    # "random" (one batched draw), or None (the host sampler). Decided once here, not per row
    # and step in `sample_tokens_device`.
    device_mode: str | None = field(init=False)
    # Whether the host sampler reads output_ids (penalties): else the runner keeps no history.
    needs_history: bool = field(init=False)

    def __post_init__(self) -> None:
        p = self.params
        self.device_mode = device_mode(p)
        self.needs_history = bool(p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty)

    @classmethod
    def create(cls, params: SamplingParams, prompt_ids: list[int], device: torch.device | str = "cpu") -> SamplerState:
        g = torch.Generator(device=device)
        g.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
        return cls(params=params, generator=g, prompt_ids=prompt_ids)


@dataclass
class Sample:
    token_id: int
    logprob: float | None = None  # None unless logprobs were asked for
    top: list[tuple[int, float]] = field(default_factory=list)


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Bool [B, vocab_size] (True: allowed) from an int32 bitmask [B, W] as llguidance writes
    it (bit j of word i: token 32 i + j), with torch ops on the bitmask's device and no sync.
    Read as little-endian bytes, byte 4 i + k holds tokens 32 i + 8 k .. 32 i + 8 k + 7, so
    unpacking each byte's bits in order lays the tokens out in order, one byte each."""
    as_bytes = bitmask.view(torch.uint8)
    shifts = torch.arange(8, dtype=torch.uint8, device=bitmask.device)
    bits = (as_bytes.unsqueeze(-1) >> shifts) & 1
    return bits.view(bitmask.shape[0], -1)[:, :vocab_size].bool()


def mask_logits(logits: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """Logits with -inf where `allowed` (bool, the logits' shape) is False; unchanged for None."""
    return logits if allowed is None else logits.masked_fill(~allowed, float("-inf"))


def apply_penalties_and_bias(logits: torch.Tensor, state: SamplerState) -> torch.Tensor:
    """One row of logits [V] with logit_bias and repetition/presence/frequency penalties applied."""
    p = state.params
    vocab = logits.shape[-1]
    if p.logit_bias:
        ids = torch.tensor([t for t in p.logit_bias if 0 <= t < vocab], dtype=torch.long, device=logits.device)
        vals = torch.tensor([p.logit_bias[t] for t in p.logit_bias if 0 <= t < vocab], dtype=logits.dtype, device=logits.device)
        logits = logits.index_add(0, ids, vals)
    if p.repetition_penalty != 1.0:
        # As in HF/vLLM: tokens seen in prompt or output are made less likely.
        seen = torch.zeros(vocab, dtype=torch.bool, device=logits.device)
        seen[torch.tensor(state.prompt_ids + state.output_ids, dtype=torch.long, device=logits.device)] = True
        penalized = torch.where(logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty)
        logits = torch.where(seen, penalized, logits)
    if (p.presence_penalty or p.frequency_penalty) and state.output_ids:
        # OpenAI: only generated tokens count.
        counts = torch.bincount(torch.tensor(state.output_ids, dtype=torch.long, device=logits.device), minlength=vocab)[:vocab]
        counts = counts.to(logits.dtype)
        logits = logits - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def truncate(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Temperature-scaled logits with top_k, top_p and min_p applied (-inf outside)."""
    logits = logits / p.temperature
    vocab = logits.shape[-1]
    if 0 < p.top_k < vocab:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens strictly before it already reach top_p; keeps >= 1.
        drop_sorted = (probs.cumsum(-1) - probs) >= p.top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    if p.min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
    return logits


def sample(logits: torch.Tensor, states: list[SamplerState], allowed: torch.Tensor | None = None) -> list[Sample]:
    """One token per row of logits [B, V] (float32) for the matching states, drawn from the
    tokens `allowed` (bool [B, V], a grammar's mask) where given."""
    out: list[Sample] = []
    for i, (row, state) in enumerate(zip(logits, states)):
        p = state.params
        row = apply_penalties_and_bias(row, state)
        pick = mask_logits(row, None if allowed is None else allowed[i])
        if p.greedy:
            token = int(torch.argmax(pick))
        else:
            probs = truncate(pick, p).softmax(-1)
            token = int(torch.multinomial(probs, 1, generator=state.generator))
        s = Sample(token)
        if p.logprobs is not None:
            logp = torch.log_softmax(row, -1)
            s.logprob = float(logp[token])
            if p.logprobs > 0:
                vals, ids = torch.topk(logp, min(p.logprobs, logp.shape[-1]))
                s.top = [(int(i), float(v)) for i, v in zip(ids, vals)]
        out.append(s)
    return out


def _is_plain(p: SamplingParams) -> bool:
    """No per-token work beyond the distribution itself: no bias, penalties or logprobs."""
    return (
        not p.logit_bias
        and p.repetition_penalty == 1.0
        and not p.presence_penalty
        and not p.frequency_penalty
        and p.logprobs is None
    )


def _is_batchable_random(p: SamplingParams) -> bool:
    """Unseeded temperature sampling with no truncation: one batched draw on the device."""
    return p.seed is None and p.top_k <= 0 and p.top_p >= 1.0 and p.min_p <= 0.0


def device_mode(p: SamplingParams) -> str | None:
    """"greedy" or "random" where the device path can decide a row with these parameters in
    one batch (greedy, or unseeded plain temperature), else None."""
    if not _is_plain(p):
        return None
    if p.greedy:
        return "greedy"
    return "random" if _is_batchable_random(p) else None


def sample_tokens_device(logits: torch.Tensor, states: list[SamplerState], allowed: torch.Tensor | None = None) -> torch.Tensor | None:
    """Token ids [B] (int64, on the logits' device, not synced) when every row can be decided
    in one batch on the device (greedy, or unseeded plain temperature); None otherwise. Drawn
    from the tokens `allowed` (bool [B, V] on the logits' device) where given."""
    modes = {s.device_mode for s in states}
    if None in modes:
        return None
    logits = mask_logits(logits, allowed)
    if modes <= {"greedy"}:
        return logits.argmax(-1)
    params = [s.params for s in states]
    temps = host_to_device(torch.tensor([p.temperature if not p.greedy else 1.0 for p in params]), logits.device)
    probs = (logits / temps[:, None]).softmax(-1)
    # Gumbel-max in its exponential form: argmax(p / E), E ~ Exp(1), draws from p.
    noise = torch.empty_like(probs).exponential_()
    drawn = (probs / noise).argmax(-1)
    greedy = host_to_device(torch.tensor([p.greedy for p in params]), logits.device)
    return torch.where(greedy, logits.argmax(-1), drawn)


def sample_batch(logits: torch.Tensor, states: list[SamplerState], allowed: torch.Tensor | None = None) -> list[Sample]:
    """One token per row of logits [B, V] (float32, any device) for the matching states,
    among the tokens `allowed` (bool [B, V] on the logits' device) where given.

    Greedy and unseeded plain-temperature rows are decided on the logits' device in one batch
    with a single device -> host copy (the GPU step's only sync). Anything else (seeds, which
    need each request's own generator, penalties, bias, truncation, logprobs) goes through
    `sample` row by row on the CPU, so its results do not depend on the fast path."""
    tokens = sample_tokens_device(logits, states, allowed)
    if tokens is not None:
        return [Sample(int(t)) for t in tokens.tolist()]
    if logits.device.type != "cpu":
        logits = logits.cpu()  # the per-request generators live on the CPU
        allowed = None if allowed is None else allowed.cpu()
    return sample(logits, states, allowed)
