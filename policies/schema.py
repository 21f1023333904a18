"""The policy file's schema: what ops may write in config/*.yaml, validated by pydantic.

Pure: no I/O beyond parsing text that the caller read.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from backends.protocol import parse_keep_alive
from policies.experiments import ExperimentConfig, validate_experiments
from policies.routing import make_strategy


LOCAL_KINDS = ("llamacpp", "paged")  # run in engine worker processes of their own
DEFAULT_KEEP_ALIVE_S = 300.0


class Located(ValueError):
    """A model-level check's failure that belongs to one field further in: `loc`, relative
    to the model that raised it (pydantic puts a model validator's errors at the model's own
    location, which for Config is the top of the file); `problems` appends it."""

    def __init__(self, message: str, *loc: str | int) -> None:
        super().__init__(message)
        self.loc = loc


class _Section(BaseModel):
    # Typos in a policy must fail loudly, not be ignored.
    model_config = ConfigDict(extra="forbid")


class ServerConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    admin_key_env: str | None = None  # env var holding the key for /admin/* (unset: no admin API)
    access_log: bool = True  # one JSON line per request on the `turnout.access` logger
    log_prompts: bool = False  # include prompts in access-log lines
    sample_log: str | None = None  # experiment samples (JSONL); default $TURNOUT_HOME/experiments/samples.jsonl
    watch_config: bool = True  # reload the policy file when it changes on disk
    # Memory the local models' worker processes may use together; loading one more unloads
    # the least recently used idle ones first. None: no budget.
    model_memory_budget_gib: float | None = Field(default=None, gt=0)
    # Safe without nginx in front: a connection must finish its request headers within
    # header_timeout_s, and past max_connections open connections new ones get a 503.
    header_timeout_s: float = Field(default=10.0, gt=0)
    max_connections: int = Field(default=2048, ge=1)
    # Peers (IPs or CIDRs) whose X-Forwarded-For is believed for the client's address; none
    # by default, so any caller cannot choose the address the access log records.
    trusted_proxies: list[str] = Field(default_factory=list)
    # /docs, /redoc and /openapi.json (behind the admin key when on).
    api_docs: bool = False
    # Bounds on what one request may ask the gateway to process (a 400 past each).
    max_messages: int = Field(default=2048, ge=1)
    max_message_bytes: int = Field(default=1024 * 1024, ge=1)  # one message's text, UTF-8
    max_tools: int = Field(default=128, ge=0)
    max_schema_bytes: int = Field(default=64 * 1024, ge=1)  # tools and response_format, as JSON

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, v: list[str]) -> list[str]:
        for entry in v:
            ipaddress.ip_network(entry, strict=False)  # ValueError names the bad entry
        return v


class BackendConfig(_Section):
    """One token producer. `options` are passed to the backend's constructor."""

    name: str = Field(min_length=1)
    kind: Literal["llamacpp", "paged", "remote", "litellm"]
    model: str = Field(min_length=1)  # remote/litellm: the upstream's model name
    served_name: str | None = None  # the model id clients use; default: `model`
    url: str | None = None  # remote: the upstream's base URL (…/v1); litellm: optional api_base
    api_key_env: str | None = None  # remote/litellm: env var holding the upstream's API key
    weight: float = Field(default=1.0, ge=0)  # share under `weighted`; 0 drains the backend
    # generate: chat and completions (and embeddings of the same model); embed: a dedicated
    # embedding model, which serves /v1/embeddings only.
    task: Literal["generate", "embed"] = "generate"
    # remote: its Prometheus page, scraped every 500 ms for load (default: beside `url`;
    # "none" to turn scraping off)
    metrics_url: str | None = None
    # Local kinds (llamacpp, paged): load at start rather than on the first request, and how
    # long an idle model stays loaded (seconds or "5m"; -1: for good; 0: unload when idle).
    preload: bool = False
    keep_alive: float | str | None = None
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _remote_has_url(self) -> BackendConfig:
        if self.kind == "remote" and not self.url:
            raise ValueError("a remote backend needs `url` (the upstream's OpenAI base URL)")
        if self.kind not in LOCAL_KINDS and (self.preload or self.keep_alive is not None):
            raise ValueError(f"preload and keep_alive apply to local backends ({', '.join(LOCAL_KINDS)}), not {self.kind}")
        if self.keep_alive is not None:
            parse_keep_alive(self.keep_alive)
        return self

    def keep_alive_s(self) -> float:
        """Seconds an idle local model stays loaded (-1: for good); Ollama's default 5 minutes."""
        return DEFAULT_KEEP_ALIVE_S if self.keep_alive is None else parse_keep_alive(self.keep_alive)

    def scrape_url(self) -> str | None:
        """Where a remote backend's load metrics are, or None (not scraped)."""
        if self.kind != "remote" or self.metrics_url == "none":
            return None
        if self.metrics_url:
            return self.metrics_url
        assert self.url is not None
        return self.url.rstrip("/").removesuffix("/v1") + "/metrics"

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


