"""The home worker's forward table: entries found once, and gone at their deadline."""

from pdserve.disagg.room_relay import ForwardTable, LegMatcher


def test_entry_is_taken_once():
    table = ForwardTable(ttl_s=3.0)
    table.add(7, 1, "tcp://h:1", now=0.0)
    target = table.pop(7)
    assert (target.dp_rank, target.kv_endpoint) == (1, "tcp://h:1")
    assert table.pop(7) is None


def test_entries_expire_at_their_deadline_only():
    table = ForwardTable(ttl_s=3.0)
    table.add(7, 1, "tcp://h:1", now=0.0)
    table.add(8, 2, "tcp://h:2", now=1.0)
    assert table.expire(now=2.9) == 0
    assert table.expire(now=3.0) == 1
    assert len(table) == 1 and table.pop(8) is not None


def test_leg_matcher_pairs_a_dispatch_with_a_page_list_held_elsewhere():
    legs = LegMatcher(ttl_s=10)
    assert legs.dispatched(room=7, dp_rank=1, now=0) is None
    assert legs.unclaimed(room=7, holder=1, now=1) is None  # the same worker: no mismatch
    assert legs.unclaimed(room=7, holder=0, now=1) == 1
    # The page list first: its holder is remembered until the room is dispatched.
    assert legs.unclaimed(room=8, holder=2, now=2) is None
    assert legs.dispatched(room=8, dp_rank=0, now=3) == 2
    assert legs.unclaimed(room=9, holder=0, now=3) is None
    assert legs.dispatched(room=9, dp_rank=0, now=4) is None


def test_leg_matcher_forgets_entries_after_their_ttl():
    legs = LegMatcher(ttl_s=10)
    legs.dispatched(room=1, dp_rank=0, now=0)
    legs.unclaimed(room=2, holder=1, now=0)
    assert legs.unclaimed(room=1, holder=1, now=10) is None  # expired: held for a dispatch
    assert legs.dispatched(room=2, dp_rank=0, now=11) is None
