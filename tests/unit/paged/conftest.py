"""Fixtures for the paged engine's unit tests: tiny random-weight engines whose block
accounting is checked after every test."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from backends.paged.engine import LLMEngine


def assert_blocks_all_free(engine: LLMEngine) -> None:
    """Every block is back in the free or cached pools and no request is left behind."""
    bm = engine.block_manager
    bm.check_invariants()
    assert not engine.scheduler.running and not engine.scheduler.waiting, "requests left in the scheduler"
    assert not engine.requests, f"requests left in the engine: {list(engine.requests)}"
    assert bm.num_free_blocks == bm.num_blocks, f"{bm.num_blocks - bm.num_free_blocks} blocks still referenced"


@pytest.fixture
def make_engine() -> Iterator[Callable[..., LLMEngine]]:
    """Build tiny engines (dummy:tiny unless model= is given); each is checked all-free at teardown."""
    engines: list[LLMEngine] = []

    def make(model: str = "dummy:tiny", **options: Any) -> LLMEngine:
        options.setdefault("num_threads", None)
        engine = LLMEngine.from_model(model, **options)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        assert_blocks_all_free(engine)
