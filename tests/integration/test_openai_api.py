"""The OpenAI contract end to end: the real model, a real server, the official client."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import llama_cpp
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from backends.chat_template import render_chat
from backends.protocol import ChatMessage, LoadReport
from tests.conftest import Server, llamacpp_config, start_server

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m"
HELLO = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def client(llamacpp_server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=llamacpp_server.base_url, api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def vocab(model_path: Path) -> llama_cpp.Llama:
    return llama_cpp.Llama(str(model_path), vocab_only=True, verbose=False)


def sse_lines(response: httpx.Response) -> list[str]:
    return [line for line in response.iter_lines() if line]


# -- happy paths ------------------------------------------------------------------------------


def test_chat_answers_and_counts_tokens(client: openai.OpenAI, vocab: llama_cpp.Llama) -> None:
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12, temperature=0)
    choice = r.choices[0]
    assert r.object == "chat.completion" and r.model == MODEL
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    # The prompt count is the chat template's tokens; the completion count is what came out.
    template = vocab.metadata["tokenizer.chat_template"]
    prompt = render_chat(template, [ChatMessage(**m) for m in HELLO])
    assert r.usage.prompt_tokens == len(vocab.tokenize(prompt.encode(), add_bos=False, special=True))
    out_tokens = vocab.tokenize(choice.message.content.encode(), add_bos=False, special=False)
    assert r.usage.completion_tokens == len(out_tokens)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_temperature_zero_is_deterministic(client: openai.OpenAI) -> None:
    a = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=20, temperature=0)
    b = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=20, temperature=0)
    assert a.choices[0].message.content == b.choices[0].message.content


def test_seed_reproduces_sampled_text(client: openai.OpenAI) -> None:
    kw = dict(model=MODEL, messages=HELLO, max_tokens=20, temperature=1.0, seed=1234)
    assert client.chat.completions.create(**kw).choices[0].message.content == (
        client.chat.completions.create(**kw).choices[0].message.content
    )


def test_chat_stream_matches_non_stream(client: openai.OpenAI) -> None:
    full = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=16, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=HELLO, max_tokens=16, temperature=0, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].choices[0].finish_reason == full.choices[0].finish_reason
    # include_usage: a last chunk with no choices and the same usage as the non-streamed answer
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.model_dump() == full.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_ends_with_finish_chunk_then_done(llamacpp_server: Server) -> None:
    # Greedy: a sampled answer may end (EOS) within 5 tokens, and this test is about `length`.
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 5, "stream": True, "temperature": 0}
    with httpx.stream("POST", llamacpp_server.base_url + "/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = sse_lines(r)
    assert lines[-1] == "data: [DONE]"
    last = json.loads(lines[-2].removeprefix("data: "))
    assert last["choices"][0]["finish_reason"] == "length"
    assert all(line.startswith("data: ") for line in lines)


def test_completions_stream_and_not(client: openai.OpenAI) -> None:
    prompt = "The quick brown fox"
    full = client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0)
    assert full.object == "text_completion" and full.choices[0].text
    assert full.usage.completion_tokens == 10 and full.choices[0].finish_reason == "length"
    chunks = list(
        client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=10, temperature=0, stream=True, stream_options={"include_usage": True}
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert chunks[-1].usage.completion_tokens == 10
    echoed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0, echo=True)
    assert echoed.choices[0].text.startswith(prompt)


def test_stop_string_is_cut_and_never_leaks(client: openai.OpenAI) -> None:
    free = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=20, temperature=0).choices[0].text
    assert " 6" in free  # the model counts on; stop where it would write 6
    stopped = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=20, temperature=0, stop=[" 6"])
    assert stopped.choices[0].text == free[: free.index(" 6")]
    assert stopped.choices[0].finish_reason == "stop"
    streamed = client.completions.create(
        model=MODEL, prompt="1, 2, 3, 4,", max_tokens=20, temperature=0, stop=[" 6"], stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == stopped.choices[0].text


def test_models_listing(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list().data]
    assert ids == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_health_and_request_ids(llamacpp_server: Server) -> None:
    assert httpx.get(llamacpp_server.url + "/healthz").json() == {"status": "ok"}
    r = httpx.get(llamacpp_server.url + "/readyz")
    assert r.status_code == 200 and r.headers["x-request-id"]
    echoed = httpx.get(llamacpp_server.base_url + "/models", headers={"x-request-id": "trace-abc-123"})
    assert echoed.headers["x-request-id"] == "trace-abc-123"
    a, b = httpx.get(llamacpp_server.url + "/healthz"), httpx.get(llamacpp_server.url + "/healthz")
    assert a.headers["x-request-id"] != b.headers["x-request-id"]


async def test_two_concurrent_streams_complete(llamacpp_server: Server) -> None:
    client = openai.AsyncOpenAI(base_url=llamacpp_server.base_url, api_key="unused", max_retries=0, timeout=60)

    async def one(prompt: str) -> tuple[str, str | None]:
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=12, temperature=0, stream=True
        )
        text, finish = "", None
        async for chunk in stream:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        return text, finish

    results = await asyncio.gather(one("Tell me about cats."), one("Tell me about dogs."))
    for text, finish in results:
        assert text and finish in ("stop", "length")
    await client.close()


# -- bad input: a clear OpenAI error and a 4xx, never a 500 or a hang ---------------------------


def _post(server: Server, path: str, **kwargs: object) -> httpx.Response:
    return httpx.post(server.base_url + path, timeout=30, **kwargs)  # type: ignore[arg-type]


def assert_openai_error(r: httpx.Response, status: int, *, code: str | None = None, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"} and err["message"]
    assert r.headers["x-request-id"]
    if code is not None:
        assert err["code"] == code
    if param is not None:
        assert err["param"] == param
    return err


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": MODEL, "messages": "hi"}, "messages"),
        ({"model": MODEL, "messages": []}, "messages"),
        ({"messages": HELLO}, "model"),
        ({"model": MODEL, "messages": HELLO, "temperature": "hot"}, "temperature"),
        ({"model": MODEL, "messages": HELLO, "temperature": 3}, "temperature"),
        ({"model": MODEL, "messages": HELLO, "stream": "yes"}, "stream"),
        ({"model": MODEL, "messages": HELLO, "max_tokens": 0}, "max_tokens"),
        ({"model": MODEL, "messages": HELLO, "max_tokens": -5}, "max_tokens"),
        ({"model": MODEL, "messages": HELLO, "max_tokens": 1.5}, "max_tokens"),
        ({"model": MODEL, "messages": HELLO, "top_p": 0}, "top_p"),
        ({"model": MODEL, "messages": HELLO, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"model": MODEL, "messages": HELLO, "logit_bias": {"hello": 5}}, "logit_bias"),
        ({"model": MODEL, "messages": HELLO, "response_format": {"type": "xml"}}, "response_format.type"),
        ({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ],
)
def test_invalid_chat_bodies_are_400(llamacpp_server: Server, body: dict, param: str) -> None:
    err = assert_openai_error(_post(llamacpp_server, "/chat/completions", json=body), 400)
    assert err["type"] == "invalid_request_error"
    assert err["param"] is not None and err["param"].startswith(param)


def test_image_content_parts_are_refused(llamacpp_server: Server) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}
    assert_openai_error(_post(llamacpp_server, "/chat/completions", json=body), 400)


def test_text_content_parts_work(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": [{"type": "text", "text": "Name three "}, {"type": "text", "text": "colours."}]}]
    parts = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    plain = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, temperature=0)
    assert parts.choices[0].message.content == plain.choices[0].message.content


@pytest.mark.parametrize("raw", [b"{not json", b"", b"[1, 2]", b'{"model": "smollm2-135m", "messages": ['])
def test_malformed_json_is_400(llamacpp_server: Server, raw: bytes) -> None:
    r = _post(llamacpp_server, "/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert_openai_error(r, 400)


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-17", messages=HELLO)
    assert info.value.code == "model_not_found"


def test_prompt_over_context_window_states_the_numbers(client: openai.OpenAI) -> None:
    long_prompt = "word " * 600  # over the test server's 512-token window on its own
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": long_prompt}], max_tokens=10)
    assert info.value.code == "context_length_exceeded"
    assert "512" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt=long_prompt)
    assert info.value.code == "context_length_exceeded"


def test_prompt_plus_max_tokens_over_window(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=600)
    message = info.value.message
    assert info.value.code == "context_length_exceeded" and "512" in message and "600 in the completion" in message


def test_huge_body_is_413(llamacpp_server: Server) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x" * 200_000}]}
    assert_openai_error(_post(llamacpp_server, "/chat/completions", json=body), 413, code="request_too_large")

    def chunks():  # no Content-Length: the limit must hold for chunked uploads too
        for _ in range(20):
            yield b"x" * 10_000

    r = _post(llamacpp_server, "/chat/completions", content=chunks(), headers={"content-type": "application/json"})
    assert_openai_error(r, 413)


def test_unknown_route_and_method(llamacpp_server: Server) -> None:
    assert_openai_error(_post(llamacpp_server, "/nope", json={}), 404)
    assert_openai_error(httpx.get(llamacpp_server.base_url + "/chat/completions"), 405)


# -- cancellation and capacity ---------------------------------------------------------------------

# Thousands of tokens (ignore_eos: no early end): many times longer to generate than a test
# waits for the instance, at any machine's speed (the disconnect tests measure it).
LONG = {"model": MODEL, "messages": HELLO, "max_tokens": 3500, "ignore_eos": True, "temperature": 0}


def _await_free_instance(server: Server, budget_s: float) -> float:
    """Seconds until a one-token request is admitted by a server whose queue holds nothing
    (max_queue 0: a busy instance answers 503 at once)."""
    start = time.monotonic()
    while time.monotonic() - start < budget_s:
        r = _post(server, "/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 1})
        if r.status_code == 200:
            return time.monotonic() - start
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
        time.sleep(0.02)
    raise AssertionError(f"the instance was not freed within {budget_s}s")


def _seconds_per_token(server: Server, n: int = 32) -> float:
    """This server's decode time per token, measured now: between the first and the last
    token of a streamed answer (prompt time excluded)."""
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": n, "ignore_eos": True, "temperature": 0, "stream": True}
    stamps = []
    with httpx.stream("POST", server.base_url + "/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
                stamps.append(time.monotonic())
    assert len(stamps) >= n // 2, "the answer should stream token by token"
    return (stamps[-1] - stamps[0]) / (n - 1)


def _seconds_it_had_left(sent_at: float, per_token: float) -> float:
    """How much longer an abandoned LONG request would have run had it not been aborted: its
    tokens not yet generated, at the measured rate. Every second since it was sent counts as
    decoding, so this never overstates what was left."""
    left = LONG["max_tokens"] - (time.monotonic() - sent_at) / per_token
    assert left >= 500, f"only {left:.0f} tokens were left: too few to tell an abort from the end"
    return left * per_token


def _requests_aborted(server: Server) -> float:
    """The engine worker's count of requests the gateway aborted, as /metrics exports it."""
    text = httpx.get(server.url + "/metrics").text
    samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
    return next(s.value for s in samples if s.name == "turnout:requests_aborted_total" and s.labels["backend"] == "local")


