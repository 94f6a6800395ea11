"""Router routes answered by asking the workers themselves, as sglang-router does (router
process): `GET /get_load` gathers every worker's load, `GET /health_generate` runs a
worker's own generation check on one prefill + decode pair (or one plain worker),
`POST /flush_cache` asks every worker to drop its cached pages."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec

from pdserve.router.http_client import HttpClient, HttpError
from pdserve.router.http_server import Response, json_response
from pdserve.router.workers import Worker
from pdserve.serving.hooks import error_object


async def _get(client: HttpClient, worker: Worker, path: str, timeout_s: float) -> Any:
    """A worker's JSON answer to GET `path`; raises RuntimeError saying what went wrong."""
    try:
        status, body = await client.get(worker.url, path, timeout_s)
    except HttpError as exc:
        raise RuntimeError(f"{worker.role} server did not answer {path}: {exc}") from exc
    if status != 200:
        raise RuntimeError(f"{worker.role} server answered {path} with HTTP {status}")
    try:
        return msgspec.json.decode(body) if body else None
    except msgspec.DecodeError:
        return body.decode(errors="replace")


async def get_load(client: HttpClient, workers: list[Worker], timeout_s: float) -> Response:
    """Each worker's own `/get_load` answer (one entry per DP rank), asked at once; a worker
    that does not answer has `load: null` and an `error`."""

    async def one(worker: Worker) -> dict[str, Any]:
        entry: dict[str, Any] = {"url": worker.url, "role": worker.role}
        try:
            entry["load"] = await _get(client, worker, "/get_load", timeout_s)
        except RuntimeError as exc:
            entry |= {"load": None, "error": str(exc)}
        return entry

    return json_response({"workers": list(await asyncio.gather(*map(one, workers)))})


async def health_generate(client: HttpClient, workers: list[Worker], timeout_s: float) -> Response:
    """200 when every one of `workers` (a prefill + decode pair, or one plain worker) passes
    its own `/health_generate`, asked at once; else 503 saying which failed."""
    results = await asyncio.gather(
        *(_get(client, w, "/health_generate", timeout_s) for w in workers), return_exceptions=True
    )
    errors = [str(r) for r in results if isinstance(r, BaseException)]
    checked = [{"url": w.url, "role": w.role} for w in workers]
    if errors:
        message = "health_generate failed: " + "; ".join(errors)
        return json_response({"error": error_object(503, message), "workers": checked}, 503)
    return json_response({"status": "ok", "workers": checked})


async def flush_cache(client: HttpClient, workers: list[Worker], timeout_s: float) -> Response:
    """Every worker's own `POST /flush_cache`, asked at once, each within `timeout_s`: 200
    when all did it, else 502 naming each worker that did not and why."""

    async def one(worker: Worker) -> str | None:
        try:
            status, _ = await client.post(worker.url, "/flush_cache", b"", timeout_s)
        except HttpError as exc:
            return f"{worker.role} server {worker.url} did not answer /flush_cache: {exc}"
        if status != 200:
            return f"{worker.role} server {worker.url} answered /flush_cache with HTTP {status}"
        return None

    errors = await asyncio.gather(*map(one, workers))
    entries = [
        {"url": w.url, "role": w.role, "ok": error is None} | ({"error": error} if error else {})
        for w, error in zip(workers, errors, strict=True)
    ]
    failed = [error for error in errors if error is not None]
    if failed:
        message = f"flush_cache failed on {len(failed)} of {len(workers)} workers: " + "; ".join(
            failed
        )
        return json_response({"error": error_object(502, message), "workers": entries}, 502)
    return json_response({"status": "ok", "workers": entries})
