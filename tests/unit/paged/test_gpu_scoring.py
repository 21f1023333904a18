"""The GPU tests' scoring helpers (tests/gpu/scoring.py) on the CPU: teacher-forced logits from
the engine's serving path equal the dense reference's at the same positions, the engine follows
any script, and the distance measures."""

from __future__ import annotations

import random

import torch

from tests.gpu.scoring import forced_logits, logits_diff


def test_forced_logits_follow_the_script_and_equal_the_dense_reference(make_engine) -> None:
    engine = make_engine(num_blocks=64, max_num_seqs=4, max_num_batched_tokens=48)  # chunked prefill
    rng = random.Random(0)
    vocab = engine.config.vocab_size
    prompts = [[rng.randrange(3, vocab) for _ in range(n)] for n in (5, 40, 70)]
    scripts = [[rng.randrange(3, vocab) for _ in range(n)] for n in (6, 3, 9)]  # not what greedy would pick
    got = forced_logits(engine, prompts, scripts)
    assert [g.shape for g in got] == [(6, vocab), (3, vocab), (9, vocab)]
    for p, s, g in zip(prompts, scripts, got):
        dense = engine.model.dense_logits(p + s)[len(p) - 1 : len(p) - 1 + len(s)]
        torch.testing.assert_close(g, dense.float(), rtol=1e-4, atol=1e-4)
    # Forcing ends with the call: the engine samples on its own again.
    from backends.generation import GenerationRequest, SamplingParams

    own = engine.generate_sync([GenerationRequest("g", prompts[0], SamplingParams(max_tokens=1, temperature=0.0))])["g"]
    assert own == [int(engine.model.dense_logits(prompts[0])[-1].argmax())]

def test_logits_diff_measures() -> None:
    ref = [torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])]
    same = logits_diff(ref, ref)
    assert same.rel_l2 == 0.0 and same.top1_agreement == 1.0 and same.positions == 2
    moved = logits_diff([torch.tensor([[0.0, 1.0, 0.0], [0.0, 2.0, 0.0]])], ref)
    assert moved.top1_agreement == 0.5
    assert abs(moved.rel_l2 - (2**0.5 / 5**0.5)) < 1e-6 and abs(moved.rel_l2_max - 2**0.5) < 1e-6
