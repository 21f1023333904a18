"""Engine-level request and output types shared by the in-process backends.

The OpenAI-facing adapter (`backends.local.LocalBackend`) turns wire requests into a
`GenerationRequest`; an engine turns that into a stream of `GenerationDelta`s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import msgspec

from backends.protocol import ContextLengthExceeded

if TYPE_CHECKING:
    from backends.grammar import Constraint


def output_budget(prompt_len: int, max_tokens: int | None, window: int) -> int:
    """How many tokens a request may generate in a `window`-token context: `max_tokens`, or
    all the window leaves when it is None. ContextLengthExceeded, in OpenAI's words, when the
    prompt and the output do not fit. The one context-length check of the local engines."""
    if max_tokens is None:
        if prompt_len >= window:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {window} tokens. "
                f"However, your messages resulted in {prompt_len} tokens.",
                param="messages",
            )
        return window - prompt_len
    if prompt_len + max_tokens > window:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {window} tokens. However, you requested "
            f"{prompt_len + max_tokens} tokens ({prompt_len} in the messages, {max_tokens} in the "
            f"completion). Please reduce the length of the messages or completion.",
            param="max_tokens",
        )
    return max_tokens


@dataclass
class SamplingParams:
    """How to pick each next token and when to stop. Defaults are OpenAI's."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: off
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: off; k >= 0: chosen token plus k alternatives
    n: int = 1  # choices generated from the one prompt (OpenAI's n); choice i is seeded seed + i
    # An llguidance grammar (backends.grammar) the output must follow: response_format or a
    # required tool call. Compiled against the model's vocabulary in `prepare`, as
    # GenerationRequest.constraint.
    grammar: str | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class GenerationRequest:
    """One sequence to generate, already tokenized."""

    request_id: str
    prompt_tokens: list[int]
    sampling: SamplingParams
    priority: int = 0  # lower runs first (0: interactive, 1: batch)
    # sampling.grammar compiled for this model (a backends.grammar.Constraint), fresh for this
    # request: an engine copies it for each further choice. In process only, never on a pipe.
    constraint: Constraint | None = None


@dataclass
class TokenLogprob:
    """The chosen token's log-probability and the top alternatives."""

    token_id: int
    text: str
    logprob: float
    top: list[tuple[str, float]] = field(default_factory=list)


class GenerationDelta(msgspec.Struct, array_like=True):
    """New output of one choice since its previous delta. Text never contains (part of) a
    stop string. A request's deltas end with the one whose `final` is set: its last choice
    finished (with n = 1, the delta that carries the finish reason).

    A msgspec Struct sent as an array: an engine worker sends one per sequence per step, and
    the HTTP process decodes them, so their encoding is on every token's path (a step of 256
    decoded in a fifth of a dataclass's time)."""

    text: str
    token_ids: list[int] = msgspec.field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" once this choice is done
    logprobs: list[TokenLogprob] | None = None
    index: int = 0  # the choice
    final: bool = False
