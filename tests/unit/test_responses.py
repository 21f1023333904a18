"""backends/responses.py: engine deltas as OpenAI's chunks, usage included as asked."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from backends.generation import GenerationDelta
from backends.protocol import ChatCompletionRequest, CompletionRequest
from backends.responses import chat_chunks, completion_chunks


async def deltas() -> AsyncIterator[GenerationDelta]:
    yield GenerationDelta(text="Hel", token_ids=[1])
    yield GenerationDelta(text="lo", token_ids=[2, 3], finish_reason="stop", final=True)


@pytest.mark.parametrize("continuous", [False, True])
async def test_usage_on_every_chunk_only_when_asked(continuous: bool) -> None:
    options = {"include_usage": True, "continuous_usage_stats": continuous}
    chat = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], stream=True, stream_options=options)  # type: ignore[list-item, arg-type]
    chunks = [c async for c in chat_chunks(chat, 7, deltas())]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3 and not chunks[-1].choices
    with_choices = [(c.usage.prompt_tokens, c.usage.completion_tokens) if c.usage else None for c in chunks if c.choices]
    assert with_choices == ([(7, 0), (7, 1), (7, 3), (7, 3)] if continuous else [None] * 4)  # role, "Hel", "lo", finish
    text = CompletionRequest(model="m", prompt="p", stream=True, stream_options=options)  # type: ignore[arg-type]
    pieces = [c async for c in completion_chunks(text, 7, "p", deltas())]
    assert [c.usage.completion_tokens if c.usage else None for c in pieces if c.choices] == ([1, 3] if continuous else [None, None])
