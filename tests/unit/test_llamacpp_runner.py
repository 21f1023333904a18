"""The llama.cpp runner in process, on the real model: several choices from one prompt, and
decoding constrained by llguidance."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import pytest_asyncio

from backends.generation import GenerationDelta
from backends.llamacpp.runner import LlamaCppBackend
from backends.protocol import ChatCompletionRequest, InvalidRequest

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

ASK = [{"role": "user", "content": "Invent a person: give their name and age."}]
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
PERSON_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def backend(model_path: Path) -> AsyncIterator[LlamaCppBackend]:
    b = LlamaCppBackend("t", str(model_path), n_ctx=2048, instances=1)
    await b.start()
    yield b
    await b.close()


async def deltas(backend: LlamaCppBackend, **body: Any) -> list[GenerationDelta]:
    """Every delta of a chat request (ASK unless `messages` is given), prepared as the worker does."""
    request = ChatCompletionRequest(model="m", **{"messages": ASK, **body})
    prepared = await asyncio.to_thread(backend.prepare, "chat", request)
    return [d async for d in backend.generate(prepared.gen)]


def choices(out: list[GenerationDelta]) -> list[str]:
    """The texts by choice index, after checking how the deltas end: each choice once with a
    finish reason, in order, and `final` on the very last delta only."""
    assert [d.final for d in out] == [False] * (len(out) - 1) + [True]
    ends = [d.index for d in out if d.finish_reason]
    assert ends == list(range(len(ends)))
    texts = [""] * len(ends)
    for d in out:
        texts[d.index] += d.text
    return texts


async def test_greedy_choices_are_equal(backend: LlamaCppBackend) -> None:
    texts = choices(await deltas(backend, n=3, temperature=0, max_tokens=16))
    assert len(texts) == 3 and texts[0] and texts.count(texts[0]) == 3


async def test_seeded_choices_are_the_seeds_requests(backend: LlamaCppBackend) -> None:
    kw: dict[str, Any] = {"temperature": 1.0, "max_tokens": 16}
    both = choices(await deltas(backend, n=2, seed=41, **kw))
    alone = [choices(await deltas(backend, seed=seed, **kw))[0] for seed in (41, 42)]
    assert both == alone and both[0] != both[1]


async def test_every_choice_follows_the_schema(backend: LlamaCppBackend) -> None:
    texts = choices(await deltas(backend, n=2, temperature=1.0, seed=3, max_tokens=120, response_format=PERSON_FORMAT))
    for text in texts:
        jsonschema.validate(json.loads(text), PERSON)
    assert texts[0] != texts[1]  # each choice got its own constraint, from the grammar's start


async def test_grammar_outranks_logit_bias_and_ignore_eos(backend: LlamaCppBackend) -> None:
    (hello,) = backend._pool[0].tokenize(b"Hello", add_bos=False)  # noqa: SLF001 - a token this schema never allows
    age = {"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"], "additionalProperties": False}
    out = await deltas(
        backend, temperature=0, max_tokens=60, ignore_eos=True, logit_bias={str(hello): 100}, logprobs=True,
        response_format={"type": "json_schema", "json_schema": {"name": "age", "schema": age}},
    )
    jsonschema.validate(json.loads(choices(out)[0]), age)
    assert out[-1].finish_reason == "stop"  # the grammar's end, ignore_eos or not
    # Logprobs stay those of the model's logits (biased, before the mask): "Hello" is the likeliest.
    logprobs = [lp for d in out for lp in d.logprobs or []]
    assert logprobs and all(lp.logprob < -1 for lp in logprobs)


async def test_a_schema_llguidance_does_not_implement_is_refused(backend: LlamaCppBackend) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "array", "uniqueItems": True}}}
    with pytest.raises(InvalidRequest) as info:
        await deltas(backend, max_tokens=4, response_format=fmt)
    assert info.value.param == "response_format" and "uniqueItems" in str(info.value)


async def test_cancelling_several_choices_frees_the_instance(backend: LlamaCppBackend) -> None:
    gen = await asyncio.to_thread(
        backend.prepare, "chat", ChatCompletionRequest(model="m", messages=ASK, n=3, max_tokens=500, ignore_eos=True, temperature=0)
    )
    stream = backend.generate(gen.gen)
    started = time.monotonic()
    async for delta in stream:  # into the second choice
        if delta.index == 1:
            break
    per_token = (time.monotonic() - started) / 500
    await stream.aclose()  # the worker is told; it stops at its next token
    deadline = time.monotonic() + max(2.0, 100 * per_token)  # far less than the ~1000 tokens left
    assert backend._free is not None  # noqa: SLF001
    while backend._free.qsize() < backend.instances:  # noqa: SLF001
        assert time.monotonic() < deadline, "the instance was not freed"
        await asyncio.sleep(0.01)
    assert backend.load().running == 0
    assert choices(await deltas(backend, max_tokens=2, temperature=0))  # and it serves again


def test_default_threads_are_the_cpus_this_process_may_use() -> None:
    """Not the host's count: a container's cpuset (here, an affinity of one CPU) bounds it, so
    that ggml's spinning threads never outnumber the CPUs they may run on."""
    code = (
        "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
        "from backends.llamacpp.runner import LlamaCppBackend; "
        "print(LlamaCppBackend('b', 'unused.gguf')._llama_args['n_threads'])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "1"
