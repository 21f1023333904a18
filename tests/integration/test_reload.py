"""A policy reload applies every section, or is rejected naming the one that cannot change.

A real `turnout serve` process; its one backend is a remote on a loopback port where nothing
listens (the rate-limit step, auth and the body cap all run before a backend is called)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import Server, free_port, start_server

ADMIN_KEY = "admin-secret-for-reload-tests"
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}


def base_config() -> dict:
    return {
        "server": {"host": "127.0.0.1", "admin_key_env": "TURNOUT_TEST_ADMIN_KEY", "watch_config": False},
        "backends": [{"name": "nowhere", "kind": "remote", "model": "m", "url": f"http://127.0.0.1:{free_port()}/v1",
                      "metrics_url": "none"}],
        "routes": [{"model": "m", "backends": ["nowhere"], "retries": {"max_retries": 0}}],
    }  # fmt: skip


@pytest.fixture()
def gateway(tmp_path: Path) -> Iterator[Server]:
    server = start_server(base_config(), tmp_path, env={"TURNOUT_TEST_ADMIN_KEY": ADMIN_KEY})
    yield server
    server.stop()


def reload_with(server: Server, config: dict) -> httpx.Response:
    server.config_path.write_text(yaml.safe_dump(config))
    return httpx.post(server.url + "/admin/reload", headers=ADMIN, timeout=30)


def complete(server: Server, **extra: object) -> httpx.Response:
    body = {"model": "m", "prompt": "hi", "max_tokens": 1, **extra}
    return httpx.post(server.base_url + "/completions", json=body, timeout=30)


def test_a_reload_of_limits_takes_effect(gateway: Server) -> None:
    # No limits at start: the backend's 502s come back, never a 429.
    assert [complete(gateway).status_code for _ in range(3)] == [502, 502, 502]
    config = yaml.safe_load(gateway.config_path.read_text())
    config["limits"] = {"key": {"rpm": 2}}  # `auth: none`: the anonymous caller gets the key defaults
    assert reload_with(gateway, config).status_code == 200
    answers = [complete(gateway) for _ in range(3)]
    assert [r.status_code for r in answers] == [502, 502, 429]
    assert answers[0].headers["x-ratelimit-limit-requests"] == "2"
    assert answers[2].json()["error"]["code"] == "rate_limit_exceeded"


def test_a_reload_applies_the_body_cap_and_turns_auth_on(gateway: Server, tmp_path: Path) -> None:
    config = yaml.safe_load(gateway.config_path.read_text())
    assert complete(gateway, user="x" * 3000).status_code == 502  # under the 4 MiB default
    config["server"]["max_body_bytes"] = 2048
    assert reload_with(gateway, config).status_code == 200
    too_big = complete(gateway, user="x" * 3000)
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "request_too_large"
    # The gateway started with `auth: none`; a reload that asks for keys is enforced at once.
    config["auth"] = {"store": "file", "path": str(tmp_path / "keys.json")}
    assert reload_with(gateway, config).status_code == 200
    refused = complete(gateway)
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize(("field", "value"), [("port", 9), ("header_timeout_s", 3.0), ("max_connections", 7)])
def test_a_reload_that_changes_the_socket_is_rejected_naming_it(gateway: Server, field: str, value: object) -> None:
    config = yaml.safe_load(gateway.config_path.read_text())
    config["server"][field] = value
    config["limits"] = {"key": {"rpm": 1}}  # would apply, were the policy accepted
    answer = reload_with(gateway, config)
    assert answer.status_code == 400
    assert f"server.{field}" in answer.json()["error"]["message"]
    assert [complete(gateway).status_code for _ in range(2)] == [502, 502]  # the old policy serves
