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
from dataclasses import dataclass
from typing import Any

import numpy as np

from backends import embeddings as emb
from backends import grammar as grammar_text
from backends import responses
from backends.chat_template import render_chat
from backends.generation import GenerationDelta, GenerationRequest, SamplingParams, output_budget
from backends.grammar import GrammarCompiler
from backends.protocol import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ContextLengthExceeded,
    EmbeddingRequest,
    EmbeddingResponse,
    InvalidRequest,
    LoadReport,
    ModelCard,
    NamedToolChoice,
)
from backends.tools.formats import HERMES, ToolFormat, template_format
from backends.tools.grammar import tool_call_grammar


@dataclass
class Prepared:
    """A request made ready for the engine."""

    gen: GenerationRequest
    prompt_text: str  # the rendered chat, or a completion's prompt (for echo)
    tool_format: ToolFormat | None = None  # the format calls are parsed from (tools offered)


class LocalBackend(abc.ABC):
    """Base for backends that run a model in this process."""

    name: str
    model_id: str
    supports_logprobs: bool = False
    # The most bytes one token stands for (the vocabulary's longest piece), where a subclass
    # knows it: a prompt whose length alone shows that it cannot fit is then refused before
    # it is tokenized (a guessed bytes-per-token ratio would refuse some prompts that fit).
    max_token_bytes: int | None = None
    # "generate": chat, completions and embeddings of the same model; "embed": an embedding
    # model, which serves embeddings only (policies.schema.BackendConfig.task).
    task: str = "generate"
    # Whether the model was Matryoshka-trained (the `matryoshka` option: see embeddings.check_dimensions).
    matryoshka: bool | list[int] = False

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

    @property
    def embedding_size(self) -> int:
        """The length of the model's embedding vectors (its hidden size)."""
        raise InvalidRequest(f"backend {self.name!r} does not serve embeddings", param="model")

    async def embed_tokens(self, inputs: list[list[int]]) -> list[np.ndarray]:
        """The pooled (not yet normalised) vector of each input, in order. Cancelling the call
        must stop the work and free what it holds."""
        raise InvalidRequest(f"backend {self.name!r} does not serve embeddings", param="model")

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Load the model."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release the model."""

    @abc.abstractmethod
    def grammar_compiler(self) -> GrammarCompiler:
        """The model's vocabulary for llguidance (built on first use, then kept). Called in
        `prepare`'s thread."""

    # -- the Backend protocol ---------------------------------------------------------

    def models(self) -> list[ModelCard]:
        return [ModelCard(id=self.model_id, max_model_len=self.context_window)]

    # In process (tests, `turnout run`), `prepare` runs in a thread, as the worker runs it:
    # rendering and tokenizing grow with the request and must not hold the event loop.

    async def chat(self, request: ChatCompletionRequest) -> ChatCompletion:
        p = await asyncio.to_thread(self.prepare, "chat", request)
        return await responses.chat_completion(request, len(p.gen.prompt_tokens), self.generate(p.gen), p.tool_format)

    async def chat_stream(self, request: ChatCompletionRequest) -> AsyncIterator[ChatCompletionChunk]:
        p = await asyncio.to_thread(self.prepare, "chat", request)
        async with aclosing(responses.chat_chunks(request, len(p.gen.prompt_tokens), self.generate(p.gen), p.tool_format)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def completion(self, request: CompletionRequest) -> Completion:
        p = await asyncio.to_thread(self.prepare, "completions", request)
        return await responses.completion(request, len(p.gen.prompt_tokens), p.prompt_text, self.generate(p.gen))

    async def completion_stream(self, request: CompletionRequest) -> AsyncIterator[Completion]:
        p = await asyncio.to_thread(self.prepare, "completions", request)
        async with aclosing(responses.completion_chunks(request, len(p.gen.prompt_tokens), p.prompt_text, self.generate(p.gen))) as chunks:
            async for chunk in chunks:
                yield chunk

    async def embeddings(self, request: EmbeddingRequest) -> EmbeddingResponse:
        """`POST /v1/embeddings`: inputs tokenized and checked in a thread, pooled by the
        engine, then normalised (and cut to `dimensions`) here."""
        inputs = await asyncio.to_thread(self.prepare_embeddings, request)
        vectors = self.finish_embeddings(request, await self.embed_tokens(inputs))
        return emb.build_response(request.model, vectors, sum(map(len, inputs)), request.encoding_format)

    def prepare_embeddings(self, request: EmbeddingRequest) -> list[list[int]]:
        """Each input's tokens, checked: `dimensions` against the model, every input against
        the context window (cut with `truncate`, else a 400 naming it) and the vocabulary.
        CPU work proportional to the request: run in a thread."""
        emb.check_dimensions(request.dimensions, self.embedding_size, self.matryoshka, self.model_id)
        tokenized = [self.tokenize(item) if isinstance(item, str) else list(item) for item in request.inputs()]
        for index, tokens in enumerate(tokenized):
            if not tokens:
                raise InvalidRequest("the input is empty", param=emb.input_param(request, index))
        self.check_embedding_tokens(request, tokenized)
        return emb.fit_to_window(request, tokenized, self.context_window)

    def check_embedding_tokens(self, request: EmbeddingRequest, tokenized: list[list[int]]) -> None:  # noqa: B027 - optional hook
        """A 400 for token ids the model cannot take (a subclass that knows its vocabulary)."""

    def finish_embeddings(self, request: EmbeddingRequest, pooled: list[np.ndarray]) -> list[np.ndarray]:
        """The vectors as the client gets them: normalised, cut to `dimensions`."""
        dims = emb.check_dimensions(request.dimensions, self.embedding_size, self.matryoshka, self.model_id)
        return [emb.finish_vector(v, dims) for v in pooled]

    def refuse_generation(self) -> None:
        """A 400 for chat and completions when this backend serves an embedding model."""
        if self.task == "embed":
            raise InvalidRequest(emb.embedding_only_message(self.model_id), param="model")

    # -- shared steps -------------------------------------------------------------------

    def prepare(self, kind: str, request: ChatCompletionRequest | CompletionRequest) -> Prepared:
        """Render (chat), tokenize and check a request, and compile its grammar. CPU work
        proportional to the request: callers run it in a thread, off any event loop. Raises
        InvalidRequest (400) for what the model cannot take; a prompt that cannot fit by its
        length alone is refused before it is tokenized (check_length_estimate)."""
        self.refuse_generation()
        if kind == "chat":
            assert isinstance(request, ChatCompletionRequest)
            template, bos, eos = self.chat_template()
            tools = request.tools_in_use()
            prompt = render_chat(
                template,
                request.messages,
                bos_token=bos,
                eos_token=eos,
                add_generation_prompt=request.generation_prompt(),
                continue_final_message=bool(request.continue_final_message),
                tools=tools,
            )
            self.check_length_estimate(len(prompt), request.output_limit(), "messages")
            tool_format = (template_format(template) or HERMES) if tools else None  # HERMES: the fallback prompt's
            logprobs = (request.top_logprobs or 0) if request.logprobs else None
            grammar = chat_grammar(request, tool_format)
            if grammar is not None and request.continue_final_message:
                # The grammar would start over at the continuation, not where the message stands.
                raise InvalidRequest(
                    f"continue_final_message cannot be combined with constrained output ({grammar[1]})", param="continue_final_message"
                )
            return Prepared(self._generation(request, self.tokenize(prompt), request.output_limit(), logprobs, grammar), prompt, tool_format)
        assert isinstance(request, CompletionRequest)
        single = request.single_prompt()
        if isinstance(single, str):
            self.check_length_estimate(len(single), request.output_limit(), "prompt")
            tokens, text = self.tokenize(single), single
        else:
            tokens, text = list(single), self.detokenize(list(single))
        return Prepared(self._generation(request, tokens, request.output_limit(), request.logprobs, None), text)

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
        grammar: tuple[str, str, str] | None,
    ) -> GenerationRequest:
        """The engine's request; `grammar`: (grammar text, what it is for, its param), compiled
        here against the model's vocabulary."""
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
            n=request.n or 1,
            grammar=grammar[0] if grammar else None,
        )
        constraint = self.grammar_compiler().compile(grammar[0], what=grammar[1], param=grammar[2]) if grammar else None
        return GenerationRequest(request_id=uuid.uuid4().hex, prompt_tokens=prompt_tokens, sampling=sampling, constraint=constraint)


