"""Parsing one HTTP/1.x answer as its bytes arrive (router process; pure, no I/O): the status
line, the headers that frame the body, and a Content-Length, chunked or read-until-close
body. The router's HTTP client (`http_client.py`) feeds it what the socket delivers."""

from __future__ import annotations

import enum

MAX_HEAD_BYTES = 64 * 1024
MAX_CHUNK_LINE_BYTES = 4096


class ParseError(ValueError):
    """Bytes that are not an HTTP/1.x answer."""


def header_value(head: bytes, lowered_head: bytes, name: bytes) -> bytes | None:
    """The value of the header `name` (lowercase) in `head`, found in its lowercased copy
    (the same length: only ASCII letters change); None when absent."""
    start = lowered_head.find(b"\r\n" + name + b":")
    if start < 0:
        return None
    start += len(name) + 3
    end = lowered_head.find(b"\r\n", start)
    return head[start : end if end >= 0 else len(head)].strip()


def chunk_size(line: bytes) -> int:
    """The size in a chunk's first line: hex digits, maybe `;extensions`."""
    try:
        size = int(line.split(b";", 1)[0] if b";" in line else line, 16)
    except ValueError:
        size = -1
    if size < 0:
        raise ParseError(f"bad chunk size line: {line[:100]!r}")
    return size


class Framing(enum.Enum):
    LENGTH = 1  # Content-Length (or no body at all)
    CHUNKED = 2
    UNTIL_CLOSE = 3  # neither: the body ends when the server closes


class _Chunk(enum.Enum):
    SIZE = 1  # waiting for "<hex size>[;ext]\r\n"
    DATA = 2
    DATA_END = 3  # the "\r\n" after a chunk's data
    TRAILER = 4  # after the last chunk: lines up to an empty one


class AnswerParser:
    """One answer. `feed` returns the body bytes found in what it is given; `head_done`,
    `body_done`, `status` and `keep_alive` say how far it got. Raises ParseError."""

    def __init__(self) -> None:
        self.status = 0
        self.head = b""  # status line and headers, as received
        self.keep_alive = True  # False once the connection cannot carry another request
        self.head_done = False
        self.body_done = False
        self.framing = Framing.LENGTH
        self._pending = b""  # a head, or a chunk's framing, cut between two reads
        self._left = 0  # body bytes left (LENGTH) or bytes left of the current chunk
        self._chunk_state = _Chunk.SIZE

    def feed(self, data: bytes) -> list[bytes]:
        if not self.head_done:
            data = self._feed_head(data)
            if not self.head_done:
                return []
        if self.body_done or not data:
            if data:
                self.keep_alive = False  # bytes after the end: the framing cannot be trusted
            return []
        if self.framing is Framing.CHUNKED:
            return self._feed_chunked(data)
        if self.framing is Framing.UNTIL_CLOSE:
            return [data]
        if len(data) > self._left:
            self.keep_alive = False  # more than announced: the framing cannot be trusted
            data = data[: self._left]
        self._left -= len(data)
        self.body_done = self._left == 0
        return [data]

    def end_of_input(self) -> bool:
        """The connection closed: True when that completes the answer (read-until-close)."""
        if self.head_done and not self.body_done and self.framing is Framing.UNTIL_CLOSE:
            self.body_done = True
        return self.body_done

    def _feed_head(self, data: bytes) -> bytes:
        """Consume the status line and headers; returns the bytes after them."""
        buf = self._pending + data if self._pending else data
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > MAX_HEAD_BYTES:
                raise ParseError("answer head too long")
            self._pending = buf
            return b""
        self._pending = b""
        self._parse_head(buf[:end])
        if self.status < 200:  # an interim answer (100 Continue): the real one follows
            return self._feed_head(buf[end + 4 :])
        self.head_done = True
        return buf[end + 4 :]

    def _parse_head(self, head: bytes) -> None:
        line_end = head.find(b"\r\n")
        parts = head[: line_end if line_end >= 0 else len(head)].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or len(parts[1]) != 3:
            raise ParseError(f"not an HTTP/1.x status line: {head[:100]!r}")
        if not parts[1].isdigit() or parts[1][0] not in b"12345":
            raise ParseError(f"bad status code in {head[:100]!r}")
        self.status = int(parts[1])
        if self.status < 200:
            return
        # Only the framing headers are read here; others are looked up when asked for.
        self.head = head
        lowered = head.lower()
        connection = header_value(lowered, lowered, b"connection")
        self.keep_alive = parts[0] == b"HTTP/1.1" and connection != b"close"
        length = header_value(lowered, lowered, b"content-length")
        if self.status in (204, 304):  # never a body (and the router never sends HEAD)
            length = b"0"
        elif b"chunked" in (header_value(lowered, lowered, b"transfer-encoding") or b""):
            self.framing = Framing.CHUNKED
            return
        if length is None:
            self.framing = Framing.UNTIL_CLOSE
            self.keep_alive = False
            return
        if not length.isdigit():
            raise ParseError(f"bad Content-Length: {length!r}")
        self._left = int(length)
        self.body_done = self._left == 0

    def _feed_chunked(self, data: bytes) -> list[bytes]:
        if self._pending:
            data, self._pending = self._pending + data, b""
        pieces: list[bytes] = []
        pos, end = 0, len(data)
        while pos < end and not self.body_done:
            state = self._chunk_state
            if state is _Chunk.DATA:
                take = min(self._left, end - pos)
                pieces.append(data[pos : pos + take])
                pos += take
                self._left -= take
                if self._left == 0:
                    self._chunk_state = _Chunk.DATA_END
                continue
            if state is _Chunk.DATA_END:
                if end - pos < 2:
                    break
                if data[pos : pos + 2] != b"\r\n":
                    raise ParseError("chunk data not followed by CRLF")
                pos += 2
                self._chunk_state = _Chunk.SIZE
                continue
            line_end = data.find(b"\r\n", pos)
            if line_end < 0:
                if end - pos > MAX_CHUNK_LINE_BYTES:
                    raise ParseError("chunk size line too long")
                break
            line, pos = data[pos:line_end], line_end + 2
            if state is _Chunk.TRAILER:
                self.body_done = not line
                continue
            size = chunk_size(line)
            if size == 0:
                self._chunk_state = _Chunk.TRAILER
            elif pos + size + 2 <= end and data[pos + size : pos + size + 2] == b"\r\n":
                pieces.append(data[pos : pos + size])  # the usual case: the whole chunk is here
                pos += size + 2
            else:
                self._chunk_state, self._left = _Chunk.DATA, size
        if pos < end:
            if self.body_done:
                self.keep_alive = False  # bytes after the end
            else:
                self._pending = data[pos:]
        return pieces
