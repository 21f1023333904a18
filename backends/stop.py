"""Stop strings over a stream of text: nothing that might begin a stop string is released
until the text after it shows that it does not."""

from __future__ import annotations


class StopMatcher:
    """Feed text pieces in order; get back what is safe to emit and whether a stop hit."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self._held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Return (text safe to emit, stopped). After a stop, the stop string and what
        follows it are dropped."""
        if not self.stops:
            return text, False
        buf = self._held + text
        # The stop that completes first wins (then the one that starts first), as a stream
        # would see it: the answer does not depend on how the text was split into pieces.
        hits = [(i + len(s), i) for s in self.stops if (i := buf.find(s)) >= 0]
        if hits:
            self._held = ""
            return buf[: min(hits)[1]], True
        keep = self._partial_suffix(buf)
        self._held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        """Release held-back text at the end of generation (it did not become a stop)."""
        held, self._held = self._held, ""
        return held

    def _partial_suffix(self, buf: str) -> int:
        """Length of the longest suffix of buf that is a proper prefix of some stop."""
        best = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(buf)), best, -1):
                if buf.endswith(stop[:k]):
                    best = k
                    break
        return best
