"""The server's KV event stream core: seq +1 per batch, wire events with rank and token
count, replay of recent batches, a snapshot when they are gone; and the router's index of
it: applies the next batch, asks for replay on a gap and for a snapshot on a new life."""

from __future__ import annotations

from pdserve.engine.kv_events import CacheCleared, PagesRemoved, PagesStored
from pdserve.router.kv_index import BatchVerdict, KVIndex
from pdserve.serving.kv_event_stream import KVEventStream


def test_batches_are_numbered_and_carry_rank_and_token_count():
    stream = KVEventStream(dp_size=2, page_size=16, max_recent_batches=8)
    first = stream.add(1, [PagesStored([5, 6], None)], now=1.0)
    second = stream.add(0, [PagesStored([7], None), PagesRemoved([7])], now=2.0)
    assert (first["seq"], second["seq"]) == (1, 2)
    assert first["events"] == [
        {
            "type": "stored",
            "dp_rank": 1,
            "page_hashes": [5, 6],
            "parent_hash": None,
            "num_tokens": 32,
        }
    ]
    assert second["events"][1] == {"type": "removed", "dp_rank": 0, "page_hashes": [7]}
    assert stream.snapshot() == {"seq": 2, "life": 0, "ranks": [[], [5, 6]]}
    stream.add(1, [CacheCleared()], now=3.0)
    assert stream.snapshot() == {"seq": 3, "life": 0, "ranks": [[], []]}


def test_replay_gives_recent_batches_or_a_snapshot_when_they_are_gone():
    stream = KVEventStream(dp_size=1, page_size=16, max_recent_batches=2)
    for page_hash in (1, 2, 3):
        stream.add(0, [PagesStored([page_hash], None)], now=0.0)
    assert [b["seq"] for b in stream.replay(2)["batches"]] == [2, 3]
    assert stream.replay(4)["batches"] == []
    assert stream.replay(1)["snapshot"] == {"seq": 3, "life": 0, "ranks": [[1, 2, 3]]}
    assert "snapshot" in stream.replay(9)  # a subscriber from another life of the server
    # One whose base is from another life, though its next seq is this life's next one.
    assert stream.replay(4, life=0)["batches"] == []
    assert stream.replay(4, life=5)["snapshot"] == stream.snapshot()


def test_the_index_follows_a_stream_and_heals_a_gap_by_replay():
    stream = KVEventStream(dp_size=2, page_size=16, max_recent_batches=8)
    index = KVIndex()
    cache = index.track("http://w")
    first = stream.add(0, [PagesStored([10, 11], None)], now=0.0)
    assert cache.offer_live(first) is BatchVerdict.RESYNC  # no base yet
    cache.load_snapshot(stream.snapshot())
    lost = stream.add(1, [PagesStored([20], None)], now=0.0)
    late = stream.add(0, [PagesRemoved([11])], now=0.0)
    assert cache.offer_live(late) is BatchVerdict.GAP
    for batch in stream.replay(cache.last_seq + 1)["batches"]:
        assert cache.offer(batch) is BatchVerdict.APPLIED
    assert lost["seq"] <= cache.last_seq
    assert index.matched_pages("http://w", [10, 11]) == {0: 1, 1: 0}
    assert index.matched_pages("http://w", [20]) == {0: 0, 1: 1}
    assert cache.offer_live(first) is BatchVerdict.APPLIED  # raced the snapshot: in it
    assert index.matched_pages("http://other", [10]) == {}


def test_a_batch_that_raced_the_snapshot_is_skipped_and_a_new_life_resynchronises():
    """Batches published while a snapshot was taken reach the subscriber after it: they
    are in the base already (before, each one cost another snapshot). A batch of another
    start of the server resynchronises, whatever its seq; one that names no life (an
    older server) and goes back does too."""
    stream = KVEventStream(dp_size=1, page_size=16, max_recent_batches=8, life=7)
    cache = KVIndex().track("http://w")
    raced = stream.add(0, [PagesStored([1], None)], now=0.0)
    cache.load_snapshot(stream.snapshot())
    assert cache.offer_live(raced) is BatchVerdict.APPLIED
    assert cache.ranks == {0: {1}}
    reborn = KVEventStream(dp_size=1, page_size=16, max_recent_batches=8, life=8)
    for page_hash in (2, 3):  # the new life is already past the old one's last batch
        batch = reborn.add(0, [PagesStored([page_hash], None)], now=0.0)
    assert batch["seq"] == cache.last_seq + 1
    assert cache.offer_live(batch) is BatchVerdict.RESYNC
    assert cache.offer(batch) is BatchVerdict.RESYNC  # replayed, too
    unnamed = {k: v for k, v in raced.items() if k != "life"}
    assert cache.offer_live(unnamed) is BatchVerdict.RESYNC
