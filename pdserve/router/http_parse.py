"""HTTP/1.x parsing as bytes arrive (router process; no I/O): the requests of the router's
clients (for `http_server.py`) and the answers of workers (for `http_connection.py`).
llhttp (through httptools) parses; this module keeps what the router needs and says which
status a bad request gets."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import httptools

MAX_HEAD_BYTES = 64 * 1024
# Header name (as sent) -> value; a repeated name keeps its last value.
Headers = dict[bytes, bytes]


class ParseError(ValueError):
    """Bytes that are not HTTP/1.x; `status` is the answer a server gives for them."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class Refused(ParseError):
    """The head's credentials were refused (`RequestParser`'s `allows`): answered with the
    server's 401, without reading the body. `origin`: the head's Origin (a browser page's,
    whose answer must allow it for the page to read the 401)."""

    def __init__(self, message: str, status: int = 401, origin: str | None = None):
        super().__init__(message, status)
        self.origin = origin


# (target, headers) -> whether the request may go on to its body and handler.
HeadCheck = Callable[[str, Headers], bool]


def find_header(headers: Headers, name: bytes) -> bytes | None:
    """The value of the header called `name` (lowercase, any case in `headers`), or None."""
    for key, value in headers.items():
        if len(key) == len(name) and key.lower() == name:
            return value
    return None


class _Parser:
    """What requests and answers share: headers, a bound on a head's size, and errors raised
    in a callback carried out of llhttp (which would only say "callback error").

    The callbacks llhttp calls most are C methods (a dict's `__setitem__` for headers, a
    list's `append` for pieces): no Python frame per header, which is most of the CPU a
    parse takes. llhttp looks its callbacks up once, so these containers are only cleared,
    never replaced."""

    def __init__(self, parser_type: type) -> None:
        self.headers: Headers = {}
        self.on_header = self.headers.__setitem__
        self._llhttp = parser_type(self)
        self._in_head = False
        self._head_bytes = 0  # of the reads that all went into a head not yet complete
        self._error: ParseError | None = None

    def _feed(self, data: bytes) -> None:
        was_in_head = self._in_head
        try:
            self._llhttp.feed_data(data)
        except httptools.HttpParserError as exc:
            if self._error is not None:
                raise self._error from None
            raise ParseError(str(exc) or type(exc).__name__) from None
        if was_in_head and self._in_head:  # the whole read went into the head
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                raise ParseError("head too long", 431)

    def _fail(self, error: ParseError) -> None:
        """Called from a callback: remember why, then stop llhttp."""
        self._error = error
        raise error


@dataclass(slots=True)
class ParsedRequest:
    method: str
    target: str  # path and query, as sent
    headers: Headers  # as received, in order
    body: bytes
    http11: bool  # else HTTP/1.0
    keep_alive: bool


# Lengths of the request headers looked at (content-length, transfer-encoding, expect): the
# others are not even lowercased.
_CHECKED_LENGTHS = (14, 17, 6)


