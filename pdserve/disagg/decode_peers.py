"""The decode connections a prefill worker knows: which handshook (only those may send page
lists), who each is, and each decode server's restart epoch. Pure; runs inside each prefill
worker (`disagg.prefill_worker`)."""

from __future__ import annotations


class DecodePeers:
    def __init__(self) -> None:
        self._handshaken: set[object] = set()
        self._who: dict[object, tuple[str, int]] = {}  # (decode_id, epoch) of a connection
        self._epochs: dict[str, int] = {}  # the last epoch each decode server handshook with

    def __contains__(self, peer: object) -> bool:
        """Whether `peer`'s KV handshake was accepted (and it was not lost since)."""
        return peer in self._handshaken

    def epoch(self, decode_id: str) -> int | None:
        return self._epochs.get(decode_id)

    def accept(self, peer: object, decode_id: str, epoch: int) -> set[object]:
        """`peer` handshook as `decode_id` of restart `epoch`. Returns the connections of
        that decode server's earlier epoch, forgotten now: it restarted, and the rooms of
        those connections will never be read."""
        old = self._epochs.get(decode_id)
        self._epochs[decode_id] = epoch
        self._who[peer] = (decode_id, epoch)
        self._handshaken.add(peer)
        if old is None or old == epoch:
            return set()
        stale = {p for p, who in self._who.items() if who == (decode_id, old)}
        for p in stale:
            self._handshaken.discard(p)
            del self._who[p]
        return stale

    def refuse(self, peer: object) -> None:
        """`peer`'s handshake was refused: no page lists from it until one is accepted."""
        self._handshaken.discard(peer)

    def lost(self, peer: object) -> None:
        self._handshaken.discard(peer)
        self._who.pop(peer, None)
