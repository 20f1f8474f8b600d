"""The FastAPI app: OpenAI's endpoints over one engine (or over Ray replicas), every request a run of a scheduler.

A request is read (at most `max_body_bytes`), checked (API key here; fields, model, context, KV budget by the
backend: each mistake an OpenAI error body with a 4xx status), then submitted to an `EngineLoop`, whose thread
batches the rows of every running request into each forward pass. The handler only relays the run's chunks: as
server-sent events when `stream` is true, as one JSON body otherwise. A client that goes away cancels its run,
which frees its blocks at once; when more than `max_queue` requests wait to start, new ones get 429 with
`Retry-After`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hogwild.engine import Engine
from hogwild.server.config import ServerConfig
from hogwild.server.metrics import Metrics
from hogwild.server.protocol import ApiError
from hogwild.server.service import EngineService, Opened

if TYPE_CHECKING:
    from hogwild.server.replicas import Replicas

STATIC = Path(__file__).parent / "static"
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "/")
log = logging.getLogger("hogwild.server")


class Server:
    """The HTTP side of a server: keys, bodies, streaming, disconnects and metrics, over a backend that runs the
    requests (`EngineService`: one engine in this process; `Replicas`: engines in Ray actors; the contract is in
    `hogwild/server/service.py`)."""

    def __init__(self, backend: EngineService | Replicas, config: ServerConfig) -> None:
        self.backend = backend
        self.config = config
        self.model = backend.model
        self.started = int(time.time())
        self.metrics = Metrics()

    @asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        await self.backend.start()
        try:
            yield
        finally:
            await self.backend.stop()

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
        opened = await self.backend.open(kind, await self.read_json(request))
        if opened.stream:
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            # the background close covers a client gone before the stream began (the generator never ran)
            return StreamingResponse(
                self.stream(opened),
                media_type="text/event-stream",
                headers=headers,
                background=BackgroundTask(opened.close),
            )
        try:
            answered = await self.collect(opened, request)
        finally:
            opened.close()
        # 499: the client closed the request (nginx's code), counted in the metrics; nobody reads the body
        return JSONResponse(opened.response()) if answered else Response(status_code=499)

    async def stream(self, opened: Opened) -> AsyncIterator[str]:
        """Server-sent events; when the client goes away Starlette cancels this generator, which cancels the run."""
        try:
            async for chunk in opened.chunks():
                yield sse(chunk)
            yield "data: [DONE]\n\n"
        except Exception as e:  # the engine failed mid-stream: the status line is sent, so say it in the stream
            log.exception("a request failed")
            yield sse(ApiError(500, f"the engine failed: {e}", type="server_error").body())
        finally:
            opened.close()

    async def collect(self, opened: Opened, request: Request) -> bool:
        """Read the run's chunks to the end -> True; if the client disconnects first, cancel the run -> False."""

        async def consume() -> None:
            async for _ in opened.chunks():
                pass

        chunks = asyncio.ensure_future(consume())
        gone = asyncio.ensure_future(disconnected(request.receive))
        try:
            await asyncio.wait({chunks, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            answered = chunks.done()
            if not answered:
                opened.close()
                chunks.cancel()
        if answered:
            chunks.result()  # re-raises an engine failure
        return answered

    # the rest

    def models(self, request: Request) -> dict:
        self.authorize(request)
        card = {"id": self.model, "object": "model", "created": self.started, "owned_by": "hogwild"}
        return {"object": "list", "data": [{**card, "hogwild": self.backend.card()}]}

    async def health(self) -> Response:
        status, body = await self.backend.health()
        return JSONResponse(body, status)

    async def render_metrics(self) -> bytes:
        return self.metrics.render(await self.backend.snapshot())


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


def create_app(engine: Engine | Replicas, config: ServerConfig | None = None) -> FastAPI:
    """The app serving `engine` (its loop thread starts with the app and stops with it), or Ray replicas."""
    config = config or ServerConfig()
    server = Server(EngineService(engine, config) if isinstance(engine, Engine) else engine, config)
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
        return await server.health()

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(await server.render_metrics(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/")
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
