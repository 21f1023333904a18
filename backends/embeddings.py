"""What every backend that embeds shares (`POST /v1/embeddings`): pooling a sequence's last
hidden states into one vector, L2 normalisation, `dimensions` (Matryoshka truncation), the
per-input context check, base64 encoding and the response with its usage.

Pooling: `mean` (every token's hidden state, averaged), `last` (the last token's: what a
causal LM sees of the whole input, vLLM's default for decoder models) or `cls` (the first
token's). A GGUF that states a pooling type (`{arch}.pooling_type`) gets it; otherwise
DEFAULT_POOLING, the same in every local engine so that they agree on a vector.

Arrays are numpy or torch alike (`PoolState` only slices, sums and adds), so the paged engine
accumulates on its device and the helpers below finish on the host.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from backends.protocol import (
    ContextLengthExceeded,
    Embedding,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingUsage,
    InvalidRequest,
)

Pooling = Literal["mean", "last", "cls"]
POOLINGS: tuple[Pooling, ...] = ("mean", "last", "cls")
DEFAULT_POOLING: Pooling = "last"
# llama.cpp's enum llama_pooling_type, as GGUF files store it (0 none, 4 rank: not embeddings).
GGUF_POOLING: dict[int, Pooling] = {1: "mean", 2: "cls", 3: "last"}
LLAMA_POOLING_TYPE: dict[Pooling, int] = {v: k for k, v in GGUF_POOLING.items()}


def gguf_pooling(value: Any) -> Pooling | None:
    """The pooling a GGUF's `{arch}.pooling_type` value names, or None (absent, none, rank)."""
    try:
        return GGUF_POOLING.get(int(value)) if value is not None else None
    except (TypeError, ValueError):
        return None


def resolve_pooling(option: Pooling | None, from_model: Pooling | None) -> Pooling:
    """The pooling to use: the backend's option, else the model's own, else DEFAULT_POOLING."""
    return option or from_model or DEFAULT_POOLING


class PoolState:
    """One sequence's pooled state, fed its hidden rows chunk by chunk (chunked prefill):
    a running sum for `mean`, the first row for `cls`, the latest last row for `last`."""

    __slots__ = ("method", "num_tokens", "_value")

    def __init__(self, method: Pooling, num_tokens: int) -> None:
        if method not in POOLINGS:
            raise ValueError(f"unknown pooling {method!r}; known: {', '.join(POOLINGS)}")
        self.method = method
        self.num_tokens = num_tokens  # the whole input's length
        self._value: Any = None

    def reset(self) -> None:
        """Forget every chunk (the sequence is computed again from its start: preemption)."""
        self._value = None

    def add(self, rows: Any, start: int) -> None:
        """Take a chunk's hidden rows [n, hidden], the first of them at position `start`."""
        n = rows.shape[0]
        if self.method == "mean":
            part = rows.sum(0)
            self._value = part if self._value is None else self._value + part
        elif self.method == "cls":
            if start == 0:
                self._value = rows[0]
        elif start + n == self.num_tokens:
            self._value = rows[n - 1]

    def result(self) -> Any:
        """The pooled vector (a 1-d array of the rows' kind); every chunk must have been added."""
        if self._value is None:
            raise RuntimeError("pooled before its rows were all added")
        return self._value / self.num_tokens if self.method == "mean" else self._value


def pool(hidden: Any, method: Pooling) -> Any:
    """One sequence's hidden states [T, hidden] pooled at once."""
    state = PoolState(method, hidden.shape[0])
    state.add(hidden, 0)
    return state.result()


def l2_normalize(vector: np.ndarray) -> np.ndarray:
    """`vector` / its L2 norm, in float32 (a zero vector stays zero)."""
    v = np.asarray(vector, dtype=np.float32)
    norm = float(np.linalg.norm(v))
    return v / norm if norm > 0 else v


