"""The bootstrap registry: prefill workers' KV endpoints, room -> prefill DP rank, room failures.

Pure core (no clock, no I/O) of the bootstrap server (docs/protocol.md section 3). It lives in the
prefill front-end process: the DP controller calls it directly, the HTTP shell serves it.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Annotated, Any

import msgspec

from pdserve import netaddr
from pdserve.disagg.messages import PROTOCOL_VERSION
from pdserve.engine.kv_layout import KVLayout
from pdserve.serving import pd_fields
from pdserve.serving.config import LB_METHODS

MAX_ROOMS_PER_QUERY = 4096
# On `/query_dp_ranks` answers: the restart epoch of the server that answered (section 3).
EPOCH_HEADER = "X-PDServe-Epoch"
# Fixed by the first registration; later registrations must agree on every one of them.
CLUSTER_FIELDS = (
    "dp_size",
    "tp_size",
    "page_size",
    "kv_dtype",
    "num_layers",
    "num_kv_heads",
    "head_dim",
    "model_fingerprint",
    "load_balance_method",
    "registers_all_rooms",
    "protocol_version",
    "epoch",  # a worker of an earlier start of this server must not register here
)

# Counters of stats(): each only ever grows.
STAT_NAMES = (
    "registrations", "room_registrations", "queries", "rooms_queried", "failures_recorded",
    "expirations",
)  # fmt: skip

NonNegInt = Annotated[int, msgspec.Meta(ge=0)]
PosInt = Annotated[int, msgspec.Meta(ge=1)]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]


def _layout_of(obj: Any) -> KVLayout:
    return KVLayout(**{name: getattr(obj, name) for name in KVLayout.__struct_fields__})


class BootstrapError(ValueError):
    """Bad input from a caller (HTTP 400)."""


class RegistrationError(BootstrapError):
    """A worker registration that is malformed or contradicts the registered ones."""


class WorkerRegistration(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One prefill worker's `PUT /route` body. Type and range checks run on construction and
    on decoding; `tp_rank` indexes tensor-parallel ranks within the DP rank."""

    dp_rank: NonNegInt
    dp_size: PosInt
    kv_endpoint: Name  # e.g. "tcp://127.0.0.1:5555"
    page_size: PosInt
    kv_dtype: Name
    num_layers: PosInt
    num_kv_heads: PosInt
    head_dim: PosInt
    model_fingerprint: Name
    load_balance_method: Name  # resolved: never "auto"
    registers_all_rooms: bool
    protocol_version: int = PROTOCOL_VERSION
    epoch: NonNegInt = 0  # the prefill server's restart epoch: one for all its workers
    tp_rank: NonNegInt = 0
    tp_size: PosInt = 1

    def __post_init__(self) -> None:
        # Decode connects to it: a bad one failed every room of this worker on decode
        endpoint_error = netaddr.tcp_endpoint_error(self.kv_endpoint)
        if endpoint_error is not None:
            raise RegistrationError(f"kv_endpoint: {endpoint_error}")
        if self.dp_rank >= self.dp_size:
            raise RegistrationError(
                f"dp_rank {self.dp_rank} out of range for dp_size {self.dp_size}"
            )
        if self.tp_rank >= self.tp_size:
            raise RegistrationError(
                f"tp_rank {self.tp_rank} out of range for tp_size {self.tp_size}"
            )
        if self.load_balance_method not in LB_METHODS:
            raise RegistrationError(
                f"load_balance_method must be one of {LB_METHODS} "
                f"(resolved, not 'auto'), got {self.load_balance_method!r}"
            )
        if self.protocol_version != PROTOCOL_VERSION:
            raise RegistrationError(
                f"protocol_version: server={PROTOCOL_VERSION} worker={self.protocol_version}"
            )

    def layout(self) -> KVLayout:
        return _layout_of(self)


class ServerInfo(msgspec.Struct, frozen=True, kw_only=True):
    """`GET /route` answer: what a decode server needs to know about this prefill server."""

    dp_size: PosInt
    tp_size: PosInt
    page_size: PosInt
    kv_dtype: str
    num_layers: PosInt
    num_kv_heads: PosInt
    head_dim: PosInt
    model_fingerprint: str
    load_balance_method: str
    follow_bootstrap_room: bool
    registers_all_rooms: bool
    protocol_version: int
    epoch: int = 0  # a new one after every restart of the prefill server

    def layout(self) -> KVLayout:
        return _layout_of(self)

    @property
    def needs_rank_query(self) -> bool:
        """False when decode may use home(room) = room mod dp_size without asking (section 4)."""
        return self.dp_size > 1 and not (
            self.follow_bootstrap_room and not self.registers_all_rooms
        )