class TimeoutsConfig(_Section):
    """Per-route deadlines (a remote backend's connect timeout is its own option)."""

    first_token_s: float = Field(default=60.0, gt=0)  # until the first token (or whole answer's start)
    total_s: float = Field(default=600.0, gt=0)  # the whole answer


class RetryConfig(_Section):
    """Retries before the first byte only: connect errors, 5xx, timeouts, overload."""

    max_retries: int = Field(default=2, ge=0, le=10)
    backoff_base_s: float = Field(default=0.05, ge=0)
    backoff_max_s: float = Field(default=2.0, ge=0)


class CircuitSection(_Section):
    """A backend failing `failures` times within `window_s` is ejected for `cooldown_s`,
    then probed with one request."""

    failures: int = Field(default=5, ge=1)
    window_s: float = Field(default=30.0, gt=0)
    cooldown_s: float = Field(default=30.0, gt=0)


class PrefixHashingConfig(_Section):
    """How prefix-aware strategies hash a prompt's leading blocks."""

    block_size: int = Field(default=16, ge=1)  # tokens per block: the engines' KV block size
    max_blocks: int = Field(default=64, ge=1)  # hash at most this many leading blocks


class AdmissionSection(_Section):
    """Per-pool admission: a concurrency limit, a priority queue (interactive before batch),
    deadlines; requests that would miss theirs are shed at once with 503 + Retry-After."""

    limit: int | None = Field(default=None, ge=1)  # None: the replicas' reported capacity
    max_queue: int = Field(default=1024, ge=0)
    default_deadline_s: float = Field(default=30.0, gt=0)  # interactive keys' wait budget
    batch_deadline_s: float = Field(default=120.0, gt=0)


class RouteConfig(_Section):
    """A model alias clients ask for, served by a pool of backends."""

    model: str = Field(min_length=1)
    backends: list[str] = Field(min_length=1)
    strategy: str = "least_load"
    strategy_params: dict[str, Any] = Field(default_factory=dict)
    fallbacks: list[str] = Field(default_factory=list)  # other aliases, tried in order
    retries: RetryConfig = Field(default_factory=RetryConfig)
    timeouts: TimeoutsConfig = Field(default_factory=TimeoutsConfig)
    prefix_hashing: PrefixHashingConfig = Field(default_factory=PrefixHashingConfig)
    admission: AdmissionSection | None = None  # None: no queue in the gateway
    # The largest max_tokens a request may ask for (a 400 past it). None: the model's context
    # length where its backends report one (a remote's /v1/models `max_model_len`).
    max_tokens: int | None = Field(default=None, ge=1)
    # A stream whose backend dies goes on, on another backend of the pool serving the same
    # model, as one stream to the client (gateway/resume.py).
    resume: bool = False

    @model_validator(mode="after")
    def _known_strategy(self) -> RouteConfig:
        make_strategy(self.strategy, **self.strategy_params)  # raises ValueError naming the problem
        return self


