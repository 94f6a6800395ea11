"""Unit tests of the pure bootstrap registry (no sockets, no clock)."""

from __future__ import annotations

import msgspec
import pytest

from pdserve.disagg.bootstrap_registry import (
    MAX_ROOMS_PER_QUERY,
    BootstrapError,
    BootstrapRegistry,
    RegistrationError,
    RoomFailure,
    ServerInfo,
    WorkerRegistration,
)
from pdserve.disagg.messages import PROTOCOL_VERSION
from pdserve.engine.kv_layout import KVLayout
from tests.disagg.bootstrap_fixtures import registration as base_registration


def registration(dp_rank: int = 0, **overrides) -> WorkerRegistration:
    """The shared builder, as a follow_bootstrap_room server without FORCE."""
    fields = dict(
        model_fingerprint="smollm2-135m:abc",
        load_balance_method="follow_bootstrap_room",
        registers_all_rooms=False,
    )
    fields.update(overrides)
    return base_registration(dp_rank, **fields)


def full_registry(dp_size: int = 2, room_ttl_s: float = 10.0, **overrides) -> BootstrapRegistry:
    registry = BootstrapRegistry(room_ttl_s=room_ttl_s)
    for rank in range(dp_size):
        registry.register_worker(registration(rank, dp_size=dp_size, **overrides), now=0.0)
    return registry


def test_server_info_is_none_until_every_worker_registered():
    registry = BootstrapRegistry(room_ttl_s=10.0)
    assert registry.server_info() is None
    assert "no prefill worker" in registry.not_ready_reason()
    registry.register_worker(registration(1, dp_size=3), now=0.0)
    assert registry.server_info() is None
    reason = registry.not_ready_reason()
    assert "2 of 3" in reason and "dp_rank=0" in reason and "dp_rank=2" in reason
    registry.register_worker(registration(0, dp_size=3), now=0.0)
    registry.register_worker(registration(2, dp_size=3), now=0.0)
    assert registry.not_ready_reason() is None
    info = registry.server_info()
    assert info == {
        "dp_size": 3,
        "tp_size": 1,
        "page_size": 16,
        "kv_dtype": "bfloat16",
        "num_layers": 4,
        "num_kv_heads": 2,
        "head_dim": 64,
        "model_fingerprint": "smollm2-135m:abc",
        "load_balance_method": "follow_bootstrap_room",
        "follow_bootstrap_room": True,
        "registers_all_rooms": False,
        "protocol_version": PROTOCOL_VERSION,
        "epoch": 0,
    }
    parsed = msgspec.convert(info, ServerInfo)
    assert parsed.layout() == registration().layout()
    assert isinstance(parsed.layout(), KVLayout)
    assert not parsed.needs_rank_query


@pytest.mark.parametrize(
    ("method", "registers_all_rooms", "dp_size", "needs_query"),
    [
        ("follow_bootstrap_room", False, 2, False),
        ("follow_bootstrap_room", True, 2, True),
        ("round_robin", False, 2, True),
        ("round_robin", True, 1, False),
    ],
)
def test_needs_rank_query_follows_prefill_advertised_behaviour(
    method, registers_all_rooms, dp_size, needs_query
):
    registry = full_registry(
        dp_size, load_balance_method=method, registers_all_rooms=registers_all_rooms
    )
    info = msgspec.convert(registry.server_info(), ServerInfo)
    assert info.follow_bootstrap_room == (method == "follow_bootstrap_room")
    assert info.needs_rank_query == needs_query


