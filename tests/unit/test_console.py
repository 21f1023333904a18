"""The console's JSON views and access rules (gateway/console/), in-process: the app over
httpx's ASGI transport, no server, no backend started. The browser tests are
tests/integration/test_console.py."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from fastapi import FastAPI

from gateway.app import create_app
from gateway.console.sample_counts import SampleCounts
from gateway.console.state import backend_status
from gateway.keys import hash_secret
from gateway.runtime import policy_digest
from policies.schema import Config
from tests.conftest import REPO

ADMIN_ENV = "TURNOUT_UNIT_CONSOLE_ADMIN_KEY"
ADMIN_KEY = "unit-console-admin-0123456789"
AB_LOG = Path(__file__).parent / "data" / "ab_samples.jsonl"  # experiment runner-vs-paged: control, paged
STATIC = REPO / "gateway" / "console" / "static"


def policy(tmp_path: Path, *, admin: bool = True, auth: bool = True, strategy: str = "least_load") -> dict[str, Any]:
    """A remote backend and a local one (never started here), a route with a fallback, an
    experiment over the route's alias, keys in a file."""
    server: dict[str, Any] = {"sample_log": str(tmp_path / "samples.jsonl")}
    if admin:
        server["admin_key_env"] = ADMIN_ENV
    return {
        "server": server,
        "auth": {"store": "file", "path": str(tmp_path / "keys.json")} if auth else "none",
        "limits": {"key": {"rpm": 60, "tpm": 1000}, "tenant": {"rpm": 600}},
        "backends": [
            {"name": "up", "kind": "remote", "model": "m", "url": "http://127.0.0.1:9/v1", "metrics_url": "none"},
            {"name": "local", "kind": "llamacpp", "model": str(tmp_path / "absent.gguf"), "served_name": "loc"},
        ],
        "routes": [{"model": "m", "backends": ["up"], "strategy": strategy, "fallbacks": ["loc"]}],
        "experiments": [
            {
                "name": "runner-vs-paged",
                "model": "m",
                "variants": [{"name": "control", "backends": ["up"]}, {"name": "paged", "backends": ["local"]}],
            }
        ],
    }


@pytest.fixture
def make_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., FastAPI]:
    monkeypatch.setenv(ADMIN_ENV, ADMIN_KEY)
    monkeypatch.setenv("TURNOUT_HOME", str(tmp_path))

    def make(**options: Any) -> FastAPI:
        return create_app(Config.model_validate(policy(tmp_path, **options)))

    return make


def client(app: FastAPI, peer: str = "127.0.0.1", key: str | None = ADMIN_KEY) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=(peer, 40000)), base_url="http://test", headers=headers)


@pytest.fixture
def app(make_app: Callable[..., FastAPI]) -> FastAPI:
    return make_app()