class Config(_Section):
    server: ServerConfig = Field(default_factory=ServerConfig)
    auth: Literal["none"] | AuthConfig = "none"
    redis: RedisConfig | None = None  # None: limits are kept in-process
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    backends: list[BackendConfig] = Field(min_length=1)
    routes: list[RouteConfig] = Field(default_factory=list)
    circuit: CircuitSection = Field(default_factory=CircuitSection)
    experiments: list[ExperimentConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _names_resolve(self) -> Config:
        # Each problem is Located at the entry that causes it, so the message names its line.
        names = [b.name for b in self.backends]
        for index, name in enumerate(names):
            if name in names[:index]:
                raise Located(f"backend names must be unique: {name!r} is used twice", "backends", index, "name")
        for i, route in enumerate(self.routes):
            for j, backend in enumerate(route.backends):
                if backend not in names:
                    raise Located(f"route {route.model!r} names unknown backends [{backend!r}]", "routes", i, "backends", j)
            kinds = {b.name: b.kind for b in self.backends}
            if route.resume and any(kinds.get(b) == "litellm" for b in route.backends):
                # A provider behind litellm cannot continue a message (continue_final_message).
                raise Located(f"route {route.model!r}: resume needs backends that can continue a message; litellm backends cannot", "routes", i, "resume")
        if isinstance(self.auth, AuthConfig) and self.auth.store == "redis" and self.redis is None:
            raise Located("keys kept in redis need a `redis` section (url, timeout_ms, fail_mode)", "auth", "store")
        aliases = self.aliases()
        for i, route in enumerate(self.routes):
            for j, fallback in enumerate(route.fallbacks):
                if fallback not in aliases:
                    raise Located(f"route {route.model!r} falls back to unknown models [{fallback!r}]", "routes", i, "fallbacks", j)
        self._no_fallback_cycles()
        validate_experiments(self.experiments, names, aliases)
        return self

    def _no_fallback_cycles(self) -> None:
        graph = {r.model: r.fallbacks for r in self.routes}
        where = {r.model: i for i, r in enumerate(self.routes)}
        for start in graph:
            seen, stack = set(), list(graph[start])
            while stack:
                alias = stack.pop()
                if alias == start:
                    raise Located(f"route {start!r}: fallbacks lead back to itself", "routes", where[start], "fallbacks")
                if alias not in seen:
                    seen.add(alias)
                    stack.extend(graph.get(alias, []))

    def route(self, alias: str) -> RouteConfig:
        """The explicit route for an alias, or the defaults for a backend's own model id."""
        for route in self.routes:
            if route.model == alias:
                return route
        return RouteConfig(model=alias, backends=self.aliases()[alias])

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
        raise ConfigError("\n".join(problems(exc, raw, source))) from exc


def problems(exc: ValidationError, raw: yaml.Node | None, source: str | None, at: tuple[Any, ...] = ()) -> list[str]:
    """Each error of `exc` as `source:line: field: message`, its line looked up in the
    composed policy `raw`; `at` locates the validated value within the policy (a backend's
    options are validated apart, at ("backends", i, "options")). Without `raw` or `source`,
    what is known of them is left out."""
    out = []
    for err in exc.errors():
        cause = err.get("ctx", {}).get("error")
        loc = (*at, *err["loc"], *(cause.loc if isinstance(cause, Located) else ()))
        where = ".".join(str(p) for p in loc) or "(top level)"
        line = line_of(raw, loc) if raw is not None else None
        msg = err["msg"].removeprefix("Value error, ")
        prefix = f"{source}:{line}: " if source and line else f"{source}: " if source else ""
        out.append(f"{prefix}{where}: {msg}")
    return out


def line_of(node: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
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
