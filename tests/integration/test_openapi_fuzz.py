"""schemathesis against a real `turnout serve`: its served schema (/openapi.json, behind the
admin key) drives bounded, seeded examples at every operation, valid and invalid, and every
answer must be no 5xx and conform to the schema (status, content type, headers, body; a
stream's events included). The backend is a `remote` on the fake upstream
(gateway/bench/fake_upstream.py), which answers any request in microseconds.

And, from the same server's log: httpx writes no INFO line per metrics scrape.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from gateway.openapi import OPERATIONS
from tests.conftest import REPO, Server, free_port, start_server

pytestmark = pytest.mark.slow

ADMIN_KEY = "fuzz-admin-key-0123456789"
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
MODEL = "fake"
# The fake upstream "generates" max_tokens tokens at once: fuzzed values are bounded to
# MAX_TOKENS so that a max_tokens of 10**9 costs nothing even where no ceiling applies; the
# route's own ceiling, lower, answers 400 between the two.
MAX_TOKENS = 256
ROUTE_MAX_TOKENS = 64
# Examples per operation and mode, and the seed: fixed for `make test`; set others for a
# longer hunt (TURNOUT_FUZZ_EXAMPLES=1000 TURNOUT_FUZZ_SEED=2).
EXAMPLES = int(os.environ.get("TURNOUT_FUZZ_EXAMPLES", "30"))
SEED = int(os.environ.get("TURNOUT_FUZZ_SEED", "17"))
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def fake_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """The fake OpenAI upstream on loopback; yields its port."""
    port = free_port()
    log = tmp_path_factory.mktemp("upstream") / "upstream.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway.bench.fake_upstream", "--port", str(port), "--model", MODEL],
        cwd=REPO, stdout=log.open("wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, log.read_text()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the fake upstream did not start"
                time.sleep(0.1)
        yield port
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@pytest.fixture(scope="module")
def gateway(fake_upstream: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`turnout serve` with the schema on, an admin key, and one remote backend on the fake
    upstream, scraped for load (every 500 ms) and routed with a max_tokens ceiling."""
    config = {
        "server": {"host": "127.0.0.1", "api_docs": True, "admin_key_env": "TURNOUT_FUZZ_ADMIN_KEY", "max_body_bytes": 65536},
        "backends": [{"name": "up", "kind": "remote", "model": MODEL, "url": f"http://127.0.0.1:{fake_upstream}/v1"}],
        "routes": [{"model": MODEL, "backends": ["up"], "max_tokens": ROUTE_MAX_TOKENS}],
    }
    server = start_server(config, tmp_path_factory.mktemp("fuzz"), env={"TURNOUT_FUZZ_ADMIN_KEY": ADMIN_KEY})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def api_schema(gateway: Server) -> Any:
    """The gateway's own schema, as served (with the admin key)."""
    config = schemathesis.Config.from_dict({"seed": SEED, "generation": {"mode": "all", "max-examples": EXAMPLES}})
    schema = schemathesis.openapi.from_url(gateway.url + "/openapi.json", headers=ADMIN, config=config, timeout=10)
    schema.config.update(base_url=gateway.url)
    schema.hook(map_case)
    return schema


def map_case(context: Any, case: Any) -> Any:
    """Bound max_tokens for the fake upstream (see MAX_TOKENS). And steer valid bodies to the
    served model (a random name is a 404) and past what the request models' validators refuse
    although their JSON schemas allow it (`_past_validators`), so that they reach the
    backend; invalid bodies are left invalid."""
    body = case.body
    if isinstance(body, dict):
        for name in ("max_tokens", "max_completion_tokens"):
            if isinstance(body.get(name), int) and body[name] > MAX_TOKENS:
                body[name] = MAX_TOKENS
        if case.meta is not None and case.meta.generation.mode is GenerationMode.POSITIVE:
            _past_validators(body)
    return case


def _past_validators(body: dict[str, Any]) -> None:
    """backends/protocol.py's validators that its JSON schema does not express (a finding of
    this fuzz run): `n` must be 1; logit_bias keys are token ids; a message other than an
    assistant's has content; one prompt per request, not empty; no suffix."""
    body["model"] = MODEL
    if isinstance(body.get("n"), int):
        body["n"] = 1
    if isinstance(body.get("logit_bias"), dict):
        body["logit_bias"] = {str(i): v for i, v in enumerate(body["logit_bias"].values())}
    for message in body.get("messages") or []:
        if isinstance(message, dict) and message.get("role") != "assistant" and message.get("content") is None:
            message["content"] = "hello"
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        body["prompt"] = prompt[:1] if prompt and isinstance(prompt[0], (str, list)) else (prompt or "hello")
    if body.get("suffix"):
        body["suffix"] = None


# The operations, known at collection (the schema itself is loaded from the live server).
# Invalid inputs only where there is something to make invalid: a request body (the others
# take no parameters but a free-form path string).
CASES = [(label, GenerationMode.POSITIVE) for label in sorted(f"{m.upper()} {p}" for m, p in OPERATIONS)] + [
    (f"{m.upper()} {p}", GenerationMode.NEGATIVE) for (m, p), op in sorted(OPERATIONS.items()) if op.request is not None
]


@pytest.mark.parametrize(("label", "mode"), CASES, ids=[f"{label} {mode}" for label, mode in CASES])
def test_every_operation_conforms_and_never_5xx(api_schema: Any, label: str, mode: GenerationMode) -> None:
    """EXAMPLES (30) seeded examples per operation and mode (positive: valid inputs and the
    schema's own examples; negative: invalid bodies), each checked by schemathesis; valid
    generation requests must reach the backend (some 200s). (schemathesis' pytest plugin,
    `schemathesis.pytest.from_fixture`, is not used: 4.32 reads `Item._nodeid`, which pytest
    9.2 no longer has.)"""
    operation = api_schema.find_operation_by_label(label)
    assert operation is not None, f"{label} is not in the served schema"
    strategies = [operation.as_strategy(generation_mode=mode)]
    if mode is GenerationMode.POSITIVE:
        strategies += operation.get_strategies_from_examples()

    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck), print_blob=True)
    @seed(SEED)
    @given(case=st.one_of(strategies))
    def check(case: Any) -> None:
        statuses.append(case.call_and_validate(headers=ADMIN, checks=CHECKS, timeout=30).status_code)

    statuses: list[int] = []
    check()
    if mode is GenerationMode.POSITIVE and label.startswith("POST /v1/"):
        assert 200 in statuses, statuses


def test_docs_pages_are_absent_and_the_schema_needs_the_admin_key(gateway: Server) -> None:
    assert httpx.get(gateway.url + "/openapi.json", timeout=10).status_code == 401
    for path in ("/docs", "/redoc"):
        response = httpx.get(gateway.url + path, headers=ADMIN, timeout=10)
        assert response.status_code == 404 and response.json()["error"]["type"] == "not_found_error"


def test_no_httpx_info_line_per_metrics_scrape(gateway: Server) -> None:
    """The remote backend is scraped every 500 ms through httpx; after two cycles at least,
    the log has none of httpx's `HTTP Request: GET ...` INFO lines."""
    time.sleep(1.5)
    noise = [line for line in gateway.log.read_text().splitlines() if " INFO httpx" in line or " INFO httpcore" in line]
    assert not noise, noise[:3]