@pytest.fixture
async def admin(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """A client with the admin key, on loopback."""
    async with client(app) as c:
        yield c


# -- the page -------------------------------------------------------------------------------------


async def test_the_page_and_its_two_assets_are_served_and_nothing_else(admin: httpx.AsyncClient) -> None:
    page = await admin.get("/console")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "connect-src 'self'" in csp and "frame-ancestors 'none'" in csp
    for name, media in (("console.js", "text/javascript"), ("console.css", "text/css")):
        asset = await admin.get(f"/console/{name}")
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(media)
        assert asset.content == (STATIC / name).read_bytes()
    for other in ("/console/index.html", "/console/..%2F__init__.py", "/console/keys.json"):
        refused = await admin.get(other)
        assert refused.status_code == 404 and "error" in refused.json()


def test_the_page_loads_nothing_from_elsewhere() -> None:
    """No CDN, no build: every URL in the static files is this gateway's (the one SVG
    namespace aside), and the HTML has no inline script for the CSP to refuse."""
    for path in STATIC.iterdir():
        text = path.read_text()
        urls = set(re.findall(r"[a-z]+://[^\s\"'`)]+", text)) - {"http://www.w3.org/2000/svg"}
        assert not urls, (path.name, urls)
    html = (STATIC / "index.html").read_text()
    assert re.findall(r"<script[^>]*>", html) == ['<script src="/console/console.js" defer>']
    assert re.findall(r'(?:href|src)="([^"]+)"', html) == ["/console/console.css", "/console/console.js"]
    assert "style=" not in html and "onclick=" not in html  # inline styles and handlers: refused by the CSP


# -- access -----------------------------------------------------------------------------------------

READS = ("/admin/console/session", "/admin/console/overview", "/admin/console/keys")


async def test_with_an_admin_key_every_call_needs_it(make_app: Callable[..., FastAPI]) -> None:
    app = make_app()
    for key in (None, "wrong-key"):
        async with client(app, peer="203.0.113.9", key=key) as c:
            assert (await c.get("/console")).status_code == 200  # the login form
            for path in READS:
                r = await c.get(path)
                assert r.status_code == 401 and r.json()["error"]["message"] == "Invalid admin key.", path
            assert (await c.post("/admin/console/keys", json={"name": "x"})).status_code == 401
            assert (await c.post("/admin/console/keys/any/revoke")).status_code == 401
            assert (await c.get("/admin/console/experiments/runner-vs-paged/report")).status_code == 401
    async with client(app, peer="203.0.113.9") as c:  # the right key works from anywhere
        for path in READS:
            assert (await c.get(path)).status_code == 200, path
        assert (await c.get("/admin/console/session")).json() == {"access": "admin", "admin_key_configured": True}


async def test_without_an_admin_key_the_console_reads_on_loopback_only_and_never_writes(make_app: Callable[..., FastAPI]) -> None:
    app = make_app(admin=False)
    async with client(app, key=None) as c:
        for path in READS:
            assert (await c.get(path)).status_code == 200, path
        assert (await c.get("/admin/console/session")).json() == {"access": "read_only", "admin_key_configured": False}
        for write in ("/admin/console/keys", "/admin/console/keys/any/revoke"):
            r = await c.post(write, json={"name": "x"})
            assert r.status_code == 403 and "server.admin_key_env" in r.json()["error"]["message"]
        assert app.state.runtime.snapshot.authenticator.store.list() == []
        forwarded = await c.get("/admin/console/overview", headers={"X-Forwarded-For": "203.0.113.9"})
        assert forwarded.status_code == 403  # a proxy on loopback fronts remote callers
        assert (await c.get("/console")).status_code == 200
    async with client(app, peer="203.0.113.9", key=None) as c:
        for path in ("/console", "/admin/console/overview"):  # the console is off
            r = await c.get(path)
            assert r.status_code == 403 and "The admin API is off" in r.json()["error"]["message"], path


# -- the views ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("healthy", "circuit", "worker", "status"),
    [
        (True, "closed", None, "up"), (True, "closed", "ready", "up"), (True, "closed", "unloaded", "idle"),
        (True, "closed", "loading", "loading"), (True, "closed", "restarting", "down"), (True, "closed", "failed", "down"),
        (False, "closed", None, "down"), (True, "open", "ready", "down"), (True, "half_open", None, "probing"),
    ],
)  # fmt: skip
def test_backend_status_word(healthy: bool, circuit: str, worker: str | None, status: str) -> None:
    assert backend_status(healthy, circuit, worker) == status


