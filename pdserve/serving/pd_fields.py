"""The PD fields of one request item (bootstrap room and address, prefill and routed ranks),
parsed once where the request enters a server's front end. Pure.

Everything after the parse passes the `PDFields` struct, never the raw body.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass

MAX_ROOM = 2**63  # rooms are in [0, MAX_ROOM)
ROUTED_RANK_FIELDS = ("routed_dp_rank", "data_parallel_rank")  # ours, then SGLang's alias
FIELD_NAMES = (
    "bootstrap_room",
    "bootstrap_host",
    "bootstrap_port",
    "disagg_prefill_dp_rank",
    "disagg_local_prefill",
    *ROUTED_RANK_FIELDS,
)
MODES = ("colocated", "prefill", "decode")


class PDFieldError(ValueError):
    """A PD field that is missing or malformed; the front end answers 400 with `message`,
    which names `field`."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field
        self.message = message


@dataclass(frozen=True)
class PDFields:
    room: int | None = None  # bootstrap_room: names the transfer on both legs
    bootstrap_host: str | None = None  # decode: the prefill server's bootstrap server
    bootstrap_port: int | None = None  # decode: None means this server's --bootstrap-port
    prefill_dp_rank: int | None = None  # disagg_prefill_dp_rank: the prefill worker, named
    routed_dp_rank: int | None = None  # this server's worker, forced by the client
    # decode: no prefill server; this server computes the prompt past its cached prefix
    local_prefill: bool = False


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_room(value: object) -> bool:
    return _is_int(value) and 0 <= value < MAX_ROOM  # type: ignore[operator]


def check_room(value: object) -> int:
    if not is_room(value):
        raise PDFieldError(
            "bootstrap_room", f"bootstrap_room must be an integer in [0, 2^63), got {value!r}"
        )
    return value  # type: ignore[return-value]


def home_rank(room: int, dp_size: int) -> int:
    """The DP rank a room belongs to under follow_bootstrap_room."""
    return room % dp_size


def _routed_rank(values: Mapping[str, object], dp_size: int) -> int | None:
    for name in ROUTED_RANK_FIELDS:
        value = values.get(name)
        if value is None:
            continue
        if not _is_int(value):
            raise PDFieldError(name, f"{name} must be an integer, got {value!r}")
        if not 0 <= value < dp_size:  # type: ignore[operator]
            raise PDFieldError(name, f"{name}={value} out of range: dp_size is {dp_size}")
        return value  # type: ignore[return-value]
    return None


def _prefill_rank(value: object) -> int | None:
    """Only the type here: its range is [0, the prefill server's dp_size), which the rank
    rules check (`disagg.rank_resolver`), so that a prefill server records the failure."""
    if value is not None and not _is_int(value):
        raise PDFieldError(
            "disagg_prefill_dp_rank", f"disagg_prefill_dp_rank must be an integer, got {value!r}"
        )
    return value  # type: ignore[return-value]


def _host(value: object) -> str | None:
    if value is not None and (not isinstance(value, str) or not value):
        raise PDFieldError(
            "bootstrap_host", f"bootstrap_host must be a non-empty string, got {value!r}"
        )
    value = unbracket(value)
    if value is not None and not is_host(value):
        raise PDFieldError(
            "bootstrap_host", f"bootstrap_host must be a host name or IP address, got {value!r}"
        )
    return value


def unbracket(host: object) -> object:
    """A bracketed IPv6 literal (`[::1]`) as the bare address; anything else unchanged.
    SGLang's router sends the host of an IPv6 prefill URL with its brackets (a decode leg
    was refused with a 400 for it); pdserve's sends the bare literal."""
    if isinstance(host, str) and host.startswith("[") and host.endswith("]"):
        try:
            return str(ipaddress.IPv6Address(host[1:-1]))  # zone ids (%eth0) kept
        except ValueError:
            return host
    return host


def is_host(value: str) -> bool:
    """An IP address, or a name the resolver takes: no URL parts (scheme, port, path,
    brackets), no spaces or control characters, labels of at most 63 characters. Digits
    and dots alone are an address or nothing: aiohttp refuses the legacy forms (`127.1`,
    `1`, `010.0.0.1`) that the resolver would map onto an address, and a decode leg asked
    that URL again until its bootstrap deadline (504)."""
    try:
        ipaddress.ip_address(value)
        return True
    except ValueError:
        pass
    if value.replace(".", "").isdigit():
        return False
    if any(c in "/[]@?#:%\\" or c.isspace() or not c.isprintable() for c in value):
        return False
    try:
        value.encode("idna")  # what the resolver does first (it raised a 500 before)
    except UnicodeError:
        return False
    return True


def _port(value: object) -> int | None:
    if value is not None and (not _is_int(value) or not 0 < value < 65536):  # type: ignore[operator]
        raise PDFieldError(
            "bootstrap_port", f"bootstrap_port must be an integer port or null, got {value!r}"
        )
    return value  # type: ignore[return-value]


def _local_prefill(value: object) -> bool:
    if value is not None and not isinstance(value, bool):
        raise PDFieldError(
            "disagg_local_prefill", f"disagg_local_prefill must be a boolean, got {value!r}"
        )
    return bool(value)


def _require_local(fields: PDFields, mode: str) -> None:
    if mode == "prefill":
        raise PDFieldError(
            "disagg_local_prefill", "disagg_local_prefill is for decode servers, not prefill"
        )
    if fields.room is not None or fields.bootstrap_host is not None:
        raise PDFieldError(
            "disagg_local_prefill",
            "a request with disagg_local_prefill carries no bootstrap_room or bootstrap_host",
        )


