"""Servers the dialect tests (Anthropic, Ollama, Responses, embeddings) and the agent-contract
tests share: a turnout node serving the real SmolLM2 on both local engines, a gateway reaching
that node through remote backends, and a gateway with API keys on. Session-scoped: each loads
the model once for every module that uses it. Import the fixtures into a test module with
`from tests.integration.dialect_servers import *  # noqa: F403`."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.keys import FileKeyStore, new_key
from tests.conftest import Server, start_server

__all__ = [
    "LLAMA", "PAGED", "REMOTE_LLAMA", "REMOTE_PAGED", "MODELS", "Served", "AuthGateway",
    "dialect_node", "dialect_gateway", "served", "auth_gateway",
]  # fmt: skip

LLAMA, PAGED = "smollm2-135m", "smollm2-135m-paged"
REMOTE_LLAMA, REMOTE_PAGED = "remote-llama", "remote-paged"
MODELS = [LLAMA, PAGED, REMOTE_LLAMA, REMOTE_PAGED]
LONG_TIMEOUTS = {"first_token_s": 120, "total_s": 300}


@pytest.fixture(scope="session")
def dialect_node(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A turnout node serving SmolLM2 on the llama.cpp runner and on the paged engine."""
    config = {
        "server": {"host": "127.0.0.1"},
        "backends": [
            {"name": "llama", "kind": "llamacpp", "model": str(model_path), "served_name": LLAMA, "options": {"n_ctx": 2048, "instances": 1}},
            {"name": "paged", "kind": "paged", "model": str(model_path), "served_name": PAGED,
             "options": {"num_blocks": 256, "max_model_len": 2048, "max_num_seqs": 8, "num_threads": 1}},
        ],
        "routes": [
            {"model": LLAMA, "backends": ["llama"], "timeouts": LONG_TIMEOUTS},
            {"model": PAGED, "backends": ["paged"], "timeouts": LONG_TIMEOUTS},
        ],
    }  # fmt: skip
    server = start_server(config, tmp_path_factory.mktemp("dialect-node"), ready_timeout_s=120)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def dialect_gateway(dialect_node: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A gateway whose backends are the node's two models, as remote backends."""
    url = dialect_node.url + "/v1"
    config = {
        "server": {"host": "127.0.0.1"},
        "backends": [
            {"name": "node-llama", "kind": "remote", "model": LLAMA, "url": url, "served_name": REMOTE_LLAMA},
            {"name": "node-paged", "kind": "remote", "model": PAGED, "url": url, "served_name": REMOTE_PAGED},
        ],
        "routes": [
            {"model": REMOTE_LLAMA, "backends": ["node-llama"], "timeouts": LONG_TIMEOUTS},
            {"model": REMOTE_PAGED, "backends": ["node-paged"], "timeouts": LONG_TIMEOUTS},
        ],
    }
    server = start_server(config, tmp_path_factory.mktemp("dialect-gw"), ready_timeout_s=60)
    yield server
    server.stop()


@dataclass(frozen=True)
class Served:
    """Where each model of MODELS is served: the node (local engines) or the gateway (remote)."""

    node: Server
    gateway: Server

    def server(self, model: str) -> Server:
        return self.gateway if model in (REMOTE_LLAMA, REMOTE_PAGED) else self.node


@pytest.fixture(scope="session")
def served(dialect_node: Server, dialect_gateway: Server) -> Served:
    return Served(dialect_node, dialect_gateway)


@dataclass(frozen=True)
class AuthGateway:
    """A gateway with API keys on (a file store, re-read when it changes) in front of the
    node's llama model, as `remote-llama`. `secret` has no limits; `limited_key()` makes a
    fresh key that may make `rpm` requests a minute (a key per test: limits are per key)."""

    server: Server
    store: FileKeyStore
    secret: str

    def limited_key(self, rpm: int = 2) -> str:
        secret, record = new_key("limited", rpm=rpm)
        self.store.add(record)
        return secret


@pytest.fixture(scope="session")
def auth_gateway(dialect_node: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthGateway]:
    tmp = tmp_path_factory.mktemp("dialect-auth")
    store = FileKeyStore(tmp / "keys.json")
    secret, record = new_key("dialects")
    store.add(record)
    config = {
        "server": {"host": "127.0.0.1"},
        "auth": {"store": "file", "path": str(tmp / "keys.json")},
        "backends": [{"name": "node-llama", "kind": "remote", "model": LLAMA, "url": dialect_node.url + "/v1", "served_name": REMOTE_LLAMA}],
        "routes": [{"model": REMOTE_LLAMA, "backends": ["node-llama"], "timeouts": LONG_TIMEOUTS}],
    }
    server = start_server(config, tmp, ready_timeout_s=60)
    yield AuthGateway(server, store, secret)
    server.stop()
