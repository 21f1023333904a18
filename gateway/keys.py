"""API keys: secrets, records, and the two stores (a JSON file, or Redis).

A secret is `sk-turnout-` + 32 random bytes (urlsafe base64). It is printed once, at
creation; the stores keep only its SHA-256 (a fast hash is enough for a 256-bit random
secret: there is nothing to brute-force), and a lookup re-checks the hash with
hmac.compare_digest.

The file store serves one host (the embedded default): `turnout keys` rewrites the file
atomically, and a running gateway notices the change on its next request (one stat per
request). The Redis store serves replicas: `turnout:key:<sha256>` holds the record, and
its `revoked` field is read by the rate-limit script on every request, so a revocation
holds at the next request on every replica.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

PREFIX = "sk-turnout-"
Priority = Literal["interactive", "batch"]


def new_secret() -> str:
    return PREFIX + secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def default_path() -> Path:
    """`$TURNOUT_HOME/keys.json`, default `~/.cache/turnout/keys.json`."""
    home = os.environ.get("TURNOUT_HOME")
    return (Path(home) if home else Path.home() / ".cache" / "turnout") / "keys.json"


def parse_expiry(text: str) -> float:
    """An ISO date (`2026-12-31`, end of that day UTC) or datetime -> epoch seconds."""
    try:
        when = datetime.fromisoformat(text)
    except ValueError as exc:
        raise ValueError(f"--expires wants an ISO date or datetime, got {text!r}") from exc
    if len(text) == 10:  # a bare date: valid through that day
        when = when.replace(hour=23, minute=59, second=59)
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp()


@dataclass(frozen=True)
class KeyRecord:
    """What a store keeps about a key (never the secret)."""

    id: str
    name: str
    hash: str
    hint: str  # `sk-turnout-...abcd`, to recognise a key in `keys list`
    tenant: str = "default"
    models: tuple[str, ...] = ()  # empty: every model
    rpm: int | None = None  # None: the config's `limits.key` default
    tpm: int | None = None
    priority: Priority = "interactive"
    expires: float | None = None  # epoch seconds
    revoked: bool = False
    created: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["models"] = list(self.models)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> KeyRecord:
        return cls(**{**data, "models": tuple(data.get("models") or ())})

    def expired(self, now: float | None = None) -> bool:
        return self.expires is not None and (now if now is not None else time.time()) >= self.expires


def new_key(
    name: str,
    *,
    tenant: str = "default",
    models: tuple[str, ...] = (),
    rpm: int | None = None,
    tpm: int | None = None,
    priority: Priority = "interactive",
    expires: float | None = None,
) -> tuple[str, KeyRecord]:
    """A fresh secret and its record."""
    secret = new_secret()
    record = KeyRecord(
        id="key_" + secrets.token_hex(6),
        name=name,
        hash=hash_secret(secret),
        hint=f"{PREFIX}...{secret[-4:]}",
        tenant=tenant,
        models=models,
        rpm=rpm,
        tpm=tpm,
        priority=priority,
        expires=expires,
    )
    return secret, record


def matches(record: KeyRecord, digest: str) -> bool:
    return hmac.compare_digest(record.hash, digest)


class KeyNotFound(LookupError):
    pass


def _find(records: list[KeyRecord], ref: str) -> KeyRecord:
    """A record by id, or by name when exactly one key has it."""
    by_id = [r for r in records if r.id == ref]
    if by_id:
        return by_id[0]
    by_name = [r for r in records if r.name == ref]
    if len(by_name) == 1:
        return by_name[0]
    if by_name:
        raise KeyNotFound(f"{len(by_name)} keys are named {ref!r}; revoke by id")
    raise KeyNotFound(f"no key with id or name {ref!r}")


class FileKeyStore:
    """Keys in one JSON file (mode 0600), reloaded when the file changes."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path).expanduser() if path else default_path()
        self._by_hash: dict[str, KeyRecord] = {}
        self._stamp: tuple[int, int] | None = None

    # -- the gateway's side ----------------------------------------------------------

    def lookup(self, digest: str) -> KeyRecord | None:
        """The record for a secret's hash, from the file as it is now."""
        self._refresh()
        record = self._by_hash.get(digest)
        return record if record is not None and matches(record, digest) else None

    def _refresh(self) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._by_hash, self._stamp = {}, None
            return
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            self._by_hash = {r.hash: r for r in self._read()}
            self._stamp = stamp

    # -- `turnout keys` ------------------------------------------------------------

    def _read(self) -> list[KeyRecord]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return []
        return [KeyRecord.from_json(item) for item in data.get("keys", [])]

    def _write(self, records: list[KeyRecord]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".keys-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"keys": [r.to_json() for r in records]}, f, indent=1)
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)  # atomic: a gateway never reads half a file
        except BaseException:
            os.unlink(tmp)
            raise

    def add(self, record: KeyRecord) -> None:
        self._write([*self._read(), record])

    def list(self) -> list[KeyRecord]:
        return self._read()

    def revoke(self, ref: str) -> KeyRecord:
        records = self._read()
        found = replace(_find(records, ref), revoked=True)
        self._write([found if r.id == found.id else r for r in records])
        return found


class RedisKeyStore:
    """Keys in Redis: `{prefix}key:<sha256>` is a hash {record: JSON, revoked: 0|1};
    `{prefix}keys` maps key id -> sha256, for `keys list` and `keys revoke`.

    The admin methods are synchronous (the CLI); `alookup` is the gateway's (async)."""

    def __init__(self, url: str, prefix: str = "turnout:", client: Any = None) -> None:
        self.url = url
        self.prefix = prefix
        self.client = client  # a redis.asyncio client, for the gateway

    def record_key(self, digest: str) -> str:
        return f"{self.prefix}key:{digest}"

    async def alookup(self, digest: str) -> KeyRecord | None:
        """The record for a hash (revoked ones too: the caller decides). Raises redis errors."""
        raw = await self.client.hget(self.record_key(digest), "record")
        if raw is None:
            return None
        record = KeyRecord.from_json(json.loads(raw))
        return record if matches(record, digest) else None

    def _sync(self) -> Any:
        import redis

        return redis.Redis.from_url(self.url, socket_timeout=5, decode_responses=True)

    def add(self, record: KeyRecord) -> None:
        r = self._sync()
        with r.pipeline(transaction=True) as p:
            p.hset(self.record_key(record.hash), mapping={"record": json.dumps(record.to_json()), "revoked": "0"})
            p.hset(f"{self.prefix}keys", record.id, record.hash)
            p.execute()

    def list(self) -> list[KeyRecord]:
        r = self._sync()
        digests = r.hgetall(f"{self.prefix}keys")
        records = []
        for digest in digests.values():
            raw = r.hget(self.record_key(digest), "record")
            if raw:
                records.append(KeyRecord.from_json(json.loads(raw)))
        return sorted(records, key=lambda rec: rec.created)

    def revoke(self, ref: str) -> KeyRecord:
        found = replace(_find(self.list(), ref), revoked=True)
        r = self._sync()
        # `revoked` is what the gateways read per request; the record follows for `keys list`.
        r.hset(self.record_key(found.hash), mapping={"revoked": "1", "record": json.dumps(found.to_json())})
        return found
