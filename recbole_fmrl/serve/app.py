"""The HTTP API (FastAPI): recommend, sessions, health, info, metrics, hot swap.

    POST   /recommend                {"history": [...]} or {"histories": [[...], ...]}, k, size, funnel,
                                      exclude_seen, skip_unknown, context  -> {"results": [...], "size": m}
    POST   /sessions/{id}/events     {"events": [...], k, size, exclude_seen, skip_unknown, context}
    DELETE /sessions/{id}
    GET    /healthz  /readyz  /info  /metrics (Prometheus text)
    POST   /admin/reload             {"artifact": folder} (optional): loopback clients only, unless allowed

A bad request is answered 4xx with ``{"error": message, "field": name}``; the server keeps serving.
"""
import asyncio
import logging
import signal
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import List, Literal, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from recbole_fmrl.errors import InputError
from recbole_fmrl.serve.batcher import Batcher
from recbole_fmrl.serve.engine import Engine, Query, RequestError
from recbole_fmrl.serve.metrics import Metrics

log = logging.getLogger("recbole_fmrl.serve")
ItemId = Union[StrictStr, StrictInt]
LOOPBACK = {"127.0.0.1", "::1", "localhost"}
UNION_MEMBERS = {"str", "int"}  # of ItemId


@dataclass
class ServeOptions:
    max_batch: int = 64
    max_wait_ms: float = 2.0
    max_body_bytes: int = 1 << 20
    max_histories: int = 1024
    remote_admin: bool = False  # allow /admin/reload from other hosts
    signals: bool = False  # SIGHUP reloads (only where the app runs in the main thread: the CLI)


class Ranking(BaseModel):
    model_config = ConfigDict(extra="forbid")
    k: StrictInt = Field(10, ge=1)
    size: Optional[StrictInt] = None
    exclude_seen: StrictBool = False
    skip_unknown: StrictBool = False


class RecommendBody(Ranking):
    history: Optional[List[ItemId]] = None
    histories: Optional[List[List[ItemId]]] = None
    funnel: Optional[StrictStr] = None
    context: Literal["window", "full"] = "window"


class EventsBody(Ranking):
    events: List[ItemId] = Field(min_length=1)
    context: Optional[Literal["window", "full"]] = None


class ReloadBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    artifact: Optional[StrictStr] = None


def error(status, field, message):
    return JSONResponse({"error": message, "field": field}, status_code=status)


def validation_error(_, exc: RequestValidationError):
    first = exc.errors()[0]
    # the location without "body" and the union member pydantic tried (`history.0.str` -> `history.0`)
    loc = [str(part) for part in first.get("loc", ()) if part != "body" and part not in UNION_MEMBERS]
    if first.get("type") == "json_invalid":
        return error(400, "body", f"malformed JSON: {first.get('msg')}")
    name = ".".join(loc) or "body"
    return error(422, name, f"{name}: {first.get('msg')}")


def create_app(engine: Engine, options: ServeOptions = None) -> FastAPI:
    options = options or ServeOptions()
    metrics = Metrics()
    batcher = Batcher(engine.run_batch, options.max_batch, options.max_wait_ms, metrics.batch_size)
    state = {"ready": False}

    @asynccontextmanager
    async def lifespan(_):
        batcher.start()
        if options.signals:
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(reload(None)))
        state["ready"] = True
        yield
        state["ready"] = False  # SIGTERM: uvicorn has finished in-flight requests; drain what is queued
        await batcher.stop()

    app = FastAPI(title="recbole_fmrl", lifespan=lifespan, description=__doc__)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(RequestError, lambda _, e: error(e.status, e.field, str(e)))
    app.add_exception_handler(InputError, lambda _, e: error(400, "body", str(e)))
    app.state.engine, app.state.metrics = engine, metrics
    app.add_middleware(BodyLimit, limit=options.max_body_bytes)

    @app.middleware("http")
    async def count(request: Request, call_next):
        start = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        metrics.request(getattr(route, "path", "unmatched"), response.status_code, time.perf_counter() - start)
        return response

    async def reload(folder):
        try:
            info = await asyncio.to_thread(engine.reload, folder)  # not the model thread: batches go on
        except InputError as err:
            metrics.reload(False)
            log.error("reload refused, still serving %s: %s", engine.folder, err)
            raise RequestError("artifact", f"reload refused, still serving {engine.folder}: {err}", status=409) from None
        metrics.reload(True)
        log.info("serving %s (generation %d)", info["artifact"], info["generation"])
        return info

    @app.post("/recommend")
    async def recommend(body: RecommendBody):
        if (body.history is None) == (body.histories is None):
            raise RequestError("history", "give exactly one of 'history' (one list of item ids) or 'histories'")
        histories = [body.history] if body.history is not None else body.histories
        if len(histories) > options.max_histories:
            raise RequestError("histories", f"{len(histories)} histories, more than the server's {options.max_histories}")
        query = Query(tuple(tuple(map(str, h)) for h in histories), body.k, body.size, body.funnel,
                      body.exclude_seen, body.skip_unknown, body.context)
        results = await batcher.submit(query)
        return {"results": results, "size": body.size or engine.rec.size}

    @app.post("/sessions/{sid}/events")
    async def events(sid: str, body: EventsBody):
        return await batcher.call(engine.session_events, sid, [str(e) for e in body.events], body.k, body.size,
                                  body.exclude_seen, body.skip_unknown, body.context)

    @app.delete("/sessions/{sid}")
    async def delete(sid: str):
        await batcher.call(engine.delete_session, sid)
        return {"session": sid, "deleted": True}

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        return {"ready": True} if state["ready"] else JSONResponse({"ready": False}, status_code=503)

    @app.get("/info")
    async def info():
        return engine.info()

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(engine), media_type="text/plain; version=0.0.4")

    @app.post("/admin/reload")
    async def admin_reload(request: Request, body: Optional[ReloadBody] = None):
        host = request.client.host if request.client else ""
        if not options.remote_admin and host not in LOOPBACK:
            raise RequestError("client", f"/admin/reload from {host}: loopback clients only (--remote-admin)", status=403)
        return await reload(body.artifact if body else None)

    return app


class BodyLimit:
    """Refuse request bodies over ``limit`` bytes with 413 (declared or streamed) before the app parses them.

    The body is read here, at most ``limit`` + one chunk, and handed on whole (FastAPI reads it whole anyway).
    """

    def __init__(self, app, limit):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self.too_large(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: let the app see it
                return await self.app(scope, self.replay([message]), send)
            chunks.append(message.get("body", b""))
            size, more = size + len(chunks[-1]), message.get("more_body", False)
            if size > self.limit:
                return await self.too_large(scope, receive, send)
        body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, self.replay([body], receive), send)

    @staticmethod
    def replay(messages, receive=None):
        async def next_message():
            return messages.pop(0) if messages else await receive()
        return next_message

    async def too_large(self, scope, receive, send):
        response = error(413, "body", f"request body over the server's limit of {self.limit} bytes (--max-body-bytes)")
        await response(scope, receive, send)
