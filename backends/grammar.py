"""Constrained decoding on llguidance, for both local engines.

A request's constraint starts as grammar text (`SamplingParams.grammar`): any JSON object
(response_format json_object), a JSON Schema (json_schema), or a tool call in the chat
template's format (backends.tools.grammar). `prepare` compiles it against the model's
vocabulary (`GrammarCompiler.compile`, a 400 when llguidance cannot take it), and the engine
asks the request's `Constraint`, before each token, for the bitmask of tokens it allows
(bit i of word i // 32 set: token i allowed), and tells it the token it picked.

JSON is constrained to json.dumps's layout (", " and ": ", no free whitespace): with free
whitespace a small model fills its budget with newlines.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import llguidance
import numpy as np

from backends.protocol import InvalidRequest

# llguidance's bounds on what one grammar may cost to build and to step (its defaults,
# stated): a hostile schema gets an error, not a stalled engine.
LIMITS = llguidance.LLParserLimits(
    initial_lexer_fuel=1_000_000,
    step_lexer_fuel=200_000,
    step_max_items=50_000,
    max_lexer_states=250_000,
    max_grammar_size=500_000,
    verbose_errors=False,  # error texts go to clients: no parser dumps
)
JSON_STYLE: dict[str, Any] = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}


def styled(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` with the JSON layout turnout generates (its own x-guidance, if any, wins)."""
    return {**schema, "x-guidance": {**JSON_STYLE, **schema.get("x-guidance", {})}}


def json_schema_grammar(schema: dict[str, Any]) -> str:
    """The grammar of JSON that validates against `schema`."""
    return llguidance.LLMatcher.grammar_from_json_schema(styled(schema))


def json_object_grammar() -> str:
    """The grammar of any JSON object (response_format json_object, as OpenAI defines it)."""
    return json_schema_grammar({"type": "object"})


def lark_grammar(lark: str) -> str:
    """A Lark grammar (with `%json {...}` for embedded JSON Schemas) as grammar text."""
    return llguidance.LLMatcher.grammar_from_lark(lark)


def lark_json(schema: dict[str, Any]) -> str:
    """A Lark rule body matching JSON valid against `schema`, in turnout's layout."""
    return "%json " + json.dumps(styled(schema), ensure_ascii=False)


class Constraint:
    """One choice's grammar state. Not thread-safe: one engine thread steps it."""

    __slots__ = ("matcher",)

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self.matcher = matcher

    def copy(self) -> Constraint:
        """An independent copy in the same state (another choice of the same request)."""
        return Constraint(self.matcher.deep_copy())

    def fill(self, bitmask: np.ndarray, row: int) -> None:
        """Write the tokens allowed next into row `row` of an int32 bitmask [B, W]."""
        target = bitmask[row]
        self.matcher.unsafe_compute_mask_ptr(target.ctypes.data, target.nbytes)

    def accept(self, token: int) -> bool:
        """Advance past the token picked; False when the grammar does not allow it (the
        constraint is then in its error state)."""
        return bool(self.matcher.consume_token(token))

    @property
    def finished(self) -> bool:
        """Whether the grammar is complete: only an end-of-sequence token is allowed."""
        return bool(self.matcher.is_stopped())


_executor: llguidance.LLExecutor | None = None
_executor_lock = threading.Lock()


def fill_bitmasks(rows: list[tuple[Constraint, int]], bitmask: np.ndarray) -> None:
    """Fill the rows of `bitmask` (C-contiguous int32 [B, W]) for many constraints at once,
    on llguidance's thread pool (the GIL released): the paged engine runs it while the
    device computes the step's logits."""
    global _executor
    if not rows:
        return
    if len(rows) == 1:
        rows[0][0].fill(bitmask, rows[0][1])
        return
    with _executor_lock:
        if _executor is None:
            _executor = llguidance.LLExecutor()
    assert bitmask.flags["C_CONTIGUOUS"] and bitmask.dtype == np.int32
    _executor.unsafe_compute_mask_ptr(
        [(c.matcher, row) for c, row in rows], bitmask.ctypes.data, bitmask.shape[1] * 4, bitmask.shape[0]
    )


def bitmask_width(vocab_size: int) -> int:
    """Words of a bitmask row for a vocabulary of `vocab_size` tokens."""
    return (vocab_size + 31) // 32


def allowed_tokens(bitmask_row: np.ndarray, vocab_size: int) -> np.ndarray:
    """A bool [vocab_size] array from one bitmask row (little-endian bits, as llguidance writes)."""
    return np.unpackbits(bitmask_row.view(np.uint8), bitorder="little")[:vocab_size].astype(bool)


class GrammarCompiler:
    """A model's vocabulary as llguidance sees it, for compiling grammars. Building one costs
    about a second for a 50k vocabulary: once per model load, lazily."""

    def __init__(self, tokenizer: llguidance.LLTokenizer) -> None:
        self.tokenizer = tokenizer

    @classmethod
    def from_tokenizer_json(cls, tokenizer_json: str, vocab_size: int, eos_token_ids: list[int]) -> GrammarCompiler:
        """From a `tokenizers` tokenizer's JSON (HF models, and GGUF vocabularies rebuilt as one)."""
        return cls(llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=eos_token_ids))

    @classmethod
    def from_token_bytes(cls, tokens: list[bytes], eos_token_id: int, bos_token_id: int | None, special_ids: list[int]) -> GrammarCompiler:
        """From every token's bytes (the paged engine's byte tokenizer for dummy models)."""

        class _Vocab:
            def __init__(self) -> None:
                self.tokens, self.eos_token_id, self.bos_token_id = tokens, eos_token_id, bos_token_id
                self.special_token_ids = special_ids
                self._index = {t: i for i, t in enumerate(tokens) if t and i not in special_ids}

            def __call__(self, data: bytes) -> list[int]:  # greedy, longest piece first
                out, i = [], 0
                while i < len(data):
                    for j in range(len(data), i, -1):
                        token = self._index.get(data[i:j])
                        if token is not None:
                            out.append(token)
                            i = j
                            break
                    else:
                        raise ValueError(f"no token for byte {data[i]}")
                return out

        return cls(llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Vocab())))

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.vocab_size)

    def compile(self, grammar: str, *, what: str, param: str) -> Constraint:
        """A fresh Constraint for `grammar`; InvalidRequest (naming `what`, e.g. "response_format
        json_schema", and `param`) with llguidance's reason when it cannot be served, such as
        a JSON Schema keyword it does not implement. CPU work that grows with the grammar (the
        GIL released): call it off any event loop."""
        matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0, limits=LIMITS)
        if matcher.is_error():
            raise InvalidRequest(f"{what} cannot be served: {matcher.get_error()}", param=param)
        return Constraint(matcher)
