"""A direct path to the generation routes, past FastAPI's routing layer.

`POST /v1/chat/completions` and `POST /v1/completions` take a `Request` and return a
`Response`: they use nothing of FastAPI's per-route machinery (no dependencies, no body
parameters, no response model). Yet on every call FastAPI matched the path against each
route in turn, opened its exit stacks, solved an empty dependency set and wrapped the
exception handling a second time: about a tenth of the gateway's CPU per request (py-spy;
docs/benchmarks.md, "Gateway overhead").

This middleware, the innermost of the app's own, sends those two method+path pairs straight
to their endpoints. It keeps what the routing layer did that anything could notice: the
app's exception handlers (the same Starlette ExceptionMiddleware over the same handlers, so
every error body is unchanged; unexpected exceptions still reach the app's 500 handler),
and `scope["route"]`, `scope["endpoint"]`, `scope["path_params"]`. Any other method or
path (405s, trailing-slash redirects, 404s) goes through FastAPI as before, and the routes
stay declared on the router (OpenAPI, and the fallback).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from fastapi.routing import APIRoute
from starlette.middleware.exceptions import ExceptionMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Router
from starlette.types import ASGIApp, Receive, Scope, Send

Endpoint = Callable[[Request], Awaitable[Response]]


def route_path(scope: Scope) -> str:
    """The path the router matches: `path` less the `root_path` it is mounted under (ASGI
    servers behind a proxy prefix send both), as Starlette's router reads it."""
    path: str = scope["path"]
    root = scope.get("root_path", "")
    if root and path.startswith(root) and (len(path) == len(root) or path[len(root)] == "/"):
        return path[len(root) :]
    return path


def _endpoint_app(route: APIRoute) -> ASGIApp:
    """The route's endpoint as a bare ASGI app: what Router + APIRoute leave in the scope,
    then the endpoint, then its response."""
    endpoint: Endpoint = route.endpoint

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        scope["route"] = route
        scope["endpoint"] = endpoint
        scope["path_params"] = {}
        response = await endpoint(Request(scope, receive, send))
        await response(scope, receive, send)

    return app


class DirectRoutes:
    """Pure ASGI: POST to one of `paths` runs that route's endpoint (one of `routes`, as
    declared on their APIRouter) at once; the rest goes on to `app` (FastAPI's exception
    middleware and the app's `router`)."""

    def __init__(
        self,
        app: ASGIApp,
        router: Router,
        routes: Iterable[Any],
        paths: Iterable[str],
        exception_handlers: Mapping[Any, Any],
    ) -> None:
        self.app = app
        self.router = router
        # FastAPI hands 500/Exception to the outermost ServerErrorMiddleware; the rest to the
        # ExceptionMiddleware inside the user middlewares: the same split here.
        handlers = {k: v for k, v in exception_handlers.items() if k not in (500, Exception)}
        wanted = set(paths)
        self.direct: dict[str, ASGIApp] = {
            route.path: ExceptionMiddleware(_endpoint_app(route), handlers=handlers)
            for route in routes
            if isinstance(route, APIRoute) and route.path in wanted and route.methods == {"POST"}
        }
        missing = wanted - set(self.direct)
        if missing:
            raise ValueError(f"no POST route for {sorted(missing)}")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            direct = self.direct.get(route_path(scope))
            if direct is not None:
                scope.setdefault("router", self.router)  # as Router.app leaves it (url_for)
                await direct(scope, receive, send)
                return
        await self.app(scope, receive, send)