@pytest.fixture(scope="module")
def no_queue_server(model_path: Path, tmp_path_factory: pytest.TempPathFactory):
    config = llamacpp_config(model_path, instances=1, max_queue=0, n_ctx=4096)
    server = start_server(config, tmp_path_factory.mktemp("noq"))
    yield server
    server.stop()


def test_full_queue_is_503_with_retry_after(no_queue_server: Server) -> None:
    with httpx.stream("POST", no_queue_server.base_url + "/chat/completions", json={**LONG, "stream": True}, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        next(lines)  # the generation holds the only instance now
        busy = _post(no_queue_server, "/chat/completions", json={"model": MODEL, "messages": HELLO, "max_tokens": 1})
        err = assert_openai_error(busy, 503)
        assert err["type"] == "server_error" and int(busy.headers["retry-after"]) >= 1


# An abandoned request is proved aborted, not finished: it still had hundreds of tokens to go,
# the next request got the only instance within a quarter of the time those would have taken
# (measured at this machine's rate, not a fixed number of seconds: a slow machine is slow at
# both), and the engine worker counted exactly one abort.


def test_disconnect_mid_stream_aborts_the_generation(no_queue_server: Server) -> None:
    _await_free_instance(no_queue_server, budget_s=5.0)  # from the test before
    per_token = _seconds_per_token(no_queue_server)
    aborted = _requests_aborted(no_queue_server)
    sent_at = time.monotonic()
    with httpx.stream("POST", no_queue_server.base_url + "/chat/completions", json={**LONG, "stream": True}, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
        left_s = _seconds_it_had_left(sent_at, per_token)
    # leaving the block closed the connection mid-stream
    _await_free_instance(no_queue_server, budget_s=left_s / 4)
    assert _requests_aborted(no_queue_server) == aborted + 1


def test_disconnect_while_waiting_for_a_non_streamed_answer_aborts_it(no_queue_server: Server) -> None:
    _await_free_instance(no_queue_server, budget_s=5.0)
    per_token = _seconds_per_token(no_queue_server)
    aborted = _requests_aborted(no_queue_server)
    sent_at = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(no_queue_server.base_url + "/chat/completions", json=LONG, timeout=0.3)
    left_s = _seconds_it_had_left(sent_at, per_token)
    _await_free_instance(no_queue_server, budget_s=left_s / 4)
    assert _requests_aborted(no_queue_server) == aborted + 1


def test_load_header_and_vllm_metrics(llamacpp_server: Server) -> None:
    r = _post(llamacpp_server, "/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 1})
    report = LoadReport.from_header(r.headers["endpoint-load-metrics"])
    assert report.healthy and report.max_running == 1 and report.running == 0
    text = httpx.get(llamacpp_server.url + "/metrics").text
    samples = {s.name: s for family in text_string_to_metric_families(text) for s in family.samples}
    running = samples["vllm:num_requests_running"]
    assert running.labels == {"model_name": MODEL, "backend": "local"} and running.value == 0
    assert samples["vllm:num_requests_waiting"].value == 0
    assert samples["turnout:backend_healthy"].value == 1


def test_json_object_response_format_yields_json(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Describe a cat as a JSON object with keys name and age."}],
        max_tokens=120,
        temperature=0,
        response_format={"type": "json_object"},
    )
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_logit_bias_bans_a_token(client: openai.OpenAI, vocab: llama_cpp.Llama) -> None:
    free = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=1, temperature=0).choices[0].text
    banned = vocab.tokenize(free.encode(), add_bos=False, special=False)
    assert len(banned) == 1
    biased = client.completions.create(
        model=MODEL, prompt="1, 2, 3, 4,", max_tokens=1, temperature=0, logit_bias={str(banned[0]): -100}
    )
    assert biased.choices[0].text != free


# -- logprobs ------------------------------------------------------------------------------------


def test_chat_logprobs_and_top_logprobs(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12, temperature=0, logprobs=True, top_logprobs=3)
    choice = r.choices[0]
    content = choice.logprobs.content
    assert len(content) == r.usage.completion_tokens > 0
    for t in content:
        assert t.logprob <= 0.0 and t.bytes == list(t.token.encode())
        assert len(t.top_logprobs) == 3
        tops = [a.logprob for a in t.top_logprobs]
        assert tops == sorted(tops, reverse=True) and all(lp <= 0.0 for lp in tops)
        # Greedy: the chosen token is the likeliest, with the same logprob.
        assert t.top_logprobs[0].token == t.token
        assert t.top_logprobs[0].logprob == pytest.approx(t.logprob)
    assert "".join(t.token for t in content) == choice.message.content
    # Asking for logprobs changes nothing about the text.
    plain = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12, temperature=0)
    assert plain.choices[0].message.content == choice.message.content and plain.choices[0].logprobs is None


def test_chat_logprobs_without_top_logprobs(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4, temperature=0, logprobs=True)
    content = r.choices[0].logprobs.content
    assert content and all(t.logprob <= 0.0 and t.top_logprobs == [] for t in content)


def test_completion_logprobs(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=6, temperature=0, logprobs=2)
    choice = r.choices[0]
    lp = choice.logprobs
    n = r.usage.completion_tokens
    assert n > 0 and len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert "".join(lp.tokens) == choice.text
    assert lp.text_offset == sorted(lp.text_offset) and len(set(lp.text_offset)) == n and lp.text_offset[0] == 0
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0.0 and len(top) == 2
        assert max(top, key=top.get) == token and top[token] == pytest.approx(logprob)


def test_logprobs_are_of_the_biased_distribution(client: openai.OpenAI, vocab: llama_cpp.Llama) -> None:
    free = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=1, temperature=0, logprobs=3)
    best = free.choices[0].logprobs.tokens[0]
    (banned,) = vocab.tokenize(best.encode(), add_bos=False, special=False)
    biased = client.completions.create(
        model=MODEL, prompt="1, 2, 3, 4,", max_tokens=1, temperature=0, logprobs=3, logit_bias={str(banned): -100}
    )
    lp = biased.choices[0].logprobs
    assert lp.tokens[0] != best and best not in lp.top_logprobs[0]
    assert lp.token_logprobs[0] > free.choices[0].logprobs.token_logprobs[0] - 20  # a real distribution, renormalised


