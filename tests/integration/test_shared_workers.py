"""`turnout serve --workers 2`: two HTTP processes in front of one engine host, which
supervises one engine worker per local model for both. Every process serves the model from
the same worker; a worker killed mid-stream ends the streams of both processes cleanly and
comes back; an HTTP process killed mid-stream has its requests aborted in the worker (blocks
freed); an engine host killed is started again and the model with it; keep_alive holds
across processes."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Server, start_server

pytestmark = pytest.mark.slow

PAGED = {"kind": "paged", "model": "dummy:tiny", "options": {"max_model_len": 512, "max_num_seqs": 8}}
LONG = {"max_tokens": 480, "ignore_eos": True, "temperature": 0}


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    tmp = tmp_path_factory.mktemp("shared")
    metrics_dir = tmp / "metrics"
    metrics_dir.mkdir()
    config = {
        "server": {"host": "127.0.0.1"},
        "backends": [{"name": "p", "served_name": "tiny", "keep_alive": -1, **PAGED}],
    }
    server = start_server(config, tmp, extra_args=["--workers", "2"], env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)})
    yield server, metrics_dir
    server.stop()


def processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process on this machine we can read."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        found[int(entry)] = (int(stat.rsplit(")", 1)[1].split()[1]), cmdline)
    return found


def descendants(root: int) -> dict[int, str]:
    table = processes()
    out: dict[int, str] = {}
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, cmd) in table.items():
            if ppid == parent and pid not in out:
                out[pid] = cmd
                frontier.append(pid)
    return out


def roles(server: Server) -> dict[str, list[int]]:
    """The server's processes by role."""
    found: dict[str, list[int]] = {"host": [], "worker": [], "http": []}
    for pid, cmd in descendants(server.process.pid).items():
        if "gateway.engine_host" in cmd:
            found["host"].append(pid)
        elif "backends.worker" in cmd:
            found["worker"].append(pid)
        elif "spawn_main" in cmd:  # uvicorn's HTTP processes (multiprocessing's spawn)
            found["http"].append(pid)
    return found


def wait_until(condition, timeout_s: float = 60.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


def complete(server: Server, **fields: object) -> httpx.Response:
    body = {"model": "tiny", "prompt": "hello there", "max_tokens": 4, "temperature": 0, **fields}
    return httpx.post(server.base_url + "/completions", json=body, timeout=120)


def ps(server: Server) -> dict:
    return httpx.get(server.url + "/admin/ps", timeout=10).json()["models"][0]


def engine_gauge(server: Server, name: str) -> float:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels.get("backend") == "p":
                return s.value
    raise AssertionError(f"no {name} sample")


def stream_until_error(server: Server, started: threading.Event, out: list[str]) -> None:
    """A long stream on a fresh connection; records its raw events."""
    body = {"model": "tiny", "prompt": "tell me", "stream": True, **LONG}
    with httpx.Client(timeout=120) as client, client.stream("POST", server.base_url + "/completions", json=body) as r:
        out.append(f"status {r.status_code}")
        try:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    out.append(line[6:])
                    started.set()
        except httpx.RemoteProtocolError:
            out.append("connection lost")  # its HTTP process was killed


def test_both_http_processes_share_one_engine_worker(shared: tuple[Server, Path]) -> None:
    server, metrics_dir = shared
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: complete(server), range(48)))
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers if a.status_code != 200]
    found = roles(server)
    assert len(found["http"]) == 2 and len(found["host"]) == 1
    assert len(found["worker"]) == 1, found  # one engine for the model, whatever the number of HTTP processes
    assert ps(server)["pid"] == found["worker"][0]
    # Both HTTP processes answered: each wrote request counters of its own (multiprocess files).
    writers = {f.name.rsplit("_", 1)[1].split(".")[0] for f in metrics_dir.glob("counter_*.db")}
    assert set(map(str, found["http"])) <= writers


