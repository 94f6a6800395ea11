"""Request bodies for the two legs (router process; pure).

Adds `bootstrap_host/port/room` (lists, one per generated sequence, for batches), an `rid`
so a leg can be aborted, and in DP-aware mode the ranks. Shapes follow SGLang's router so
that servers see the same bodies from either router.
"""

from __future__ import annotations

import itertools
import uuid
from dataclasses import dataclass
from typing import Any

import msgspec

from pdserve.router.prefix_table import Prompt
from pdserve.serving.openai_format import MAX_N

GENERATE = "/generate"
COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
ROUTES = (GENERATE, COMPLETIONS, CHAT)
# Rank fields the router owns in DP-aware mode; a client's values are replaced.
RANK_FIELDS = ("routed_dp_rank", "data_parallel_rank", "disagg_prefill_dp_rank")
# A client's own routed rank: with --align-room (no --dp-aware) a prefill rank, the one its
# rooms are drawn on; on the decode leg it would name a decode worker (refused where decode
# has fewer ranks than that), so it reaches the prefill leg only.
CLIENT_ROUTED_FIELDS = ("routed_dp_rank", "data_parallel_rank")


class BadRequest(ValueError):
    """The client's body cannot be routed (the router answers 400); `param`: the field at
    fault, if one is."""

    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.param = param
        self.status = status


def _batch_len(value: Any, name: str) -> int | None:
    """Length of batch field `name`, or None when it holds one prompt (a string or token
    ids)."""
    if not isinstance(value, list):
        return None
    if not value:
        raise BadRequest(f"empty batch: {name} is an empty list", param=name)
    if isinstance(value[0], int):
        return None
    return len(value)


def num_sequences(route: str, body: dict[str, Any]) -> int | None:
    """Sequences this request generates when it is a batch (one room each), else None.
    Also refuses the fields only the router may set on a leg."""
    if "disagg_local_prefill" in body:
        raise BadRequest(
            "disagg_local_prefill is set by the router (--local-prefill-threshold), not by "
            "clients: send the request without it"
        )
    n = body.get("n") if route != GENERATE else None
    # Checked here as the servers check it: each sequence costs the router a room and a rid.
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_N):
        raise BadRequest(f"n must be in [1, {MAX_N}], got {n!r}", param="n")
    if route == GENERATE:
        if "text" in body:
            return _batch_len(body["text"], "text")
        return _batch_len(body.get("input_ids"), "input_ids")
    prompts = _batch_len(body.get("prompt"), "prompt") if route == COMPLETIONS else None
    if prompts is None:
        return n if n and n > 1 else None
    return prompts * (n or 1)


def _first_prompt(value: Any) -> Prompt | None:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value:
        if isinstance(value[0], int):
            return value
        return _first_prompt(value[0])
    return None


def _message_text(messages: Any) -> str | None:
    if not isinstance(messages, list):
        return None
    parts: list[str] = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):  # multi-part content: keep the text parts
            texts = (p.get("text") for p in content if isinstance(p, dict))
            content = "".join(t for t in texts if isinstance(t, str))  # the server checks
        parts.append(
            f"{message.get('role', '')}:{content or ''}\n" if isinstance(message, dict) else ""
        )
    return "".join(parts)


def several_prompts(route: str, body: dict[str, Any]) -> bool:
    """Whether the request is a batch of more than one prompt (its `n` samples aside)."""
    if route == GENERATE:
        value = body.get("text")
        value = body.get("input_ids") if value is None else value
    else:
        value = body.get("prompt") if route == COMPLETIONS else None
    return isinstance(value, list) and len(value) > 1 and not isinstance(value[0], int)


def prompt_of(route: str, body: dict[str, Any]) -> Prompt | None:
    """The (first) prompt, for cache-aware routing and load estimates."""
    if route == GENERATE:
        return _first_prompt(body.get("text")) or _first_prompt(body.get("input_ids"))
    if route == COMPLETIONS:
        return _first_prompt(body.get("prompt"))
    return _message_text(body.get("messages"))


def estimate_tokens(prompt: Prompt | None, num_seqs: int | None) -> int:
    """Rough prompt tokens of a request (text: ~4 characters per token)."""
    if prompt is None:
        return 0
    per_seq = len(prompt) if not isinstance(prompt, str) else len(prompt) // 4 + 1
    return per_seq * (num_seqs or 1)


# A random prefix per router process and a counter: unique like uuid4s, without a syscall
# and a UUID object per request.
_RID_PREFIX = f"pdr-{uuid.uuid4().hex[:16]}-"
_rid_counter = itertools.count()


def new_rids(num_seqs: int | None) -> str | list[str]:
    """One rid per generated sequence, so each can be aborted by name."""
    if num_seqs is not None:
        return [f"{_RID_PREFIX}{next(_rid_counter)}" for _ in range(num_seqs)]
    return f"{_RID_PREFIX}{next(_rid_counter)}"


@dataclass(frozen=True)
class LegPlan:
    """Everything the router decided for one attempt."""

    bootstrap_host: str
    bootstrap_port: int | None
    rooms: list[int]
    num_seqs: int | None
    rid: str | list[str]
    prefill_rank: int | None = None  # set in DP-aware mode
    decode_rank: int | None = None
    # --align-room without --dp-aware: the client's routed rank fields go to prefill only
    client_rank_prefill_only: bool = False