def test_streamed_chat_logprobs(client: openai.OpenAI) -> None:
    full = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=10, temperature=0, logprobs=True, top_logprobs=2)
    chunks = [
        c
        for c in client.chat.completions.create(
            model=MODEL, messages=HELLO, max_tokens=10, temperature=0, logprobs=True, top_logprobs=2, stream=True
        )
        if c.choices and c.choices[0].delta.content
    ]
    assert chunks
    streamed = []
    for c in chunks:
        lp = c.choices[0].logprobs
        assert lp is not None and lp.content
        assert "".join(t.token for t in lp.content) == c.choices[0].delta.content
        streamed += lp.content
    whole = full.choices[0].logprobs.content
    assert [(t.token, t.top_logprobs[0].token) for t in streamed] == [(t.token, t.top_logprobs[0].token) for t in whole]
    for a, b in zip(streamed, whole):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)


def test_streamed_completion_logprobs(client: openai.OpenAI) -> None:
    chunks = [
        c
        for c in client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=6, temperature=0, logprobs=1, stream=True)
        if c.choices and c.choices[0].text
    ]
    assert chunks
    for c in chunks:
        lp = c.choices[0].logprobs
        assert lp is not None and "".join(lp.tokens) == c.choices[0].text
        assert all(v <= 0.0 for v in lp.token_logprobs) and all(len(t) == 1 for t in lp.top_logprobs)


