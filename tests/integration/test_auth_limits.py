"""API keys and rate limits end to end: real `turnout serve` processes (the real model), a
real redis-server, the official client. Requests generate at most one token: the limiter
decides before generation, so what these tests measure does not depend on model speed."""

from __future__ import annotations

import asyncio
import json
import math
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from gateway.keys import FileKeyStore, KeyRecord, RedisKeyStore, new_key
from tests.conftest import REPO, RedisServer, Server, free_port, llamacpp_config, start_server

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m"
HI = [{"role": "user", "content": "Hi"}]
LIMIT_HEADERS = [f"x-ratelimit-{what}-{kind}" for kind in ("requests", "tokens") for what in ("limit", "remaining", "reset")]


def gateway_config(model_path: Path, **sections: object) -> dict:
    config = llamacpp_config(model_path, instances=1, max_queue=16)
    config.update(sections)
    return config


def start_many(configs: list[dict], tmp_dir: Path) -> list[Server]:
    """Start gateways in parallel (each loads the model)."""
    with ThreadPoolExecutor(len(configs)) as pool:
        return list(pool.map(lambda c: start_server(c, tmp_dir), configs))


def add_key(store: FileKeyStore | RedisKeyStore, name: str, **fields: object) -> tuple[str, KeyRecord]:
    secret, record = new_key(name, **fields)  # type: ignore[arg-type]
    store.add(record)
    return secret, record


def chat(server: Server, secret: str | None, model: str = MODEL, **body: object) -> httpx.Response:
    headers = {"Authorization": f"Bearer {secret}"} if secret else {}
    return httpx.post(
        server.base_url + "/chat/completions",
        headers=headers,
        json={"model": model, "messages": HI, "max_tokens": 1, **body},
        timeout=120,
    )


async def concurrent_chats(targets: list[tuple[Server, str]]) -> list[httpx.Response]:
    """One chat request per (server, secret), all in flight at once."""
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=len(targets))) as client:
        return await asyncio.gather(
            *(
                client.post(
                    server.base_url + "/chat/completions",
                    headers={"Authorization": f"Bearer {secret}"},
                    json={"model": MODEL, "messages": HI, "max_tokens": 1},
                )
                for server, secret in targets
            )
        )


