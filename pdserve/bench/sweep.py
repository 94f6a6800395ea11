"""The rate sweep: which request rate is the highest whose goodput share holds the target.

Pure search state (no I/O): the `pdserve bench` client asks `next_rate()`, runs a benchmark
at that rate and reports the share with `record()`. First the given rates run in ascending
order until one falls short; then optional bisection between the best good rate and the
first bad one. Goodput is assumed to fall as the rate rises, so nothing above a bad rate runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class RateSweep:
    rates: Sequence[float]
    target_share: float
    search_steps: int = 0
    results: list[tuple[float, float]] = field(default_factory=list)  # (rate, share) as run

    def __post_init__(self) -> None:
        self._grid = sorted(set(self.rates))
        self._steps_done = 0

    @property
    def best_rate(self) -> float | None:
        """The highest rate that held the target below every rate that did not."""
        bad = self.first_bad_rate
        good = [r for r, share in self.results if share >= self.target_share]
        good = [r for r in good if bad is None or r < bad]
        return max(good) if good else None

    @property
    def first_bad_rate(self) -> float | None:
        bad = [r for r, share in self.results if share < self.target_share]
        return min(bad) if bad else None

    def record(self, rate: float, goodput_share: float) -> None:
        if self._grid and rate == self._grid[0]:
            self._grid.pop(0)
        elif self.first_bad_rate is not None:
            self._steps_done += 1
        self.results.append((rate, goodput_share))

    def next_rate(self) -> float | None:
        """The rate to run next, or None when the sweep is over."""
        bad = self.first_bad_rate
        if self._grid and bad is None:
            return self._grid[0]
        if bad is None or self._steps_done >= self.search_steps:
            return None
        low = self.best_rate
        # nothing good yet: bisect towards zero from the first bad rate
        return (bad + (low or 0.0)) / 2
