"""Issue 17, item 1: one request must not stall the gateway. Against a real `turnout serve`
with the llama.cpp runner: the request bounds answer 400s naming the param before anything
is validated or rendered; with the message bound raised, 20,000- and 100,000-message chats
reach the engine worker and end with a context-length 400 (estimated from the prompt's
length, before tokenizing), while /healthz answers within 100 ms and a small request on the
same backend completes; the event-loop lag is on /metrics. And the runner's tokenizing in
pieces (linear, where llama.cpp's special-token pass over one text is quadratic) gives the
same tokens as one pass over the whole text."""

from __future__ import annotations

import asyncio
import random
import re
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from backends.chat_template import render_chat
from backends.protocol import ChatMessage
from tests.conftest import Server, llamacpp_config, start_server

MODEL = "smollm2-135m"
# The small request: a two-token prompt, one token out (tens of ms alone), so that it is done
# well within the huge one's second or so in the worker.
SMALL = {"model": MODEL, "prompt": "hi", "max_tokens": 1, "temperature": 0}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
REQUEST_TIMEOUT_S = 120.0  # generous: these answers take about a second here (minutes before the fix)
HEALTHZ_BOUND_S = 0.1  # the bound


def many_messages(n: int) -> dict:
    """A chat of `n` one-word messages (20,000: 740 KB; 100,000: 3.7 MB)."""
    roles = ("user", "assistant")
    return {"model": MODEL, "messages": [{"role": roles[i % 2], "content": "word"} for i in range(n)]}


def error_of(response: httpx.Response) -> dict:
    assert response.status_code == 400, response.text[:500]
    return response.json()["error"]


@pytest.fixture(scope="module")
def bounded(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The default request bounds (and the default 4 MiB body cap)."""
    config = llamacpp_config(model_path, n_threads=1)
    config["server"]["max_body_bytes"] = 4 << 20
    server = start_server(config, tmp_path_factory.mktemp("bounded"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def roomy(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """max_messages raised to 100,000, so that huge chats reach the engine worker."""
    config = llamacpp_config(model_path, n_threads=1, instances=1)
    config["server"].update(max_messages=100_000, max_body_bytes=8 << 20)
    config["backends"][0]["preload"] = True
    server = start_server(config, tmp_path_factory.mktemp("roomy"), ready_timeout_s=120)
    yield server
    server.stop()


# -- the bounds ---------------------------------------------------------------------------------


def test_more_messages_than_max_messages_is_a_400_naming_messages(bounded: Server) -> None:
    r = httpx.post(bounded.base_url + "/chat/completions", json=many_messages(2049), timeout=REQUEST_TIMEOUT_S)
    error = error_of(r)
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", "messages", "array_above_max_length")
    assert "maximum length 2048" in error["message"]


def test_a_message_over_max_message_bytes_is_a_400_naming_it(bounded: Server) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "a" * ((1 << 20) + 1)}]}
    error = error_of(httpx.post(bounded.base_url + "/chat/completions", json=body, timeout=REQUEST_TIMEOUT_S))
    assert (error["param"], error["code"]) == ("messages.1.content", "string_above_max_length")


def test_more_tools_than_max_tools_is_a_400_naming_tools(bounded: Server) -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    body = {**CHAT, "tools": [tool] * 129}
    error = error_of(httpx.post(bounded.base_url + "/chat/completions", json=body, timeout=REQUEST_TIMEOUT_S))
    assert (error["param"], error["code"]) == ("tools", "array_above_max_length")


def test_the_event_loop_lag_is_on_metrics(bounded: Server) -> None:
    deadline = time.monotonic() + 30
    while True:
        text = httpx.get(bounded.url + "/metrics", timeout=10).text
        found = re.search(r"^turnout_event_loop_lag_seconds_count (\S+)$", text, re.M)
        if (found and float(found.group(1)) >= 1) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert found, "no turnout_event_loop_lag_seconds histogram on /metrics"
    assert float(found.group(1)) >= 1
    assert 'turnout_event_loop_lag_seconds_bucket{le="0.1"}' in text


# -- huge chats in flight -----------------------------------------------------------------------------


class Prober:
    """GETs /healthz back to back in a thread, recording (start, seconds) of each answer."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Prober:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def _run(self) -> None:
        with httpx.Client(base_url=self.server.url, timeout=60) as client:
            while not self._stop.is_set():
                start = time.monotonic()
                assert client.get("/healthz").status_code == 200
                self.samples.append((start, time.monotonic() - start))
                time.sleep(0.01)

    def during(self, start: float, end: float) -> list[float]:
        return [seconds for at, seconds in self.samples if start <= at <= end]


@pytest.mark.slow
def test_healthz_answers_while_a_huge_chat_is_in_flight(roomy: Server) -> None:
    assert httpx.post(roomy.base_url + "/completions", json=SMALL, timeout=REQUEST_TIMEOUT_S).status_code == 200
    with Prober(roomy) as prober, httpx.Client(timeout=REQUEST_TIMEOUT_S) as client:
        time.sleep(0.2)
        for n in (20_000, 100_000):
            start = time.monotonic()
            r = client.post(roomy.base_url + "/chat/completions", json=many_messages(n))
            end = time.monotonic()
            error = error_of(r)
            # The estimate answered: the prompt's length alone shows it cannot fit.
            assert (error["code"], error["param"]) == ("context_length_exceeded", "messages"), error
            assert "maximum context length is 512 tokens" in error["message"]
            probes = prober.during(start, end)
            assert len(probes) >= 3, f"{n} messages: only {len(probes)} /healthz probes while in flight"
            # The median: one probe may meet a CI hiccup; the bound itself is the issue's.
            assert statistics.median(probes) < HEALTHZ_BOUND_S, f"{n} messages: /healthz took {sorted(probes)}"


@pytest.mark.slow
def test_a_small_request_completes_while_a_huge_one_is_prepared(roomy: Server) -> None:
    assert httpx.post(roomy.base_url + "/completions", json=SMALL, timeout=REQUEST_TIMEOUT_S).status_code == 200
    big: dict[str, object] = {}

    def send_big() -> None:
        big["response"] = httpx.post(roomy.base_url + "/chat/completions", json=many_messages(100_000), timeout=REQUEST_TIMEOUT_S)

    thread = threading.Thread(target=send_big)
    thread.start()
    try:
        # Once the gateway has dispatched it, the big one is in the engine worker (or on its way).
        deadline = time.monotonic() + REQUEST_TIMEOUT_S
        while in_flight(roomy, "local") < 1 and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.005)
        assert thread.is_alive(), "the huge request ended before the small one was sent"
        small = httpx.post(roomy.base_url + "/completions", json=SMALL, timeout=REQUEST_TIMEOUT_S)
        assert small.status_code == 200, small.text
        small_done_first = thread.is_alive()
    finally:
        thread.join(timeout=REQUEST_TIMEOUT_S)
    assert error_of(big["response"])["code"] == "context_length_exceeded"  # type: ignore[arg-type]
    # The worker's loop served the small request while the huge one was validated and rendered.
    assert small_done_first, "the small request waited for the huge one"