def test_reregistration_replaces_entry_without_double_counting():
    registry = BootstrapRegistry(room_ttl_s=10.0)
    registry.register_worker(registration(0), now=0.0)
    registry.register_worker(registration(0, kv_endpoint="tcp://127.0.0.1:7777"), now=1.0)
    assert registry.num_workers == 1
    assert registry.server_info() is None  # still missing rank 1
    assert registry.worker(0)["kv_endpoint"] == "tcp://127.0.0.1:7777"
    assert registry.stats()["registrations"] == 2


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("page_size", 32),
        ("model_fingerprint", "other-model"),
        ("kv_dtype", "float16"),
        ("head_dim", 128),
        ("load_balance_method", "round_robin"),
        ("registers_all_rooms", True),
        ("epoch", 99),  # a worker of an earlier start of the server
    ],
)
def test_contradicting_registration_names_field_and_both_values(field, value):
    registry = BootstrapRegistry(room_ttl_s=10.0)
    first = registration(0)
    registry.register_worker(first, now=0.0)
    with pytest.raises(RegistrationError) as err:
        registry.register_worker(registration(1, **{field: value}), now=0.0)
    message = str(err.value)
    assert field in message and repr(getattr(first, field)) in message and repr(value) in message
    assert registry.num_workers == 1


def test_contradicting_dp_size_and_out_of_range_rank_are_rejected():
    registry = BootstrapRegistry(room_ttl_s=10.0, dp_size=2)
    with pytest.raises(RegistrationError, match="dp_size: server=2 worker=4"):
        registry.register_worker(registration(3, dp_size=4), now=0.0)
    registry.register_worker(registration(0), now=0.0)
    with pytest.raises(RegistrationError, match="dp_size"):
        registry.register_worker(registration(0, dp_size=1), now=0.0)
    with pytest.raises(RegistrationError, match="dp_rank 2 out of range for dp_size 2"):
        registry.register_worker(registration(2), now=0.0)


@pytest.mark.parametrize(
    "overrides",
    [
        {"dp_rank": True},
        {"page_size": 0},
        {"dp_rank": -1},
        {"kv_endpoint": ""},
        {"kv_endpoint": "tcp://127.0.0.1"},  # no port: decode's connect raised on every room
        {"kv_endpoint": "tcp://127.0.0.1:0"},
        {"kv_endpoint": "tcp://127.0.0.1:65536"},
        {"kv_endpoint": "tcp://::1:6000"},  # ZeroMQ reads no device in it
        {"kv_endpoint": "tcp://*:6000"},
        {"kv_endpoint": "ipc:///tmp/kv"},
        {"kv_endpoint": "http://127.0.0.1:6000"},
        {"load_balance_method": "auto"},
        {"protocol_version": 99},
        {"tp_rank": 1},
    ],
)
def test_malformed_registration_is_rejected(overrides):
    registry = BootstrapRegistry(room_ttl_s=10.0)
    with pytest.raises(RegistrationError):
        registry.register_worker(registration(**{"dp_rank": 0, **overrides}), now=0.0)
    assert registry.num_workers == 0


@pytest.mark.parametrize(
    "endpoint", ["tcp://127.0.0.1:6000", "tcp://[::1]:6000", "tcp://prefill-0.svc:65535"]
)
def test_a_tcp_endpoint_with_host_and_port_registers(endpoint):
    registry = BootstrapRegistry(room_ttl_s=10.0)
    registry.register_worker(registration(0, kv_endpoint=endpoint), now=0.0)
    assert registry.worker(0)["kv_endpoint"] == endpoint


def test_worker_answers_endpoint_and_layout_or_none():
    registry = full_registry()
    answer = registry.worker(1)
    assert answer["kv_endpoint"] == "tcp://127.0.0.1:6001"
    assert answer["page_size"] == 16 and answer["dp_rank"] == 1
    assert registry.worker(2) is None


def test_query_returns_only_known_rooms():
    registry = full_registry()
    registry.register_room(10, 1, now=0.0)
    registry.register_room(11, 0, now=0.0)
    assert registry.query([10, 11, 12], now=1.0) == {10: 1, 11: 0}
    assert registry.query([], now=1.0) == {}
    stats = registry.stats()
    assert stats["queries"] == 2 and stats["rooms_queried"] == 3
    assert stats["room_registrations"] == 2


