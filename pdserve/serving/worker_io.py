"""Conversions between the front end's messages and the engine's objects. Runs in a worker."""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

from pdserve.engine.request import Request
from pdserve.serving.protocol import GenerateReq, ReqOutput

if TYPE_CHECKING:
    from pdserve.engine.request import StepOutput


def request_from_msg(msg: GenerateReq, prefill_only: bool = False) -> Request:
    return Request(
        rid=msg.rid,
        prompt_ids=list(msg.input_ids),
        sampling=msg.sampling,
        return_logprob=msg.return_logprob,
        logprob_start_len=msg.logprob_start_len,
        top_logprobs_num=msg.top_logprobs_num,
        prefill_only=prefill_only,
        cache_salt=msg.cache_salt,
    )


def _pairs(rows: list | None) -> list | None:
    if rows is None:
        return None
    return [None if row is None else [(int(t), float(lp)) for t, lp in row] for row in rows]


def output_to_msg(out: StepOutput) -> ReqOutput:
    """An engine error is an internal failure of that request: 500 with the engine's message."""
    msg = ReqOutput(
        rid=out.rid,
        new_token_ids=list(out.new_token_ids),
        new_token_logprobs=[float(x) for x in out.new_token_logprobs or []],
        new_top_logprobs=_pairs(out.new_top_logprobs) or [],
        prompt_logprobs=None if out.prompt_logprobs is None else list(out.prompt_logprobs),
        prompt_top_logprobs=_pairs(out.prompt_top_logprobs),
        cached_tokens=int(out.cached_tokens or 0),
        finish_reason=out.finish_reason,
    )
    if out.error is not None:
        msg.error_status = 500
        msg.error_message = out.error
    return msg


def rejected_msg(rid: str, message: str, status: int = 400) -> ReqOutput:
    """The answer for a request the engine refused (RequestRejected) or could not take."""
    from pdserve.engine.request import FinishReason

    return ReqOutput(
        rid=rid,
        finish_reason=FinishReason("abort", message=message),
        error_status=status,
        error_message=message,
    )


def without_finish(out: ReqOutput) -> ReqOutput:
    """`out` with no finish reason (prefill: a room's first token, its finish comes once
    the KV is sent)."""
    if out.finish_reason is None:
        return out
    return msgspec.structs.replace(out, finish_reason=None)
