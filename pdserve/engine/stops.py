"""When a request stops: length, EOS, stop token ids, stop strings (pure). Worker process."""

from __future__ import annotations

from collections.abc import Callable

from pdserve.engine.request import FinishReason, Request

# Stop strings are looked for in the text of the last few tokens: a match ending at the
# newest token spans at most len(stop) tokens, plus a few that decode to no text.
_STOP_TAIL_EXTRA_TOKENS = 8


def check_finish(
    req: Request,
    eos_token_ids: frozenset[int],
    detokenize: Callable[[list[int]], str] | None,
) -> FinishReason | None:
    """The finish reason after the newest output token was appended, or None."""
    params = req.sampling
    last = req.output_ids[-1]
    if len(req.output_ids) >= params.max_new_tokens:
        return FinishReason("length", matched=None)
    # vLLM's rule: EOS and stop ids are never sampled before min_new_tokens tokens (the
    # sampler bans them) and stop strings are matched only once more were generated.
    if len(req.output_ids) <= params.min_new_tokens:
        return None
    if last in params.stop_token_ids:
        return FinishReason("stop", matched=last)
    if not params.ignore_eos and last in eos_token_ids:
        return FinishReason("stop", matched=last)
    if params.stop and detokenize is not None:
        return _match_stop_string(req, detokenize)
    return None


def _match_stop_string(req: Request, detokenize: Callable[[list[int]], str]) -> FinishReason | None:
    params = req.sampling
    longest = max(len(s) for s in params.stop)
    tail_ids = req.output_ids[-(longest + _STOP_TAIL_EXTRA_TOKENS) :]
    tail = detokenize(tail_ids)
    # Without min_new_tokens a match anywhere in the tail is new: an older one would have
    # stopped the request. With it, one within the first tokens' text never counts (vLLM's
    # rule), so only a match reaching into the newest token's text does.
    first_checked = len(detokenize(tail_ids[:-1])) if params.min_new_tokens else 0
    for stop in params.stop:
        if tail.find(stop, max(0, first_checked - len(stop) + 1)) != -1:
            return FinishReason("stop", matched=stop)
    return None
