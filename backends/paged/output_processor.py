"""New token ids -> text deltas: incremental detokenization, stop strings, logprobs.

The scheduler has already finished the sequences that hit a stop token or their length. Stop
strings can only be seen in the text, so they are found here; the engine then finishes those
sequences too (as vLLM v1's output processor asks its engine core to abort them). Text that
could still be the start of a stop string is held back until it cannot be.
"""

from __future__ import annotations

import msgspec

from backends.generation import GenerationDelta, TokenLogprob
from backends.paged.pooling import EmbeddingOutput
from backends.paged.scheduler import SampledToken
from backends.paged.sequence import Sequence
from backends.paged.tokenizer import ByteDetokenizer, IncrementalDetokenizer, Tokenizer, byte_tables, make_detokenizer
from backends.stop import StopMatcher


class StepOutput(msgspec.Struct):
    """One choice's delta from one engine step (the engine sets `delta.final`), or an
    embedding request's vectors (always final). A msgspec Struct, as SampledToken: one per
    sequence per step."""

    request_id: str
    delta: GenerationDelta | EmbeddingOutput


class _TextState:
    """One sequence's detokenizer and stop-string matcher (None without stop strings: the
    common case skips the matcher altogether)."""

    __slots__ = ("add", "stops")

    def __init__(self, detok: IncrementalDetokenizer | ByteDetokenizer, stops: list[str]) -> None:
        self.add = detok.add
        self.stops = StopMatcher(stops) if any(stops) else None


class OutputProcessor:
    """Per-sequence (one per choice) text state, from add() until its last delta (or remove())."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._states: dict[Sequence, _TextState] = {}
        # Built once here (engine start), not on the first request: a byte-level tokenizer's
        # tables take a fraction of a second to build and check.
        self._tables = byte_tables(tokenizer)

    def add(self, seq: Sequence) -> None:
        """Start a sequence's detokenizer (after its prompt) and stop-string matcher."""
        self._states[seq] = _TextState(make_detokenizer(self.tokenizer, seq.prompt_ids, self._tables), seq.sampling.stop)

    def remove(self, seq: Sequence) -> None:
        """Forget a sequence (aborted)."""
        self._states.pop(seq, None)

    def process(self, tokens: list[SampledToken]) -> tuple[list[StepOutput], list[Sequence]]:
        """(a delta per token, the sequences a stop string ended, which the caller finishes)."""
        outputs: list[StepOutput] = []
        stopped: list[Sequence] = []
        tt = self.tokenizer.token_text
        states = self._states
        for t in tokens:
            seq = t.seq
            state = states[seq]
            finish = t.finish_reason
            logprobs = None
            stops = state.stops
            if finish == "stop":  # a stop token: its own text is not part of the output
                text = stops.flush() if stops is not None else ""
            else:
                text = state.add(t.token_id)
                hit = False
                if stops is not None:
                    text, hit = stops.feed(text)
                r = t.sample
                if r is not None and r.logprob is not None:
                    logprobs = [TokenLogprob(t.token_id, tt(t.token_id), r.logprob, [(tt(i), lp) for i, lp in r.top])]
                if hit:
                    if finish is None:
                        stopped.append(seq)
                    finish = "stop"  # the stop string wins over a length reached by the same token
                elif finish == "length" and stops is not None:
                    text += stops.flush()
            if finish is not None:
                del states[seq]
            delta = GenerationDelta(text, [t.token_id], finish, logprobs, seq.index)
            outputs.append(StepOutput(seq.request_id, delta))
        return outputs, stopped
