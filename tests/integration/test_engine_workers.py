"""Engine workers under a live gateway: a llama.cpp worker killed mid-stream or mid-answer
(SIGKILL, and SIGILL as a native fault would) ends its requests with clean errors, the gateway
and its other backend keep serving, the worker comes back, and nothing leaks. Models load on
demand, unload after keep_alive (`turnout ps` shows it), and a model that cannot load says so."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import REPO, Server, start_server

pytestmark = pytest.mark.slow

HELLO = [{"role": "user", "content": "Tell me a long story about the sea."}]
LONG = {"max_tokens": 200, "ignore_eos": True, "temperature": 0}


@pytest.fixture(scope="module")
def gateway(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    local = {"kind": "llamacpp", "model": str(model_path), "options": {"n_ctx": 512, "n_threads": 1}}
    config = {
        "server": {"host": "127.0.0.1"},
        "backends": [
            {"name": "local", "served_name": "smollm2-135m", **local},
            {"name": "spare", "served_name": "smollm2-spare", **local},
        ],
        "routes": [{"model": "smollm2-ha", "backends": ["local"], "fallbacks": ["smollm2-spare"]}],
    }
    server = start_server(config, tmp_path_factory.mktemp("workers"))
    yield server
    server.stop()


def ps(server: Server) -> dict[str, dict]:
    rows = httpx.get(server.url + "/admin/ps", timeout=10).json()["models"]
    return {row["name"]: row for row in rows}


def chat(server: Server, model: str, **fields: object) -> httpx.Response:
    body = {"model": model, "messages": HELLO, "max_tokens": 8, "temperature": 0, **fields}
    return httpx.post(server.base_url + "/chat/completions", json=body, timeout=120)


def healthy(server: Server, backend: str) -> float:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "turnout:backend_healthy" and s.labels.get("backend") == backend:
                return s.value
    raise AssertionError("no turnout:backend_healthy sample")


def wait_until(condition, timeout_s: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


def loaded_pid(server: Server, name: str) -> int:
    """Load the backend's model (one request) and return its worker's pid."""
    model = "smollm2-135m" if name == "local" else "smollm2-spare"
    assert chat(server, model).status_code == 200
    row = ps(server)[name]
    assert row["state"] == "ready" and row["pid"] not in (None, server.process.pid)
    return row["pid"]


def back_after_restart(server: Server, name: str) -> None:
    """The backoff passes, and the backend answers again (a restart whose load failed is
    retried by that request)."""
    wait_until(lambda: ps(server)[name]["state"] != "restarting")
    model = "smollm2-135m" if name == "local" else "smollm2-spare"
    assert chat(server, model).status_code == 200
    assert ps(server)[name]["state"] == "ready"


def deaths_logged(server: Server) -> int:
    return server.log.read_text().count("engine worker pid")


def test_models_run_in_their_own_processes(gateway: Server) -> None:
    local, spare = loaded_pid(gateway, "local"), loaded_pid(gateway, "spare")
    assert len({local, spare, gateway.process.pid}) == 3
    for pid in (local, spare):  # children of the gateway
        assert int(Path(f"/proc/{pid}/stat").read_text().split()[3]) == gateway.process.pid


def test_sigkill_mid_stream_ends_the_stream_cleanly_and_the_worker_comes_back(gateway: Server) -> None:
    pid = loaded_pid(gateway, "local")
    logged = deaths_logged(gateway)
    events: list[str] = []
    body = {"model": "smollm2-135m", "messages": HELLO, "stream": True, **LONG}
    with httpx.stream("POST", gateway.base_url + "/chat/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line.removeprefix("data: "))
                if len(events) == 4:
                    os.kill(pid, signal.SIGKILL)
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert "'local'" in error["message"] and "SIGKILL" in error["message"] and error["code"] == "worker_died"
    # While it restarts: down in /readyz, /metrics and ps; the other backend answers.
    assert httpx.get(gateway.url + "/readyz").status_code == 503
    assert healthy(gateway, "local") == 0.0 and ps(gateway)["local"]["state"] == "restarting"
    refused = chat(gateway, "smollm2-135m")  # within the 0.5 s backoff
    assert refused.status_code == 503 and refused.headers.get("retry-after")
    assert chat(gateway, "smollm2-spare").status_code == 200
    back_after_restart(gateway, "local")
    row = ps(gateway)["local"]
    assert row["pid"] != pid and row["restarts"] >= 1 and row["last_exit"] == "SIGKILL"
    assert httpx.get(gateway.url + "/readyz").status_code == 200 and healthy(gateway, "local") == 1.0
    assert deaths_logged(gateway) == logged + 1  # once per exit, not once per request
    assert ps(gateway)["local"]["in_flight"] == 0 and ps(gateway)["spare"]["in_flight"] == 0


def test_sigill_mid_answer_is_a_502_naming_backend_and_signal(gateway: Server) -> None:
    pid = loaded_pid(gateway, "local")
    result: dict[str, httpx.Response] = {}
    thread = threading.Thread(target=lambda: result.setdefault("r", chat(gateway, "smollm2-135m", **LONG)))
    thread.start()
    wait_until(lambda: ps(gateway)["local"]["in_flight"] == 1)
    time.sleep(0.3)  # generating
    os.kill(pid, signal.SIGILL)
    thread.join(timeout=60)
    response = result["r"]
    assert response.status_code == 502
    error = response.json()["error"]
    assert "'local'" in error["message"] and "SIGILL" in error["message"]
    back_after_restart(gateway, "local")


def test_a_route_with_fallbacks_fails_over_before_the_first_byte(gateway: Server) -> None:
    pid = loaded_pid(gateway, "local")
    result: dict[str, httpx.Response] = {}
    thread = threading.Thread(target=lambda: result.setdefault("r", chat(gateway, "smollm2-ha", **LONG)))
    thread.start()
    wait_until(lambda: ps(gateway)["local"]["in_flight"] == 1)
    os.kill(pid, signal.SIGKILL)
    thread.join(timeout=120)
    response = result["r"]
    assert response.status_code == 200, response.text  # answered by the fallback
    assert response.json()["usage"]["completion_tokens"] == 200
    back_after_restart(gateway, "local")


def test_disconnect_mid_stream_frees_the_instance(gateway: Server) -> None:
    loaded_pid(gateway, "local")
    body = {"model": "smollm2-135m", "messages": HELLO, "stream": True, **LONG}
    with httpx.stream("POST", gateway.base_url + "/chat/completions", json=body, timeout=120) as response:
        for n, _ in enumerate(response.iter_lines()):
            if n == 3:
                break  # the client goes away
    wait_until(lambda: ps(gateway)["local"]["in_flight"] == 0, 10)
    assert chat(gateway, "smollm2-135m").status_code == 200  # the one instance is free again


@pytest.fixture
def fleeting(model_path: Path, tmp_path: Path) -> Iterator[Server]:
    config = {
        "server": {"host": "127.0.0.1"},
        "backends": [
            {"name": "brief", "kind": "llamacpp", "model": str(model_path), "served_name": "brief", "keep_alive": 5,
             "options": {"n_ctx": 256, "n_threads": 1}},
            {"name": "broken", "kind": "llamacpp", "model": str(tmp_path / "broken.gguf"), "served_name": "broken"},
        ],
    }  # fmt: skip
    (tmp_path / "broken.gguf").write_bytes(b"not a gguf file")
    server = start_server(config, tmp_path)
    yield server
    server.stop()


def turnout_ps(server: Server) -> str:
    out = subprocess.run([sys.executable, "-m", "gateway.cli", "ps", "--url", server.url], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_load_on_demand_unload_after_keep_alive_and_turnout_ps(fleeting: Server) -> None:
    models = httpx.get(fleeting.base_url + "/models").json()["data"]
    assert {m["id"] for m in models} == {"brief", "broken"}  # what can be served, loaded or not
    assert ps(fleeting)["brief"]["state"] == "unloaded" and ps(fleeting)["brief"]["pid"] is None
    assert chat(fleeting, "brief").status_code == 200
    row = ps(fleeting)["brief"]
    assert row["state"] == "ready" and row["pid"] and row["memory_bytes"] > 0 and row["expires_at"] > time.time()
    listing = turnout_ps(fleeting)
    assert "brief" in listing and "ready" in listing and str(row["pid"]) in listing
    wait_until(lambda: ps(fleeting)["brief"]["state"] == "unloaded", 20)
    assert "unloaded" in turnout_ps(fleeting)
    assert not Path(f"/proc/{row['pid']}").exists() or "Z" in Path(f"/proc/{row['pid']}/stat").read_text().split()[2]
    assert chat(fleeting, "brief", keep_alive="1h").status_code == 200  # a request's own keep_alive wins
    assert ps(fleeting)["brief"]["expires_at"] > time.time() + 3000


def test_a_model_that_cannot_load_answers_a_clear_error_and_is_retried_per_request(fleeting: Server) -> None:
    first = chat(fleeting, "broken")
    assert first.status_code == 502
    assert "could not load model" in first.json()["error"]["message"] and first.json()["error"]["code"] == "model_load_failed"
    time.sleep(1.0)
    row = ps(fleeting)["broken"]
    assert row["state"] == "failed" and row["pid"] is None and row["load_error"]
    attempts = fleeting.log.read_text().count("could not load model")
    assert chat(fleeting, "broken").status_code == 502
    assert fleeting.log.read_text().count("could not load model") > attempts  # tried again, once asked
    assert chat(fleeting, "brief").status_code == 200  # the rest keeps serving
