"""What the server counted during a run: Prometheus counters scraped before and after.

Pure (text in, numbers out): runs in the `pdserve bench` client. Works with any server
exposing the Prometheus text format (pdserve, vLLM, SGLang), whatever its metric names.
"""

from __future__ import annotations

import re

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
