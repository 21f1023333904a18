"""The policy file's schema: what ops may write in config/*.yaml, validated by pydantic.

Pure: no I/O beyond parsing text that the caller read.
"""

from __future__ import annotations

from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class _Section(BaseModel):
    # Typos in a policy must fail loudly, not be ignored.
    model_config = ConfigDict(extra="forbid")


class ServerConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)


class BackendConfig(_Section):
    """One token producer. `options` are passed to the backend's constructor."""

    name: str = Field(min_length=1)
    kind: Literal["llamacpp", "paged", "remote"]
    model: str = Field(min_length=1)
    served_name: str | None = None  # the model id clients use; default: `model`
    url: str | None = None  # remote backends only
    options: dict[str, Any] = Field(default_factory=dict)

    def model_id(self) -> str:
        """The id clients ask for: served_name, else the model name (a file path's stem)."""
        if self.served_name:
            return self.served_name
        if self.model.endswith(".gguf"):
            return self.model.rsplit("/", 1)[-1].removesuffix(".gguf")
        return self.model


class AuthConfig(_Section):
    """API keys required on /v1/*, from a store: a JSON file (one host) or Redis (replicas)."""

    store: Literal["file", "redis"] = "file"
    path: str | None = None  # file store; default $TURNOUT_HOME/keys.json


class RedisConfig(_Section):
    """A Redis shared by replicas: rate-limit buckets (and keys, with `auth.store: redis`)."""

    url: str = "redis://127.0.0.1:6379/0"
    timeout_ms: float = Field(default=50.0, gt=0)  # per call; slower counts as down
    fail_mode: Literal["open", "closed"] = "open"  # Redis down: serve unlimited, or 503
    prefix: str = "turnout:"


class LimitSpec(_Section):
    """Requests and tokens per minute; None = no limit of that kind."""

    rpm: int | None = Field(default=None, ge=1)
    tpm: int | None = Field(default=None, ge=1)


class LimitsConfig(_Section):
    """Per-key and per-tenant limits; a request must fit both (the tighter wins)."""

    key: LimitSpec = Field(default_factory=LimitSpec)  # for keys created without --rpm/--tpm
    tenant: LimitSpec = Field(default_factory=LimitSpec)  # for every tenant not listed below
    tenants: dict[str, LimitSpec] = Field(default_factory=dict)
    # Seconds of the per-minute rate a client may spend at once. 60: the whole minute's
    # budget (as OpenAI's limits behave); less smooths bursts.
    burst_seconds: float = Field(default=60.0, gt=0, le=60)
    # Completion tokens reserved up front when a request sets no max_tokens.
    assumed_max_tokens: int = Field(default=512, ge=1)


class RouteConfig(_Section):
    """A model alias clients ask for, served by a pool of backends."""

    model: str = Field(min_length=1)
    backends: list[str] = Field(min_length=1)


class Config(_Section):
    server: ServerConfig = Field(default_factory=ServerConfig)
    auth: Literal["none"] | AuthConfig = "none"
    redis: RedisConfig | None = None  # None: limits are kept in-process
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    backends: list[BackendConfig] = Field(min_length=1)
    routes: list[RouteConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _names_resolve(self) -> Config:
        names = [b.name for b in self.backends]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise ValueError(f"backend names must be unique: {sorted(dupes)}")
        for route in self.routes:
            unknown = [b for b in route.backends if b not in names]
            if unknown:
                raise ValueError(f"route {route.model!r} names unknown backends {unknown}")
        if isinstance(self.auth, AuthConfig) and self.auth.store == "redis" and self.redis is None:
            raise ValueError("auth.store: redis needs a `redis` section (url, timeout_ms, fail_mode)")
        return self

    def aliases(self) -> dict[str, list[str]]:
        """Model id -> backend names: explicit routes, then each backend's own model id."""
        table: dict[str, list[str]] = {}
        for backend in self.backends:
            table.setdefault(backend.model_id(), []).append(backend.name)
        for route in self.routes:
            table[route.model] = list(route.backends)
        return table


class ConfigError(ValueError):
    """A policy file that does not validate, with where and why."""


def parse_config(text: str, source: str = "<config>") -> Config:
    """Parse and validate a policy file's text; errors name the source, line and field."""
    try:
        raw = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
    try:
        return Config.model_validate(data or {})
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = err["loc"]
            where = ".".join(str(p) for p in loc) or "(top level)"
            line = _line_of(raw, loc)
            problems.append(f"{source}:{line}: {where}: {err['msg']}" if line else f"{source}: {where}: {err['msg']}")
        raise ConfigError("\n".join(problems)) from exc


def _line_of(node: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """1-based line of the YAML node at loc (or of its nearest existing parent)."""
    line = node.start_mark.line + 1 if node is not None else None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            node = next((v for k, v in node.value if k.value == key), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
        else:
            break
        if node is None:
            break
        line = node.start_mark.line + 1
    return line
