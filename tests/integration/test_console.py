"""The operator console (`/console`, gateway/console/) in a real browser: headless Chromium
(Debian's, /usr/bin/chromium) driven by Playwright, against a real `turnout serve` with an
admin key, a file key store and two llama.cpp backends on SmolLM2.

With TURNOUT_SCREENSHOTS=DIR set, each test also saves its screen as DIR/console-NAME.png
(`TURNOUT_SCREENSHOTS=docs/figures` makes the figures of docs/operations.md)."""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from playwright.sync_api import expect, sync_playwright

from gateway.keys import FileKeyStore, new_key
from tests.conftest import Server, start_server

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
ADMIN_ENV = "TURNOUT_CONSOLE_TEST_ADMIN_KEY"
ADMIN_KEY = "console-admin-0123456789abcdef"
REFRESH_MS = 250  # the page's poll period here: a 0.5 s restart window is seen for sure


def console_config(model_path: Path, tmp: Path) -> dict[str, Any]:
    """SmolLM2 on both local engines (llama.cpp, and the paged engine, whose KV cache and
    prefix hits the console shows); a route with a fallback; an experiment splitting a third
    alias between the engines; keys in a file; limits on every key."""
    local = {"model": str(model_path), "preload": True, "keep_alive": -1}
    return {
        "server": {"host": "127.0.0.1", "admin_key_env": ADMIN_ENV, "sample_log": str(tmp / "samples.jsonl")},
        "auth": {"store": "file", "path": str(tmp / "keys.json")},
        "limits": {"key": {"rpm": 600, "tpm": 200000}, "tenant": {"rpm": 6000}},
        "backends": [
            {"name": "runner", "kind": "llamacpp", "served_name": "smollm2-135m", "options": {"n_ctx": 512}, **local},
            {
                "name": "paged",
                "kind": "paged",
                "served_name": "smollm2-135m-paged",
                "options": {"num_blocks": 128, "max_model_len": 1024, "max_num_seqs": 4, "num_threads": 1},
                **local,
            },
        ],
        "routes": [
            {"model": "smollm2-135m", "backends": ["runner"], "strategy": "least_load", "fallbacks": ["smollm2-135m-paged"]},
            {"model": "smollm2-ab", "backends": ["runner", "paged"], "strategy": "kv_pressure"},
        ],
        "experiments": [
            {
                "name": "runner-vs-paged",
                "model": "smollm2-ab",
                "sticky_by": "none",
                "variants": [{"name": "runner", "backends": ["runner"]}, {"name": "paged", "backends": ["paged"]}],
            }
        ],
    }


@pytest.fixture(scope="module")
def console(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, str]]:
    """The gateway, and an API key for the playground and for traffic."""
    tmp = tmp_path_factory.mktemp("console")
    config = console_config(model_path, tmp)
    secret, record = new_key("operator", tenant="ops")
    FileKeyStore(config["auth"]["path"]).add(record)
    server = start_server(config, tmp, env={ADMIN_ENV: ADMIN_KEY}, ready_timeout_s=180)
    yield server, secret
    server.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs it (apt-get install chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Any, console: tuple[Server, str]) -> Iterator[Any]:
    """A fresh tab (its own sessionStorage) on the console."""
    context = browser.new_context(viewport={"width": 1280, "height": 720})
    tab = context.new_page()
    tab.set_default_timeout(20_000)
    tab.goto(f"{console[0].url}/console?refresh={REFRESH_MS}")
    yield tab
    context.close()


def screenshot(page: Any, name: str, *, full_page: bool = False) -> None:
    """Save the screen (or the whole page) as console-NAME.png when TURNOUT_SCREENSHOTS names a folder."""
    folder = os.environ.get("TURNOUT_SCREENSHOTS")
    if not folder:
        return
    from PIL import Image  # matplotlib's dependency (the dev extra)

    path = Path(folder) / f"console-{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), full_page=full_page)
    # 256 colours are plenty for a flat UI and keep the docs' figures small.
    with Image.open(path) as image:
        small = image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    small.save(path, optimize=True)