class RequestParser(_Parser):
    """The requests on one client connection, several per read when pipelined. `feed`
    returns the requests completed by `data`; bytes that are not a request set `error` (with
    the status to answer) and end the parsing, the requests before them still returned.
    `expects_continue` turns True when a head with `Expect: 100-continue` has come (the
    client waits before sending the body): the caller answers 100 and sets it back.
    `allows`, given, sees every head first: a head it refuses is a `Refused` error."""

    def __init__(self, max_body_bytes: int, allows: HeadCheck | None = None):
        self._url: list[bytes] = []
        self.on_url = self._url.append
        super().__init__(httptools.HttpRequestParser)
        self.max_body_bytes = max_body_bytes
        self.allows = allows
        self.expects_continue = False
        self.partial = False  # part of a request has come, not all of it
        self.error: ParseError | None = None
        self._body: list[bytes] = []
        self._body_bytes = 0
        self._http11 = True
        self._done: list[ParsedRequest] = []
        self._upgraded = False  # a request asked to upgrade: what follows is not HTTP/1.x

    def feed(self, data: bytes) -> list[ParsedRequest]:
        if self._upgraded or self.error is not None:
            return []
        try:
            self._feed(data)
        except ParseError as exc:
            self.error = exc
        except httptools.HttpParserUpgrade:
            # An upgrade (h2c, websocket) or CONNECT, which the router does not do: answer
            # the request as plain HTTP/1.1, then close (what follows is not HTTP/1.x).
            self._upgraded = True
            if self._done and self._done[-1].method != "CONNECT":
                self._done[-1].keep_alive = False
            else:
                self._done = self._done[:-1]
                self.error = ParseError("CONNECT is not supported", 405)
        done, self._done = self._done, []
        return done

    def on_message_begin(self) -> None:
        self.partial = self._in_head = True
        self.headers.clear()
        self._url.clear()
        self._body = []
        self._head_bytes = self._body_bytes = 0

    def on_headers_complete(self) -> None:
        self._in_head = False
        version = self._llhttp.get_http_version()
        if version != "1.1" and version != "1.0":
            self._fail(ParseError(f"HTTP/{version} is not supported", 505))
        self._http11 = version == "1.1"
        if self.allows is not None and not self.allows(self._target(), self.headers):
            # Before the body: a client without credentials must not make us hold one
            # (up to max_body_bytes per connection), nor be invited by a 100 Continue.
            origin = find_header(self.headers, b"origin")
            self._fail(Refused("credentials refused", 401, origin and origin.decode("latin-1")))
        for name, value in self.headers.items():
            if len(name) in _CHECKED_LENGTHS:
                self._check_header(name.lower(), value)

    def _check_header(self, name: bytes, value: bytes) -> None:
        """llhttp checked the framing headers' syntax; here is what the router refuses."""
        if name == b"content-length" and int(value) > self.max_body_bytes:
            self._fail(ParseError(f"body of {int(value)} bytes is over the limit", 413))
        elif name == b"transfer-encoding" and value.lower() != b"chunked":
            if value.lower().endswith(b"chunked"):  # codings before it; llhttp refuses the rest
                self._fail(ParseError(f"unsupported Transfer-Encoding {value[:40]!r}", 501))
        elif name == b"expect" and value.lower() == b"100-continue":
            self.expects_continue = True

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        if self._body_bytes > self.max_body_bytes:
            self._fail(ParseError(f"body of over {self.max_body_bytes} bytes", 413))
        self._body.append(body)

    def _target(self) -> str:
        url = self._url[0] if len(self._url) == 1 else b"".join(self._url)
        return url.decode("latin-1")

    def on_message_complete(self) -> None:
        llhttp = self._llhttp
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        self._done.append(
            ParsedRequest(
                llhttp.get_method().decode("latin-1"),
                self._target(),
                self.headers.copy(),
                body,
                self._http11,
                llhttp.should_keep_alive(),
            )
        )
        self.partial = self.expects_continue = False


class AnswerParser(_Parser):
    """One answer of a worker. `feed` returns the body bytes found in what it is given;
    `head_done`, `body_done`, `status` and `keep_alive` say how far it got. Interim answers
    (100 Continue) are skipped. Raises ParseError."""

    def __init__(self) -> None:
        self._pieces: list[bytes] = []
        self.on_body = self._pieces.append
        super().__init__(httptools.HttpResponseParser)
        self.status = 0
        self.keep_alive = True  # False once the connection cannot carry another request
        self.head_done = False
        self.body_done = False
        self.until_close = False  # no length given: the body ends when the server closes

    def feed(self, data: bytes) -> list[bytes]:
        if self.body_done:
            self.keep_alive = False  # bytes after the end: the framing cannot be trusted
            return []
        try:
            self._feed(data)
        except httptools.HttpParserUpgrade:
            raise ParseError("an upgrade the router did not ask for") from None
        except ParseError:
            if not self.body_done:
                raise
            self.keep_alive = False  # bytes after the end: the framing cannot be trusted
        pieces = self._pieces.copy()
        self._pieces.clear()
        return pieces

    def end_of_input(self) -> bool:
        """The connection closed: True when that completes the answer (read-until-close)."""
        if self.head_done and self.until_close:
            self.body_done = True
        return self.body_done

    def on_message_begin(self) -> None:
        if self.body_done:  # a second answer: stop there
            self._fail(ParseError("bytes after the end of the answer"))
        self.headers.clear()
        self._in_head, self._head_bytes = True, 0

    def on_headers_complete(self) -> None:
        self._in_head = False
        status = self._llhttp.get_status_code()
        if not 100 <= status <= 599:
            self._fail(ParseError(f"bad status code {status}"))
        if status < 200:
            return  # interim: the real answer follows
        self.status, self.head_done = status, True
        self.keep_alive = self._llhttp.should_keep_alive()
        if not self.keep_alive and status != 204 and status != 304:
            # llhttp reads a body with neither a length nor chunked coding until the close
            encoding = find_header(self.headers, b"transfer-encoding") or b""
            length = find_header(self.headers, b"content-length")
            self.until_close = length is None and not encoding.lower().endswith(b"chunked")

    def on_message_complete(self) -> None:
        if self.head_done:
            self.body_done = True
