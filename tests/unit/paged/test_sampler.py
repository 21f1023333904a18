"""Sampler: each OpenAI parameter changes the distribution the way it should."""

from __future__ import annotations

import math

import pytest

import torch

from backends.generation import SamplingParams
from backends.paged.sampler import SamplerState, apply_penalties_and_bias, sample, truncate


def state(prompt: list[int] | None = None, output: list[int] | None = None, **kw) -> SamplerState:
    kw.setdefault("max_tokens", 8)
    s = SamplerState.create(SamplingParams(**kw), prompt or [])
    s.output_ids = list(output or [])
    return s


LOGITS = torch.tensor([1.0, 3.0, 2.0, 0.5, -1.0])


def test_greedy_picks_argmax() -> None:
    assert sample(LOGITS[None], [state(temperature=0.0)])[0].token_id == 1


def test_top_k_keeps_only_k_best() -> None:
    out = truncate(LOGITS, SamplingParams(max_tokens=1, top_k=2))
    assert torch.isfinite(out).tolist() == [False, True, True, False, False]


def test_top_p_keeps_smallest_set_reaching_p() -> None:
    probs = LOGITS.softmax(-1)  # sorted: 1 (0.61), 2 (0.22), 0 (0.08), ...
    p = float(probs[1] + probs[2]) - 1e-4  # tokens 1 and 2 are needed to reach p
    out = truncate(LOGITS, SamplingParams(max_tokens=1, top_p=p))
    assert torch.isfinite(out).tolist() == [False, True, True, False, False]
    # A tiny top_p still keeps the best token.
    out = truncate(LOGITS, SamplingParams(max_tokens=1, top_p=0.01))
    assert torch.isfinite(out).tolist() == [False, True, False, False, False]


def test_min_p_drops_tokens_below_fraction_of_best() -> None:
    probs = LOGITS.softmax(-1)
    ratio = float(probs[2] / probs[1])
    out = truncate(LOGITS, SamplingParams(max_tokens=1, min_p=ratio - 1e-3))
    assert torch.isfinite(out).tolist() == [False, True, True, False, False]


def test_temperature_sharpens() -> None:
    cold = truncate(LOGITS, SamplingParams(max_tokens=1, temperature=0.5)).softmax(-1)
    warm = truncate(LOGITS, SamplingParams(max_tokens=1, temperature=1.5)).softmax(-1)
    assert cold[1] > LOGITS.softmax(-1)[1] > warm[1]


def test_logit_bias_can_force_a_token() -> None:
    assert sample(LOGITS[None], [state(temperature=0.0, logit_bias={4: 100.0})])[0].token_id == 4
    assert sample(LOGITS[None], [state(temperature=0.0, logit_bias={1: -100.0})])[0].token_id == 2


def test_presence_and_frequency_penalties_count_output_only() -> None:
    s = state(prompt=[2], output=[1, 1, 1], presence_penalty=0.5, frequency_penalty=0.25)
    out = apply_penalties_and_bias(LOGITS, s)
    assert out[1] == pytest.approx(3.0 - 0.5 - 3 * 0.25)
    assert out[2] == pytest.approx(2.0)  # prompt tokens are not penalised (OpenAI semantics)
    assert out[0] == pytest.approx(1.0)


def test_repetition_penalty_divides_positive_and_multiplies_negative() -> None:
    s = state(prompt=[1], output=[4], repetition_penalty=2.0)
    out = apply_penalties_and_bias(LOGITS, s)
    assert out[1] == pytest.approx(1.5) and out[4] == pytest.approx(-2.0) and out[2] == pytest.approx(2.0)


def test_seeded_sampling_is_reproducible_and_seed_dependent() -> None:
    logits = torch.randn(1, 1000, generator=torch.Generator().manual_seed(0))

    def run(seed: int) -> list[int]:
        s = state(temperature=1.0, seed=seed)
        return [sample(logits, [s])[0].token_id for _ in range(20)]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_row_result_does_not_depend_on_batch_neighbours() -> None:
    logits = torch.randn(3, 500, generator=torch.Generator().manual_seed(1))
    alone = [sample(logits[1:2], [state(temperature=0.9, top_p=0.9, seed=5)])[0].token_id for _ in range(1)]
    batch = sample(logits, [state(temperature=0.9), state(temperature=0.9, top_p=0.9, seed=5), state(temperature=0.0)])
    assert batch[1].token_id == alone[0]
    assert batch[2].token_id == int(logits[2].argmax())


def test_sampling_follows_the_distribution() -> None:
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    s = state(temperature=1.0, seed=0)
    counts = [0, 0, 0]
    for _ in range(2000):
        counts[sample(logits, [s])[0].token_id] += 1
    assert counts[0] / 2000 == pytest.approx(0.7, abs=0.04)
    assert counts[2] / 2000 == pytest.approx(0.1, abs=0.03)


def test_logprobs_and_top_logprobs() -> None:
    r = sample(LOGITS[None], [state(temperature=0.0, logprobs=2)])[0]
    logp = torch.log_softmax(LOGITS, -1)
    assert r.logprob == pytest.approx(float(logp[1]))
    assert [t for t, _ in r.top] == [1, 2]
    assert r.top[1][1] == pytest.approx(float(logp[2]))
    assert sum(math.exp(lp) for _, lp in r.top) < 1.0
    # Off unless asked for.
    assert sample(LOGITS[None], [state(temperature=0.0)])[0].logprob is None
