"""Which raw TCP data connection belongs to which KV peer; runs in worker processes.

Prefill listens on a second port and hands each decode peer a one-time token (DataOffer) over
ZeroMQ; a connection becomes that peer's channel once its first bytes are that token, and is
closed otherwise. Decode connects when the offer comes. One selector holds every socket, so
the worker loop polls a single stable descriptor for all of them.
"""

from __future__ import annotations

import logging
import secrets
import selectors
import socket
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from pdserve.disagg.transfer.zmq.data_channel import (
    TOKEN_NBYTES,
    ChannelClosed,
    DataOffer,
    RecvChannel,
    SendChannel,
)

log = logging.getLogger(__name__)

MAX_PENDING_CONNECTIONS = 32  # accepted, token not read yet; more are closed at once


@dataclass
class _Pending:
    """An accepted connection whose token is still coming."""

    sock: socket.socket
    deadline: float
    token: bytearray = field(default_factory=lambda: bytearray(TOKEN_NBYTES))
    got: int = 0


@dataclass
class LinkEvents:
    opened: list[str] = field(default_factory=list)  # peers whose channel is now usable
    failed: list[tuple[str, str]] = field(default_factory=list)  # (peer, reason); closed
    readable: list[RecvChannel] = field(default_factory=list)


class DataLinks:
    """The data connections of one transport. A token, and a connection waiting to show one,
    lives `token_timeout_s`; `poll` reports channels opened, failed and readable."""

    def __init__(self, listen_host: str | None, token_timeout_s: float) -> None:
        self.token_timeout_s = token_timeout_s
        self.selector = selectors.DefaultSelector()
        self.senders: dict[str, SendChannel] = {}
        self.receivers: dict[str, RecvChannel] = {}
        self.stats: Counter[str] = Counter()
        self._offers: dict[bytes, tuple[str, float]] = {}  # token -> (peer, deadline)
        self._pending: list[_Pending] = []
        self._listener: socket.socket | None = None
        if listen_host is not None:
            self._listener = _listen(listen_host)
            self.selector.register(self._listener, selectors.EVENT_READ, self._listener)

    @property
    def can_offer(self) -> bool:
        return self._listener is not None

    def fileno(self) -> int:
        return self.selector.fileno()

    # -- prefill side --------------------------------------------------------------------
    def offer(self, peer: str, now: float) -> DataOffer:
        """A fresh token for `peer`; any older one it did not use is void."""
        assert self._listener is not None
        self._drop_offers(lambda p, _: p == peer)
        token = secrets.token_bytes(TOKEN_NBYTES)
        self._offers[token] = (peer, now + self.token_timeout_s)
        return DataOffer(port=self._listener.getsockname()[1], token=token)

    def want_write(self, channel: SendChannel, on: bool) -> None:
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if on else 0)
        if self.selector.get_key(channel.sock).events != events:
            self.selector.modify(channel.sock, events, channel)

    # -- decode side ---------------------------------------------------------------------
    def connect(self, peer: str, host: str, offer: DataOffer, max_message_nbytes: int) -> None:
        """Start connecting to the offered port (non-blocking); replaces any channel of `peer`."""
        self.close_peer(peer)
        try:
            family, kind, proto, _, address = socket.getaddrinfo(
                host, offer.port, type=socket.SOCK_STREAM
            )[0]
            sock = socket.socket(family, kind, proto)
        except OSError as exc:
            log.warning("KV data connection to %s:%d not opened: %s", host, offer.port, exc)
            self.stats["data_connect_failed"] += 1
            return
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.connect_ex(address)  # EINPROGRESS; a failure shows when the token is written
        channel = RecvChannel(sock, peer, offer.token, max_message_nbytes)
        self.receivers[peer] = channel
        self.selector.register(sock, selectors.EVENT_WRITE, channel)

    # -- both ----------------------------------------------------------------------------
    def poll(self, now: float) -> LinkEvents:
        """What happened on the data sockets since the last call; never blocks."""
        events = LinkEvents()
        for key, mask in self.selector.select(0):
            item = key.data
            if item is self._listener:
                self._accept(now, events)
            elif isinstance(item, _Pending):
                self._read_token(item, events)
            elif isinstance(item, SendChannel):
                if mask & selectors.EVENT_READ:  # writable alone is the transport's business
                    self._check(item, events)
            elif isinstance(item, RecvChannel):
                self._on_receiver(item, mask, events)
        for pending in [p for p in self._pending if now >= p.deadline]:
            self._drop_pending(pending, "data_token_timeout")
        self._drop_offers(lambda _, deadline: now >= deadline)
        return events

    def close_peer(self, peer: str) -> SendChannel | None:
        """Close the peer's channels; returns its sender, whose queued records are abandoned."""
        self._drop_offers(lambda p, _: p == peer)
        receiver = self.receivers.pop(peer, None)
        if receiver is not None:
            self._close(receiver.sock)
        sender = self.senders.pop(peer, None)
        if sender is not None:
            self._close(sender.sock)
        return sender

    def close(self) -> list[SendChannel]:
        senders = list(self.senders.values())
        for peer in {*self.senders, *self.receivers}:
            self.close_peer(peer)
        for pending in list(self._pending):
            self._drop_pending(pending, None)
        if self._listener is not None:
            self._close(self._listener)
        self.selector.close()
        return senders

    # -- internals -----------------------------------------------------------------------
    def _accept(self, now: float, events: LinkEvents) -> None:
        """Accept what is queued and read each token at once: it is usually there already,
        and a hold on the peer must not expire between the accept and the next poll."""
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. out of descriptors: the connection stays queued
                log.warning("KV data listener: accept failed: %s", exc)
                return
            if len(self._pending) >= MAX_PENDING_CONNECTIONS:
                sock.close()
                self.stats["dropped_data_backlog"] += 1
                continue
            sock.setblocking(False)
            pending = _Pending(sock, now + self.token_timeout_s)
            self._pending.append(pending)
            self.selector.register(sock, selectors.EVENT_READ, pending)
            self._read_token(pending, events)

    def _read_token(self, pending: _Pending, events: LinkEvents) -> None:
        try:
            got = pending.sock.recv_into(memoryview(pending.token)[pending.got :])
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            got = 0
        if got == 0:
            self._drop_pending(pending, "data_closed_before_token")
            return
        pending.got += got
        if pending.got < TOKEN_NBYTES:
            return
        offer = self._offers.pop(bytes(pending.token), None)
        if offer is None:
            self._drop_pending(pending, "data_bad_token")
            return
        peer, _ = offer
        self._pending.remove(pending)
        old = self.senders.get(peer)
        if old is not None:  # a newer handshake replaced it; its sends were failed then
            self._close(old.sock)
        channel = SendChannel(pending.sock, peer)
        channel.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.senders[peer] = channel
        self.selector.modify(channel.sock, selectors.EVENT_READ, channel)
        self.stats["data_channels_opened"] += 1
        events.opened.append(peer)

    def _check(self, channel: SendChannel, events: LinkEvents) -> None:
        try:
            channel.check_alive()
        except ChannelClosed as exc:
            events.failed.append((channel.peer, str(exc)))

    def _on_receiver(self, channel: RecvChannel, mask: int, events: LinkEvents) -> None:
        if channel.unsent_token:
            if not mask & selectors.EVENT_WRITE:
                return
            try:
                channel.write_token()
            except ChannelClosed as exc:
                # Never opened (nothing listens there, or no route): KV keeps using ZeroMQ.
                log.warning("KV data connection to %s not opened: %s", channel.peer, exc)
                self.stats["data_connect_failed"] += 1
                self.close_peer(channel.peer)
                return
            if not channel.unsent_token:
                self.selector.modify(channel.sock, selectors.EVENT_READ, channel)
                self.stats["data_channels_opened"] += 1
        elif mask & selectors.EVENT_READ:
            events.readable.append(channel)

    def _drop_offers(self, drop: Callable[[str, float], bool]) -> None:
        self._offers = {t: o for t, o in self._offers.items() if not drop(*o)}

    def _drop_pending(self, pending: _Pending, reason: str | None) -> None:
        self._pending.remove(pending)
        self._close(pending.sock)
        if reason is not None:
            self.stats["dropped_" + reason] += 1
            log.debug("closed a connection on the KV data port: %s", reason)

    def _close(self, sock: socket.socket) -> None:
        try:
            self.selector.unregister(sock)
        except (KeyError, ValueError):
            pass
        sock.close()


def _listen(host: str) -> socket.socket:
    family = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0][0]
    sock = socket.create_server((host, 0), family=family)
    sock.setblocking(False)
    return sock
