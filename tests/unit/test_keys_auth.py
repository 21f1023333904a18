"""Keys, stores and authentication without a server: secrets, hashing, headers, expiry."""

from __future__ import annotations

import asyncio
import base64
import os
import time
from pathlib import Path

import pytest

from gateway.auth import AuthError, Authenticator
from gateway.cli import bind_refusal
from gateway.keys import FileKeyStore, hash_secret, new_key, parse_expiry
from gateway.ratelimit import _duration, _headers, buckets_for
from policies.ratelimit import decide
from policies.schema import LimitSpec, parse_config

BACKENDS = "backends: [{name: a, kind: llamacpp, model: m}]\n"


def test_secrets_are_prefixed_random_and_stored_as_hashes(tmp_path: Path) -> None:
    secret, record = new_key("k")
    body = secret.removeprefix("sk-turnout-")
    assert secret.startswith("sk-turnout-") and len(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))) >= 32
    assert new_key("k")[0] != secret
    store = FileKeyStore(tmp_path / "keys.json")
    store.add(record)
    text = (tmp_path / "keys.json").read_text()
    assert body not in text and record.hash == hash_secret(secret) and record.hash in text
    assert oct(os.stat(tmp_path / "keys.json").st_mode & 0o777) == "0o600"


def test_file_store_sees_changes_without_restart(tmp_path: Path) -> None:
    store = FileKeyStore(tmp_path / "keys.json")
    assert store.lookup("nope") is None  # no file yet
    secret, record = new_key("k")
    writer = FileKeyStore(tmp_path / "keys.json")
    writer.add(record)
    assert store.lookup(hash_secret(secret)).id == record.id
    writer.revoke(record.id)
    assert store.lookup(hash_secret(secret)).revoked


def auth_for(tmp_path: Path, extra: str = "") -> tuple[Authenticator, FileKeyStore]:
    config = parse_config(f"auth: {{store: file, path: {tmp_path}/k.json}}\n{extra}{BACKENDS}")
    store = FileKeyStore(tmp_path / "k.json")
    return Authenticator(config, store), store


def test_bearer_api_key_and_x_api_key_headers(tmp_path: Path) -> None:
    auth, store = auth_for(tmp_path, "limits: {key: {rpm: 9}, tenants: {t: {tpm: 100}}}\n")
    secret, record = new_key("k", tenant="t", models=("m",))
    store.add(record)
    given = [(b"authorization", f"Bearer {secret}".encode())], [(b"api-key", secret.encode())], [(b"x-api-key", secret.encode())]
    for headers in given:
        principal = asyncio.run(auth.authenticate(headers))
        assert principal.key_id == record.id and principal.may_use("m") and not principal.may_use("x")
        assert [(b.scope, b.tokens, b.rate.limit) for b in principal.buckets] == [("key", False, 9), ("tenant", True, 100)]
    for headers in ([], [(b"authorization", b"Basic abc")], [(b"authorization", b"Bearer sk-turnout-wrong")]):
        with pytest.raises(AuthError):
            asyncio.run(auth.authenticate(headers))


def test_expired_and_revoked_keys_are_refused(tmp_path: Path) -> None:
    auth, store = auth_for(tmp_path)
    old, old_record = new_key("old", expires=time.time() - 1)
    store.add(old_record)
    with pytest.raises(AuthError, match="expired"):
        asyncio.run(auth.authenticate([(b"api-key", old.encode())]))
    secret, record = new_key("k")
    store.add(record)
    assert asyncio.run(auth.authenticate([(b"api-key", secret.encode())]))
    store.revoke("k")
    with pytest.raises(AuthError):
        asyncio.run(auth.authenticate([(b"api-key", secret.encode())]))


def test_expiry_parsing() -> None:
    assert parse_expiry("2030-01-01") == parse_expiry("2030-01-01T23:59:59+00:00")
    with pytest.raises(ValueError):
        parse_expiry("next week")


def test_headers_report_the_tightest_bucket() -> None:
    buckets = buckets_for("", "k", "t", LimitSpec(rpm=10, tpm=1000), LimitSpec(rpm=3), 60)
    d = decide([None] * 3, [b.rate for b in buckets], [1, 100, 1], 1e9)
    headers = dict(_headers(buckets, d))
    assert headers[b"x-ratelimit-limit-requests"] == b"3" and headers[b"x-ratelimit-remaining-requests"] == b"2"
    assert headers[b"x-ratelimit-limit-tokens"] == b"1000" and headers[b"x-ratelimit-remaining-tokens"] == b"900"
    assert headers[b"x-ratelimit-reset-requests"] == b"20s" and headers[b"x-ratelimit-reset-tokens"] == b"6s"
    assert [_duration(x) for x in (0.0123, 1.5, 360)] == ["13ms", "1.5s", "6m0s"]


def test_auth_none_may_only_bind_loopback() -> None:
    open_config = parse_config(BACKENDS)
    keyed = parse_config("auth: {store: file}\n" + BACKENDS)
    assert bind_refusal(open_config, "127.0.0.1") is None and bind_refusal(open_config, "::1") is None
    assert "auth: none" in bind_refusal(open_config, "0.0.0.0")
    assert bind_refusal(keyed, "0.0.0.0") is None
