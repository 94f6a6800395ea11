"""The watchdog's pure core: a worker is stuck when its loop step stands still past the
timeout while it has work, judged on its beats."""

from __future__ import annotations

import pytest

from pdserve.cli import build_parser
from pdserve.disagg.config import pd_server_config_from_args
from pdserve.serving.watchdog import ProgressWatch


def test_a_step_that_stands_still_past_the_timeout_with_work_is_stuck():
    watch = ProgressWatch(dp_size=2, timeout_s=0.5)
    assert watch.on_beat(1, step=7, now=10.0)
    assert watch.stuck_for(1, busy=True, now=10.0) is None
    assert not watch.on_beat(1, step=7, now=11.0)
    assert watch.stuck_for(1, busy=True, now=11.0) == 1.0
    assert watch.stuck_for(0, busy=True, now=11.0) is None  # never beat: nothing to judge


def test_a_loop_that_turns_between_beats_is_never_stuck_however_short_the_timeout():
    watch = ProgressWatch(dp_size=1, timeout_s=0.1)
    for beat in range(5):  # beats a second apart, ten times the timeout
        assert watch.on_beat(0, step=beat * 10, now=float(beat))
        assert watch.stuck_for(0, busy=True, now=float(beat)) is None


def test_an_idle_worker_or_a_zero_timeout_is_never_stuck():
    watch = ProgressWatch(dp_size=1, timeout_s=0.5)
    watch.on_beat(0, step=3, now=0.0)
    watch.on_beat(0, step=3, now=100.0)
    assert watch.stuck_for(0, busy=False, now=100.0) is None
    off = ProgressWatch(dp_size=1, timeout_s=0)
    off.on_beat(0, step=3, now=0.0)
    off.on_beat(0, step=3, now=100.0)
    assert off.stuck_for(0, busy=True, now=100.0) is None


def test_time_the_front_end_itself_stood_still_is_excused():
    watch = ProgressWatch(dp_size=1, timeout_s=5)
    watch.on_beat(0, step=3, now=0.0)
    watch.excuse(now=60.0)  # its beats waited unread
    watch.on_beat(0, step=3, now=61.0)
    assert watch.stuck_for(0, busy=True, now=61.0) is None
    assert watch.stuck_for(0, busy=True, now=66.0) == 6.0


def test_the_watchdog_flag_is_sglangs_and_refuses_a_negative_timeout():
    def parse(*flags: str):
        ns = build_parser().parse_args(["serve", "--model-path", "tiny-random", *flags])
        return pd_server_config_from_args(ns).server

    assert parse().watchdog_timeout_s == 300.0
    assert parse("--watchdog-timeout", "0").watchdog_timeout_s == 0.0
    with pytest.raises(ValueError, match="--watchdog-timeout must be >= 0"):
        parse("--watchdog-timeout", "-1")
