"""The engine on a tiny random model: paged, batched, chunked and preempted runs give the
same greedy tokens as a plain dense forward; prefix caching, stops, aborts, seeds."""

from __future__ import annotations

import random

import pytest

from backends.generation import GenerationRequest, SamplingParams
from backends.paged.engine import LLMEngine
from backends.protocol import ContextLengthExceeded, InvalidRequest

from .conftest import assert_blocks_all_free


def prompts(n: int, seed: int = 0, lo: int = 5, hi: int = 30) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, 300) for _ in range(rng.randrange(lo, hi))] for _ in range(n)]


def greedy(rid: str, prompt: list[int], n: int, **kw) -> GenerationRequest:
    kw.setdefault("ignore_eos", True)
    return GenerationRequest(rid, prompt, SamplingParams(max_tokens=n, temperature=0.0, **kw))


def dense_greedy(engine: LLMEngine, prompt: list[int], n: int) -> list[int]:
    """Reference: recompute the whole sequence with dense causal attention each token."""
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(int(engine.model.dense_logits(tokens)[-1].argmax()))
    return tokens[len(prompt) :]


def test_greedy_matches_dense_reference(make_engine) -> None:
    engine = make_engine(num_blocks=64, block_size=4)
    for i, p in enumerate(prompts(3)):
        out = engine.generate_sync([greedy(f"r{i}", p, 12)])
        assert out[f"r{i}"] == dense_greedy(engine, p, 12)


def test_batching_chunked_prefill_and_preemption_do_not_change_greedy_tokens(make_engine) -> None:
    ps = prompts(8, seed=1, lo=10, hi=20)
    n = 16
    # 14 blocks of 4 tokens hold under two of these sequences at full length; a budget of
    # 8 tokens per step splits every prompt into chunks.
    engine = make_engine(num_blocks=14, block_size=4, max_num_batched_tokens=8, max_num_seqs=8, watermark=0.0)
    assert all(len(p) > 8 for p in ps)
    out = engine.generate_sync([greedy(f"r{i}", p, n) for i, p in enumerate(ps)])
    assert engine.scheduler.num_preemptions > 0, "the config was meant to force preemption"
    reference = make_engine(num_blocks=64, block_size=4)
    for i, p in enumerate(ps):
        expected = dense_greedy(reference, p, n)
        assert out[f"r{i}"] == expected, f"request {i} differs"
    assert len(out) == 8  # nothing lost


def test_prefix_cache_hits_are_counted_and_output_unchanged(make_engine) -> None:
    engine = make_engine(num_blocks=64, block_size=4)
    system = [1] + list(range(10, 30))  # 21 tokens: 5 full blocks shared
    a, b = system + [40, 41, 42], system + [50, 51]
    engine.generate_sync([greedy("a", a, 6)])
    hits_before = engine.block_manager.prefix_hits
    out = engine.generate_sync([greedy("b", b, 6)])
    assert engine.block_manager.prefix_hits - hits_before == 20  # 5 blocks of 4
    stats = engine.stats()
    assert stats["vllm:prefix_cache_hits"] == engine.block_manager.prefix_hits
    assert stats["vllm:prefix_cache_queries"] == len(a) + len(b)
    assert out["b"] == dense_greedy(engine, b, 6)


def test_prefix_caching_off_counts_nothing(make_engine) -> None:
    engine = make_engine(num_blocks=64, block_size=4, enable_prefix_caching=False)
    system = [1] + list(range(10, 30))
    engine.generate_sync([greedy("a", system + [40], 3), greedy("b", system + [41], 3)])
    assert engine.block_manager.prefix_hits == 0


def test_seeded_sampling_is_reproducible_across_batch_compositions(make_engine) -> None:
    engine = make_engine(num_blocks=128, block_size=4)
    p = prompts(1, seed=3)[0]

    def seeded(rid: str, seed: int = 1234) -> GenerationRequest:
        return GenerationRequest(rid, p, SamplingParams(max_tokens=12, temperature=1.0, top_p=0.95, seed=seed, ignore_eos=True))

    alone = engine.generate_sync([seeded("alone")])["alone"]
    others = [GenerationRequest(f"o{i}", q, SamplingParams(max_tokens=20, temperature=0.8, ignore_eos=True)) for i, q in enumerate(prompts(5, seed=9))]
    mixed = engine.generate_sync([others[0], others[1], seeded("mixed"), *others[2:]])["mixed"]
    assert mixed == alone
    other_seed = engine.generate_sync([seeded("x", seed=99)])["x"]
    assert other_seed != alone


