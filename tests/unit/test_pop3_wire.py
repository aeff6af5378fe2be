"""The POP3 stream reader and body decoder: any cut of the byte stream gives the same message, and a
reply is never read past its terminator (the next pipelined reply must stay in the buffer)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from connector.pop3.wire import BODY_PIECE, BodyDecoder, ConnectionClosed, StreamReader
from tests.servers.scripted_pop3 import canonical, dot_stuffed


class FragmentingSocket:
    """``recv`` hands over the stream in the given piece sizes (cycled), like a slow network would."""

    def __init__(self, data: bytes, cuts: list[int]) -> None:
        self.data, self.cuts, self.calls = data, cuts or [len(data) or 1], 0

    def recv(self, size: int) -> bytes:
        take = min(size, self.cuts[self.calls % len(self.cuts)])
        self.calls += 1
        piece, self.data = self.data[:take], self.data[take:]
        return piece


def read_body(reader: StreamReader) -> tuple[bytes, list[bytes]]:
    decoder = BodyDecoder()
    output, pieces = b"", []
    while True:
        piece, done = reader.body_piece(decoder.at_line_start)
        pieces.append(piece)
        output += decoder.feed(piece)
        if done:
            return output + decoder.finish(), pieces


line_bytes = st.binary(max_size=40).filter(lambda line: b"\n" not in line)


@given(
    bodies=st.lists(st.lists(line_bytes, max_size=8), min_size=1, max_size=3),
    cuts=st.lists(st.integers(min_value=1, max_value=17), max_size=5),
)
def test_pipelined_bodies_survive_any_fragmentation(bodies: list[list[bytes]], cuts: list[int]) -> None:
    wire = b"".join(dot_stuffed(lines) for lines in bodies) + b"+OK next\r\n"
    reader = StreamReader(FragmentingSocket(wire, cuts))  # type: ignore[arg-type]
    for lines in bodies:
        output, _ = read_body(reader)
        # A bare CR inside a line becomes a line end too (the reference is the old per-line decoder).
        assert output == b"".join(line.replace(b"\r", b"\r\n") + b"\r\n" for line in lines)
    assert reader.readline(100) == b"+OK next\r\n"


def test_long_lines_come_in_bounded_pieces() -> None:
    content = b"Subject: x\r\n\r\n" + b"y" * (3 * BODY_PIECE + 5) + b"\r\n"
    reader = StreamReader(FragmentingSocket(dot_stuffed(content.split(b"\r\n")[:-1]), [100_000]))  # type: ignore[arg-type]
    output, pieces = read_body(reader)
    assert output == canonical(content)
    assert max(len(piece) for piece in pieces) <= BODY_PIECE + 1


def test_bare_lf_terminator_and_bare_lf_lines() -> None:
    reader = StreamReader(FragmentingSocket(b"a\n..b\n.\n+OK\r\n", [3]))  # type: ignore[arg-type]
    assert read_body(reader)[0] == b"a\r\n.b\r\n"
    assert reader.readline(100) == b"+OK\r\n"


def test_end_of_stream_inside_a_body() -> None:
    reader = StreamReader(FragmentingSocket(b"half a line\r\nand a li", [5]))  # type: ignore[arg-type]
    with pytest.raises(ConnectionClosed):
        read_body(reader)


def test_decoder_holds_a_final_cr() -> None:
    decoder = BodyDecoder()
    assert decoder.feed(b"one\r") == b"one"
    assert decoder.feed(b"\ntwo\r") == b"\r\ntwo"
    assert decoder.finish() == b"\r\n"