def _require(fields: PDFields, mode: str) -> None:
    if fields.local_prefill:
        _require_local(fields, mode)
        return
    if mode != "colocated" and fields.room is None:
        raise PDFieldError(
            "bootstrap_room", f"a {mode} server needs bootstrap_room in every request"
        )
    if mode == "decode" and fields.bootstrap_host is None:
        raise PDFieldError(
            "bootstrap_host",
            "bootstrap_host is required on a decode server "
            "(the prefill server's host; the router sets it)",
        )


def parse_pd_fields(values: Mapping[str, object], dp_size: int, mode: str) -> PDFields:
    """The item's PD fields from its JSON values (null is absent), checked for a server of
    `mode` with `dp_size` workers; PDFieldError names the first bad field."""
    if mode not in MODES:
        raise ValueError(f"unknown server mode {mode!r}")
    room = values.get("bootstrap_room")
    fields = PDFields(
        room=None if room is None else check_room(room),
        bootstrap_host=_host(values.get("bootstrap_host")),
        bootstrap_port=_port(values.get("bootstrap_port")),
        prefill_dp_rank=_prefill_rank(values.get("disagg_prefill_dp_rank")),
        routed_dp_rank=_routed_rank(values, dp_size),
        local_prefill=_local_prefill(values.get("disagg_local_prefill")),
    )
    _require(fields, mode)
    return fields


@dataclass(frozen=True)
class RoomAddress:
    """A room a rejected request named, and where its prefill's bootstrap server is (decode:
    the request's bootstrap_host/port, each None where absent or malformed)."""

    room: int
    bootstrap_host: str | None = None
    bootstrap_port: int | None = None


def item_room(value: object, index: int, num_items: int) -> object:
    """The room of item `index` of `num_items` when a request names one room for all of
    them (SGLang's rule: room + index, so that the n samples or prompts each have their
    own transfer; SGLang's router sends one room with a completions `n`); a list or a
    malformed value is left to the caller."""
    if num_items > 1 and is_room(value):
        return (value + index) % MAX_ROOM  # type: ignore[operator]
    return value


def per_prompt_entry(name: str, value: list, index: int, n: int) -> object:
    """Item `index`'s entry of a PD field list with one entry per prompt of a request with
    `n` > 1 samples of each (items prompt-major: item i is sample i % n of prompt i // n).
    SGLang's router sends such lists for a completions prompt list with `n`; sample j of a
    prompt gets that prompt's room + j, so that every item has its own transfer (SGLang's
    servers repeat the list, giving the samples of a prompt one room)."""
    entry = value[index // n]
    if name == "bootstrap_room" and is_room(entry):
        return (entry + index % n) % MAX_ROOM  # type: ignore[operator]
    return entry


# The most items of one rejected body whose rooms are reported to their other leg (rooms past
# it fail there at the bootstrap deadline). They are enumerated on the event loop: a body
# with n = 2**63 and a bad field had held the server's loop for good.
MAX_REPORTED_ITEMS = 1 << 16


def items_in_body(body: dict) -> int:
    """How many items a generation body makes (prompts x n, at most MAX_REPORTED_ITEMS),
    read leniently: 1 where the body does not say."""
    n = body.get("n")
    n = n if _is_int(n) and n > 1 else 1  # type: ignore[operator]
    prompts = 1
    for name in ("prompt", "text", "input_ids"):
        value = body.get(name)
        if isinstance(value, list) and value and not _is_int(value[0]):
            prompts = len(value)  # a list of texts or of token id lists
    return min(n * prompts, MAX_REPORTED_ITEMS)


def _entries(name: str, value: object, num_items: int, n: int) -> list[object]:
    if not isinstance(value, list):
        return [value] * num_items
    if len(value) == num_items:
        return value
    if n > 1 and len(value) * n == num_items:
        return [per_prompt_entry(name, value, i, n) for i in range(num_items)]
    return [None] * num_items


def rooms_in_body(body: object) -> list[RoomAddress]:
    """Every well-formed room of a request body, with its bootstrap address where that is
    well-formed too. Lenient on purpose: a request rejected for any reason (even a bad PD
    field) still names rooms whose other leg must learn of the rejection."""
    if not isinstance(body, dict):
        return []
    rooms = body.get("bootstrap_room")
    num = items_in_body(body)
    n = body.get("n")
    n = n if _is_int(n) and n > 1 else 1  # type: ignore[operator]
    if isinstance(rooms, list):  # one per item, or one per prompt (expanded as the servers do)
        per_prompt = n > 1 and len(rooms) * n == num
        room_list = _entries("bootstrap_room", rooms, num, n) if per_prompt else rooms
    else:
        room_list = [item_room(rooms, i, num) for i in range(num)]
    hosts = _entries("bootstrap_host", body.get("bootstrap_host"), len(room_list), n)
    ports = _entries("bootstrap_port", body.get("bootstrap_port"), len(room_list), n)
    found = []
    for room, host, port in zip(room_list, hosts, ports, strict=True):
        if not is_room(room):
            continue
        host = unbracket(host)
        valid_host = host if isinstance(host, str) and host else None
        valid_port = port if _is_int(port) and 0 < port < 65536 else None  # type: ignore[operator]
        found.append(RoomAddress(room, valid_host, valid_port))  # type: ignore[arg-type]
    return found