# -- response_format json_schema ------------------------------------------------------------------

PERSON_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
PERSON_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA, "strict": True}}
PERSON_ASK = [{"role": "user", "content": "Invent a person: give their name and age."}]


def test_json_schema_response_format_validates(client: openai.OpenAI) -> None:
    import jsonschema

    r = client.chat.completions.create(
        model=MODEL, messages=PERSON_ASK, max_tokens=200, temperature=0, response_format=PERSON_FORMAT
    )
    choice = r.choices[0]
    assert choice.finish_reason == "stop"
    jsonschema.validate(json.loads(choice.message.content), PERSON_SCHEMA)
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=PERSON_ASK, max_tokens=200, temperature=0, response_format=PERSON_FORMAT, stream=True
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    jsonschema.validate(json.loads(text), PERSON_SCHEMA)
    assert text == choice.message.content


@pytest.mark.parametrize(
    ("json_schema", "param", "words"),
    [
        ({"name": "p", "schema": {"type": "object", "properties": 5}}, "response_format.json_schema.schema", "'properties'"),
        ({"name": "p", "schema": {"type": "objekt"}}, "response_format.json_schema.schema", "'type'"),
        ({"name": "p", "schema": "an object"}, "response_format.json_schema.schema", ""),
        ({"schema": PERSON_SCHEMA}, "response_format.json_schema.name", ""),
        ({"name": "has space", "schema": PERSON_SCHEMA}, "response_format.json_schema.name", ""),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_bad_json_schemas_are_400(llamacpp_server: Server, json_schema: dict, param: str, words: str, stream: bool) -> None:
    body = {"model": MODEL, "messages": HELLO, "stream": stream, "response_format": {"type": "json_schema", "json_schema": json_schema}}
    err = assert_openai_error(_post(llamacpp_server, "/chat/completions", json=body), 400, param=param)
    assert words in err["message"]


def test_json_schema_without_its_object_is_400(llamacpp_server: Server) -> None:
    body = {"model": MODEL, "messages": HELLO, "response_format": {"type": "json_schema"}}
    err = assert_openai_error(_post(llamacpp_server, "/chat/completions", json=body), 400, param="response_format")
    assert "json_schema" in err["message"]


# Valid JSON Schemas with a keyword llguidance does not implement: the message names it.
@pytest.mark.parametrize(
    ("schema", "keyword"),
    [
        ({"type": "string", "if": {"minLength": 2}, "then": {"maxLength": 5}}, "if"),
        ({"not": {"type": "string"}}, "not"),
        ({"type": "array", "uniqueItems": True}, "uniqueItems"),
        ({"type": "object", "propertyNames": {"maxLength": 3}}, "propertyNames"),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_llguidance_cannot_take_is_400_before_any_byte(
    client: openai.OpenAI, schema: dict, keyword: str, stream: bool
) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": schema}}
    with pytest.raises(openai.BadRequestError) as caught:
        r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, response_format=fmt, stream=stream)
        if stream:
            list(r)
    assert caught.value.status_code == 400
    err = caught.value.body
    assert err["param"] == "response_format" and f'"{keyword}"' in err["message"]
    # The engine worker is still there.
    assert client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2).choices[0].finish_reason


def test_json_schema_with_a_long_string_bound_is_served(client: openai.OpenAI) -> None:
    # llama.cpp's GBNF parser overflowed its stack on this (30,000 nested groups); llguidance
    # takes the bound as a lexer count.
    fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "string", "maxLength": 30000}}}
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, temperature=0, response_format=fmt)
    assert r.choices[0].message.content.startswith('"')


# -- n: several choices from one prompt --------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_n_choices_are_the_seeds_answers(client: openai.OpenAI, stream: bool) -> None:
    kw = dict(model=MODEL, messages=HELLO, max_tokens=12, temperature=1.0, n=2)
    alone = [client.chat.completions.create(**{**kw, "n": 1, "seed": seed}) for seed in (7, 8)]
    texts = [a.choices[0].message.content for a in alone]
    if not stream:
        r = client.chat.completions.create(**kw, seed=7)
        assert [c.index for c in r.choices] == [0, 1] and all(c.finish_reason for c in r.choices)
        assert [c.message.content for c in r.choices] == texts  # choice i is seeded seed + i
        assert r.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)
        assert r.usage.prompt_tokens == alone[0].usage.prompt_tokens  # one prompt
        return
    streamed, finishes = ["", ""], [None, None]
    for chunk in client.chat.completions.create(**kw, seed=7, stream=True):
        for c in chunk.choices:
            streamed[c.index] += c.delta.content or ""
            finishes[c.index] = c.finish_reason or finishes[c.index]
    assert streamed == texts and all(finishes)
