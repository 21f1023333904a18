"""Engine deltas in, OpenAI responses and chunks out: the one place that shapes what a local
model produced, whether it ran in this process or in an engine worker."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field

from backends.generation import GenerationDelta, TokenLogprob
from backends.protocol import (
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChoiceLogprobs,
    ChunkChoice,
    ChunkDelta,
    ChunkFunctionCall,
    ChunkToolCall,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    ResponseFunctionCall,
    ResponseMessage,
    ResponseToolCall,
    TokenLogprob as WireTokenLogprob,
    TopLogprob,
    Usage,
)
from backends.tools.formats import ToolFormat
from backends.tools.parser import ParsedCall, ToolCallParser

Deltas = AsyncIterator[GenerationDelta]


@dataclass
class _Choice:
    """One choice's output, collected."""

    parts: list[str] = field(default_factory=list)
    finish: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(self.parts)


async def _collect(deltas: Deltas, n: int) -> tuple[list[_Choice], int]:
    """Every choice's whole output (by index) and the tokens generated for all of them."""
    choices = [_Choice() for _ in range(n)]
    count = 0
    async with aclosing(deltas):
        async for delta in deltas:
            choice = choices[delta.index]
            choice.parts.append(delta.text)
            choice.logprobs.extend(delta.logprobs or [])
            choice.finish = delta.finish_reason or choice.finish
            count += len(delta.token_ids)
    return choices, count


def _response_calls(calls: list[ParsedCall]) -> list[ResponseToolCall]:
    return [ResponseToolCall(id=c.id, function=ResponseFunctionCall(name=c.name, arguments=c.arguments)) for c in calls]


def _finish_reason(finish: str | None, parser: ToolCallParser | None) -> str | None:
    """A choice that stopped after calling tools finished with "tool_calls", as in OpenAI."""
    return "tool_calls" if finish == "stop" and parser is not None and parser.calls else finish


async def chat_completion(request: ChatCompletionRequest, prompt_tokens: int, deltas: Deltas, tools: ToolFormat | None = None) -> ChatCompletion:
    """The whole answer of a chat completion; `tools`: the format its tool calls are parsed
    from (None: no tools offered, the text is all content)."""
    collected, completion_tokens = await _collect(deltas, request.n or 1)
    choices: list[ChatChoice] = []
    for index, choice in enumerate(collected):
        parser = ToolCallParser(tools) if tools is not None else None
        content, calls = choice.text, []
        if parser is not None:
            fed, calls = parser.feed(content)
            rest, more = parser.finish()
            content, calls = fed + rest, calls + more
        choices.append(
            ChatChoice(
                index=index,
                message=ResponseMessage(content=content if content or not calls else None, tool_calls=_response_calls(calls) or None),
                finish_reason=_finish_reason(choice.finish, parser),  # type: ignore[arg-type]
                logprobs=_chat_logprobs(choice.logprobs) if request.logprobs else None,
            )
        )
    return ChatCompletion(model=request.model, choices=choices, usage=usage(prompt_tokens, completion_tokens))


