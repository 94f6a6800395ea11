"""HTTP/1.x parsing as bytes arrive (router process; pure, no I/O): the answers of workers
(for `http_client.py`) and the requests of the router's clients (for `http_server.py`).
Bodies framed by Content-Length, chunked encoding or, for answers, the end of the
connection."""

from __future__ import annotations

import enum
from dataclasses import dataclass

MAX_HEAD_BYTES = 64 * 1024
MAX_CHUNK_LINE_BYTES = 4096


class ParseError(ValueError):
    """Bytes that are not HTTP/1.x; `status` is the answer a server gives for them."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def header_value(head: bytes, lowered_head: bytes, name: bytes) -> bytes | None:
    """The value of the header `name` (lowercase) in `head`, found in its lowercased copy
    (the same length: only ASCII letters change); None when absent."""
    start = lowered_head.find(b"\r\n" + name + b":")
    if start < 0:
        return None
    start += len(name) + 3
    end = lowered_head.find(b"\r\n", start)
    return head[start : end if end >= 0 else len(head)].strip()


def content_length(value: bytes | None) -> int | None:
    if value is None:
        return None
    if not value.isdigit():
        raise ParseError(f"bad Content-Length: {value[:40]!r}")
    return int(value)


def chunk_size(line: bytes) -> int:
    """The size in a chunk's first line: hex digits, maybe `;extensions`."""
    try:
        size = int(line.split(b";", 1)[0] if b";" in line else line, 16)
    except ValueError:
        size = -1
    if size < 0:
        raise ParseError(f"bad chunk size line: {line[:100]!r}")
    return size


class _Chunk(enum.Enum):
    SIZE = 1  # waiting for "<hex size>[;ext]\r\n"
    DATA = 2
    DATA_END = 3  # the "\r\n" after a chunk's data
    TRAILER = 4  # after the last chunk: lines up to an empty one


class ChunkedBody:
    """Decodes a chunked body. `feed` returns the data found; once `done`, `rest` holds the
    bytes that came after the body."""

    def __init__(self) -> None:
        self.done = False
        self.rest = b""
        self._state = _Chunk.SIZE
        self._left = 0  # bytes left of the current chunk
        self._pending = b""  # framing cut between two reads

    def feed(self, data: bytes) -> list[bytes]:
        if self._pending:
            data, self._pending = self._pending + data, b""
        pieces: list[bytes] = []
        pos, end = 0, len(data)
        while pos < end and not self.done:
            state = self._state
            if state is _Chunk.DATA:
                take = min(self._left, end - pos)
                pieces.append(data[pos : pos + take])
                pos += take
                self._left -= take
                if self._left == 0:
                    self._state = _Chunk.DATA_END
                continue
            if state is _Chunk.DATA_END:
                if end - pos < 2:
                    break
                if data[pos : pos + 2] != b"\r\n":
                    raise ParseError("chunk data not followed by CRLF")
                pos += 2
                self._state = _Chunk.SIZE
                continue
            line_end = data.find(b"\r\n", pos)
            if line_end < 0:
                if end - pos > MAX_CHUNK_LINE_BYTES:
                    raise ParseError("chunk size line too long")
                break
            line, pos = data[pos:line_end], line_end + 2
            if state is _Chunk.TRAILER:
                self.done = not line
                continue
            size = chunk_size(line)
            if size == 0:
                self._state = _Chunk.TRAILER
            elif pos + size + 2 <= end and data[pos + size : pos + size + 2] == b"\r\n":
                pieces.append(data[pos : pos + size])  # the usual case: the whole chunk is here
                pos += size + 2
            else:
                self._state, self._left = _Chunk.DATA, size
        if self.done:
            self.rest = data[pos:]
        elif pos < end:
            self._pending = data[pos:]
        return pieces