def test_failure_wins_over_rank_in_either_order():
    registry = full_registry()
    registry.register_room(5, 1, now=0.0)
    registry.record_failure(5, "follow_bootstrap_room conflict", 400, now=0.0)
    registry.record_failure(6, "boom", 500, now=0.0)
    registry.register_room(6, 0, now=0.0)
    answer = registry.query([5, 6], now=0.0)
    assert answer == {
        5: RoomFailure("follow_bootstrap_room conflict", 400),
        6: RoomFailure("boom", 500),
    }
    assert registry.stats()["failures_recorded"] == 2


def test_ttl_is_measured_from_last_use():
    registry = full_registry(room_ttl_s=10.0)
    registry.register_room(1, 0, now=0.0)
    registry.register_room(2, 1, now=0.0)
    registry.query([1], now=8.0)  # refreshes room 1 only
    assert registry.expire(now=10.0) == 0  # idle exactly the TTL: kept
    assert registry.expire(now=10.5) == 1
    assert registry.query([1, 2], now=10.5) == {1: 0}
    assert registry.expire(now=20.4) == 0  # room 1 last used at 10.5
    assert registry.expire(now=20.6) == 1
    assert registry.num_rooms == 0
    assert registry.stats()["expirations"] == 2


def test_drop_room_forgets_rank_but_keeps_failure_until_expiry():
    registry = full_registry(room_ttl_s=10.0)
    registry.register_room(1, 0, now=0.0)
    registry.record_failure(2, "prefill aborted", 500, now=0.0)
    assert registry.drop_room(1) is True
    assert registry.drop_room(1) is False
    assert registry.drop_room(2) is False
    assert registry.query([1, 2], now=1.0) == {2: RoomFailure("prefill aborted", 500)}
    assert registry.expire(now=11.5) == 1
    assert registry.num_rooms == 0


@pytest.mark.parametrize("room", [-1, 2**63, True, 1.0, "5", None])
def test_invalid_rooms_are_rejected(room):
    registry = full_registry()
    with pytest.raises(BootstrapError, match="bootstrap_room"):
        registry.register_room(room, 0, now=0.0)
    with pytest.raises(BootstrapError, match="bootstrap_room"):
        registry.record_failure(room, "x", 500, now=0.0)
    with pytest.raises(BootstrapError, match="bootstrap_room"):
        registry.query([1, room], now=0.0)
    assert registry.num_rooms == 0


def test_room_edges_are_accepted():
    registry = full_registry()
    registry.register_room(0, 0, now=0.0)
    registry.register_room(2**63 - 1, 1, now=0.0)
    assert registry.query([0, 2**63 - 1], now=0.0) == {0: 0, 2**63 - 1: 1}


@pytest.mark.parametrize("dp_rank", [-1, 2, True, "1", None])
def test_invalid_dp_rank_is_rejected_once_dp_size_known(dp_rank):
    registry = full_registry(dp_size=2)
    with pytest.raises(BootstrapError, match="dp_rank"):
        registry.register_room(7, dp_rank, now=0.0)
    assert registry.num_rooms == 0


def test_dp_rank_checked_against_configured_dp_size_before_any_worker():
    registry = BootstrapRegistry(room_ttl_s=10.0, dp_size=2)
    registry.register_room(1, 1, now=0.0)
    with pytest.raises(BootstrapError, match="out of range"):
        registry.register_room(2, 2, now=0.0)


@pytest.mark.parametrize(("error", "status"), [("", 500), ("x", 200), ("x", 600), ("x", True)])
def test_invalid_failure_is_rejected(error, status):
    registry = full_registry()
    with pytest.raises(BootstrapError):
        registry.record_failure(1, error, status, now=0.0)


def test_query_size_is_bounded():
    registry = full_registry()
    with pytest.raises(BootstrapError, match="at most"):
        registry.query(list(range(MAX_ROOMS_PER_QUERY + 1)), now=0.0)


def test_stats_are_monotonic_counters_only():
    registry = full_registry()
    registry.register_room(1, 0, now=0.0)
    registry.expire(now=100.0)
    assert registry.stats() == {
        "registrations": 2,
        "room_registrations": 1,
        "queries": 0,
        "rooms_queried": 0,
        "failures_recorded": 0,
        "expirations": 1,
    }
    assert registry.num_rooms == 0 and registry.num_workers == 2