def test_stop_string_never_leaks(make_engine) -> None:
    engine = make_engine(num_blocks=64, block_size=4)
    a = ord("a") + 3  # the byte tokenizer's id for "a"
    req = GenerationRequest("s", [1, 50, 60], SamplingParams(max_tokens=10, temperature=0.0, logit_bias={a: 100.0}, stop=["aa"]))
    engine.add_request(req)
    deltas = []
    while engine.has_unfinished():
        deltas += [o.delta for o in engine.step()]
    assert "".join(d.text for d in deltas) == ""
    assert deltas[-1].finish_reason == "stop" and len(deltas) == 2


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_stop_string_on_the_last_token_wins_over_length(make_engine, async_scheduling: bool) -> None:
    """The scheduler ends the sequence with "length"; the text then shows a stop string on the
    same token, which makes it "stop", with the partial stop text held back, not flushed."""
    engine = make_engine(num_blocks=64, block_size=4, async_scheduling=async_scheduling)
    a, b = ord("a") + 3, ord("b") + 3
    engine.add_request(GenerationRequest("s", [1, 50], SamplingParams(max_tokens=2, temperature=0.0, logit_bias={a: 100.0}, stop=["aa"])))
    engine.add_request(GenerationRequest("t", [1, 51], SamplingParams(max_tokens=2, temperature=0.0, logit_bias={b: 100.0}, stop=["bbb"])))
    deltas: dict[str, list] = {"s": [], "t": []}
    while engine.has_unfinished():
        for o in engine.step():
            deltas[o.request_id].append(o.delta)
    assert [d.finish_reason for d in deltas["s"]] == [None, "stop"] and "".join(d.text for d in deltas["s"]) == ""
    # No stop string by the end: length, and the held-back "bb" is flushed.
    assert [d.finish_reason for d in deltas["t"]] == [None, "length"] and "".join(d.text for d in deltas["t"]) == "bb"


def test_stop_token_ids_eos_ignore_eos_and_length(make_engine) -> None:
    engine = make_engine(num_blocks=64, block_size=4)

    def run(**kw) -> tuple[list[int], str | None, str]:
        engine.add_request(GenerationRequest("q", [1, 70, 80], SamplingParams(temperature=0.0, **kw)))
        ids, finish, text = [], None, ""
        while engine.has_unfinished():
            for o in engine.step():
                ids += o.delta.token_ids
                text += o.delta.text
                finish = o.delta.finish_reason or finish
        return ids, finish, text

    x = ord("x") + 3
    assert run(max_tokens=5, logit_bias={x: 100.0}) == ([x] * 5, "length", "xxxxx")
    assert run(max_tokens=5, logit_bias={x: 100.0}, stop_token_ids=[x]) == ([x], "stop", "")
    assert run(max_tokens=5, logit_bias={2: 100.0}) == ([2], "stop", "")  # EOS
    ids, finish, _ = run(max_tokens=5, logit_bias={2: 100.0}, ignore_eos=True)
    assert ids == [2] * 5 and finish == "length"


def test_logprobs_in_deltas(make_engine) -> None:
    engine = make_engine(num_blocks=64, block_size=4)
    engine.add_request(GenerationRequest("l", [1, 5, 6], SamplingParams(max_tokens=3, temperature=0.0, logprobs=3, ignore_eos=True)))
    deltas = []
    while engine.has_unfinished():
        deltas += [o.delta for o in engine.step()]
    for d in deltas:
        (lp,) = d.logprobs
        assert lp.token_id == d.token_ids[0] and lp.logprob <= 0.0
        assert len(lp.top) == 3 and lp.top[0][1] == pytest.approx(lp.logprob)  # greedy: chosen is the best


def test_abort_mid_generation_frees_blocks_at_once(make_engine) -> None:
    engine = make_engine(num_blocks=64, block_size=4)
    ps = prompts(2, seed=5, lo=20, hi=25)
    engine.add_request(greedy("keep", ps[0], 10))
    engine.add_request(greedy("drop", ps[1], 50))
    for _ in range(3):
        engine.step()
    held = len(engine.requests["drop"].seqs[0].block_table)
    free_before = engine.block_manager.num_free_blocks
    assert held > 0
    assert engine.abort("drop")
    assert engine.block_manager.num_free_blocks == free_before + held
    assert not engine.abort("drop")  # unknown now
    out: list[int] = []
    while engine.has_unfinished():
        for o in engine.step():
            assert o.request_id == "keep"
            out += o.delta.token_ids
    assert len(out) == 10 - 3


def test_abort_of_waiting_request(make_engine) -> None:
    engine = make_engine(num_blocks=64, block_size=4, max_num_seqs=1)
    engine.add_request(greedy("a", [1, 2, 3], 4))
    engine.add_request(greedy("b", [1, 2, 3], 4))
    engine.step()
    assert [s.request_id for s in engine.scheduler.waiting] == ["b"]
    assert engine.abort("b")
    engine.generate_sync([])
    assert_blocks_all_free(engine)


def test_validation(make_engine) -> None:
    engine = make_engine(num_blocks=8, block_size=4)  # pool of 32 tokens caps the context
    assert engine.max_model_len == 32
    with pytest.raises(ContextLengthExceeded):
        engine.add_request(greedy("long", [1] * 30, 5))
    with pytest.raises(InvalidRequest, match="not compiled") as caught:  # a grammar is never dropped
        engine.add_request(GenerationRequest("j", [1, 2], SamplingParams(max_tokens=2, grammar="start: /a/")))
    assert caught.value.param == "response_format"
    with pytest.raises(InvalidRequest) as caught:
        engine.add_request(GenerationRequest("n", [1, 2], SamplingParams(max_tokens=2, n=0)))
    assert caught.value.param == "n"
    with pytest.raises(InvalidRequest):
        engine.add_request(greedy("v", [1, 99999], 2))
    with pytest.raises(ValueError, match="unknown paged backend option"):
        LLMEngine.from_model("dummy:tiny", kv_cache_gb=1)
