"""The home worker's forward table: entries found once, and gone at their deadline."""

from pdserve.disagg.room_relay import ForwardTable


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
