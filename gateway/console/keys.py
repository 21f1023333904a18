"""The console's keys: list them with their usage against their limits, create one (its
secret is in that answer and nowhere else), revoke one. The key store is the policy
snapshot's own (gateway.keys: the JSON file or Redis), as `turnout keys` uses it; the
stores' methods are blocking, so they run in a thread."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Callable
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from gateway.auth import Authenticator
from gateway.keys import FileKeyStore, KeyRecord, RedisKeyStore, new_key, parse_expiry
from gateway.ratelimit import Bucket, Limiter, StoreError
from gateway.snapshot import Snapshot

# Usage costs one store round trip per key; past this many keys a poll shows the first ones'
# usage only (a console refreshing every second must not load a shared Redis).
USAGE_KEYS_MAX = 200

# Create and revoke rewrite the key file whole: one at a time in this process (a thread
# lock: the writes run in threads, and it serves any event loop).
_write_lock = threading.Lock()
T = TypeVar("T")


def _locked(work: Callable[..., T], *args: Any) -> T:
    with _write_lock:
        return work(*args)


class NoKeyStore(Exception):
    """The policy has `auth: none`: there are no keys to manage."""


class KeyCreate(BaseModel):
    """A create request from the console: `turnout keys create`'s options."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128)
    tenant: str = Field(default="default", min_length=1, max_length=128)
    models: list[str] = Field(default_factory=list)  # empty: every model
    rpm: int | None = Field(default=None, ge=1)  # None: the policy's `limits.key`
    tpm: int | None = Field(default=None, ge=1)
    priority: Literal["interactive", "batch"] = "interactive"
    expires: str | None = None  # an ISO date (valid through that day, UTC) or datetime


def key_view(record: KeyRecord, authenticator: Authenticator) -> dict[str, Any]:
    """A key as the console shows it: never its secret, nor the secret's hash."""
    default = authenticator.config.limits.key
    return {
        "id": record.id,
        "name": record.name,
        "hint": record.hint,
        "tenant": record.tenant,
        "models": list(record.models),
        "rpm": record.rpm if record.rpm is not None else default.rpm,
        "tpm": record.tpm if record.tpm is not None else default.tpm,
        "limits_from_policy": record.rpm is None or record.tpm is None,  # some limit is limits.key's
        "priority": record.priority,
        "created": record.created,
        "expires": record.expires,
        "status": "revoked" if record.revoked else "expired" if record.expired() else "active",
    }


async def bucket_usage(limiter: Limiter, buckets: tuple[Bucket, ...]) -> list[dict[str, Any]] | str:
    """Each bucket's limit, what is left in it now and when it is full again: a cost-0
    decision, which reads the buckets and changes nothing (policies.ratelimit). The error
    text when the store cannot be reached."""
    if not buckets:
        return []
    try:
        decision = await limiter.store.take(buckets, [0] * len(buckets), None)
    except StoreError as exc:
        return f"the rate-limit store is unavailable: {exc}"
    return [
        {
            "scope": bucket.scope,
            "kind": "tokens" if bucket.tokens else "requests",
            "limit": bucket.rate.limit,
            "capacity": math.floor(bucket.rate.capacity),
            "remaining": state.remaining,
            "reset_s": state.reset_after,
        }
        for bucket, state in zip(buckets, decision.buckets)
    ]


def _store(snapshot: Snapshot) -> FileKeyStore | RedisKeyStore:
    store = snapshot.authenticator.store
    if store is None:
        raise NoKeyStore(
            "This gateway runs with `auth: none`: there are no API keys to manage. "
            "Set `auth: {store: file}` (or redis) in the policy to require keys."
        )
    return store


async def keys_view(snapshot: Snapshot) -> dict[str, Any]:
    """Every key with its usage (active keys), and each tenant's shared buckets. With `auth:
    none`, the anonymous caller's limits instead."""
    authenticator, limiter = snapshot.authenticator, snapshot.limiter
    if authenticator.store is None:
        usage = await bucket_usage(limiter, authenticator.anonymous.buckets)
        return {"store": None, "keys": [], "tenants": [], "anonymous": usage}
    records = await asyncio.to_thread(authenticator.store.list)
    keys: list[dict[str, Any]] = []
    tenants: dict[str, dict[str, Any]] = {}
    active = 0
    for record in records:
        view = key_view(record, authenticator)
        view["usage"] = None  # revoked or expired: no limits apply any more
        keys.append(view)
        if view["status"] != "active":
            continue
        tenant = tenants.setdefault(record.tenant, {"tenant": record.tenant, "keys": 0, "usage": None})
        tenant["keys"] += 1
        active += 1
        if active > USAGE_KEYS_MAX:
            continue
        # The buckets the request path builds for this key (its own, then its tenant's).
        usage = await bucket_usage(limiter, authenticator.principal(record).buckets)
        if isinstance(usage, str):
            view["usage"] = tenant["usage"] = usage
        else:
            view["usage"] = [b for b in usage if b["scope"] == "key"]
            tenant["usage"] = [b for b in usage if b["scope"] == "tenant"]  # the same for every key of the tenant
    store = "redis" if isinstance(authenticator.store, RedisKeyStore) else "file"
    return {
        "store": store,
        "keys": keys,
        "tenants": sorted(tenants.values(), key=lambda t: t["tenant"]),
        "usage_keys_max": USAGE_KEYS_MAX,
    }


async def create_key(snapshot: Snapshot, spec: KeyCreate) -> tuple[str, dict[str, Any]]:
    """Add a key to the store; its secret (to show once) and its view. Raises NoKeyStore, or
    ValueError for a bad expiry."""
    store = _store(snapshot)
    try:
        expires = parse_expiry(spec.expires) if spec.expires else None
    except ValueError:
        raise ValueError(f"expires: an ISO date (2026-12-31) or datetime is expected, not {spec.expires!r}") from None
    if expires is not None and expires <= time.time():
        raise ValueError(f"expires: {spec.expires!r} is in the past")
    secret, record = new_key(
        spec.name,
        tenant=spec.tenant,
        models=tuple(spec.models),
        rpm=spec.rpm,
        tpm=spec.tpm,
        priority=spec.priority,
        expires=expires,
    )
    await asyncio.to_thread(_locked, store.add, record)
    return secret, key_view(record, snapshot.authenticator)


async def revoke_key(snapshot: Snapshot, ref: str) -> dict[str, Any]:
    """Revoke a key by id (or by name, when one key has it). Raises NoKeyStore, or
    gateway.keys.KeyNotFound."""
    store = _store(snapshot)
    record = await asyncio.to_thread(_locked, store.revoke, ref)
    return key_view(record, snapshot.authenticator)
