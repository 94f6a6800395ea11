"""Health, info, load, cache, abort and metrics routes of a server. Runs in the front end."""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any

from aiohttp import web

import pdserve
from pdserve.engine.request import SamplingParams
from pdserve.serving.generation import run_to_end
from pdserve.serving.hooks import SHUTTING_DOWN, RequestError, error_object
from pdserve.serving.metrics import CONTENT_TYPE
from pdserve.serving.openai_format import model_not_found
from pdserve.serving.request_parse import GenItem, new_rid
from pdserve.serving.server_state import ServerState, read_json, state_of

DUMP_TIMEOUT_S = 10.0


async def health(request: web.Request) -> web.Response:
    state = state_of(request)
    down = {**state.controller.dead, **state.controller.unresponsive}
    problem = "; ".join(down.values()) or state.hooks.not_ready_reason()
    if state.draining:
        problem = SHUTTING_DOWN
    if problem:
        return web.json_response({"error": error_object(503, problem)}, status=503)
    return web.Response(text="")


async def health_generate(request: web.Request) -> web.Response:
    """A one-token generation on worker 0 (colocated); PD servers check their workers only,
    since a lone prefill or decode leg cannot generate without its peer."""
    state = state_of(request)
    if state.controller.dead or state.controller.unresponsive:
        return await health(request)
    if state.cfg.server.mode != "colocated":
        return web.Response(text="")
    timeout_s = state.cfg.server.health_generate_timeout_s
    bos = state.tokenizer.bos_token_id
    item = GenItem(
        rid=f"health-{new_rid()}",
        input_ids=[bos if bos is not None else 0],
        sampling=SamplingParams(max_new_tokens=1, temperature=0.0),
    )
    try:
        await asyncio.wait_for(run_to_end(state.generator, item), timeout_s)
    except asyncio.TimeoutError:
        raise RequestError(503, f"health generation took longer than {timeout_s:g} s") from None
    return web.Response(text="")


def server_info_dict(request: web.Request) -> dict[str, Any]:
    state = state_of(request)
    cfg = state.cfg
    ready = list(state.controller.ready.values())
    info: dict[str, Any] = {
        "model_path": cfg.engine.model_path,
        "tokenizer_path": state.model_dir,
        "served_model_name": cfg.served_model_name,
        "tp_size": 1,
        "dp_size": cfg.server.dp_size,
        "disaggregation_mode": "null" if cfg.server.mode == "colocated" else cfg.server.mode,
        "version": pdserve.__version__,
        "page_size": state.controller.page_size,
        "load_balance_method": cfg.server.resolved_lb_method,
        "context_length": state.controller.max_context_len,
        # one worker's KV pool, as SGLang reports one scheduler's (and max_running_requests)
        "max_total_num_tokens": max((r.num_total_pages for r in ready), default=0)
        * state.controller.page_size,
        "max_running_requests": cfg.engine.max_running_requests,
        "chunked_prefill_size": cfg.engine.chunked_prefill_size,
        "host": cfg.server.host,
        "port": cfg.server.port,
        "device": cfg.engine.device,
        "dtype": cfg.engine.dtype,
        "worker_pids": list(state.controller.workers.pids),
    }
    if state.controller.kv_events is not None:
        info.update(state.controller.kv_events.info())
    info.update(state.hooks.server_info())
    return info


async def server_info(request: web.Request) -> web.Response:
    return web.json_response(server_info_dict(request))


async def model_info(request: web.Request) -> web.Response:
    state = state_of(request)
    hf_config: dict[str, Any] = {}
    config_path = os.path.join(state.model_dir, "config.json")
    if os.path.exists(config_path):
        with open(config_path) as f:
            hf_config = json.load(f)
    return web.json_response(
        {
            "model_path": state.cfg.engine.model_path,
            "tokenizer_path": state.model_dir,
            "is_generation": True,
            "model_type": hf_config.get("model_type"),
            "architectures": hf_config.get("architectures"),
            "served_model_name": state.cfg.served_model_name,
        }
    )


def _model_card(state: ServerState, name: str, created: int) -> dict[str, Any]:
    return {
        "id": name,
        "object": "model",
        "created": created,
        "owned_by": "pdserve",
        "root": state.cfg.engine.model_path,
        "max_model_len": state.controller.max_context_len,
    }


async def models(request: web.Request) -> web.Response:
    """Every name the OpenAI routes accept, the served name first."""
    state = state_of(request)
    created = int(time.time())
    cards = [_model_card(state, name, created) for name in state.cfg.model_names]
    return web.json_response({"object": "list", "data": cards})


