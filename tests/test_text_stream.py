"""TextStream: valid UTF-8 at every chunk, stop strings caught across token boundaries and never leaked."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from chatloop.coordinator.text import TextStream


def _feed_all(stream: TextStream, pieces: list[bytes]) -> str:
    out = []
    for p in pieces:
        out.append(stream.feed(p))
        if stream.stopped:
            break
    out.append(stream.flush())
    return "".join(out)


def test_character_split_across_tokens_is_held_back():
    data = "héllo 世界 🎉".encode()
    stream = TextStream()
    chunks = [stream.feed(data[i : i + 1]) for i in range(len(data))]
    assert "".join(chunks) + stream.flush() == "héllo 世界 🎉"
    for c in chunks:
        c.encode("utf-8")  # every chunk is valid text on its own


def test_stop_string_spanning_tokens_never_leaks():
    stream = TextStream(stop=["STOP"])
    emitted = [stream.feed(p) for p in (b"abc S", b"T", b"O", b"P tail")]
    assert "".join(emitted) == "abc "
    assert stream.stopped and stream.matched == "STOP"
    assert all("S" not in e for e in emitted)


def test_false_start_of_stop_is_released():
    stream = TextStream(stop=["</end>"])
    assert stream.feed(b"a </e") == "a "
    assert stream.feed(b"xtra") == "</extra"
    assert stream.flush() == ""


def test_earliest_of_several_stops_wins():
    stream = TextStream(stop=["world", "lo w"])
    assert _feed_all(stream, [b"hello", b" world"]) == "hel"


@given(
    st.text(max_size=60), st.lists(st.integers(min_value=1, max_value=5), max_size=30), st.text(min_size=1, max_size=4)
)
def test_random_splits_equal_reference(text, cuts, stop):
    data = text.encode()
    pieces, i = [], 0
    for c in cuts:
        pieces.append(data[i : i + c])
        i += c
    pieces.append(data[i:])
    got = _feed_all(TextStream(stop=[stop]), pieces)
    idx = text.find(stop)
    assert got == (text if idx < 0 else text[:idx])
