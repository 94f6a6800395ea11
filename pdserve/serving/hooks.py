"""Where disaggregation plugs into a server: one hook object in the front end, one in each
worker. Colocated mode uses these no-op defaults; the prefill and decode implementations
come from a layer above serving, chosen where the server is composed (`pdserve serve`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import zmq

    from pdserve.engine.engine import Engine
    from pdserve.serving.config import ServerConfig
    from pdserve.serving.pd_fields import PDFields, RoomAddress
    from pdserve.serving.protocol import GenerateReq, ReqOutput, RoomFailed, RoomForwarded


# The `origin` of a decode server's error that its prefill peer caused: the room's failure
# reported by prefill, a lost or unreachable prefill worker or bootstrap server, a restarted
# (new epoch) prefill server. The router gives no verdict on decode for those.
PREFILL_ORIGIN = "prefill"
# The `origin` of a prefill server's error that its decode peer caused: no page list from
# decode before the bootstrap deadline (decode did not take the KV: a stuck decode worker),
# a lost or restarted decode. The router avoids that decode server, not prefill, on a retry.
DECODE_ORIGIN = "decode"
# The message of a draining server's 503s (SIGTERM: new generation requests, and those still
# in flight at --shutdown-timeout-s). The router reads it as no verdict on that server's
# health: a rolling restart is not a fault, and counted as one it opened the server's
# circuit breaker, which kept it out of rotation once restarted.
SHUTTING_DOWN = "the server is shutting down"

# Generation request bodies, on the servers and (as the servers read them) in the router: the
# most bytes one may hold, and the size from which it is parsed and tokenized off the event
# loop (megabytes of text take seconds to encode; a smaller body is spared the thread hop).
MAX_BODY_BYTES = 64 * 1024**2
LARGE_BODY_BYTES = 64 * 1024


class RequestError(Exception):
    """A request that must fail with an HTTP status and a clear message. `kind` names the
    error's type in the answer (default: by status); `param`, the request field at fault;
    `origin`, the peer whose fault it is (PREFILL_ORIGIN, DECODE_ORIGIN), None for this
    server's own."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str | None = None,
        param: str | None = None,
        origin: str | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.param = param
        self.origin = origin

    def to_json(self) -> dict[str, Any]:
        return error_object(self.status, self.message, self.kind, self.param, self.origin)


def error_object(
    status: int,
    message: str,
    kind: str | None = None,
    param: str | None = None,
    origin: str | None = None,
) -> dict[str, Any]:
    """The `error` object of every error answer, OpenAI's shape (vLLM's too): `type` by
    status unless given, `param` the request field at fault or null, `code` the status;
    plus `origin` when the fault is a peer's (only then)."""
    kind = kind or ("invalid_request_error" if status < 500 else "server_error")
    error = {"message": message, "type": kind, "param": param, "code": status}
    if origin is not None:
        error["origin"] = origin
    return error


class RequestCancelled(RequestError):
    """The client went away before the request ended: nobody reads the answer."""

    def __init__(self) -> None:
        super().__init__(499, "cancelled")


class FrontendHooks:
    """Runs in the HTTP front-end process (asyncio)."""

    async def start(self) -> None:
        """Called once the workers are ready (e.g. start the bootstrap server)."""

    async def stop(self) -> None:
        pass

    def server_info(self) -> dict[str, Any]:
        """Extra fields for /server_info."""
        return {}

    def not_ready_reason(self) -> str | None:
        """Why the server cannot serve yet though its workers run (GET /health answers 503
        with it), or None."""
        return None

    async def prepare(self, req: GenerateReq, dp_rank: int, pd: PDFields) -> GenerateReq:
        """Called after the DP controller chose `dp_rank`, before the request is sent to that
        worker. May return an updated request or raise RequestError. `pd` holds the item's
        PD fields, already validated for this server's mode."""
        return req

    def on_output(self, req: GenerateReq, out: ReqOutput) -> None:
        """Called for every output message of the request (metrics of the PD layer)."""

    def on_finished(self, req: GenerateReq, error: RequestError | None) -> None:
        """Called when the request's worker answered its last message; `error` (with the
        status its client got) when it failed, `RequestCancelled` when the client left."""

    def on_rejected(
        self, rooms: list[RoomAddress], status: int, message: str, origin: str | None = None
    ) -> None:
        """Called when the front end answers an error for a request naming `rooms` before
        any of them reached a worker (rooms in flight here are left out): the other leg of
        each room must learn it. `origin`: the error's (its peer's fault), if any."""

    def exposure_warnings(self) -> list[str]:
        """What this mode leaves open on a routable address (logged loudly at start)."""
        return []