def _format_schema(request: ChatCompletionRequest) -> dict[str, Any] | None:
    """The JSON Schema response_format asks the answer to follow (json_object: any object)."""
    fmt = request.response_format
    if fmt is None or fmt.type == "text":
        return None
    return fmt.schema_object() or {"type": "object"}


def chat_grammar(request: ChatCompletionRequest, tools: ToolFormat | None) -> tuple[str, str, str] | None:
    """(grammar, what it serves, its param) for a chat request, or None for free text: a
    required or named tool_choice allows only calls; tool_choice auto with a response_format,
    calls or the formatted answer; a response_format alone, the formatted answer."""
    schema = _format_schema(request)
    choice = request.tool_choice
    if tools is not None:
        named = choice.function.name if isinstance(choice, NamedToolChoice) else None
        parallel = request.parallel_tool_calls is not False
        if choice == "required" or named is not None:
            return tool_call_grammar(tools, request.tools_in_use(), named=named, parallel=parallel), "tool_choice", "tool_choice"
        if schema is not None:
            grammar = tool_call_grammar(tools, request.tools_in_use(), named=None, parallel=parallel, or_json=schema)
            return grammar, "response_format with tools", "response_format"
    if schema is None:
        return None
    assert request.response_format is not None
    return grammar_text.json_schema_grammar(schema), f"response_format {request.response_format.type}", "response_format"
