"""Whether a PD worker's own loop stood still (the process stopped, or starved of CPU): the
faults it then sees are likely its own. Pure; the worker's loop feeds it `now` each turn."""

from __future__ import annotations


class StallClock:
    """The loop turns at least every 0.1 s (serving/worker.py's IDLE_POLL_MS), so a gap
    between turns longer than `limit_s` (the KV heartbeat timeout) means this worker did
    not run. For `limit_s` after such a gap its peer's silence (a lost KV connection, a
    deadline on the peer that lapsed meanwhile) is this worker's fault, not the peer's:
    a decode worker frozen past its KV wait blamed its sound prefill peer, and the
    router's retry then avoided prefill and kept the frozen decode server; a prefill worker
    frozen past its wait for decode's page list blamed its sound decode peer likewise."""

    def __init__(self, limit_s: float, peer_origin: str):
        self.limit_s = limit_s
        self.peer_origin = peer_origin  # hooks.PREFILL_ORIGIN or DECODE_ORIGIN
        self._last_turn: float | None = None
        self._resumed_at: float | None = None
        self._stood_still_s = 0.0

    def turn(self, now: float) -> None:
        if self._last_turn is not None and now - self._last_turn > self.limit_s:
            self._resumed_at = now
            self._stood_still_s = now - self._last_turn
        self._last_turn = now

    def stalled_lately(self, now: float) -> bool:
        return self._resumed_at is not None and now - self._resumed_at <= self.limit_s

    def blame(self, now: float) -> str | None:
        """The `origin` of an error for the peer's silence (a lost connection, a failed
        send, a deadline on the peer that lapsed): the peer's, unless this worker itself
        stood still lately (then its own: none)."""
        return None if self.stalled_lately(now) else self.peer_origin

    def attribute(self, reason: str, now: float) -> tuple[str, str | None]:
        """(message, `origin`) of an error for the peer's silence: `reason` and the peer's
        origin, or, where this worker itself stood still lately, `reason` saying so and no
        origin (the text had blamed the peer where the origin named this worker)."""
        if not self.stalled_lately(now):
            return reason, self.peer_origin
        note = (
            f" (this worker itself did not run for {self._stood_still_s:.1f} s just before: "
            "stopped or starved of CPU, the likelier cause)"
        )
        return reason + note, None
