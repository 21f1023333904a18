"""OpenAI requests in, engine generations out: the part every in-process backend shares.

A subclass supplies tokenization, the chat template and `generate`; this class does the
context-window check, sampling defaults, and the shape of OpenAI responses and chunks.
"""

from __future__ import annotations

import abc
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing

from backends.chat_template import render_chat
from backends.generation import GenerationDelta, GenerationRequest, SamplingParams, TokenLogprob
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
    ContextLengthExceeded,
    InvalidRequest,
    LoadReport,
    ModelCard,
    ResponseMessage,
    TokenLogprob as WireTokenLogprob,
    TopLogprob,
    Usage,
)


class LocalBackend(abc.ABC):
    """Base for backends that run a model in this process."""

    name: str
    model_id: str
    supports_logprobs: bool = False

    # -- what a subclass provides ---------------------------------------------------

    @property
    @abc.abstractmethod
    def context_window(self) -> int:
        """Tokens of prompt plus output the model can hold."""

    @abc.abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Token ids of text, special tokens parsed, BOS added where the model wants it."""

    @abc.abstractmethod
    def chat_template(self) -> tuple[str | None, str, str]:
        """(Jinja template or None, bos token text, eos token text)."""

    @abc.abstractmethod
    def detokenize(self, token_ids: list[int]) -> str:
        """Text of token ids (used for echo)."""

    @abc.abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        """Stream the generation. Closing the iterator early must cancel it and free
        whatever it holds."""

    @abc.abstractmethod
    def load(self) -> LoadReport: ...

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Load the model."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release the model."""

    # -- the Backend protocol ---------------------------------------------------------

    def models(self) -> list[ModelCard]:
        return [ModelCard(id=self.model_id, max_model_len=self.context_window)]

    async def chat(self, request: ChatCompletionRequest) -> ChatCompletion:
        gen, _ = self._chat_generation(request)
        text, finish, completion_tokens, logprobs = await self._collect(gen)
        return ChatCompletion(
            model=request.model,
            choices=[
                ChatChoice(
                    message=ResponseMessage(content=text),
                    finish_reason=finish,  # type: ignore[arg-type]
                    logprobs=_chat_logprobs(logprobs) if request.logprobs else None,
                )
            ],
            usage=_usage(len(gen.prompt_tokens), completion_tokens),
        )

    async def chat_stream(self, request: ChatCompletionRequest) -> AsyncIterator[ChatCompletionChunk]:
        gen, _ = self._chat_generation(request)
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
        async with aclosing(self.generate(gen)) as deltas:
            async for delta in deltas:
                # The role chunk waits for the first token: admission and prefill errors
                # then surface before the first byte, as HTTP errors.
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
                id=chunk_id,
                created=created,
                model=request.model,
                choices=[],
                usage=_usage(len(gen.prompt_tokens), completion_tokens),
            )

    async def completion(self, request: CompletionRequest) -> Completion:
        gen, prompt_text = self._completion_generation(request)
        text, finish, completion_tokens, logprobs = await self._collect(gen)
        return Completion(
            model=request.model,
            choices=[
                CompletionChoice(
                    text=(prompt_text if request.echo else "") + text,
                    finish_reason=finish,  # type: ignore[arg-type]
                    logprobs=_completion_logprobs(logprobs) if request.logprobs is not None else None,
                )
            ],
            usage=_usage(len(gen.prompt_tokens), completion_tokens),
        )

    async def completion_stream(self, request: CompletionRequest) -> AsyncIterator[Completion]:
        gen, prompt_text = self._completion_generation(request)
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
        async with aclosing(self.generate(gen)) as deltas:
            async for delta in deltas:
                if request.echo and not started:
                    yield chunk(prompt_text)
                started = True
                completion_tokens += len(delta.token_ids)
                if delta.text or delta.finish_reason:
                    yield chunk(delta.text, delta.finish_reason, delta.logprobs)
        if request.wants_usage_chunk():
            yield Completion(
                id=chunk_id,
                created=created,
                model=request.model,
                choices=[],
                usage=_usage(len(gen.prompt_tokens), completion_tokens),
            )

    # -- shared steps -------------------------------------------------------------------

    def _chat_generation(self, request: ChatCompletionRequest) -> tuple[GenerationRequest, str]:
        template, bos, eos = self.chat_template()
        prompt = render_chat(template, request.messages, bos_token=bos, eos_token=eos)
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        json_mode = bool(request.response_format and request.response_format.type == "json_object")
        return self._generation(request, self.tokenize(prompt), request.output_limit(), logprobs, json_mode), prompt

    def _completion_generation(self, request: CompletionRequest) -> tuple[GenerationRequest, str]:
        prompt = request.single_prompt()
        if isinstance(prompt, str):
            tokens, text = self.tokenize(prompt), prompt
        else:
            tokens, text = list(prompt), self.detokenize(list(prompt))
        return self._generation(request, tokens, request.output_limit(), request.logprobs, False), text

    def _generation(
        self,
        request: ChatCompletionRequest | CompletionRequest,
        prompt_tokens: list[int],
        max_tokens: int | None,
        logprobs: int | None,
        json_mode: bool,
    ) -> GenerationRequest:
        if logprobs is not None and not self.supports_logprobs:
            raise InvalidRequest(f"backend {self.name!r} does not return logprobs", param="logprobs")
        window = self.context_window
        prompt_len = len(prompt_tokens)
        if not prompt_tokens:
            raise InvalidRequest("the prompt is empty", param="prompt")
        if max_tokens is None:
            if prompt_len >= window:
                raise ContextLengthExceeded(
                    f"This model's maximum context length is {window} tokens. "
                    f"However, your messages resulted in {prompt_len} tokens.",
                    param="messages",
                )
            max_tokens = window - prompt_len
        elif prompt_len + max_tokens > window:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {window} tokens. However, you requested "
                f"{prompt_len + max_tokens} tokens ({prompt_len} in the messages, {max_tokens} in the "
                f"completion). Please reduce the length of the messages or completion.",
                param="max_tokens",
            )
        bias = {int(k): v for k, v in (request.logit_bias or {}).items()}
        sampling = SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if request.temperature is None else request.temperature,
            top_p=1.0 if request.top_p is None else request.top_p,
            top_k=-1 if request.top_k in (None, 0) else request.top_k,  # type: ignore[arg-type]
            min_p=request.min_p or 0.0,
            seed=request.seed,
            presence_penalty=request.presence_penalty or 0.0,
            frequency_penalty=request.frequency_penalty or 0.0,
            repetition_penalty=request.repetition_penalty or 1.0,
            logit_bias=bias,
            stop=request.stop_list(),
            ignore_eos=bool(request.ignore_eos),
            logprobs=logprobs,
            json_mode=json_mode,
        )
        return GenerationRequest(request_id=uuid.uuid4().hex, prompt_tokens=prompt_tokens, sampling=sampling)

    async def _collect(self, gen: GenerationRequest) -> tuple[str, str | None, int, list[TokenLogprob]]:
        parts: list[str] = []
        logprobs: list[TokenLogprob] = []
        finish: str | None = None
        count = 0
        async with aclosing(self.generate(gen)) as deltas:
            async for delta in deltas:
                parts.append(delta.text)
                count += len(delta.token_ids)
                logprobs.extend(delta.logprobs or [])
                finish = delta.finish_reason or finish
        return "".join(parts), finish, count, logprobs


def _usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


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