def wait_until(condition: Callable[[], bool], timeout_s: float = 20.0) -> None:
    """Poll `condition` from here (the page's CSP forbids the eval that wait_for_function needs)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def log_in(page: Any, key: str = ADMIN_KEY) -> None:
    page.fill("#admin-key", key)
    page.click("#login-form button[type=submit]")


def logged_in(page: Any) -> None:
    log_in(page)
    page.wait_for_selector("#tabs", state="visible")


def chat(server: Server, key: str, model: str = "smollm2-135m", max_tokens: int = 8, stream: bool = False) -> httpx.Response:
    """One chat request (read to its end when streamed)."""
    return httpx.post(
        f"{server.base_url}/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": model, "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": max_tokens, "stream": stream},
        timeout=60,
    )


def admin(server: Server, path: str) -> Any:
    response = httpx.get(server.url + path, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10)
    response.raise_for_status()
    return response.json()


# -- the tests ------------------------------------------------------------------------------------


def test_login_refuses_a_wrong_admin_key_and_accepts_the_right_one(page: Any, console: tuple[Server, str]) -> None:
    server, _ = console
    assert page.is_visible("#login-form") and page.is_hidden("#tabs")
    assert httpx.get(server.url + "/admin/console/overview").status_code == 401  # the API itself, keyless

    log_in(page, "not-the-admin-key")
    expect(page.locator("#login-error")).to_have_text("Invalid admin key.")
    assert page.is_hidden("#tabs")
    assert page.evaluate("sessionStorage.getItem('turnout.adminKey')") is None  # a refused key is not kept
    screenshot(page, "login")

    log_in(page)
    page.wait_for_selector("#tabs", state="visible")
    page.wait_for_selector('tr[data-backend="runner"][data-status="up"]')
    page.wait_for_selector('tr[data-backend="paged"][data-status="up"]')
    assert page.is_hidden("#login")
    # A reload keeps the tab's session: no second login. Logging out forgets the key.
    page.reload()
    page.wait_for_selector('tr[data-backend="runner"]')
    assert page.is_hidden("#login")
    page.click("#logout")
    page.wait_for_selector("#login-form", state="visible")
    assert page.evaluate("sessionStorage.getItem('turnout.adminKey')") is None and page.is_hidden("#tabs")


def test_a_killed_worker_shows_down_then_up_again(page: Any, console: tuple[Server, str]) -> None:
    server, _ = console
    logged_in(page)
    row = 'tr[data-backend="runner"]'
    page.wait_for_selector(f'{row}[data-status="up"]')
    (before,) = [m for m in admin(server, "/admin/ps")["models"] if m["name"] == "runner"]
    assert before["pid"] and page.inner_text(f"{row} td.restarts") == str(before["restarts"])

    os.kill(before["pid"], signal.SIGKILL)
    page.wait_for_selector(f'{row}[data-status="down"]', timeout=10_000)
    assert page.get_attribute('tr[data-backend="paged"]', "data-status") == "up"  # the other one serves on
    page.wait_for_selector(f'{row}[data-status="up"]', timeout=120_000)
    (after,) = [m for m in admin(server, "/admin/ps")["models"] if m["name"] == "runner"]
    assert after["restarts"] == before["restarts"] + 1 and after["pid"] != before["pid"]
    expect(page.locator(f"{row} td.restarts")).to_have_text(str(after["restarts"]))
    assert f"pid {after['pid']}" in page.inner_text(f"{row} td.worker")
    assert "SIGKILL" in page.inner_text(row)  # the last exit's reason
    screenshot(page, "backends")


def test_routes_show_strategy_fallbacks_and_a_rejected_reload(page: Any, console: tuple[Server, str]) -> None:
    server, _ = console
    logged_in(page)
    page.click('#tabs button[data-tab="routes"]')
    route = 'tr[data-route="smollm2-135m"]'
    page.wait_for_selector(route)
    assert "least_load" in page.inner_text(route) and "smollm2-135m-paged" in page.inner_text(route)
    version = admin(server, "/admin/console/overview")["policy"]["version"]
    assert page.inner_text('dd[data-field="version"]') == version

    good = server.config_path.read_text()
    broken = yaml.safe_load(good)
    broken["routes"][0]["strategy"] = "fastest_please"
    try:
        server.config_path.write_text(yaml.safe_dump(broken))  # the gateway polls its file every second
        page.wait_for_selector("#reload-error", state="visible", timeout=15_000)
        assert "fastest_please" in page.inner_text("#reload-error pre")
        assert page.inner_text('dd[data-field="version"]') == version  # the old policy serves on
        assert "rejected" in page.inner_text('dd[data-field="last reload"]')
        screenshot(page, "routes")
    finally:
        time.sleep(0.05)  # a distinct mtime for the restore
        server.config_path.write_text(good)
    page.wait_for_selector("#reload-error", state="hidden", timeout=15_000)
    assert "applied" in page.inner_text('dd[data-field="last reload"]')
    assert page.inner_text('dd[data-field="version"]') == version  # the same policy: the same digest


def test_experiment_counts_samples_and_shows_its_report(page: Any, console: tuple[Server, str]) -> None:
    server, key = console
    logged_in(page)
    page.click('#tabs button[data-tab="experiments"]')
    card = 'div[data-experiment="runner-vs-paged"]'
    page.wait_for_selector(card)

    def samples() -> int:
        return sum(int(x) for x in page.locator(f"{card} td.samples").all_inner_texts())

    before = samples()
    for _ in range(6):  # streamed: the report has a time per output token
        assert chat(server, key, model="smollm2-ab", max_tokens=16, stream=True).status_code == 200
    wait_until(lambda: samples() == before + 6)
    page.click(f"{card} button")
    page.wait_for_selector("#report-body .report-table tbody tr")
    variants = page.locator("#report-body .report-table tbody tr").all_inner_texts()
    assert variants and all(re.match(r"^(runner|paged)\t", v) for v in variants)
    assert page.locator("#report-body .metric svg.chart").count() == 3  # TTFT, TPOT, end-to-end
    page.wait_for_selector("#report-body .plot img")  # the report's own PNG (matplotlib: the dev extra)
    assert page.evaluate("document.querySelector('#report-body .plot img').naturalWidth") > 0
    screenshot(page, "experiments", full_page=True)


def test_keys_create_shows_the_secret_once_and_revoke_refuses_it(page: Any, console: tuple[Server, str]) -> None:
    server, _ = console
    logged_in(page)
    page.click('#tabs button[data-tab="keys"]')
    page.fill('#key-form input[name="name"]', "console-made")
    page.fill('#key-form input[name="tenant"]', "web")
    page.fill('#key-form input[name="rpm"]', "2")  # 30 s per request: a used one stays visible
    page.click("#key-form button[type=submit]")
    page.wait_for_selector("#new-key", state="visible")
    secret = page.inner_text("#new-secret")
    assert secret.startswith("sk-turnout-")
    key_id = admin(server, "/admin/console/keys")["keys"][-1]["id"]
    row = f'tr[data-key="{key_id}"]'
    page.wait_for_selector(f'{row}[data-status="active"]')

    assert chat(server, secret).status_code == 200
    expect(page.locator(f"{row} td.usage-requests")).to_have_text(re.compile(r"^1 / 2 "))
    page.wait_for_selector('tr[data-tenant="web"]')
    screenshot(page, "keys")

    # Never again: not after a reload, not in the API.
    page.reload()
    page.wait_for_selector("#tabs", state="visible")
    page.click('#tabs button[data-tab="keys"]')
    page.wait_for_selector(row)
    assert page.is_hidden("#new-key") and secret not in page.content()
    listed = httpx.get(server.url + "/admin/console/keys", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).text
    assert secret not in listed and secret[-20:] not in listed

    page.click(f"{row} button.revoke")
    page.click(f"{row} button.revoke.armed")  # the second click confirms
    page.wait_for_selector(f'{row}[data-status="revoked"]')
    refused = chat(server, secret)
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"


def test_playground_streams_an_answer_with_ttft_and_tokens_per_second(page: Any, console: tuple[Server, str]) -> None:
    _, key = console
    logged_in(page)
    page.click('#tabs button[data-tab="playground"]')
    page.fill("#api-key", key)
    page.click("#models-reload")
    page.wait_for_selector('#model option[value="smollm2-135m"]', state="attached")
    page.select_option("#model", "smollm2-135m")
    page.fill("#max-tokens", "48")
    page.fill("#prompt", "Write one sentence about the sea.")
    page.click("#send")
    expect(page.locator("#tps")).to_have_text(re.compile(r"^[0-9.]+$"), timeout=60_000)
    assert page.inner_text("#chat-error") == ""
    answer = page.inner_text(".turn.assistant .text")
    assert len(answer.strip()) > 0
    ttft, tps, tokens = (float(page.inner_text(s)) for s in ("#ttft", "#tps", "#tokens"))
    assert ttft > 0 and tps > 0 and tokens > 1
    screenshot(page, "playground")

