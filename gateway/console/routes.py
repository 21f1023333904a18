"""The console's URLs: the page at `/console` (three static files of this package) and its
JSON API under `/admin/console/`, behind the admin key as the rest of /admin is
(gateway.admin_access). Reading needs the admin key, or, when none is configured, a caller
on this machine; creating and revoking keys always need the admin key."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse, JSONResponse
from pydantic import ValidationError

from gateway.admin_access import admin_refusal
from gateway.console.keys import KeyCreate, NoKeyStore, create_key, keys_view, revoke_key
from gateway.console.sample_counts import SampleCounts
from gateway.console.state import overview
from gateway.errors import error_response
from gateway.keys import KeyNotFound
from gateway.runtime import GatewayRuntime

if TYPE_CHECKING:
    from gateway.ab.report import Report

router = APIRouter(include_in_schema=False)  # an operator's page, not part of the OpenAI API

STATIC = Path(__file__).parent / "static"
ASSETS = {"console.js": "text/javascript", "console.css": "text/css"}
# The page loads only its own files and talks only to this gateway: no CDN, no inline script.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
        "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def _runtime(request: Request) -> GatewayRuntime:
    return request.app.state.runtime


def _counts(request: Request) -> SampleCounts:
    """The app's sample counter (one per app: it remembers how far it read the log)."""
    state = request.app.state
    if not hasattr(state, "console_sample_counts"):
        state.console_sample_counts = SampleCounts()
    return state.console_sample_counts


# -- the page ----------------------------------------------------------------------------------


@router.get("/console")
async def page(request: Request) -> Response:
    """The console's page. It holds no data: it asks for the admin key, then reads the API.
    With no admin key configured the console is off, except read-only on this machine."""
    if _runtime(request).admin_key() is None:
        refusal = admin_refusal(request, read_only=True)
        if refusal is not None:
            return refusal
    return FileResponse(STATIC / "index.html", media_type="text/html", headers=PAGE_HEADERS)


@router.get("/console/{name}")
async def asset(name: str) -> Response:
    """The page's script and style sheet (only these names: nothing else of the disk)."""
    if name not in ASSETS:
        return error_response(404, f"No console file named {name!r}.", code="not_found")
    return FileResponse(STATIC / name, media_type=ASSETS[name], headers=PAGE_HEADERS)


# -- the JSON API --------------------------------------------------------------------------------


@router.get("/admin/console/session")
async def session(request: Request) -> Response:
    """Whether the caller may read (and manage keys): the page's login check."""
    refusal = admin_refusal(request, read_only=True)
    if refusal is not None:
        return refusal
    runtime = _runtime(request)
    configured = runtime.admin_key() is not None
    return JSONResponse({"access": "admin" if configured else "read_only", "admin_key_configured": configured})


@router.get("/admin/console/overview")
async def overview_(request: Request) -> Response:
    """Backends and their load, routes, the policy and its last reload, experiments with
    their sample counts: what the page refreshes every second."""
    refusal = admin_refusal(request, read_only=True)
    if refusal is not None:
        return refusal
    runtime = _runtime(request)
    counts = await asyncio.to_thread(_counts(request).read, runtime.snapshot.sample_log)
    return JSONResponse(overview(runtime, counts))


@router.get("/admin/console/keys")
async def list_keys(request: Request) -> Response:
    """Every key (never a secret) with its usage against its limits, and each tenant's."""
    refusal = admin_refusal(request, read_only=True)
    if refusal is not None:
        return refusal
    return JSONResponse(await keys_view(_runtime(request).snapshot))


@router.post("/admin/console/keys")
async def create(request: Request) -> Response:
    """Create a key. The answer holds its secret: the only time anything shows it."""
    refusal = admin_refusal(request)
    if refusal is not None:
        return refusal
    try:
        spec = KeyCreate.model_validate_json(await request.body())
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or None
        return error_response(400, f"{field + ': ' if field else ''}{first['msg']}", param=field, code="invalid_value")
    try:
        secret, key = await create_key(_runtime(request).snapshot, spec)
    except NoKeyStore as exc:
        return error_response(409, str(exc), code="no_key_store")
    except ValueError as exc:
        return error_response(400, str(exc), param="expires", code="invalid_value")
    return JSONResponse({"key": key, "secret": secret}, status_code=201, headers={"Cache-Control": "no-store"})


@router.post("/admin/console/keys/{ref}/revoke")
async def revoke(ref: str, request: Request) -> Response:
    """Revoke a key by id: it is refused at its next request."""
    refusal = admin_refusal(request)
    if refusal is not None:
        return refusal
    try:
        key = await revoke_key(_runtime(request).snapshot, ref)
    except NoKeyStore as exc:
        return error_response(409, str(exc), code="no_key_store")
    except KeyNotFound as exc:
        return error_response(404, str(exc).capitalize() + ".", code="key_not_found")
    return JSONResponse({"key": key})


@router.get("/admin/console/experiments/{name}/report")
async def report(name: str, request: Request, baseline: str | None = None) -> Response:
    """The experiment's A/B report (table, comparisons, decision) as JSON."""
    refusal = admin_refusal(request, read_only=True)
    if refusal is not None:
        return refusal
    from gateway.console import ab_view  # the tools' room: loaded on the first report only

    built = await _report(request, name, baseline, ab_view)
    if isinstance(built, Response):
        return built
    return JSONResponse(await asyncio.to_thread(ab_view.report_json, built))


@router.get("/admin/console/experiments/{name}/plot.png")
async def report_plot(name: str, request: Request, baseline: str | None = None) -> Response:
    """The experiment's distributions as `turnout ab report --png` draws them."""
    refusal = admin_refusal(request, read_only=True)
    if refusal is not None:
        return refusal
    from gateway.console import ab_view  # the tools' room: loaded on the first report only

    if not ab_view.plots_available():
        return error_response(501, "Plots need matplotlib: pip install 'turnout[plots]'.", code="plots_unavailable")
    built = await _report(request, name, baseline, ab_view)
    if isinstance(built, Response):
        return built
    png = await asyncio.to_thread(ab_view.report_png, built)
    return Response(png, media_type="image/png", headers={"Cache-Control": "no-store"})


async def _report(request: Request, name: str, baseline: str | None, ab_view: ModuleType) -> Report | Response:
    """The experiment's Report, or the error response that says why there is none."""
    snapshot = _runtime(request).snapshot
    if not any(e.name == name for e in snapshot.config.experiments):
        return error_response(404, f"The policy has no experiment named {name!r}.", code="experiment_not_found")
    try:
        built = await asyncio.to_thread(ab_view.load_report, snapshot.sample_log, name, baseline)
    except ValueError as exc:  # a baseline without samples
        return error_response(400, str(exc), param="baseline", code="invalid_value")
    if built is None:
        return error_response(404, f"No samples for experiment {name!r} yet in {snapshot.sample_log}.", code="no_samples")
    return built