async def test_overview_shows_backends_routes_policy_and_experiments(app: FastAPI, admin: httpx.AsyncClient) -> None:
    runtime = app.state.runtime
    data = (await admin.get("/admin/console/overview")).json()
    backends = {b["name"]: b for b in data["backends"]}
    assert backends["up"]["kind"] == "remote" and backends["up"]["status"] == "up" and backends["up"]["worker"] is None
    assert backends["up"]["fresh"] is False  # no report from the upstream yet
    local = backends["local"]
    assert local["status"] == "idle" and local["worker"]["state"] == "unloaded" and local["worker"]["restarts"] == 0

    board = runtime.snapshot.dispatcher.board
    for _ in range(runtime.snapshot.config.circuit.failures):
        board.breaker("up").record_failure(runtime.snapshot.dispatcher.clock())
    ejected = {b["name"]: b for b in (await admin.get("/admin/console/overview")).json()["backends"]}["up"]
    assert ejected["status"] == "down" and ejected["circuit"] == "open"

    routes = {r["model"]: r for r in data["routes"]}
    assert routes["m"] == {
        "model": "m", "explicit": True, "backends": ["up"], "strategy": "least_load", "strategy_params": {},
        "fallbacks": ["loc"], "max_retries": 2, "max_tokens": None, "admission": None, "experiment": "runner-vs-paged",
    }  # fmt: skip
    assert routes["loc"]["explicit"] is False and routes["loc"]["backends"] == ["local"]

    pol = data["policy"]
    assert pol["version"] == policy_digest(runtime.snapshot.config) and pol["generation"] == 1
    assert pol["last_reload"] is None and pol["path"] is None and pol["auth"] == "file"

    (experiment,) = data["experiments"]
    assert experiment["name"] == "runner-vs-paged" and experiment["samples"] == 0
    assert [(v["name"], v["samples"]) for v in experiment["variants"]] == [("control", 0), ("paged", 0)]


async def test_reloads_are_recorded_applied_or_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ADMIN_ENV, ADMIN_KEY)
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(policy(tmp_path)))
    app = create_app(Config.model_validate(policy(tmp_path)), config_path=path)
    runtime = app.state.runtime
    async with client(app) as c:
        first = (await c.get("/admin/console/overview")).json()["policy"]
        assert first["path"] == str(path) and first["watch_config"] is True

        path.write_text(yaml.safe_dump(policy(tmp_path, strategy="fastest_please")))
        assert (await runtime.reload("unit test"))[0] is False
        rejected = (await c.get("/admin/console/overview")).json()["policy"]
        assert rejected["version"] == first["version"] and rejected["generation"] == 1  # the old policy serves on
        last = rejected["last_reload"]
        assert last["applied"] is False and last["reason"] == "unit test" and "fastest_please" in last["message"]

        path.write_text(yaml.safe_dump(policy(tmp_path, strategy="round_robin")))
        assert (await runtime.reload("unit test"))[0] is True
        applied = (await c.get("/admin/console/overview")).json()
        assert applied["policy"]["generation"] == 2 and applied["policy"]["version"] != first["version"]
        assert applied["policy"]["last_reload"]["applied"] is True and applied["policy"]["applied_at"] >= last["at"]
        assert {r["model"]: r["strategy"] for r in applied["routes"]}["m"] == "round_robin"
    await runtime.stop_background()


# -- keys -------------------------------------------------------------------------------------------------


