"""The front end's watchdog over its workers' loops (--watchdog-timeout, as SGLang's).

Pure: fed with the loop step each `WorkerAlive` carries and `now`; runs in the front-end
process. A worker with work whose step has not moved for the timeout is stuck (its loop hangs,
or runs one very long step) though its heartbeat thread still beats.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class _Seen:
    step: int
    since: float  # when the front end first saw this step


class ProgressWatch:
    """Progress is the loop turning, not tokens coming out: a loop with nothing to compute
    (a decode room waiting for its KV, a request waiting for pages) still turns every
    IDLE_POLL_MS. Judged on beats only: a live loop shows a new step at every beat, so a
    timeout shorter than the beat period blames no live worker."""

    def __init__(self, dp_size: int, timeout_s: float):
        self.timeout_s = timeout_s
        self._seen: list[_Seen | None] = [None] * dp_size

    def on_beat(self, rank: int, step: int, now: float) -> bool:
        """Record a beat of worker `rank`; True when its loop turned since the last one."""
        seen = self._seen[rank]
        if seen is not None and seen.step == step:
            return False
        self._seen[rank] = _Seen(step, now)
        return True

    def stuck_for(self, rank: int, busy: bool, now: float) -> float | None:
        """How long worker `rank`'s loop has not turned, where that is past the timeout while
        it has work; None otherwise (an idle worker is never stuck)."""
        seen = self._seen[rank]
        if self.timeout_s <= 0 or not busy or seen is None:
            return None
        stalled_s = now - seen.since
        return stalled_s if stalled_s > self.timeout_s else None

    def excuse(self, now: float) -> None:
        """The front end itself did not run for a while (blocked, or stopped): the time its
        beats waited unread is no worker's stall, so every step counts as seen from `now`."""
        for seen in self._seen:
            if seen is not None:
                seen.since = max(seen.since, now)
