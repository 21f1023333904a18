"""New token ids -> text deltas: incremental detokenization, stop strings, logprobs.

The scheduler has already finished the sequences that hit a stop token or their length. Stop
strings can only be seen in the text, so they are found here; the engine then finishes those
sequences too (as vLLM v1's output processor asks its engine core to abort them). Text that
could still be the start of a stop string is held back until it cannot be.
"""

from __future__ import annotations

from dataclasses import dataclass

from backends.generation import GenerationDelta, TokenLogprob
from backends.paged.pooling import EmbeddingOutput
from backends.paged.scheduler import SampledToken
from backends.paged.sequence import Sequence
from backends.paged.tokenizer import IncrementalDetokenizer, Tokenizer
from backends.stop import StopMatcher


@dataclass
class StepOutput:
    """One choice's delta from one engine step (the engine sets `delta.final`), or an
    embedding request's vectors (always final)."""

    request_id: str
    delta: GenerationDelta | EmbeddingOutput


@dataclass
class _TextState:
    detok: IncrementalDetokenizer
    stops: StopMatcher


class OutputProcessor:
    """Per-sequence (one per choice) text state, from add() until its last delta (or remove())."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._states: dict[Sequence, _TextState] = {}

    def add(self, seq: Sequence) -> None:
        """Start a sequence's detokenizer (after its prompt) and stop-string matcher."""
        self._states[seq] = _TextState(IncrementalDetokenizer(self.tokenizer, seq.prompt_ids), StopMatcher(seq.sampling.stop))

    def remove(self, seq: Sequence) -> None:
        """Forget a sequence (aborted)."""
        self._states.pop(seq, None)

    def process(self, tokens: list[SampledToken]) -> tuple[list[StepOutput], list[Sequence]]:
        """(a delta per token, the sequences a stop string ended, which the caller finishes)."""
        outputs: list[StepOutput] = []
        stopped: list[Sequence] = []
        tt = self.tokenizer.token_text
        for t in tokens:
            state = self._states[t.seq]
            finish = t.finish_reason
            logprobs = None
            if finish == "stop":  # a stop token: its own text is not part of the output
                text = state.stops.flush()
            else:
                text, hit = state.stops.feed(state.detok.add(t.token_id))
                r = t.sample
                if r is not None and r.logprob is not None:
                    logprobs = [TokenLogprob(t.token_id, tt(t.token_id), r.logprob, [(tt(i), lp) for i, lp in r.top])]
                if hit:
                    if finish is None:
                        stopped.append(t.seq)
                    finish = "stop"  # the stop string wins over a length reached by the same token
                elif finish == "length":
                    text += state.stops.flush()
            if finish is not None:
                del self._states[t.seq]
            delta = GenerationDelta(text=text, token_ids=[t.token_id], finish_reason=finish, logprobs=logprobs, index=t.seq.index)
            outputs.append(StepOutput(t.seq.request_id, delta))
        return outputs, stopped