async def test_create_shows_the_secret_once_and_revoke_refuses_the_key(app: FastAPI, admin: httpx.AsyncClient) -> None:
    created = await admin.post("/admin/console/keys", json={"name": "web", "tenant": "shop", "models": ["m"], "rpm": 2, "expires": "2099-12-31"})
    assert created.status_code == 201 and created.headers["cache-control"] == "no-store"
    secret, key = created.json()["secret"], created.json()["key"]
    assert secret.startswith("sk-turnout-") and key["hint"].endswith(secret[-4:])
    assert (key["name"], key["tenant"], key["models"], key["rpm"], key["tpm"], key["status"]) == ("web", "shop", ["m"], 2, 1000, "active")
    store = app.state.runtime.snapshot.authenticator.store
    assert store.lookup(hash_secret(secret)).id == key["id"]  # the gateway's own store: `turnout keys` sees it
    assert secret not in store.path.read_text()

    listed = await admin.get("/admin/console/keys")
    assert secret not in listed.text and hash_secret(secret) not in listed.text
    (row,) = listed.json()["keys"]
    assert row["id"] == key["id"] and "hash" not in row and "secret" not in row

    async with client(app, key=secret) as app_client:
        assert (await app_client.get("/v1/models")).status_code == 200
        revoked = await admin.post(f"/admin/console/keys/{key['id']}/revoke")
        assert revoked.status_code == 200 and revoked.json()["key"]["status"] == "revoked"
        refused = await app_client.get("/v1/models")
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    row = (await admin.get("/admin/console/keys")).json()["keys"][0]
    assert row["status"] == "revoked" and row["usage"] is None

    missing = await admin.post("/admin/console/keys/key_nope/revoke")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "key_not_found"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"name": "x", "rpm": 0}, "rpm"),
        ({"name": ""}, "name"),
        ({"name": "x", "colour": "red"}, "colour"),
        ({"name": "x", "priority": "urgent"}, "priority"),
        ({"name": "x", "expires": "someday"}, "expires"),
        ({"name": "x", "expires": "2001-01-01"}, "expires"),
    ],
)
async def test_create_refuses_a_bad_request_naming_the_field(admin: httpx.AsyncClient, body: dict[str, Any], param: str) -> None:
    r = await admin.post("/admin/console/keys", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.json()
    assert (await admin.get("/admin/console/keys")).json()["keys"] == []


async def test_create_refuses_a_body_that_is_not_json(admin: httpx.AsyncClient) -> None:
    r = await admin.post("/admin/console/keys", content=b"name=x")
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


async def test_usage_is_read_from_the_limiter_without_taking(app: FastAPI, admin: httpx.AsyncClient) -> None:
    created = (await admin.post("/admin/console/keys", json={"name": "slow", "tenant": "shop", "rpm": 2})).json()
    runtime = app.state.runtime

    def requests_left(data: dict[str, Any]) -> tuple[int, int]:
        (bucket,) = [b for b in data["keys"][0]["usage"] if b["kind"] == "requests"]
        return bucket["remaining"], bucket["capacity"]

    assert requests_left((await admin.get("/admin/console/keys")).json()) == (2, 2)
    assert requests_left((await admin.get("/admin/console/keys")).json()) == (2, 2)  # reading took nothing
    record = runtime.snapshot.authenticator.store.list()[0]
    buckets = runtime.snapshot.authenticator.principal(record).buckets
    await runtime.snapshot.limiter.acquire(buckets, 100, 50, None)  # one request, as the request path takes it
    data = (await admin.get("/admin/console/keys")).json()
    assert requests_left(data) == (1, 2)
    tokens = [b for b in data["keys"][0]["usage"] if b["kind"] == "tokens"]
    assert tokens[0]["limit"] == 1000 and tokens[0]["remaining"] == 900  # limits.key's tpm: the default applies
    (tenant,) = data["tenants"]
    assert tenant["tenant"] == "shop" and tenant["keys"] == 1
    assert [(b["kind"], b["limit"], b["remaining"]) for b in tenant["usage"]] == [("requests", 600, 599)]
    assert created["key"]["limits_from_policy"] is True  # its tpm is limits.key's


async def test_without_keys_there_is_nothing_to_manage(make_app: Callable[..., FastAPI]) -> None:
    async with client(make_app(auth=False)) as c:
        r = await c.post("/admin/console/keys", json={"name": "x"})
        assert r.status_code == 409 and "auth: none" in r.json()["error"]["message"]
        assert (await c.post("/admin/console/keys/x/revoke")).status_code == 409
        listed = (await c.get("/admin/console/keys")).json()
        assert listed["store"] is None and listed["keys"] == []
        anonymous = [(b["scope"], b["kind"], b["limit"]) for b in listed["anonymous"]]
        assert anonymous == [("key", "requests", 60), ("key", "tokens", 1000), ("tenant", "requests", 600)]


# -- experiments ------------------------------------------------------------------------------------------


def test_sample_counts_read_only_what_was_appended(tmp_path: Path) -> None:
    log = tmp_path / "samples.jsonl"
    counts = SampleCounts()
    assert counts.read(log) == {}  # no log yet

    def line(variant: str, status: int = 200) -> str:
        return json.dumps({"experiment": "e", "variant": variant, "status": status, "e2e_s": 1}) + "\n"

    log.write_text(line("a") + line("b", 502) + "not json\n" + line("a")[:20])  # a last line still being written
    got = counts.read(log)
    assert (got[("e", "a")].samples, got[("e", "b")].samples, got[("e", "b")].errors) == (1, 1, 1) and counts.malformed == 1
    with log.open("a") as f:
        f.write(line("a")[20:] + line("a", 0))
    got = counts.read(log)
    assert (got[("e", "a")].samples, got[("e", "a")].errors) == (3, 1)
    log.write_text(line("b"))  # rewritten smaller: counted again from the start
    assert {k: v.samples for k, v in counts.read(log).items()} == {("e", "b"): 1}
    replacement = tmp_path / "new.jsonl"
    replacement.write_text(line("a") + line("a") + line("a"))
    replacement.replace(log)  # another file at the same path
    assert {k: v.samples for k, v in counts.read(log).items()} == {("e", "a"): 3}


async def test_experiment_counts_and_report_come_from_the_sample_log(admin: httpx.AsyncClient, tmp_path: Path) -> None:
    shutil.copy(AB_LOG, tmp_path / "samples.jsonl")
    expected: dict[str, int] = {}
    for text in AB_LOG.read_text().splitlines():
        try:
            obj = json.loads(text)
        except ValueError:
            continue
        if obj.get("experiment") == "runner-vs-paged":
            expected[obj["variant"]] = expected.get(obj["variant"], 0) + 1
    (experiment,) = (await admin.get("/admin/console/overview")).json()["experiments"]
    assert {v["name"]: v["samples"] for v in experiment["variants"]} == expected

    r = await admin.get("/admin/console/experiments/runner-vs-paged/report")
    assert r.status_code == 200
    report = r.json()
    assert {v["name"]: v["n"] for v in report["variants"]} == expected
    baseline = max(expected, key=lambda name: expected[name])
    (comparison,) = report["comparisons"]
    assert report["baseline"] == comparison["baseline"] == baseline
    assert set(comparison["median_diff"]) == {"ttft_s", "tpot_s", "e2e_s"}
    for v in report["variants"]:
        p50 = v["metrics"]["ttft_s"]["p50"]
        assert p50["low"] <= p50["value"] <= p50["high"]
    assert report["decision"][0].startswith("decision") and f"against baseline '{baseline}'" in report["text"]

    other = next(name for name in expected if name != baseline)
    rebased = (await admin.get(f"/admin/console/experiments/runner-vs-paged/report?baseline={other}")).json()
    assert rebased["baseline"] == other
    assert (await admin.get("/admin/console/experiments/runner-vs-paged/report?baseline=nobody")).status_code == 400

    png = await admin.get("/admin/console/experiments/runner-vs-paged/plot.png")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png" and png.content.startswith(b"\x89PNG")


async def test_report_of_an_unknown_or_empty_experiment_says_why(admin: httpx.AsyncClient) -> None:
    unknown = await admin.get("/admin/console/experiments/nope/report")
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "experiment_not_found"
    empty = await admin.get("/admin/console/experiments/runner-vs-paged/report")
    assert empty.status_code == 404 and empty.json()["error"]["code"] == "no_samples"


# The A/B report is the tools' room: the console loads it when a report is asked for, not before.
LAZY = """
import sys
from fastapi.testclient import TestClient
from gateway.app import create_app
from policies.schema import Config
config = Config.model_validate(json.loads(sys.argv[1]))
c = TestClient(create_app(config), client=("127.0.0.1", 40000))
assert c.get("/admin/console/overview").status_code == 200
assert not [m for m in sys.modules if m.startswith("gateway.ab")]
assert c.get("/admin/console/experiments/runner-vs-paged/report").status_code == 200
assert "gateway.ab.report" in sys.modules
"""


def test_the_report_is_imported_only_when_asked_for(tmp_path: Path) -> None:
    shutil.copy(AB_LOG, tmp_path / "samples.jsonl")
    config = json.dumps(policy(tmp_path, admin=False))
    out = subprocess.run([sys.executable, "-c", "import json\n" + LAZY, config], check=False, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