class WorkerHooks:
    """Runs in a worker process, inside its single-threaded loop."""

    def __init__(self, engine: Engine):
        self.engine = engine

    @property
    def kv_endpoint(self) -> str | None:
        return None

    def sockets(self) -> list[zmq.Socket]:
        """Extra sockets the worker loop polls."""
        return []

    def busy(self) -> bool:
        """True while there is transfer work that needs the loop to spin without sleeping."""
        return False

    def num_rooms(self) -> int:
        """PD rooms in flight in this worker (for /get_load and leak checks)."""
        return 0

    def num_kv_peers(self) -> int:
        """KV peers this worker keeps a connection to (PD decode: prefill workers it dials),
        for /get_load and leak checks."""
        return 0

    def num_parked(self) -> int:
        """Requests held back from the engine for now (prefill: until decode's page list);
        load reports count them as waiting."""
        return 0

    def num_parked_tokens(self) -> int:
        """The prompt tokens of those requests: load reports count them as the engine counts
        a waiting request's (a router balancing on tokens must see them)."""
        return 0

    def num_auth_refusals(self) -> int:
        """Peers refused for a wrong credential since start (PD: KV handshakes)."""
        return 0

    def lost_kv_peers(self) -> list[str]:
        """KV endpoints of peers whose connection dropped since the last call (PD decode:
        prefill workers that died or restarted), for the front end to forget."""
        return []

    def unclaimed_rooms(self) -> list[int]:
        """Rooms whose page list came here a while ago without their request, reported
        since the last call (PD prefill), for the front end to match with its dispatches."""
        return []

    def on_generate(self, req: GenerateReq) -> list[ReqOutput]:
        """A new request from the front end. Colocated: straight into the engine."""
        from pdserve.serving.worker_io import request_from_msg

        self.engine.add_request(request_from_msg(req))
        return []

    def on_abort(self, rid: str, reason: str) -> list[ReqOutput]:
        return []

    def on_room_failed(self, msg: RoomFailed) -> list[ReqOutput]:
        return []

    def on_room_forwarded(self, msg: RoomForwarded) -> list[ReqOutput]:
        return []

    def poll(self, now: float) -> list[ReqOutput]:
        """Handle transfer traffic and deadlines; return outputs for the front end."""
        return []

    def after_step(
        self, now: float, outputs: list[ReqOutput], held_pages: dict[str, list[int]]
    ) -> list[ReqOutput]:
        """After each engine step, with that step's outputs already converted to ReqOutput;
        returns what to send to the front end (colocated: the outputs unchanged). `held_pages`
        maps each request the engine now holds for sending (prefill role) to its page ids:
        the prefill role owns them from here until `engine.release`, and starts their send."""
        return outputs

    def close(self) -> None:
        pass


# Builds a worker's hooks inside the worker process. It crosses the process boundary by
# pickle, so it must be a module-level function (pickled by its name).
WorkerHooksFactory = Callable[["ServerConfig", "Engine", int], WorkerHooks]


def colocated_worker_hooks(cfg: ServerConfig, engine: Engine, dp_rank: int) -> WorkerHooks:
    return WorkerHooks(engine)
