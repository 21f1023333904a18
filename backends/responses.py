"""Engine deltas in, OpenAI responses and chunks out: the one place that shapes what a local
model produced, whether it ran in this process or in an engine worker."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing

from backends.generation import GenerationDelta, TokenLogprob
from backends.protocol import (
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChoiceLogprobs,
    ChunkChoice,
    ChunkDelta,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    ResponseMessage,
    TokenLogprob as WireTokenLogprob,
    TopLogprob,
    Usage,
)

Deltas = AsyncIterator[GenerationDelta]


async def chat_completion(request: ChatCompletionRequest, prompt_tokens: int, deltas: Deltas) -> ChatCompletion:
    """The whole answer of a chat completion."""
    text, finish, completion_tokens, logprobs = await _collect(deltas)
    return ChatCompletion(
        model=request.model,
        choices=[
            ChatChoice(
                message=ResponseMessage(content=text),
                finish_reason=finish,  # type: ignore[arg-type]
                logprobs=_chat_logprobs(logprobs) if request.logprobs else None,
            )
        ],
        usage=usage(prompt_tokens, completion_tokens),
    )


async def chat_chunks(request: ChatCompletionRequest, prompt_tokens: int, deltas: Deltas) -> AsyncIterator[ChatCompletionChunk]:
    """A chat completion as OpenAI's stream of chunks."""
    chunk_id, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

    def chunk(delta: ChunkDelta, finish: str | None = None, logprobs: list[TokenLogprob] | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=chunk_id,
            created=created,
            model=request.model,
            choices=[
                ChunkChoice(
                    delta=delta,
                    finish_reason=finish,  # type: ignore[arg-type]
                    logprobs=_chat_logprobs(logprobs) if request.logprobs and logprobs else None,
                )
            ],
        )

    completion_tokens, started = 0, False
    async with aclosing(deltas):
        async for delta in deltas:
            # The role chunk waits for the first token: admission and prefill errors then
            # surface before the first byte, as HTTP errors.
            if not started:
                started = True
                yield chunk(ChunkDelta(role="assistant", content=""))
            completion_tokens += len(delta.token_ids)
            if delta.text or delta.logprobs:
                yield chunk(ChunkDelta(content=delta.text), logprobs=delta.logprobs)
            if delta.finish_reason:
                yield chunk(ChunkDelta(), delta.finish_reason)
    if request.wants_usage_chunk():
        yield ChatCompletionChunk(
            id=chunk_id, created=created, model=request.model, choices=[], usage=usage(prompt_tokens, completion_tokens)
        )


async def completion(request: CompletionRequest, prompt_tokens: int, prompt_text: str, deltas: Deltas) -> Completion:
    """The whole answer of a text completion (`prompt_text` is echoed when asked)."""
    text, finish, completion_tokens, logprobs = await _collect(deltas)
    return Completion(
        model=request.model,
        choices=[
            CompletionChoice(
                text=(prompt_text if request.echo else "") + text,
                finish_reason=finish,  # type: ignore[arg-type]
                logprobs=_completion_logprobs(logprobs) if request.logprobs is not None else None,
            )
        ],
        usage=usage(prompt_tokens, completion_tokens),
    )


async def completion_chunks(
    request: CompletionRequest, prompt_tokens: int, prompt_text: str, deltas: Deltas
) -> AsyncIterator[Completion]:
    """A text completion as OpenAI's stream of chunks."""
    chunk_id, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())

    def chunk(text: str, finish: str | None = None, logprobs: list[TokenLogprob] | None = None) -> Completion:
        return Completion(
            id=chunk_id,
            created=created,
            model=request.model,
            choices=[
                CompletionChoice(
                    text=text,
                    finish_reason=finish,  # type: ignore[arg-type]
                    logprobs=_completion_logprobs(logprobs) if request.logprobs is not None and logprobs else None,
                )
            ],
        )

    completion_tokens, started = 0, False
    async with aclosing(deltas):
        async for delta in deltas:
            if request.echo and not started:
                yield chunk(prompt_text)
            started = True
            completion_tokens += len(delta.token_ids)
            if delta.text or delta.finish_reason:
                yield chunk(delta.text, delta.finish_reason, delta.logprobs)
    if request.wants_usage_chunk():
        yield Completion(id=chunk_id, created=created, model=request.model, choices=[], usage=usage(prompt_tokens, completion_tokens))


def usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    """OpenAI's usage block."""
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens)


async def _collect(deltas: Deltas) -> tuple[str, str | None, int, list[TokenLogprob]]:
    parts: list[str] = []
    logprobs: list[TokenLogprob] = []
    finish: str | None = None
    count = 0
    async with aclosing(deltas):
        async for delta in deltas:
            parts.append(delta.text)
            count += len(delta.token_ids)
            logprobs.extend(delta.logprobs or [])
            finish = delta.finish_reason or finish
    return "".join(parts), finish, count, logprobs


def _chat_logprobs(items: list[TokenLogprob] | None) -> ChoiceLogprobs:
    return ChoiceLogprobs(
        content=[
            WireTokenLogprob(
                token=i.text,
                logprob=i.logprob,
                bytes=list(i.text.encode()),
                top_logprobs=[TopLogprob(token=t, logprob=lp, bytes=list(t.encode())) for t, lp in i.top],
            )
            for i in items or []
        ]
    )


def _completion_logprobs(items: list[TokenLogprob] | None) -> CompletionLogprobs:
    out = CompletionLogprobs()
    offset = 0
    for i in items or []:
        out.tokens.append(i.text)
        out.token_logprobs.append(i.logprob)
        out.top_logprobs.append(dict(i.top))
        out.text_offset.append(offset)
        offset += len(i.text)
    return out