class Framing(enum.Enum):
    LENGTH = 1  # Content-Length (or no body at all)
    CHUNKED = 2
    UNTIL_CLOSE = 3  # answers only: the body ends when the server closes


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
        self._pending = b""  # a head cut between two reads
        self._left = 0  # Content-Length bytes left
        self._chunked: ChunkedBody | None = None

    def feed(self, data: bytes) -> list[bytes]:
        if not self.head_done:
            data = self._feed_head(data)
            if not self.head_done:
                return []
        if self.body_done or not data:
            if data:
                self.keep_alive = False  # bytes after the end: the framing cannot be trusted
            return []
        if self._chunked is not None:
            pieces = self._chunked.feed(data)
            self.body_done = self._chunked.done
            if self._chunked.rest:
                self.keep_alive = False
            return pieces
        if self.framing is Framing.UNTIL_CLOSE:
            return [data]
        if len(data) > self._left:
            self.keep_alive = False
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
        length = content_length(header_value(lowered, lowered, b"content-length"))
        if self.status in (204, 304):  # never a body (and the router never sends HEAD)
            length = 0
        elif b"chunked" in (header_value(lowered, lowered, b"transfer-encoding") or b""):
            self.framing, self._chunked = Framing.CHUNKED, ChunkedBody()
            return
        if length is None:
            self.framing = Framing.UNTIL_CLOSE
            self.keep_alive = False
            return
        self._left = length
        self.body_done = length == 0


@dataclass
class RequestHead:
    method: str
    target: str  # path and query, as sent
    head: bytes  # request line and headers, as received
    lowered: bytes  # the same, lowercased (header lookups)
    http11: bool  # else HTTP/1.0
    keep_alive: bool
    expects_continue: bool  # `Expect: 100-continue`: the client waits before the body


@dataclass
class ParsedRequest:
    head: RequestHead
    body: bytes


class RequestParser:
    """The requests on one client connection, several per read when pipelined. `feed`
    returns the requests completed by `data`; `waiting` is the head whose body is awaited.
    Raises ParseError (with the status to answer)."""

    def __init__(self, max_body_bytes: int):
        self.max_body_bytes = max_body_bytes
        self.waiting: RequestHead | None = None
        self._pending = b""
        self._body: list[bytes] = []
        self._left = 0  # Content-Length bytes left
        self._size = 0  # chunked bytes so far
        self._chunked: ChunkedBody | None = None

    @property
    def partial(self) -> bool:
        """Part of a request has come, not all of it."""
        return bool(self._pending) or self.waiting is not None

    def feed(self, data: bytes) -> list[ParsedRequest]:
        done: list[ParsedRequest] = []
        data = self._pending + data if self._pending else data
        self._pending = b""
        while data:
            if self.waiting is None:
                data = data.lstrip(b"\r\n")  # empty lines between requests are allowed
                end = data.find(b"\r\n\r\n")
                if end < 0:
                    if len(data) > MAX_HEAD_BYTES:
                        raise ParseError("request head too long", 431)
                    self._pending = data
                    break
                self._start(data[:end])
                data = data[end + 4 :]
            else:
                data = self._feed_body(data)
            if self.waiting is not None and self._complete():
                done.append(ParsedRequest(self.waiting, b"".join(self._body)))
                self.waiting, self._body = None, []
        return done

    def _complete(self) -> bool:
        return self._chunked.done if self._chunked is not None else self._left == 0

    def _start(self, head: bytes) -> None:
        line_end = head.find(b"\r\n")
        parts = head[: line_end if line_end >= 0 else len(head)].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            raise ParseError(f"not an HTTP/1.x request line: {head[:100]!r}")
        lowered = head.lower()
        http11 = parts[2] == b"HTTP/1.1"
        connection = header_value(lowered, lowered, b"connection") or b""
        keep_alive = connection != b"close" if http11 else connection == b"keep-alive"
        expect = header_value(lowered, lowered, b"expect")
        self.waiting = RequestHead(
            parts[0].decode("latin-1"),
            parts[1].decode("latin-1"),
            head,
            lowered,
            http11,
            keep_alive,
            expect == b"100-continue",
        )
        encoding = header_value(lowered, lowered, b"transfer-encoding")
        if encoding is not None:
            if encoding != b"chunked":
                raise ParseError(f"unsupported Transfer-Encoding {encoding[:40]!r}", 501)
            self._chunked, self._size = ChunkedBody(), 0
            return
        self._chunked = None
        self._left = content_length(header_value(lowered, lowered, b"content-length")) or 0
        if self._left > self.max_body_bytes:
            raise ParseError(f"body of {self._left} bytes is over the limit", 413)

    def _feed_body(self, data: bytes) -> bytes:
        """Consume body bytes; returns those after the body."""
        if self._chunked is None:
            take = min(self._left, len(data))
            self._body.append(data[:take])
            self._left -= take
            return data[take:]
        pieces = self._chunked.feed(data)
        self._body += pieces
        self._size += sum(map(len, pieces))
        if self._size > self.max_body_bytes:
            raise ParseError(f"body of over {self.max_body_bytes} bytes", 413)
        return self._chunked.rest if self._chunked.done else b""