async def retrieve_model(request: web.Request) -> web.Response:
    """OpenAI's retrieve model: the card /v1/models lists for that name, else vLLM's 404."""
    state = state_of(request)
    name = request.match_info["model"]  # percent-decoded: a name may hold a slash
    if name not in state.cfg.model_names:
        raise model_not_found(name)
    return web.json_response(_model_card(state, name, int(time.time())))


async def get_load(request: web.Request) -> web.Response:
    controller = state_of(request).controller
    loads = []
    inflight_reqs, _ = controller.inflight_counts()
    for rank, front in enumerate(controller.rank_loads()):
        worker = controller.loads[rank]
        running = worker.num_running if worker else 0
        waiting = worker.num_waiting if worker else 0
        cached_pages = worker.num_cached_pages if worker else 0
        loads.append(
            {
                "dp_rank": rank,
                "num_reqs": running + waiting,
                "num_running_reqs": running,
                "num_waiting_reqs": waiting,
                "num_tokens": worker.num_tokens if worker else 0,
                "num_used_pages": worker.num_used_pages if worker else 0,
                "num_free_pages": worker.num_free_pages
                if worker
                else controller.ready[rank].num_total_pages,
                "num_total_pages": controller.ready[rank].num_total_pages,
                "num_disagg_rooms": worker.num_disagg_rooms if worker else 0,
                "num_kv_peers": worker.num_kv_peers if worker else 0,
                "num_cached_pages": cached_pages,
                "num_cached_tokens": cached_pages * controller.page_size,
                "num_evictable_pages": worker.num_evictable_pages if worker else 0,
                "num_inflight_reqs": inflight_reqs[rank],
                "alive": front.alive,
            }
        )
    return web.json_response(loads)


async def flush_cache(request: web.Request) -> web.Response:
    unconfirmed = await state_of(request).controller.flush_cache(DUMP_TIMEOUT_S)
    if unconfirmed:
        ranks = ", ".join(map(str, unconfirmed))
        raise RequestError(504, f"worker(s) {ranks} did not confirm the flush in time")
    return web.Response(text="Cache flushed.\n")


async def debug_kv_cache(request: web.Request) -> web.Response:
    """A worker's real prefix cache: its page hashes, and the event batch it matches
    (every batch up to `seq` was published before the dump was taken)."""
    controller = state_of(request).controller
    try:
        dp_rank = int(request.query.get("dp_rank", "0"))
    except ValueError:
        raise RequestError(400, "dp_rank must be an integer") from None
    if not 0 <= dp_rank < controller.dp_size:
        raise RequestError(400, f"dp_rank must be in [0, {controller.dp_size})")
    try:
        page_hashes, seq = await controller.dump_cache(dp_rank, DUMP_TIMEOUT_S)
    except asyncio.TimeoutError:
        raise RequestError(504, f"worker {dp_rank} did not dump its cache in time") from None
    return web.json_response({"dp_rank": dp_rank, "seq": seq, "page_hashes": sorted(page_hashes)})


async def abort_request(request: web.Request) -> web.Response:
    body = await read_json(request)
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    controller = state_of(request).controller
    if body.get("abort_all") is True:
        return web.json_response({"num_aborted": controller.abort_all("aborted by /abort_request")})
    rid = body.get("rid")
    if not isinstance(rid, str):
        raise RequestError(400, 'give {"rid": "<request id>"} or {"abort_all": true}')
    room = body.get("bootstrap_room")  # the router's: only the leg of that room
    if room is not None and (not isinstance(room, int) or isinstance(room, bool)):
        raise RequestError(
            400, f"bootstrap_room must be an integer, got {room!r}", param="bootstrap_room"
        )
    found = controller.abort(rid, "aborted by /abort_request", room)
    return web.json_response({"num_aborted": int(found)})


async def metrics(request: web.Request) -> web.Response:
    body = state_of(request).controller.metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/health", health)
    app.router.add_get("/health_generate", health_generate)
    for path in ("/server_info", "/get_server_info"):
        app.router.add_get(path, server_info)
    for path in ("/model_info", "/get_model_info"):
        app.router.add_get(path, model_info)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/models/{model:.+}", retrieve_model)
    app.router.add_get("/debug/kv_cache", debug_kv_cache)
    app.router.add_get("/get_load", get_load)
    app.router.add_route("*", "/flush_cache", flush_cache)
    app.router.add_post("/abort_request", abort_request)
    app.router.add_get("/metrics", metrics)