def check_dimensions(requested: int | None, native: int, matryoshka: bool | Sequence[int], model: str) -> int | None:
    """The size to cut vectors to, or None to keep them whole. `dimensions` equal to the
    native size is always accepted; another size only for a Matryoshka-trained model (the
    backend's `matryoshka` option: true for any size up to the native one, or a list of the
    sizes it was trained for). Anything else is a 400 naming `dimensions`, as vLLM answers."""
    if requested is None or requested == native:
        return None
    if not matryoshka:
        raise InvalidRequest(
            f"Model {model!r} does not support matryoshka representation, changing output dimensions will lead to poor results.",
            param="dimensions",
        )
    if requested > native:
        raise InvalidRequest(f"dimensions must be at most {native}, the model's embedding size (got {requested})", param="dimensions")
    if not isinstance(matryoshka, bool) and requested not in matryoshka:
        sizes = ", ".join(str(d) for d in sorted({*matryoshka, native}))
        raise InvalidRequest(f"Model {model!r} supports dimensions {sizes} only (got {requested})", param="dimensions")
    return requested


def finish_vector(vector: Any, dimensions: int | None) -> np.ndarray:
    """A pooled vector as the client gets it: normalised, cut to `dimensions` and normalised
    again (a Matryoshka prefix is renormalised), float32."""
    v = l2_normalize(np.asarray(vector, dtype=np.float32))
    return l2_normalize(v[:dimensions]) if dimensions is not None else v


def embedding_only_message(model: str) -> str:
    """What chat and completions answer on a `task: embed` backend (a 400, param `model`)."""
    return f"model {model!r} is an embedding model: it serves /v1/embeddings only, not chat or completions"


def input_param(request: EmbeddingRequest, index: int) -> str:
    """The param that names input `index`: `input.N` in a list of inputs, `input` for a lone
    one (the request's own validator names them so)."""
    given = request.input
    many = isinstance(given, list) and bool(given) and isinstance(given[0], (str, list))
    return f"input.{index}" if many else "input"


def fit_to_window(request: EmbeddingRequest, tokenized: list[list[int]], window: int) -> list[list[int]]:
    """Each input's tokens within the context window: cut there with `truncate` (Ollama's
    semantics), else a 400 ContextLengthExceeded naming the first input that does not fit."""
    fitted = []
    for index, tokens in enumerate(tokenized):
        if len(tokens) > window:
            if not request.truncate:
                raise ContextLengthExceeded(
                    f"This model's maximum context length is {window} tokens. However, "
                    f"{input_param(request, index)} resulted in {len(tokens)} tokens. Shorten it, or set truncate.",
                    param=input_param(request, index),
                )
            tokens = tokens[:window]
        fitted.append(tokens)
    return fitted


def check_vocabulary(request: EmbeddingRequest, tokenized: list[list[int]], vocab_size: int) -> None:
    """A 400 naming the first input holding a token id outside the vocabulary."""
    for index, tokens in enumerate(tokenized):
        bad = next((t for t in tokens if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise InvalidRequest(f"token id {bad} is outside the vocabulary", param=input_param(request, index))


def encode(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    """A vector as the wire carries it: floats, or base64 of its little-endian float32 bytes
    (what OpenAI sends for `encoding_format: base64`)."""
    v = np.asarray(vector, dtype="<f4")
    if encoding_format == "base64":
        return base64.b64encode(v.tobytes()).decode("ascii")
    return v.tolist()


def decode_base64(text: str) -> np.ndarray:
    """The float32 vector a base64 embedding carries (clients and tests)."""
    return np.frombuffer(base64.b64decode(text), dtype="<f4")


def build_response(model: str, vectors: Sequence[np.ndarray], prompt_tokens: int, encoding_format: str) -> EmbeddingResponse:
    """The OpenAI answer: one Embedding per input, in order; usage counts the input tokens.
    `model`: the id the client asked for, as chat answers carry it."""
    return EmbeddingResponse(
        data=[Embedding(index=i, embedding=encode(v, encoding_format)) for i, v in enumerate(vectors)],
        model=model,
        usage=EmbeddingUsage(prompt_tokens=prompt_tokens, total_tokens=prompt_tokens),
    )