def keys_cli(config_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", "keys", "--config", str(config_path), *args],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )


def config_path_of(server: Server, tmp_dir: Path) -> Path:
    return tmp_dir / f"config-{server.port}.yaml"


def assert_429(r: httpx.Response, kind: str) -> None:
    assert r.status_code == 429, r.text
    error = r.json()["error"]
    assert error["code"] == "rate_limit_exceeded" and error["type"] == kind
    assert f"Rate limit reached for {kind}" in error["message"]
    assert int(r.headers["retry-after"]) >= 1 and int(r.headers["retry-after-ms"]) > 0
    assert r.headers[f"x-ratelimit-remaining-{kind}"] == "0"


# -- a single gateway with a key file -----------------------------------------------------------


@pytest.fixture(scope="module")
def keyfile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("keys") / "keys.json"


@pytest.fixture(scope="module")
def file_keys(keyfile: Path) -> dict[str, tuple[str, KeyRecord]]:
    store = FileKeyStore(keyfile)
    return {
        "all": add_key(store, "all", rpm=1000, tpm=100_000),
        "smol": add_key(store, "smol", models=(MODEL,), rpm=2),
        "other": add_key(store, "other", models=("some-other-model",)),
        "expired": add_key(store, "expired", expires=time.time() - 60),
        "doomed": add_key(store, "doomed"),
    }


@pytest.fixture(scope="module")
def file_server(
    model_path: Path, keyfile: Path, file_keys: dict, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    server = start_server(gateway_config(model_path, auth={"store": "file", "path": str(keyfile)}), keyfile.parent)
    yield server
    server.stop()


def client_for(server: Server, secret: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=secret, max_retries=0, timeout=120)


def test_missing_and_wrong_keys_are_401(file_server: Server, file_keys: dict) -> None:
    r = httpx.get(file_server.base_url + "/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert r.json()["error"]["type"] == "invalid_request_error" and r.headers["x-request-id"]
    good = file_keys["all"][0]
    almost = good[:-1] + ("A" if good[-1] != "A" else "B")
    for secret in ("sk-turnout-" + "x" * 43, almost, file_keys["expired"][0]):
        with pytest.raises(openai.AuthenticationError) as info:
            client_for(file_server, secret).chat.completions.create(model=MODEL, messages=HI, max_tokens=1)
        assert info.value.status_code == 401 and info.value.code == "invalid_api_key"
    assert "expired" in chat(file_server, file_keys["expired"][0]).json()["error"]["message"]
    # Health and metrics are not under /v1: no key needed.
    assert httpx.get(file_server.url + "/healthz").status_code == 200


def test_a_key_works_through_the_official_client_and_the_api_key_header(file_server: Server, file_keys: dict) -> None:
    secret = file_keys["all"][0]
    r = client_for(file_server, secret).chat.completions.with_raw_response.create(model=MODEL, messages=HI, max_tokens=1)
    assert r.http_response.status_code == 200 and r.parse().choices[0].finish_reason in ("stop", "length")
    for header in LIMIT_HEADERS:
        assert header in r.headers, header
    assert r.headers["x-ratelimit-limit-requests"] == "1000" and r.headers["x-ratelimit-limit-tokens"] == "100000"
    azure = httpx.get(file_server.base_url + "/models", headers={"api-key": secret})
    assert azure.status_code == 200 and [m["id"] for m in azure.json()["data"]] == [MODEL]


def test_models_are_filtered_and_other_models_are_403(file_server: Server, file_keys: dict) -> None:
    other = client_for(file_server, file_keys["other"][0])
    assert [m.id for m in other.models.list()] == []
    with pytest.raises(openai.NotFoundError):
        other.models.retrieve(MODEL)
    with pytest.raises(openai.PermissionDeniedError) as info:
        other.chat.completions.create(model=MODEL, messages=HI, max_tokens=1)
    assert info.value.status_code == 403 and info.value.code == "model_not_allowed"
    smol = client_for(file_server, file_keys["smol"][0])
    assert [m.id for m in smol.models.list()] == [MODEL]
    assert smol.models.retrieve(MODEL).id == MODEL


def test_in_process_limit_gives_429_with_retry_after(file_server: Server, file_keys: dict) -> None:
    secret = file_keys["smol"][0]  # 2 requests per minute
    statuses = [chat(file_server, secret) for _ in range(3)]
    assert [r.status_code for r in statuses[:2]] == [200, 200]
    assert_429(statuses[2], "requests")
    assert 1 <= int(statuses[2].headers["retry-after"]) <= 30  # one request back every 30 s
    with pytest.raises(openai.RateLimitError) as info:
        client_for(file_server, secret).chat.completions.create(model=MODEL, messages=HI, max_tokens=1)
    assert info.value.code == "rate_limit_exceeded"


def test_revoking_with_the_cli_holds_at_the_next_request(file_server: Server, file_keys: dict, keyfile: Path) -> None:
    secret, record = file_keys["doomed"]
    assert httpx.get(file_server.base_url + "/models", headers={"Authorization": f"Bearer {secret}"}).status_code == 200
    config = keyfile.parent / "cli.yaml"
    config.write_text(yaml.safe_dump({"auth": {"store": "file", "path": str(keyfile)}, "backends": [{"name": "x", "kind": "llamacpp", "model": "m"}]}))
    done = keys_cli(config, "revoke", record.id)
    assert done.returncode == 0, done.stderr
    r = httpx.get(file_server.base_url + "/models", headers={"Authorization": f"Bearer {secret}"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    listing = keys_cli(config, "list", "--json")
    rows = {row["id"]: row for row in json.loads(listing.stdout)}
    assert rows[record.id]["revoked"] is True
    assert all(s not in listing.stdout for s, _ in file_keys.values())  # secrets never listed
    assert "hash" not in rows[record.id]
    # The file holds hashes only.
    text = keyfile.read_text()
    assert all(s not in text and s.removeprefix("sk-turnout-") not in text for s, _ in file_keys.values())


def test_cli_creates_a_key_that_works(file_server: Server, keyfile: Path) -> None:
    config = keyfile.parent / "cli.yaml"
    config.write_text(yaml.safe_dump({"auth": {"store": "file", "path": str(keyfile)}, "backends": [{"name": "x", "kind": "llamacpp", "model": "m"}]}))
    done = keys_cli(config, "create", "--name", "cli", "--tenant", "t1", "--models", MODEL, "--rpm", "7", "--priority", "batch", "--expires", "2999-01-01")
    assert done.returncode == 0, done.stderr
    secret = done.stdout.strip()
    assert secret.startswith("sk-turnout-") and len(secret) >= len("sk-turnout-") + 43
    r = httpx.get(file_server.base_url + "/models", headers={"Authorization": f"Bearer {secret}"})
    assert r.status_code == 200 and r.headers["x-ratelimit-limit-requests"] == "7"


def test_non_loopback_bind_without_keys_refuses_to_start(tmp_path: Path) -> None:
    config = tmp_path / "open.yaml"
    config.write_text(yaml.safe_dump({"auth": "none", "backends": [{"name": "x", "kind": "llamacpp", "model": "m.gguf"}]}))
    # 192.0.2.1 (TEST-NET-1) is never a local address: even a gateway that failed to refuse
    # could not bind it.
    done = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config), "--host", "192.0.2.1", "--port", str(free_port())],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2
    assert "refusing to serve on 192.0.2.1 with `auth: none`" in done.stderr and "turnout keys create" in done.stderr


# -- two gateways sharing one Redis (keys and limits in Redis) ------------------------------------


@pytest.fixture(scope="module")
def shared_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(port=free_port(), log=tmp_path_factory.mktemp("redis") / "redis.log")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def pair_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pair")


@pytest.fixture(scope="module")
def pair(model_path: Path, shared_redis: RedisServer, pair_dir: Path) -> Iterator[list[Server]]:
    config = gateway_config(
        model_path,
        auth={"store": "redis"},
        redis={"url": shared_redis.url, "timeout_ms": 500},  # generous: the test machine is shared
        limits={"tenants": {"team-t": {"rpm": 3}}},
    )
    servers = start_many([config, config], pair_dir)
    yield servers
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def redis_keys(shared_redis: RedisServer) -> RedisKeyStore:
    return RedisKeyStore(shared_redis.url)


def test_two_gateways_enforce_one_key_limit_together(pair: list[Server], redis_keys: RedisKeyStore) -> None:
    secret, _ = add_key(redis_keys, "shared", rpm=5)  # 5 per minute: no refill during the test
    responses = asyncio.run(concurrent_chats([(pair[i % 2], secret) for i in range(12)]))
    statuses = [r.status_code for r in responses]
    assert statuses.count(200) == 5 and statuses.count(429) == 7, statuses
    for r in responses:
        if r.status_code == 429:
            assert_429(r, "requests")
        assert r.headers["x-ratelimit-limit-requests"] == "5"


def test_tenant_limit_spans_keys_and_gateways(pair: list[Server], redis_keys: RedisKeyStore) -> None:
    a, _ = add_key(redis_keys, "a", tenant="team-t", rpm=100)
    b, _ = add_key(redis_keys, "b", tenant="team-t", rpm=100)
    targets = [(pair[0], a), (pair[1], b), (pair[1], a), (pair[0], b)] * 2
    responses = asyncio.run(concurrent_chats(targets))
    statuses = [r.status_code for r in responses]
    assert statuses.count(200) == 3 and statuses.count(429) == 5, statuses  # the tenant's 3, not 2 x 100
    limited = next(r for r in responses if r.status_code == 429)
    assert "tenant limit 3" in limited.json()["error"]["message"]
    assert limited.headers["x-ratelimit-limit-requests"] == "3"  # the tighter bucket is reported


def test_revocation_through_one_gateway_is_seen_by_the_other(
    pair: list[Server], redis_keys: RedisKeyStore, pair_dir: Path
) -> None:
    secret, record = add_key(redis_keys, "revoke-me")
    auth = {"Authorization": f"Bearer {secret}"}
    for server in pair:  # both gateways have seen (and cached) the key
        assert httpx.get(server.base_url + "/models", headers=auth).status_code == 200
    done = keys_cli(config_path_of(pair[0], pair_dir), "revoke", record.id)
    assert done.returncode == 0, done.stderr
    for server in pair:
        r = chat(server, secret)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", r.text
        assert httpx.get(server.base_url + "/models", headers=auth).status_code == 401


def test_tokens_are_reserved_then_reconciled_with_usage(pair: list[Server], redis_keys: RedisKeyStore) -> None:
    secret, _ = add_key(redis_keys, "tokens", tpm=600)  # 10 tokens/s
    auth = {"Authorization": f"Bearer {secret}", "content-type": "application/json"}
    # Padding in `user` inflates the up-front estimate (body bytes / 4), not the real prompt.
    body = json.dumps({"model": MODEL, "messages": HI, "max_tokens": 2, "user": "u" * 1200}).encode()
    reservation = math.ceil(len(body) / 4) + 2
    url = pair[0].base_url + "/chat/completions"
    started = time.monotonic()
    first = httpx.post(url, content=body, headers=auth, timeout=120)
    assert first.status_code == 200, first.text
    assert int(first.headers["x-ratelimit-remaining-tokens"]) == 600 - reservation
    used = first.json()["usage"]["total_tokens"]
    assert used < reservation - 200
    time.sleep(0.3)  # reconciliation runs just after the response
    # Streamed, through the other gateway, without asking for usage.
    stream_body = json.dumps({"model": MODEL, "messages": HI, "max_tokens": 2, "user": "u" * 1200, "stream": True}).encode()
    reservation2 = math.ceil(len(stream_body) / 4) + 2
    with httpx.stream("POST", pair[1].base_url + "/chat/completions", content=stream_body, headers=auth, timeout=120) as second:
        assert second.status_code == 200
        elapsed = time.monotonic() - started
        remaining = int(second.headers["x-ratelimit-remaining-tokens"])
        events = [line for line in second.iter_lines() if line.startswith("data: ")]
    assert elapsed < 25, "too slow to tell reconciliation from refill"
    # Reconciled: the first request cost `used`, not its reservation (refill only adds) ...
    assert 600 - used - reservation2 - 1 <= remaining <= 600 - reservation2
    # ... where without reconciliation it would be at most:
    assert remaining > 600 - reservation - reservation2 + 10 * elapsed
    chunks = [json.loads(e.removeprefix("data: ")) for e in events if e != "data: [DONE]"]
    assert events[-1] == "data: [DONE]" and chunks and all(c.get("usage") is None and c["choices"] for c in chunks)
    time.sleep(0.3)
    third = httpx.get(pair[0].base_url + "/models", headers=auth)
    elapsed = time.monotonic() - started
    level = int(third.headers["x-ratelimit-remaining-tokens"])
    # The stream was settled too, from its hidden usage chunk (same prompt, <= 2 tokens out).
    assert level >= 600 - 2 * used - 2
    assert level > 600 - used - reservation2 + 10 * elapsed


# -- Redis down: fail open, fail closed, recovery -----------------------------------------------


@pytest.fixture(scope="module")
def flaky_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(port=free_port(), log=tmp_path_factory.mktemp("flaky") / "redis.log")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def fail_pair(model_path: Path, flaky_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Server, str]]:
    """Keys in a file (they survive Redis); limits in Redis. [0] fails open, [1] closed."""
    tmp = tmp_path_factory.mktemp("failpair")
    secret, _ = add_key(FileKeyStore(tmp / "keys.json"), "k", rpm=30)  # 1 back every 2 s
    configs = [
        gateway_config(
            model_path,
            auth={"store": "file", "path": str(tmp / "keys.json")},
            redis={"url": flaky_redis.url, "timeout_ms": 100, "fail_mode": mode},
            limits={"burst_seconds": 4},  # at most 2 at once
        )
        for mode in ("open", "closed")
    ]
    open_gw, closed_gw = start_many(configs, tmp)
    yield open_gw, closed_gw, secret
    open_gw.stop()
    closed_gw.stop()


def admitted(server: Server, secret: str) -> httpx.Response:
    """A request the limiter counts but nothing generates (an unknown model: 404 after the
    limiter), so its timing is the gateway's, not the model's."""
    return chat(server, secret, model="no-such-model")


def test_refill_on_schedule_across_gateways(fail_pair: tuple[Server, Server, str]) -> None:
    open_gw, closed_gw, secret = fail_pair
    assert [admitted(s, secret).status_code for s in (open_gw, closed_gw)] == [404, 404]
    refused = admitted(open_gw, secret)
    assert_429(refused, "requests")
    wait_ms = int(refused.headers["retry-after-ms"])
    assert 0 < wait_ms <= 2000
    time.sleep(wait_ms / 1000 + 0.1)
    assert admitted(closed_gw, secret).status_code == 404  # one came back, on schedule
    assert admitted(open_gw, secret).status_code == 429  # and only one
    time.sleep(4.1)  # a full bucket: 2 at once again
    assert [admitted(s, secret).status_code for s in (open_gw, closed_gw, open_gw)] == [404, 404, 429]


def metric(server: Server, name: str) -> float:
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def test_redis_down_fails_open_or_closed_then_recovers(
    fail_pair: tuple[Server, Server, str], flaky_redis: RedisServer
) -> None:
    open_gw, closed_gw, secret = fail_pair
    time.sleep(4.1)  # start from a full bucket
    flaky_redis.stop()
    try:
        # Open: served, unlimited (three times the burst), without rate-limit headers.
        for _ in range(6):
            r = admitted(open_gw, secret)
            assert r.status_code == 404 and "x-ratelimit-remaining-requests" not in r.headers
        assert chat(open_gw, secret).status_code == 200
        # Closed: 503 with Retry-After.
        r = admitted(closed_gw, secret)
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1, r.text
        assert r.json()["error"]["type"] == "server_error"
        assert metric(open_gw, "turnout_ratelimit_fail_open_total") >= 7
        assert metric(closed_gw, "turnout_ratelimit_fail_closed_total") >= 1
        assert metric(closed_gw, "turnout_ratelimit_store_errors_total") >= 1
    finally:
        flaky_redis.start()
    # Recovery, without restarting the gateways (bounded wait).
    deadline = time.monotonic() + 15
    while (r := admitted(closed_gw, secret)).status_code == 503 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert r.status_code == 404 and r.headers["x-ratelimit-limit-requests"] == "30"
    time.sleep(0.6)  # past the open gateway's backoff from its last failed call
    assert admitted(open_gw, secret).status_code == 404
    assert_429(admitted(open_gw, secret), "requests")  # limits hold again, shared


def test_slow_redis_counts_as_down(fail_pair: tuple[Server, Server, str], flaky_redis: RedisServer) -> None:
    open_gw, closed_gw, secret = fail_pair

    def stall() -> None:  # Redis answers nothing for 2 s
        with socket.create_connection(("127.0.0.1", flaky_redis.port), timeout=10) as s:
            s.sendall(b"DEBUG SLEEP 2\r\n")
            s.recv(16)

    time.sleep(4.1)
    sleeper = threading.Thread(target=stall)
    sleeper.start()
    time.sleep(0.2)
    try:
        t = time.monotonic()
        assert admitted(open_gw, secret).status_code == 404
        assert admitted(closed_gw, secret).status_code == 503
        assert time.monotonic() - t < 1.5  # 100 ms timeouts, not the 2 s stall
    finally:
        sleeper.join(timeout=10)