# The sides a room's failure may be blamed on (`RoomFailure.origin`).
FAILURE_ORIGINS = ("decode", "prefill")


class RoomFailure(msgspec.Struct, frozen=True):
    """A room that failed on prefill: decode's leg must fail at once with this error.
    `origin`: the side whose fault it is, where known (decode's report says so): "decode"
    marks prefill's leg of the room `origin: decode`; "prefill" or None leaves it unmarked."""

    error: str
    status: int = 500
    origin: str | None = None

    def to_json(self) -> dict[str, object]:
        """The failure in a /query_dp_ranks answer (`origin` only where known)."""
        answer: dict[str, object] = {"error": self.error, "status": self.status}
        if self.origin is not None:
            answer["origin"] = self.origin
        return answer


class _RoomEntry:
    __slots__ = ("dp_rank", "failure", "last_used")

    def __init__(self, last_used: float):
        self.dp_rank: int | None = None
        self.failure: RoomFailure | None = None
        self.last_used = last_used


def _validated(reg: WorkerRegistration) -> WorkerRegistration:
    # Struct construction skips type checks; decoding does them, so round-trip once.
    try:
        return msgspec.convert(msgspec.structs.asdict(reg), WorkerRegistration)
    except msgspec.ValidationError as e:
        raise RegistrationError(f"invalid worker registration: {e}") from None


def check_room(room: object) -> int:
    """A valid bootstrap room (the rule of a request's bootstrap_room) or BootstrapError."""
    try:
        return pd_fields.check_room(room)
    except pd_fields.PDFieldError as exc:
        raise BootstrapError(exc.message) from None


