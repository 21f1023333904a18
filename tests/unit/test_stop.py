"""Stop strings: cut at the first stop, and never release a piece of one."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from backends.stop import StopMatcher


def run(stops: list[str], pieces: list[str]) -> tuple[list[str], bool]:
    matcher = StopMatcher(stops)
    out: list[str] = []
    for piece in pieces:
        text, hit = matcher.feed(piece)
        out.append(text)
        if hit:
            return out, True
    out.append(matcher.flush())
    return out, False


def test_stop_split_across_pieces() -> None:
    out, hit = run(["###"], ["abc#", "#", "#def"])
    assert hit and "".join(out) == "abc"
    assert out[0] == "abc" and out[1] == ""  # the '#'s were held back


def test_partial_stop_released_when_it_turns_out_not_to_be_one() -> None:
    out, hit = run(["<end>"], ["a<e", "nx", "b"])
    assert not hit and "".join(out) == "a<enxb"


def test_earliest_of_several_stops_wins() -> None:
    out, hit = run(["c", "ab"], ["xabc"])
    assert hit and "".join(out) == "x"


alphabet = st.text(alphabet="ab#", max_size=6)


@given(stops=st.lists(st.text(alphabet="ab#", min_size=1, max_size=3), max_size=3), pieces=st.lists(alphabet, max_size=8))
def test_matches_the_reference(stops: list[str], pieces: list[str]) -> None:
    """Emitted text is the full text cut at the first stop to complete, however the text
    was split, and no emitted prefix ever ends inside what turns out to be a stop."""
    full = "".join(pieces)
    hits = [(i + len(s), i) for s in stops if (i := full.find(s)) >= 0]  # (end, start)
    expected = full[: min(hits)[1]] if hits else full  # cut where the first stop to complete starts
    out, hit = run(stops, pieces)
    assert "".join(out) == expected and hit == bool(hits)
    emitted = ""
    for part in out:
        emitted += part
        assert expected.startswith(emitted)
