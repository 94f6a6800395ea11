"""What the server counted during a run: Prometheus counters scraped before and after.

Pure (text in, numbers out): runs in the `pdserve bench` client. Works with any server
exposing the Prometheus text format (pdserve, vLLM, SGLang), whatever its metric names;
the KV transfer summary reads pdserve's own counters.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def parse_prometheus(text: str) -> tuple[dict[str, float], dict[str, str]]:
    """(samples keyed `name{labels}`, metric family -> type) from the Prometheus text format.
    Unparsable lines are skipped: a benchmark must not fail on a server's odd metric."""
    samples: dict[str, float] = {}
    types: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            parts = line.split()
            if len(parts) >= 4:
                types[parts[2]] = parts[3]
            continue
        if line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if match is None:
            continue
        try:
            samples[match.group(1) + (match.group(2) or "")] = float(match.group(3))
        except ValueError:
            continue
    return samples, types


def _family(name: str, types: dict[str, str]) -> str | None:
    for suffix in ("", "_total", "_count", "_sum"):
        if suffix and not name.endswith(suffix):
            continue
        base = name[: len(name) - len(suffix)] if suffix else name
        if types.get(base) in ("counter", "histogram", "summary"):
            return base
    return None


def counter_deltas(before_text: str, after_text: str) -> dict[str, float]:
    """How much each counter (and each histogram's `_count` and `_sum`) grew between two
    scrapes. Gauges, buckets and `_created` timestamps are left out."""
    before, _ = parse_prometheus(before_text)
    after, types = parse_prometheus(after_text)
    out = {}
    for key, value in after.items():
        name = key.split("{", 1)[0]
        if name.endswith(("_created", "_bucket")) or _family(name, types) is None:
            continue
        out[key] = value - before.get(key, 0.0)
    return out


KV_BYTES_COUNTER = "pdserve_kv_transfer_bytes_total"
CACHED_TOKENS_COUNTER = "pdserve_cached_tokens_total"
_MODE = re.compile(r'^pdserve_server_info\{.*mode="([^"]*)"')


def server_mode(text: str) -> str | None:
    """A pdserve server's mode (colocated, prefill, decode) from its `server_info` gauge."""
    for line in text.splitlines():
        match = _MODE.match(line)
        if match is not None:
            return match.group(1)
    return None


@dataclass(frozen=True)
class ServerGrowth:
    """What one server counted during a run."""

    mode: str | None
    kv_transfer_bytes: float
    cached_tokens: float


def _family_total(deltas: dict[str, float], name: str) -> float:
    """Growth of every series of `name`, whatever its labels (pdserve's carry `model_name`)."""
    return sum(value for key, value in deltas.items() if key.split("{", 1)[0] == name)


def server_growth(before_text: str, after_text: str) -> ServerGrowth:
    deltas = counter_deltas(before_text, after_text)
    return ServerGrowth(
        server_mode(after_text),
        _family_total(deltas, KV_BYTES_COUNTER),
        _family_total(deltas, CACHED_TOKENS_COUNTER),
    )


def kv_transfer_summary(scrapes: dict[str, tuple[str | None, str | None]]) -> dict[str, Any]:
    """KV bytes and cached tokens each server counted during a run, from (before, after)
    scrapes by URL. A byte that crosses the wire is counted twice, sent by prefill and
    received by decode, so `kv_transfer_bytes` is what decode servers received (what prefill
    servers sent when no decode server was given). A server that did not answer is None."""
    growths = {
        url: server_growth(before, after) if before and after else None
        for url, (before, after) in scrapes.items()
    }
    known = [g for g in growths.values() if g is not None]
    sent = sum(g.kv_transfer_bytes for g in known if g.mode == "prefill")
    received = sum(g.kv_transfer_bytes for g in known if g.mode == "decode")
    any_decode = any(g.mode == "decode" for g in known)
    return {
        "servers": {url: g and dataclasses.asdict(g) for url, g in growths.items()},
        "kv_bytes_sent": sent,
        "kv_bytes_received": received,
        "kv_transfer_bytes": received if any_decode else sent,
        "server_cached_tokens": sum(g.cached_tokens for g in known),
        "complete": len(known) == len(growths),
    }


STAGE_HISTOGRAM = "pdserve_disagg_stage_seconds"
_STAGE_LABEL = re.compile(r'stage="([^"]*)"')


def stage_summary(scrapes: dict[str, tuple[str | None, str | None]]) -> dict[str, Any]:
    """Mean milliseconds and count of each PD stage the servers timed during a run (their
    `disagg_stage_seconds` histograms, summed over servers), from (before, after) scrapes."""
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for before, after in scrapes.values():
        if not (before and after):
            continue
        for key, value in counter_deltas(before, after).items():
            name = key.split("{", 1)[0]
            label = _STAGE_LABEL.search(key)
            if label is None or name not in (STAGE_HISTOGRAM + "_sum", STAGE_HISTOGRAM + "_count"):
                continue
            into = sums if name.endswith("_sum") else counts
            into[label.group(1)] = into.get(label.group(1), 0.0) + value
    return {
        stage: {"count": int(count), "mean_ms": 1000 * sums.get(stage, 0.0) / count}
        for stage, count in counts.items()
        if count > 0
    }
