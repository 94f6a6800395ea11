"""`--help` of every subcommand: each default shown once, readable section titles."""

from __future__ import annotations

import argparse
import dataclasses
import re
import subprocess
import sys
from dataclasses import dataclass

import pytest

from pdserve.cli import build_parser
from pdserve.config import add_arguments, group_title, opt


def subcommand_parsers() -> dict[str, argparse.ArgumentParser]:
    """Every parser under `pdserve`, nested ones included, by its command line."""
    found: dict[str, argparse.ArgumentParser] = {}
    pending = [("pdserve", build_parser())]
    while pending:
        name, parser = pending.pop()
        found[name] = parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                pending += [(f"{name} {sub}", p) for sub, p in action.choices.items()]
    return found


PARSERS = subcommand_parsers()


def test_every_subcommand_is_checked():
    assert {"pdserve serve", "pdserve router", "pdserve up", "pdserve bench"} <= set(PARSERS)
    assert "pdserve bench compare" in PARSERS


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_help_shows_each_default_once_under_readable_titles(name: str):
    parser = PARSERS[name]
    text = " ".join(parser.format_help().split())  # wrapped lines joined
    assert not re.search(r"\(default: [^)]*\)\)? \(default:", text), text
    assert "(default: None)" not in text and "(default: [])" not in text
    assert "(default: )" not in text  # an empty string, as `up --server-args` showed
    for group in parser._action_groups:
        assert group.title and not re.search(r"[a-z][A-Z]", group.title), group.title


def test_top_level_help_describes_pdserve_not_its_code():
    text = " ".join(PARSERS["pdserve"].format_help().split())
    assert "prefill-decode disaggregation" in text and "owns its parser" not in text


def test_sampling_defaults_help_names_its_default():
    # its help says "defaults", which stopped the generated "(default: model)"
    text = " ".join(PARSERS["pdserve serve"].format_help().split())
    assert "openai = always the OpenAI defaults (default: model)" in text


def test_up_help_names_its_default_router_port_once():
    text = " ".join(PARSERS["pdserve up"].format_help().split())
    assert text.count("(default: 30000") == 1


@dataclass(frozen=True)
class DemoConfig:
    count: int = opt(3, "how many")
    port: int | None = opt(None, "a port (default: a free port)")
    name: str | None = opt(None, "a name")


def test_generated_options_append_a_default_only_where_the_help_lacks_one():
    parser = argparse.ArgumentParser()
    add_arguments(parser, DemoConfig)
    helps = {a.dest: a.help for a in parser._actions}
    assert helps == {
        "help": "show this help message and exit",
        "count": "how many (default: 3)",
        "port": "a port (default: a free port)",
        "name": "a name",
    }
    assert [g.title for g in parser._action_groups][-1] == "demo options"


@pytest.mark.parametrize(
    ("cls_name", "title"),
    [("RouterConfig", "router options"), ("ServerArgs", "server options"),
     ("KVTransferBenchConfig", "kv transfer bench options"), ("Cluster", "cluster options")],
)  # fmt: skip
def test_group_titles_are_words(cls_name: str, title: str):
    assert group_title(type(cls_name, (), {})) == title


def test_serve_takes_sglangs_disaggregation_spellings_as_aliases():
    from pdserve.disagg.config import pd_server_config_from_args

    ours = ["--mode", "prefill", "--bootstrap-port", "9123", "--transfer-backend", "nixl"]
    ours += ["--dp-size", "3", "--load-balance-method", "total_requests"]
    sglangs = [
        "--data-parallel-size", "3", "--load-balance-method", "total_requests",
        "--disaggregation-mode", "prefill",
        "--disaggregation-bootstrap-port", "9123",
        "--disaggregation-transfer-backend", "nixl",
    ]  # fmt: skip
    configs = [
        pd_server_config_from_args(build_parser().parse_args(["serve", *argv]))
        for argv in (ours, sglangs)
    ]
    assert configs[0] == dataclasses.replace(configs[1], epoch=configs[0].epoch)  # per start
    assert configs[1].server.mode == "prefill" and configs[1].disagg.bootstrap_port == 9123
    assert configs[1].disagg.transfer_backend == "nixl" and configs[1].server.dp_size == 3
    assert configs[1].server.resolved_lb_method == "shortest_queue"


@pytest.mark.parametrize(
    "module", ["auth_bench", "bench_router", "kv_transfer_bench", "pd_rank_bench", "penalty_bench"]
)
def test_bench_script_help_describes_it_in_whole_sentences(module: str):
    """The description is the docstring's first paragraph: its first line alone cut
    penalty_bench's and bench_router's mid-sentence ("... their ids kept on the")."""
    out = subprocess.run(
        [sys.executable, "-m", f"pdserve.bench.{module}", "--help"],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    description = " ".join(out.split("\n\n")[1].split())
    assert description.endswith((".", ".)")), description
