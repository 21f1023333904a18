"""OpenAI requests in, engine generations out: the part every in-process backend shares.

A subclass supplies tokenization, the chat template and `generate`; this class does the
rendering, the context-window check and the sampling defaults (`prepare`), and hands the
engine's deltas to `backends.responses` for OpenAI's shapes. In the gateway, a LocalBackend
runs inside an engine worker process (`backends.worker`); tests and `turnout run` use one
in-process.
"""

from __future__ import annotations

import abc
import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from backends import responses
from backends.chat_template import render_chat
from backends.generation import GenerationDelta, GenerationRequest, SamplingParams, output_budget
from backends.protocol import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ContextLengthExceeded,
    InvalidRequest,
    LoadReport,
    ModelCard,
)


class LocalBackend(abc.ABC):
    """Base for backends that run a model in this process."""

    name: str
    model_id: str
    supports_logprobs: bool = False
    # The most bytes one token stands for (the vocabulary's longest piece), where a subclass
    # knows it: a prompt whose length alone shows that it cannot fit is then refused before
    # it is tokenized (a guessed bytes-per-token ratio would refuse some prompts that fit).
    max_token_bytes: int | None = None

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

    def check_json_schema(self, schema: dict[str, Any]) -> None:  # noqa: B027 - optional hook
        """Raise InvalidRequest (param `response_format`) for a JSON Schema (already valid as
        one) that this backend cannot constrain its output to. Runs in `prepare`'s thread,
        before generation starts. Engines without any JSON-schema support refuse the request
        in their own validation (the paged engine's `validate`)."""

    # -- the Backend protocol ---------------------------------------------------------

    def models(self) -> list[ModelCard]:
        return [ModelCard(id=self.model_id, max_model_len=self.context_window)]

    # In process (tests, `turnout run`), `prepare` runs in a thread, as the worker runs it:
    # rendering and tokenizing grow with the request and must not hold the event loop.

    async def chat(self, request: ChatCompletionRequest) -> ChatCompletion:
        gen, _ = await asyncio.to_thread(self.prepare, "chat", request)
        return await responses.chat_completion(request, len(gen.prompt_tokens), self.generate(gen))

    async def chat_stream(self, request: ChatCompletionRequest) -> AsyncIterator[ChatCompletionChunk]:
        gen, _ = await asyncio.to_thread(self.prepare, "chat", request)
        async with aclosing(responses.chat_chunks(request, len(gen.prompt_tokens), self.generate(gen))) as chunks:
            async for chunk in chunks:
                yield chunk

    async def completion(self, request: CompletionRequest) -> Completion:
        gen, text = await asyncio.to_thread(self.prepare, "completions", request)
        return await responses.completion(request, len(gen.prompt_tokens), text, self.generate(gen))

    async def completion_stream(self, request: CompletionRequest) -> AsyncIterator[Completion]:
        gen, text = await asyncio.to_thread(self.prepare, "completions", request)
        async with aclosing(responses.completion_chunks(request, len(gen.prompt_tokens), text, self.generate(gen))) as chunks:
            async for chunk in chunks:
                yield chunk

    # -- shared steps -------------------------------------------------------------------

    def prepare(self, kind: str, request: ChatCompletionRequest | CompletionRequest) -> tuple[GenerationRequest, str]:
        """Render (chat), tokenize and check a request: the engine's request and the prompt
        text. CPU work proportional to the request: callers run it in a thread, off any event
        loop. Raises InvalidRequest (400) for what the model cannot take; a prompt that cannot
        fit by its length alone is refused before it is tokenized (check_length_estimate)."""
        if kind == "chat":
            assert isinstance(request, ChatCompletionRequest)
            tool_param = request.tool_calling_param()
            if tool_param is not None:
                raise InvalidRequest(f"tool calling is not supported by backend {self.name!r} yet", param=tool_param)
            template, bos, eos = self.chat_template()
            prompt = render_chat(template, request.messages, bos_token=bos, eos_token=eos)
            self.check_length_estimate(len(prompt), request.output_limit(), "messages")
            logprobs = (request.top_logprobs or 0) if request.logprobs else None
            fmt = request.response_format
            json_mode = bool(fmt and fmt.type == "json_object")
            schema = fmt.schema_object() if fmt is not None else None
            gen = self._generation(request, self.tokenize(prompt), request.output_limit(), logprobs, json_mode, schema)
            return gen, prompt
        assert isinstance(request, CompletionRequest)
        single = request.single_prompt()
        if isinstance(single, str):
            self.check_length_estimate(len(single), request.output_limit(), "prompt")
            tokens, text = self.tokenize(single), single
        else:
            tokens, text = list(single), self.detokenize(list(single))
        return self._generation(request, tokens, request.output_limit(), request.logprobs, False), text

    def check_length_estimate(self, chars: int, max_tokens: int | None, what: str) -> None:
        """ContextLengthExceeded, in output_budget's words, when a prompt of `chars` characters
        cannot fit even if every token stood for `max_token_bytes` of them (a character is at
        least a byte): the cheap check before the exact count, which for a huge prompt costs
        far more than the answer it gets. Nothing without `max_token_bytes`."""
        if self.max_token_bytes is None:
            return
        least = -(-chars // self.max_token_bytes)
        window = self.context_window
        if max_tokens is None and least >= window:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {window} tokens. "
                f"However, your {what} resulted in at least {least} tokens.",
                param=what,
            )
        if max_tokens is not None and least + max_tokens > window:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {window} tokens. However, you requested "
                f"at least {least + max_tokens} tokens (at least {least} in the {what}, {max_tokens} in "
                f"the completion). Please reduce the length of the {what} or completion.",
                param="max_tokens",
            )

    def _generation(
        self,
        request: ChatCompletionRequest | CompletionRequest,
        prompt_tokens: list[int],
        max_tokens: int | None,
        logprobs: int | None,
        json_mode: bool,
        json_schema: dict[str, Any] | None = None,
    ) -> GenerationRequest:
        if logprobs is not None and not self.supports_logprobs:
            raise InvalidRequest(f"backend {self.name!r} does not return logprobs", param="logprobs")
        if not prompt_tokens:
            raise InvalidRequest("the prompt is empty", param="prompt")
        max_tokens = output_budget(len(prompt_tokens), max_tokens, self.context_window)
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
            json_schema=json_schema,
        )
        if json_schema is not None:
            self.check_json_schema(json_schema)
        return GenerationRequest(request_id=uuid.uuid4().hex, prompt_tokens=prompt_tokens, sampling=sampling)