async def chat_chunks(
    request: ChatCompletionRequest, prompt_tokens: int, deltas: Deltas, tools: ToolFormat | None = None
) -> AsyncIterator[ChatCompletionChunk]:
    """A chat completion as OpenAI's stream of chunks (each choice's chunks carry its index;
    each tool call comes as a delta with its id, type and name, then its arguments)."""
    chunk_id, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

    continuous = _continuous_usage(request)

    def chunk(index: int, delta: ChunkDelta, finish: str | None = None, logprobs: list[TokenLogprob] | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=chunk_id,
            created=created,
            model=request.model,
            choices=[
                ChunkChoice(
                    index=index,
                    delta=delta,
                    finish_reason=finish,  # type: ignore[arg-type]
                    logprobs=_chat_logprobs(logprobs) if request.logprobs and logprobs else None,
                )
            ],
            usage=usage(prompt_tokens, completion_tokens) if continuous else None,
        )

    def call_chunks(index: int, calls: list[ParsedCall]) -> list[ChatCompletionChunk]:
        out = []
        for c in calls:
            head = ChunkToolCall(index=c.index, id=c.id, type="function", function=ChunkFunctionCall(name=c.name, arguments=""))
            out.append(chunk(index, ChunkDelta(tool_calls=[head])))
            out.append(chunk(index, ChunkDelta(tool_calls=[ChunkToolCall(index=c.index, function=ChunkFunctionCall(arguments=c.arguments))])))
        return out

    n = request.n or 1
    parsers = [ToolCallParser(tools) if tools is not None else None for _ in range(n)]
    started = [False] * n
    completion_tokens = 0
    async with aclosing(deltas):
        async for delta in deltas:
            i = delta.index
            # The role chunk waits for the first token: admission and prefill errors then
            # surface before the first byte, as HTTP errors.
            if not started[i]:
                started[i] = True
                yield chunk(i, ChunkDelta(role="assistant", content=""))
            completion_tokens += len(delta.token_ids)
            parser = parsers[i]
            content, calls = parser.feed(delta.text) if parser is not None else (delta.text, [])
            if delta.finish_reason and parser is not None:
                rest, more = parser.finish()
                content, calls = content + rest, calls + more
            if content or delta.logprobs:
                yield chunk(i, ChunkDelta(content=content), logprobs=delta.logprobs)
            for c in call_chunks(i, calls):
                yield c
            if delta.finish_reason:
                yield chunk(i, ChunkDelta(), _finish_reason(delta.finish_reason, parser))
    if request.wants_usage_chunk():
        yield ChatCompletionChunk(
            id=chunk_id, created=created, model=request.model, choices=[], usage=usage(prompt_tokens, completion_tokens)
        )


async def completion(request: CompletionRequest, prompt_tokens: int, prompt_text: str, deltas: Deltas) -> Completion:
    """The whole answer of a text completion (`prompt_text` is echoed when asked)."""
    collected, completion_tokens = await _collect(deltas, request.n or 1)
    return Completion(
        model=request.model,
        choices=[
            CompletionChoice(
                index=index,
                text=(prompt_text if request.echo else "") + choice.text,
                finish_reason=choice.finish,  # type: ignore[arg-type]
                logprobs=_completion_logprobs(choice.logprobs) if request.logprobs is not None else None,
            )
            for index, choice in enumerate(collected)
        ],
        usage=usage(prompt_tokens, completion_tokens),
    )


async def completion_chunks(
    request: CompletionRequest, prompt_tokens: int, prompt_text: str, deltas: Deltas
) -> AsyncIterator[Completion]:
    """A text completion as OpenAI's stream of chunks."""
    chunk_id, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())

    continuous = _continuous_usage(request)

    def chunk(index: int, text: str, finish: str | None = None, logprobs: list[TokenLogprob] | None = None) -> Completion:
        return Completion(
            id=chunk_id,
            created=created,
            model=request.model,
            choices=[
                CompletionChoice(
                    index=index,
                    text=text,
                    finish_reason=finish,  # type: ignore[arg-type]
                    logprobs=_completion_logprobs(logprobs) if request.logprobs is not None and logprobs else None,
                )
            ],
            usage=usage(prompt_tokens, completion_tokens) if continuous else None,
        )

    started = [False] * (request.n or 1)
    completion_tokens = 0
    async with aclosing(deltas):
        async for delta in deltas:
            i = delta.index
            if request.echo and not started[i]:
                yield chunk(i, prompt_text)
            started[i] = True
            completion_tokens += len(delta.token_ids)
            if delta.text or delta.finish_reason:
                yield chunk(i, delta.text, delta.finish_reason, delta.logprobs)
    if request.wants_usage_chunk():
        yield Completion(id=chunk_id, created=created, model=request.model, choices=[], usage=usage(prompt_tokens, completion_tokens))


def _continuous_usage(request: ChatCompletionRequest | CompletionRequest) -> bool:
    """vLLM's `stream_options.continuous_usage_stats`: usage so far on every chunk."""
    return bool(request.stream_options and request.stream_options.include_usage and request.stream_options.continuous_usage_stats)


def usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    """OpenAI's usage block."""
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens)


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
