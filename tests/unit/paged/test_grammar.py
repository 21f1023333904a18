"""Grammar-constrained decoding in the paged engine on a tiny random model: the bitmask's
unpacking on torch, masked sampling on both paths (logprobs of the raw distribution), JSON
Schema outputs that parse and validate, unconstrained neighbours left unchanged, async
scheduling, preemption, and the backend's response_format."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest
import torch

from backends.generation import GenerationRequest, SamplingParams
from backends.grammar import Constraint, allowed_tokens, bitmask_width, json_schema_grammar
from backends.paged.backend import PagedBackend
from backends.paged.engine import LLMEngine
from backends.paged.sampler import SamplerState, sample, sample_batch, sample_tokens_device, unpack_bitmask
from backends.paged.tokenizer import ByteTokenizer
from backends.protocol import ChatCompletionRequest

from .conftest import assert_blocks_all_free

# Every field bounded, so that even a random model finishes the object within max_tokens.
SCHEMA = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "n": {"type": "integer", "minimum": 0, "maximum": 999},
        "tag": {"enum": ["red", "green", "blue"]},
        "s": {"type": "string", "maxLength": 8},
    },
    "required": ["ok", "n", "tag", "s"],
    "additionalProperties": False,
}
GRAMMAR = json_schema_grammar(SCHEMA)


def constrained(engine: LLMEngine, rid: str, prompt: list[int], **kw) -> GenerationRequest:
    kw.setdefault("max_tokens", 80)
    compiler = engine.tokenizer.grammar_compiler(engine.config.vocab_size)
    return GenerationRequest(rid, prompt, SamplingParams(grammar=GRAMMAR, **kw), constraint=compiler.compile(GRAMMAR, what="test", param="x"))


def run(engine: LLMEngine, requests: list[GenerationRequest]) -> dict[str, tuple[list[int], str, str | None]]:
    """(token ids, text, finish reason) per request (n = 1), stepping by hand."""
    for r in requests:
        engine.add_request(r)
    out: dict[str, tuple[list[int], str, str | None]] = {}
    while engine.has_unfinished():
        for o in engine.step():
            ids, text, fin = out.get(o.request_id, ([], "", None))
            assert fin is None, f"{o.request_id} produced a delta after finishing"
            out[o.request_id] = (ids + o.delta.token_ids, text + o.delta.text, o.delta.finish_reason)
            assert o.delta.final == (o.delta.finish_reason is not None)
    return out


# -- the mask ---------------------------------------------------------------------------------


def test_unpack_bitmask_matches_llguidance_bit_order() -> None:
    vocab = 77
    rng = np.random.default_rng(0)
    bits = rng.integers(-(2**31), 2**31, size=(3, bitmask_width(vocab)), dtype=np.int64).astype(np.int32)
    got = unpack_bitmask(torch.from_numpy(bits), vocab)
    assert got.shape == (3, vocab) and got.dtype == torch.bool
    for row in range(3):
        assert got[row].tolist() == allowed_tokens(bits[row], vocab).tolist()


def test_masked_sampling_on_both_paths_keeps_raw_logprobs() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.5, -1.0], [0.0, 1.0, 2.0, 3.0, 4.0]])
    allowed = torch.tensor([[True, False, True, False, False], [True, True, True, True, True]])
    greedy = [SamplerState.create(SamplingParams(max_tokens=1, temperature=0.0), [1]) for _ in range(2)]
    assert sample_tokens_device(logits, greedy, allowed).tolist() == [2, 4]
    assert [s.token_id for s in sample_batch(logits, greedy, allowed)] == [2, 4]
    with_logprobs = [SamplerState.create(SamplingParams(max_tokens=1, temperature=0.0, logprobs=1), [1]) for _ in range(2)]
    r = sample(logits, with_logprobs, allowed)[0]
    raw = torch.log_softmax(logits[0], -1)
    assert r.token_id == 2 and r.logprob == pytest.approx(float(raw[2]))  # before the mask
    assert r.top[0][0] == 1  # the raw distribution's best, though the grammar forbids it
    seeded = [SamplerState.create(SamplingParams(max_tokens=1, temperature=1.5, top_p=0.9, seed=i), [1]) for i in range(2)]
    for _ in range(20):
        assert sample(logits, seeded, allowed)[0].token_id in (0, 2)


def test_byte_tokenizer_compiler_allows_eos_only_at_the_end() -> None:
    tok = ByteTokenizer(320)
    compiler = tok.grammar_compiler(320)
    assert compiler.vocab_size == 320
    c = compiler.compile(json_schema_grammar({"type": "object", "properties": {"a": {"type": "boolean"}}, "required": ["a"]}), what="t", param="x")
    bits = np.zeros((1, bitmask_width(320)), dtype=np.int32)
    for token in tok.encode('{"a": true}')[1:]:
        c.fill(bits, 0)
        allowed = allowed_tokens(bits[0], 320)
        assert allowed[token] and not allowed[2]
        assert c.accept(token)
    assert c.finished
    c.fill(bits, 0)
    assert np.flatnonzero(allowed_tokens(bits[0], 320)).tolist() == [2]  # only EOS


# -- the engine -------------------------------------------------------------------------------


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_json_schema_output_parses_and_validates(make_engine, async_scheduling: bool) -> None:
    engine = make_engine(num_blocks=128, block_size=4, async_scheduling=async_scheduling)
    reqs = [constrained(engine, f"s{i}", [1, 5, 6, 7 + i], temperature=1.0, seed=i) for i in range(6)]
    reqs.append(constrained(engine, "greedy", [1, 9, 8], temperature=0.0))
    reqs.append(constrained(engine, "eos-ignored", [1, 9, 8], temperature=0.0, ignore_eos=True))
    out = run(engine, reqs)
    for rid, (ids, text, finish) in out.items():
        assert finish == "stop", (rid, text)
        jsonschema.validate(json.loads(text), SCHEMA)
        assert ids[-1] == 2  # ended on EOS, which the grammar allowed only once it was complete
    assert out["eos-ignored"] == out["greedy"]  # a grammar ends at EOS, ignore_eos or not
    assert engine.scheduler.num_grammar_rejections == 0


def test_async_equals_sync_with_constrained_rows(make_engine) -> None:
    def go(asy: bool):
        engine = make_engine(num_blocks=128, block_size=4, max_num_batched_tokens=16, async_scheduling=asy)
        reqs = [constrained(engine, f"c{i}", [1, 40 + i, 50], temperature=0.0) for i in range(3)]
        reqs += [GenerationRequest(f"g{i}", [1, 60 + i, 70, 80], SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)) for i in range(3)]
        return run(engine, reqs)

    assert go(True) == go(False)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_unconstrained_rows_are_unchanged_by_constrained_neighbours(make_engine, async_scheduling: bool) -> None:
    """Device-path and host-sampler rows alike draw the same tokens with or without a
    constrained request in their batch."""
    opts = dict(num_blocks=128, block_size=4, async_scheduling=async_scheduling)
    plain = [
        GenerationRequest("g0", [1, 11, 12, 13], SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)),
        GenerationRequest("g1", [1, 21, 22], SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)),
        GenerationRequest("p2", [1, 31, 32], SamplingParams(max_tokens=20, temperature=0.0, repetition_penalty=1.3, ignore_eos=True)),
        GenerationRequest("s3", [1, 41], SamplingParams(max_tokens=20, temperature=0.9, seed=11, ignore_eos=True)),
    ]
    alone = run(make_engine(**opts), plain)
    engine = make_engine(**opts)
    mixed = run(engine, [*plain[:2], constrained(engine, "c", [1, 51, 52], temperature=0.0), *plain[2:]])
    assert {k: v for k, v in mixed.items() if k != "c"} == alone
    jsonschema.validate(json.loads(mixed["c"][1]), SCHEMA)


def test_constrained_output_unchanged_by_preemption(make_engine) -> None:
    def go(**opts):
        engine = make_engine(block_size=4, **opts)
        reqs = [constrained(engine, f"c{i}", [1] + list(range(100 + i, 112 + i)), temperature=0.0, max_tokens=60) for i in range(4)]
        return engine, run(engine, reqs)

    tight, preempted = go(num_blocks=30, max_num_batched_tokens=8, watermark=0.0)
    assert tight.scheduler.num_preemptions > 0, "the pool was sized to force preemption"
    _, roomy = go(num_blocks=256)
    assert preempted == roomy


def test_a_token_the_grammar_refuses_ends_the_sequence_with_stop(make_engine, caplog, monkeypatch) -> None:
    engine = make_engine(num_blocks=64, block_size=4)
    reqs = [constrained(engine, f"c{i}", [1, 5, 6], temperature=0.0) for i in range(2)]
    monkeypatch.setattr(Constraint, "accept", lambda self, token: False)
    with caplog.at_level("WARNING"):
        out = run(engine, reqs)
    assert all(finish == "stop" and text == "" and len(ids) == 1 for ids, text, finish in out.values())
    assert engine.scheduler.num_grammar_rejections == 2
    assert sum("grammar refused" in r.message for r in caplog.records) == 1  # logged once


# -- the backend ------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
async def test_backend_chat_with_json_schema(stream: bool) -> None:
    backend = PagedBackend(name="tiny", model="dummy:tiny", num_blocks=64, block_size=4, max_num_seqs=4)
    assert backend.grammar_compiler() is backend.grammar_compiler()  # built once
    await backend.start()
    try:
        request = ChatCompletionRequest.model_validate(
            {
                "model": "dummy:tiny",
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 80,
                "temperature": 0.7,
                "seed": 3,
                "n": 2,
                "stream": stream,
                "response_format": {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA}},
            }
        )
        texts, finishes = {0: "", 1: ""}, {}
        if stream:
            async for chunk in backend.chat_stream(request):
                for choice in chunk.choices:
                    texts[choice.index] += choice.delta.content or ""
                    finishes[choice.index] = choice.finish_reason or finishes.get(choice.index)
        else:
            answer = await backend.chat(request)
            for choice in answer.choices:
                texts[choice.index], finishes[choice.index] = choice.message.content, choice.finish_reason
        assert finishes == {0: "stop", 1: "stop"}
        for text in texts.values():
            jsonschema.validate(json.loads(text), SCHEMA)
    finally:
        await backend.close()
    assert_blocks_all_free(backend.engine)
