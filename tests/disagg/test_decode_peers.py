"""The prefill worker's record of its decode connections (`disagg.decode_peers`): only an
accepted handshake lets a connection send page lists, and a decode server that handshakes
with a new restart epoch makes its connections of the old one stale."""

from __future__ import annotations

from pdserve.disagg.decode_peers import DecodePeers


def test_only_accepted_connections_count_until_refused_or_lost() -> None:
    peers = DecodePeers()
    assert "a" not in peers and peers.epoch("d") is None
    assert peers.accept("a", "d", 7) == set()
    assert "a" in peers and peers.epoch("d") == 7
    peers.refuse("a")
    assert "a" not in peers
    assert peers.accept("a", "d", 7) == set()  # the same start handshakes again
    peers.lost("a")
    assert "a" not in peers and peers.epoch("d") == 7  # the epoch outlives the connection


def test_a_new_epoch_makes_that_decodes_old_connections_stale() -> None:
    peers = DecodePeers()
    peers.accept("a", "d", 7)
    peers.accept("b", "d", 7)
    peers.accept("other", "e", 7)
    assert peers.accept("c", "d", 9) == {"a", "b"}
    assert "c" in peers and "other" in peers and "a" not in peers and "b" not in peers
    assert peers.epoch("d") == 9
    assert peers.accept("a", "d", 9) == set()  # forgotten: not stale a second time
