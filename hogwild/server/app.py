"""The FastAPI app: OpenAI's endpoints over one engine, every request a run of the shared scheduler.

A request is read (at most `max_body_bytes`), checked (API key, fields, model, context, KV budget: each mistake an
OpenAI error body with a 4xx status), then submitted to the `EngineLoop`, whose thread batches the rows of every
running request into each forward pass. The handler only relays the run's events: as server-sent events when
`stream` is true, as one JSON body otherwise. A client that goes away cancels its run, which frees its blocks at
once; when more than `max_queue` requests wait to start, new ones get 429 with `Retry-After`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hogwild.collab.layouts import LAYOUTS
from hogwild.collab.protocol import MODES, CollabConfig
from hogwild.engine import Engine
from hogwild.errors import HogwildError
from hogwild.loop import EngineLoop, Ticket
from hogwild.server.config import ServerConfig
from hogwild.server.metrics import Metrics
from hogwild.server.protocol import OPENAI_TEMPERATURE, ApiError, Reply, build_job, model_name, parse

STATIC = Path(__file__).parent / "static"
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "/")
RETRY_AFTER_S = 1
log = logging.getLogger("hogwild.server")


class Server:
    """One engine served over HTTP: its loop thread, the open requests, the metrics."""

    def __init__(self, engine: Engine, config: ServerConfig) -> None:
        self.engine = engine
        self.config = config
        self.model = config.model_name or model_name(engine)
        self.started = int(time.time())
        self.loop: EngineLoop | None = None
        self.open: set[Ticket] = set()
        self.metrics = Metrics(engine, self.queued)

    def queued(self) -> int:
        """Requests submitted and not started yet (waiting for a run slot or KV room)."""
        return sum(1 for ticket in list(self.open) if ticket.run.ledger is None and not ticket.run.done)

    @asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        self.loop = EngineLoop(self.engine)
        try:
            yield
        finally:
            self.loop.close()

    # checks

    def authorize(self, request: Request) -> None:
        if self.config.api_key is None:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), self.config.api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send `Authorization: Bearer <key>`", code="invalid_api_key")

    async def read_json(self, request: Request) -> object:
        """The request body as JSON; 413 past `max_body_bytes` (the body is drained up to 16x that, so the client
        reads the answer instead of a reset connection), 400 when it is not JSON."""
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length", "")
        too_large = declared.isdigit() and int(declared) > limit
        chunks, size = [], 0
        if not (declared.isdigit() and int(declared) > 16 * limit):
            async for chunk in request.stream():
                size += len(chunk)
                too_large = too_large or size > limit
                if too_large and size > 16 * limit:
                    break
                if not too_large:
                    chunks.append(chunk)
        if too_large:
            raise ApiError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
        try:
            return json.loads(b"".join(chunks))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON ({e})", code="invalid_json") from None

    # the two generation endpoints

    async def generate(self, request: Request, kind: str) -> Response:
        self.authorize(request)
        job = build_job(self.engine, kind, parse(kind, await self.read_json(request)), self.model, self.config.max_n)
        if self.queued() >= self.config.max_queue:
            raise ApiError(
                429,
                f"the server is busy: {self.queued()} requests are waiting to start; retry in a moment",
                type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        assert self.loop is not None, "the app was not started"
        try:
            ticket = self.loop.submit(job.run, aio=asyncio.get_running_loop())
        except HogwildError as e:  # build_job checked the KV budget: what is left is an engine loop that stopped
            raise ApiError(503, str(e), type="server_error") from None
        self.open.add(ticket)
        reply = Reply(job)
        if job.stream:
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            # the background close covers a client gone before the stream began (the generator never ran)
            return StreamingResponse(
                self.stream(reply, ticket),
                media_type="text/event-stream",
                headers=headers,
                background=BackgroundTask(self.close, reply, ticket),
            )
        try:
            answered = await self.collect(reply, ticket, request)
        finally:
            self.close(reply, ticket)
        # 499: the client closed the request (nginx's code), counted in the metrics; nobody reads the body
        return JSONResponse(reply.response()) if answered else Response(status_code=499)

    async def stream(self, reply: Reply, ticket: Ticket) -> AsyncIterator[str]:
        """Server-sent events; when the client goes away Starlette cancels this generator, which cancels the run."""
        try:
            for chunk in reply.start():
                yield sse(chunk)
            async for event in ticket:
                for chunk in reply.push(event):
                    yield sse(chunk)
            yield "data: [DONE]\n\n"
        except Exception as e:  # the engine failed mid-stream: the status line is sent, so say it in the stream
            log.exception("run %s failed", ticket.run)
            yield sse(ApiError(500, f"the engine failed: {e}", type="server_error").body())
        finally:
            self.close(reply, ticket)

    async def collect(self, reply: Reply, ticket: Ticket, request: Request) -> bool:
        """Read the run's events to the end -> True; if the client disconnects first, cancel the run -> False."""

        async def consume() -> None:
            async for event in ticket:
                reply.push(event)

        events = asyncio.ensure_future(consume())
        gone = asyncio.ensure_future(disconnected(request.receive))
        try:
            await asyncio.wait({events, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            answered = events.done()
            if not answered:
                ticket.cancel()
                events.cancel()
        if answered:
            events.result()  # re-raises an engine failure
        return answered

    def close(self, reply: Reply, ticket: Ticket) -> None:
        """The request is over (answered, failed or abandoned): cancel its run if still going, count its tokens."""
        if ticket in self.open:
            self.open.discard(ticket)
            if not ticket.done:
                ticket.cancel()
            self.metrics.prompt_tokens.inc(reply.prompt_tokens)
            self.metrics.completion_tokens.inc(reply.completion_tokens)

    # the rest

    def models(self, request: Request) -> dict:
        self.authorize(request)
        collab = dataclasses.asdict(CollabConfig())
        extension = {
            "context_window": self.engine.context_window,
            "max_workers": collab["max_workers"],
            "layouts": list(LAYOUTS),
            "modes": list(MODES),
            "defaults": {
                **{k: collab[k] for k in ("workers", "layout", "mode", "budget")},
                "temperature": OPENAI_TEMPERATURE,
            },
        }
        card = {"id": self.model, "object": "model", "created": self.started, "owned_by": "hogwild"}
        return {"object": "list", "data": [{**card, "hogwild": extension}]}

    def health(self) -> Response:
        if self.loop is None or not self.loop.alive:
            error = repr(self.loop.error) if self.loop and self.loop.error else "the engine loop has stopped"
            return JSONResponse({"status": "error", "error": error}, 503)
        return JSONResponse({"status": "ok", "model": self.model, "running": len(self.engine.scheduler.running)})


def sse(chunk: dict) -> str:
    return f"data: {json.dumps(chunk, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def disconnected(receive: Receive) -> None:
    """Returns when the client has gone (the body is read by then, so only `http.disconnect` can come)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class CountRequests:
    """ASGI middleware: counts every response by endpoint and status (streams included, at their status line)."""

    def __init__(self, app: ASGIApp, server: Server) -> None:
        self.app = app
        self.server = server

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"

        async def counting(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.server.metrics.requests.labels(endpoint, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting)


def create_app(engine: Engine, config: ServerConfig | None = None) -> FastAPI:
    """The app serving `engine`; the engine's loop thread starts with the app and stops with it."""
    server = Server(engine, config or ServerConfig())
    app = FastAPI(title="hogwild", lifespan=server.lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    app.add_middleware(CountRequests, server=server)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        message = f"no such endpoint: {request.method} {request.url.path}" if error.status_code == 404 else error.detail
        return JSONResponse(ApiError(error.status_code, str(message)).body(), status_code=error.status_code)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await server.generate(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await server.generate(request, "completion")

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        return server.models(request)

    @app.get("/health")
    async def health() -> Response:
        return server.health()

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(server.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/")
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
