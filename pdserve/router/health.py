"""Per-worker health state and circuit breaker (router process; pure, `now` passed in).

Health comes from periodic `GET /health`; the breaker from real request outcomes. A worker
takes traffic only while both say yes.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class HealthState:
    """Healthy/unhealthy with hysteresis: `failure_threshold` failed checks in a row take a
    worker out, `success_threshold` passed checks in a row bring it back."""

    def __init__(self, failure_threshold: int, success_threshold: int, healthy: bool = False):
        self.failure_threshold = failure_threshold
        self.success_threshold = success_threshold
        self.healthy = healthy
        # Why checks fail, when no retry heals it (a refused API key, another role): said
        # in the 503s and /readiness while the worker is out, so a client learns the cause.
        self.stuck_reason: str | None = None
        self._failures_in_row = 0
        self._successes_in_row = 0
        self.checked = healthy  # a check was recorded (or the worker was known healthy)

    def record(self, ok: bool) -> bool:
        """Record one check; True when the healthy flag changed."""
        self.checked = True
        if ok:
            self._failures_in_row = 0
            self._successes_in_row += 1
            if not self.healthy and self._successes_in_row >= self.success_threshold:
                self.healthy = True
                return True
        else:
            self._successes_in_row = 0
            self._failures_in_row += 1
            if self.healthy and self._failures_in_row >= self.failure_threshold:
                self.healthy = False
                return True
        return False


class BreakerState(enum.Enum):
    CLOSED = "closed"  # normal traffic
    OPEN = "open"  # no traffic until `open_until`
    HALF_OPEN = "half_open"  # one probe request at a time


@dataclass
class CircuitBreaker:
    failure_threshold: int
    success_threshold: int
    open_s: float
    state: BreakerState = BreakerState.CLOSED
    open_until: float = 0.0
    _failures_in_row: int = 0
    _successes_in_row: int = 0
    _probe_in_flight: bool = False

    def allows(self, now: float) -> bool:
        """Whether a request may be sent now (no side effect; see `on_dispatch`)."""
        if self.state is BreakerState.OPEN:
            return now >= self.open_until
        if self.state is BreakerState.HALF_OPEN:
            return not self._probe_in_flight
        return True

    def probing(self, now: float) -> bool:
        """Out of rotation only because a probe is in flight, or its open period ended and no
        request tried it yet: a server to use when no other one is available."""
        if self.state is BreakerState.OPEN:
            return now >= self.open_until
        return self.state is BreakerState.HALF_OPEN

    def on_dispatch(self, now: float) -> None:
        if self.state is BreakerState.OPEN and now >= self.open_until:
            self.state = BreakerState.HALF_OPEN
            self._successes_in_row = 0
        if self.state is BreakerState.HALF_OPEN:
            self._probe_in_flight = True

    def on_back(self, now: float) -> None:
        """The server passed a health check after failing enough of them to be taken out
        (it restarted, or recovered): the failures that opened the breaker were of that
        outage, so a probe may go now. Held out for the rest of the open period, a server
        restarted quicker than it was unused though healthy (the only one of its role: 503
        for every request)."""
        if self.state is BreakerState.OPEN:
            self.open_until = min(self.open_until, now)

    def release(self) -> None:
        """The dispatched request ended without a verdict (client gone, peer leg failed)."""
        self._probe_in_flight = False

    def record(self, ok: bool, now: float) -> None:
        self._probe_in_flight = False
        if ok:
            self._failures_in_row = 0
            self._successes_in_row += 1
            if (
                self.state is BreakerState.HALF_OPEN
                and self._successes_in_row >= self.success_threshold
            ):
                self.state = BreakerState.CLOSED
            return
        self._successes_in_row = 0
        self._failures_in_row += 1
        if self.state is BreakerState.HALF_OPEN or self._failures_in_row >= self.failure_threshold:
            self.state = BreakerState.OPEN
            self.open_until = now + self.open_s
            self._failures_in_row = 0
