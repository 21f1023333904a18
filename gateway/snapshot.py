"""One policy, whole: the config and everything built from it that a request uses (the
authenticator and its key store, the rate limiter and its store, the dispatcher with its
routes and admission queues). A reload builds a new snapshot completely, then swaps it in at
once; each request keeps the snapshot it started with. Nothing else holds config."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gateway.auth import Authenticator
from gateway.dispatch import Dispatcher
from gateway.keys import FileKeyStore, RedisKeyStore
from gateway.ratelimit import InProcessStore, Limiter, LimiterMetrics, RedisStore, redis_client
from gateway.samples import default_log_path
from policies.schema import AuthConfig, Config, ConfigError

# What a running process cannot change: the socket is bound, and its protocol (header
# timeout, connection cap: gateway.connections) was built with it. A reload that changes one
# of these is rejected, naming it, rather than half-applied.
RESTART_ONLY = ("host", "port", "header_timeout_s", "max_connections")


@dataclass(frozen=True)
class Snapshot:
    """Everything a request needs that a policy decides."""

    config: Config
    authenticator: Authenticator
    limiter: Limiter
    dispatcher: Dispatcher
    sample_log: Path


def check_restart_only(started: Config, new: Config) -> None:
    """Raise ConfigError naming each `server` field that differs from the startup policy's
    and cannot change without a restart."""
    changed = [f for f in RESTART_ONLY if getattr(started.server, f) != getattr(new.server, f)]
    if changed:
        fields = ", ".join(f"server.{f} ({getattr(started.server, f)!r} -> {getattr(new.server, f)!r})" for f in changed)
        raise ConfigError(f"{fields}: the listening socket's settings change only at a restart; restart the gateway to apply them")


def build_access(config: Config, metrics: LimiterMetrics, previous: Snapshot | None = None) -> tuple[Authenticator, Limiter]:
    """The authenticator and rate limiter `config` asks for. Unchanged `redis` and `auth`
    sections keep the previous snapshot's limiter (its bucket state, its connections) and key
    store; a changed one gets new ones (the caller closes what is left over)."""
    same_redis = previous is not None and previous.config.redis == config.redis
    if same_redis:
        assert previous is not None
        limiter = previous.limiter
        client = limiter.store.client if isinstance(limiter.store, RedisStore) else None
    else:
        client = redis_client(config.redis.url, config.redis.timeout_ms) if config.redis else None
        fail_mode = config.redis.fail_mode if config.redis else "open"
        limiter = Limiter(RedisStore(client) if client else InProcessStore(), fail_mode, metrics)
    store: FileKeyStore | RedisKeyStore | None = None
    if same_redis and previous is not None and previous.config.auth == config.auth:
        store = previous.authenticator.store
    elif isinstance(config.auth, AuthConfig):
        if config.auth.store == "redis":
            assert config.redis is not None  # the schema requires it
            store = RedisKeyStore(config.redis.url, config.redis.prefix, client)
        else:
            store = FileKeyStore(config.auth.path)
    return Authenticator(config, store, fail_open=limiter.fail_open), limiter


def sample_log_path(config: Config) -> Path:
    """Where experiment samples go: `server.sample_log`, else the default under TURNOUT_HOME."""
    return Path(config.server.sample_log) if config.server.sample_log else default_log_path()
