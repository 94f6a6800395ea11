"""The PD server's config composition: the role reaches the engine config."""

from __future__ import annotations

import argparse

import pytest

from pdserve.disagg.config import add_pd_server_arguments, pd_server_config_from_args


def parse(argv: list[str]):
    parser = argparse.ArgumentParser()
    add_pd_server_arguments(parser)
    return pd_server_config_from_args(parser.parse_args(argv))


@pytest.mark.parametrize(
    "mode,runs_decode", [("colocated", True), ("prefill", False), ("decode", True)]
)
def test_only_the_prefill_role_tells_the_engine_it_never_decodes(mode, runs_decode):
    cfg = parse(["--mode", mode])
    assert cfg.engine.runs_decode is runs_decode


def test_runs_decode_is_not_a_command_line_flag():
    with pytest.raises(SystemExit):
        parse(["--runs-decode"])