def leg_fields(plan: LegPlan) -> tuple[dict[str, Any], dict[str, Any]]:
    """The fields the router sets on (prefill, decode). The same object unless ranks differ."""
    if plan.num_seqs is None:
        shared: dict[str, Any] = {
            "bootstrap_host": plan.bootstrap_host,
            "bootstrap_port": plan.bootstrap_port,
            "bootstrap_room": plan.rooms[0],
        }
    else:
        shared = {
            "bootstrap_host": [plan.bootstrap_host] * plan.num_seqs,
            "bootstrap_port": [plan.bootstrap_port] * plan.num_seqs,
            "bootstrap_room": list(plan.rooms),
        }
    shared["rid"] = plan.rid
    if plan.prefill_rank is None:
        return shared, shared
    p = plan.prefill_rank
    prefill = {**shared, "routed_dp_rank": p, "disagg_prefill_dp_rank": p}
    decode = {**shared, "disagg_prefill_dp_rank": p}
    if plan.decode_rank is not None:
        decode["routed_dp_rank"] = plan.decode_rank
    return prefill, decode


def shape_bodies(body: dict[str, Any], plan: LegPlan) -> tuple[dict[str, Any], dict[str, Any]]:
    """(prefill body, decode body). They are the same object unless ranks differ; in
    DP-aware mode a client's rank fields are dropped, and with `client_rank_prefill_only`
    its routed rank is left off the decode leg."""
    prefill_fields, decode_fields = leg_fields(plan)
    if plan.prefill_rank is not None:
        body = {k: v for k, v in body.items() if k not in RANK_FIELDS}
    prefill = {**body, **prefill_fields}
    decode_body = body
    if plan.client_rank_prefill_only and any(k in body for k in CLIENT_ROUTED_FIELDS):
        decode_body = {k: v for k, v in body.items() if k not in CLIENT_ROUTED_FIELDS}
    if decode_fields is prefill_fields and decode_body is body:
        return prefill, prefill
    return prefill, {**decode_body, **decode_fields}


def encode_bodies(raw: bytes, body: dict[str, Any], plan: LegPlan) -> tuple[bytes, bytes]:
    """The legs' bodies as JSON, from the client's bytes `raw` (which decode to `body`).
    When the client sent none of the router's fields, its bytes are kept and the fields
    appended: a long prompt is not encoded again. The same object unless ranks differ."""
    prefill_fields, decode_fields = leg_fields(plan)
    ranks = RANK_FIELDS if plan.prefill_rank is not None else ()
    if plan.client_rank_prefill_only:
        ranks = CLIENT_ROUTED_FIELDS
    owned = [*prefill_fields, *decode_fields, *ranks]
    if any(key in body for key in owned):  # a key must not appear twice: encode anew
        prefill, decode = shape_bodies(body, plan)
        prefill_data = msgspec.json.encode(prefill)
        return prefill_data, prefill_data if decode is prefill else msgspec.json.encode(decode)
    head = raw.rstrip()[:-1] + (b"," if body else b"")  # the object without its closing brace
    prefill_data = head + msgspec.json.encode(prefill_fields)[1:]
    if decode_fields is prefill_fields:
        return prefill_data, prefill_data
    return prefill_data, head + msgspec.json.encode(decode_fields)[1:]


LOCAL_PREFILL_DROPPED = (*RANK_FIELDS, "bootstrap_room", "bootstrap_host", "bootstrap_port")


def local_prefill_body(raw: bytes, body: dict[str, Any], decode_rank: int | None) -> bytes:
    """The one body of a request a decode server computes alone: `disagg_local_prefill`,
    no bootstrap fields, and the rank the router chose (if it chose one)."""
    fields: dict[str, Any] = {"disagg_local_prefill": True}
    if decode_rank is not None:
        fields["routed_dp_rank"] = decode_rank
    if any(key in body for key in (*LOCAL_PREFILL_DROPPED, *fields)):
        kept = {k: v for k, v in body.items() if k not in LOCAL_PREFILL_DROPPED}
        return msgspec.json.encode({**kept, **fields})
    head = raw.rstrip()[:-1] + (b"," if body else b"")
    return head + msgspec.json.encode(fields)[1:]


def plain_body(raw: bytes, body: dict[str, Any], rank: int | None) -> bytes:
    """The body for a plain (colocated) worker: the client's, with `routed_dp_rank` when the
    router chose the rank (kv_aware or cache_aware with --dp-aware: the rank that holds the
    prefix)."""
    if rank is None:
        return raw
    if any(key in body for key in RANK_FIELDS):
        kept = {k: v for k, v in body.items() if k not in RANK_FIELDS}
        return msgspec.json.encode({**kept, "routed_dp_rank": rank})
    head = raw.rstrip()[:-1] + (b"," if body else b"")
    return head + msgspec.json.encode({"routed_dp_rank": rank})[1:]


def abort_rids(route: str, rid: str | list[str], num_seqs: int | None) -> list[str]:
    """The rids the server knows: on the OpenAI routes one client rid for several sequences
    becomes `<rid>-<index>` there, on /generate one for a batch `<rid>_<index>` (SGLang's)."""
    if isinstance(rid, list):
        return list(rid)
    if route == GENERATE and num_seqs is not None:
        return [f"{rid}_{i}" for i in range(num_seqs)]
    if num_seqs is not None and num_seqs > 1:
        return [f"{rid}-{i}" for i in range(num_seqs)]
    return [rid]