def in_flight(server: Server, backend: str) -> float:
    text = httpx.get(server.url + "/metrics", timeout=30).text
    found = re.search(r'^turnout:in_flight_requests\{[^}]*backend="%s"[^}]*\} (\S+)$' % re.escape(backend), text, re.M)
    return float(found.group(1)) if found else 0.0


# -- tokenizing in pieces -----------------------------------------------------------------------------------


def test_tokenizing_in_pieces_gives_the_whole_texts_tokens(model_path: Path) -> None:
    from backends.llamacpp.runner import TOKENIZE_PIECE_CHARS, LlamaCppBackend

    backend = LlamaCppBackend("t", str(model_path), n_ctx=512, n_threads=1)
    asyncio.run(backend.start())
    try:
        llm = backend._pool[0]  # noqa: SLF001 - one pass over the whole text, as before
        assert backend._cut is not None and "<|im_start|>" in backend._cut.pattern.replace("\\", "")  # noqa: SLF001
        assert backend.max_token_bytes and backend.max_token_bytes >= 16

        def whole(text: str) -> list[int]:
            return llm.tokenize(text.encode(), add_bos=True, special=True)

        rnd = random.Random(17)
        words = ["word", " ", "  ", "\n", "\t", "héllo", "日本語", "=====", "<", "|", ">", "im_start",
                 "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<repo_name>", " <|im_end|> ", "<|im_start|><|im_end|>"]  # fmt: skip
        for _ in range(40):
            text = "".join(rnd.choice(words) for _ in range(rnd.choice([5, 500, 3000])))
            assert backend.tokenize(text) == whole(text)
        messages = [ChatMessage(role=("user", "assistant")[i % 2], content=rnd.choice(words) * 3) for i in range(2000)]
        prompt = render_chat(backend.chat_template()[0], messages)
        assert len(prompt) > 10 * TOKENIZE_PIECE_CHARS
        assert backend.tokenize(prompt) == whole(prompt)
    finally:
        asyncio.run(backend.close())