def test_a_killed_engine_worker_ends_every_process_stream_and_returns(shared: tuple[Server, Path]) -> None:
    server, _ = shared
    complete(server)
    before = ps(server)
    events: list[list[str]] = [[] for _ in range(6)]
    started = [threading.Event() for _ in events]
    threads = [threading.Thread(target=stream_until_error, args=(server, s, e)) for s, e in zip(started, events)]
    for t in threads:
        t.start()
    assert all(s.wait(60) for s in started)
    os.kill(before["pid"], signal.SIGKILL)
    for t in threads:
        t.join(60)
        assert not t.is_alive()
    for out in events:
        assert out[0] == "status 200" and out[-1] == "[DONE]"
        error = json.loads(out[-2])["error"]
        assert "SIGKILL" in error["message"] and "'p'" in error["message"]
    after = wait_until(lambda: (row := ps(server))["state"] == "ready" and row["pid"] != before["pid"] and row, 60)
    assert after["restarts"] == before["restarts"] + 1
    assert complete(server).status_code == 200
    assert len(roles(server)["worker"]) == 1


def connections(pid: int, port: int) -> int:
    """How many established TCP connections to `port` the process `pid` holds."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port and fields[3] == "01" and fields[9] in inodes:
            count += 1
    return count


def test_a_killed_http_process_has_its_requests_aborted(shared: tuple[Server, Path]) -> None:
    server, _ = shared
    complete(server)
    http_before = roles(server)["http"]
    aborted_before = engine_gauge(server, "turnout:requests_aborted_total")
    events: list[list[str]] = [[] for _ in range(6)]
    started = [threading.Event() for _ in events]
    threads = [threading.Thread(target=stream_until_error, args=(server, s, e), daemon=True) for s, e in zip(started, events)]
    for t in threads:
        t.start()
    assert all(s.wait(60) for s in started)
    # The process holding the most of these streams dies; the worker aborts what it asked
    # for (nobody will read it), the other process's streams run to their end, and uvicorn
    # starts another HTTP process.
    held = {pid: connections(pid, server.port) for pid in http_before}
    victim = max(held, key=held.__getitem__)
    assert held[victim] >= 1
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: len(set(roles(server)["http"]) - {victim}) == 2, 60)
    for t in threads:
        t.join(60)
    assert sum(out[-1] == "connection lost" for out in events) == held[victim]
    assert sum(out[-1] == "[DONE]" for out in events) == len(events) - held[victim]
    assert wait_until(lambda: engine_gauge(server, "vllm:num_requests_running") == 0, 30)
    assert engine_gauge(server, "turnout:requests_aborted_total") - aborted_before == held[victim]
    assert engine_gauge(server, "vllm:kv_cache_usage_perc") == 0.0
    assert complete(server).status_code == 200


def test_a_killed_engine_host_is_started_again(shared: tuple[Server, Path]) -> None:
    server, _ = shared
    complete(server)
    (host,) = roles(server)["host"]
    (worker,) = roles(server)["worker"]
    os.kill(host, signal.SIGKILL)
    wait_until(lambda: not Path(f"/proc/{worker}").exists(), 30)  # the worker went with its host
    # The HTTP processes stay up; the next requests load the model in a new host's worker.
    answer = wait_until(lambda: (r := complete(server)).status_code == 200 and r, 60)
    assert answer.json()["usage"]["completion_tokens"] == 4
    found = roles(server)
    assert len(found["host"]) == 1 and found["host"][0] != host and len(found["worker"]) == 1


def test_keep_alive_holds_across_processes(shared: tuple[Server, Path]) -> None:
    server, _ = shared
    # A request's own keep_alive (as Ollama's) applies whichever HTTP process served it.
    assert complete(server, keep_alive=1).status_code == 200
    wait_until(lambda: ps(server)["state"] == "unloaded", 30)
    wait_until(lambda: roles(server)["worker"] == [], 30)  # the worker exits just after
    assert complete(server).status_code == 200  # loads again on demand
    assert ps(server)["state"] == "ready"