class BootstrapRegistry:
    """All state of one prefill server's bootstrap server. Not thread-safe: one event loop."""

    def __init__(self, room_ttl_s: float, dp_size: int | None = None):
        if room_ttl_s <= 0:
            raise ValueError(f"room_ttl_s must be > 0, got {room_ttl_s}")
        if dp_size is not None and (type(dp_size) is not int or dp_size < 1):
            raise ValueError(f"dp_size must be a positive int, got {dp_size!r}")
        self.room_ttl_s = room_ttl_s
        self.dp_size = dp_size
        self._first: WorkerRegistration | None = None
        self._workers: dict[tuple[int, int], WorkerRegistration] = {}
        # Ordered by last use, oldest first, so expiry only looks at what it drops.
        self._rooms: OrderedDict[int, _RoomEntry] = OrderedDict()
        self._stats = dict.fromkeys(STAT_NAMES, 0)

    # -- workers ------------------------------------------------------------------------------

    def register_worker(self, reg: WorkerRegistration, now: float) -> None:
        """Add or replace (a restarted worker) the entry of (dp_rank, tp_rank)."""
        reg = _validated(reg)
        if self._first is None and self.dp_size is not None and reg.dp_size != self.dp_size:
            raise RegistrationError(f"dp_size: server={self.dp_size} worker={reg.dp_size}")
        if self._first is not None:
            for name in CLUSTER_FIELDS:
                fixed, got = getattr(self._first, name), getattr(reg, name)
                if fixed != got:
                    raise RegistrationError(
                        f"{name}: registered={fixed!r} worker(dp_rank={reg.dp_rank})={got!r}"
                    )
        else:
            self._first = reg
            self.dp_size = reg.dp_size
        self._workers[(reg.dp_rank, reg.tp_rank)] = reg
        self._stats["registrations"] += 1

    def not_ready_reason(self) -> str | None:
        """Why server info is not available yet, or None once every worker has registered."""
        if self._first is None:
            return "no prefill worker has registered yet"
        expected = self._first.dp_size * self._first.tp_size
        if len(self._workers) < expected:
            missing = sorted(
                (dp, tp)
                for dp in range(self._first.dp_size)
                for tp in range(self._first.tp_size)
                if (dp, tp) not in self._workers
            )
            shown = ", ".join(f"dp_rank={dp} tp_rank={tp}" for dp, tp in missing[:8])
            return (
                f"{len(missing)} of {expected} prefill workers not registered yet ({shown}"
                + (", ..." if len(missing) > 8 else "")
                + ")"
            )
        return None

    def server_info(self) -> dict[str, Any] | None:
        """The `GET /route` answer, or None until all dp_size x tp_size workers registered."""
        if self.not_ready_reason() is not None:
            return None
        first = self._first
        assert first is not None
        info = ServerInfo(
            follow_bootstrap_room=first.load_balance_method == "follow_bootstrap_room",
            **{name: getattr(first, name) for name in CLUSTER_FIELDS},
        )
        return msgspec.structs.asdict(info)

    def worker(self, dp_rank: int) -> dict[str, Any] | None:
        """The `GET /route?prefill_dp_rank=R` answer (tp_rank 0), or None if not registered."""
        reg = self._workers.get((dp_rank, 0))
        return None if reg is None else msgspec.structs.asdict(reg)

    @property
    def num_workers(self) -> int:
        return len(self._workers)

    @property
    def epoch(self) -> int | None:
        """The restart epoch of the registered workers' server; None before any registered."""
        return None if self._first is None else self._first.epoch

    # -- rooms --------------------------------------------------------------------------------

    def _check_rank(self, dp_rank: object) -> int:
        if type(dp_rank) is not int or dp_rank < 0:
            raise BootstrapError(f"dp_rank must be a non-negative integer, got {dp_rank!r}")
        if self.dp_size is not None and dp_rank >= self.dp_size:
            raise BootstrapError(f"dp_rank {dp_rank} out of range for dp_size {self.dp_size}")
        return dp_rank

    def _touch(self, room: int, now: float) -> _RoomEntry:
        entry = self._rooms.get(room)
        if entry is None:
            entry = self._rooms[room] = _RoomEntry(now)
        else:
            entry.last_used = now
            self._rooms.move_to_end(room)
        return entry

    def register_room(self, room: int, dp_rank: int, now: float) -> None:
        """Publish that `room` was dispatched to prefill worker `dp_rank`."""
        check_room(room)
        self._check_rank(dp_rank)
        self._touch(room, now).dp_rank = dp_rank
        self._stats["room_registrations"] += 1

    def record_failure(
        self, room: int, reason: str, status: int, now: float, origin: str | None = None
    ) -> None:
        """Publish that `room` failed on prefill. A failure wins over any rank, now or later.
        `origin`: the side at fault, where known (FAILURE_ORIGINS)."""
        check_room(room)
        if not isinstance(reason, str) or not reason:
            raise BootstrapError(f"error must be a non-empty string, got {reason!r}")
        if type(status) is not int or not 400 <= status < 600:
            raise BootstrapError(
                f"status must be an HTTP error status in [400, 600), got {status!r}"
            )
        if origin is not None and origin not in FAILURE_ORIGINS:
            raise BootstrapError(f'origin must be "decode" or "prefill", got {origin!r}')
        self._touch(room, now).failure = RoomFailure(reason, status, origin)
        self._stats["failures_recorded"] += 1

    def failure(self, room: int) -> RoomFailure | None:
        """The failure recorded for `room`, if any (does not count as a use)."""
        entry = self._rooms.get(room)
        return None if entry is None else entry.failure

    def query(self, rooms: list[int], now: float) -> dict[int, int | RoomFailure]:
        """Ranks or failures of the known rooms among `rooms`; unknown rooms are left out.
        Every room answered counts as used (its TTL restarts)."""
        if len(rooms) > MAX_ROOMS_PER_QUERY:
            raise BootstrapError(f"at most {MAX_ROOMS_PER_QUERY} rooms per query, got {len(rooms)}")
        for room in rooms:
            check_room(room)
        self._stats["queries"] += 1
        self._stats["rooms_queried"] += len(rooms)
        answer: dict[int, int | RoomFailure] = {}
        for room in rooms:
            if room not in self._rooms:
                continue
            entry = self._touch(room, now)
            answer[room] = entry.failure if entry.failure is not None else entry.dp_rank  # type: ignore[assignment]
        return answer

    def drop_room(self, room: int) -> bool:
        """The transfer for `room` finished: forget its rank. A recorded failure stays until it
        expires, so a decode leg that asks late still learns why. True if a rank was dropped."""
        entry = self._rooms.get(room)
        if entry is None or entry.failure is not None:
            return False
        del self._rooms[room]
        return True

    def expire(self, now: float) -> int:
        """Drop entries unused for longer than room_ttl_s; return how many were dropped."""
        num_dropped = 0
        while self._rooms:
            room, entry = next(iter(self._rooms.items()))
            if now - entry.last_used <= self.room_ttl_s:
                break
            del self._rooms[room]
            num_dropped += 1
        self._stats["expirations"] += num_dropped
        return num_dropped

    @property
    def num_rooms(self) -> int:
        return len(self._rooms)

    def stats(self) -> dict[str, int]:
        """Monotonic counters, for Prometheus counters (sizes: `num_rooms`, `num_workers`)."""
        return dict(self._stats)
