"""The FastAPI app: OpenAI's endpoints over one engine (or over Ray replicas), every request a run of a scheduler.

Every request first passes `Guard`, which counts its response in the metrics, refuses a `Host` that does not name
this server (DNS rebinding) and a browser `Origin` that is neither the server's own page nor allowed with
`--cors-origin`, and turns an unexpected exception into a 500 JSON body with a request id (the traceback goes to
the log). An API request's body must be `application/json` (a web page cannot send that cross-site without a CORS
preflight, which this server does not grant), arrive within `body_timeout_s` and hold at most `max_body_bytes`;
then the backend checks it (fields, model, context, KV budget: each mistake an OpenAI error body with a 4xx
status) and submits it to an `EngineLoop`, whose thread batches the rows of every running request into each
forward pass. The handler only relays the run's chunks: as server-sent events when `stream` is true, as one JSON
body otherwise. A client that goes away cancels its run, which frees its blocks at once; when a run would wait for
KV room behind `max_queue` others, its request gets 429 with `Retry-After`. If the engine itself fails, /health
says so and `serve` stops the server, which exits non-zero for its supervisor to restart it.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import uvicorn
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.background import BackgroundTask
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

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
        self.failed = False  # the engine failed: the server stops and exits non-zero
        self.stop_serving: Callable[[], None] | None = None  # set by `serve`: asks uvicorn to shut down
        if isinstance(backend, EngineService):
            backend.on_fatal = self.engine_failed

    def engine_failed(self, error: BaseException) -> None:
        """Called from the engine's thread when the engine failed and its loop stopped (logged there)."""
        self.failed = True
        if self.stop_serving is not None:
            self.stop_serving()

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
        """The request body as JSON: 415 unless it is sent as `application/json`, 408 when it has not arrived in
        `body_timeout_s`, 413 past `max_body_bytes` (the body is drained up to 16x that, so the client reads the
        answer instead of a reset connection), 400 when it is not strict JSON (NaN, Infinity, nesting deeper than
        the parser goes)."""
        media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if media != "application/json":
            raise ApiError(
                415,
                f"send the body as Content-Type: application/json, not {media or 'no content type'}",
                code="unsupported_media_type",
            )
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length", "")
        too_large = declared.isdigit() and int(declared) > limit
        chunks, size = [], 0
        try:
            async with asyncio.timeout(self.config.body_timeout_s):
                if not (declared.isdigit() and int(declared) > 16 * limit):
                    async for chunk in request.stream():
                        size += len(chunk)
                        too_large = too_large or size > limit
                        if too_large and size > 16 * limit:
                            break
                        if not too_large:
                            chunks.append(chunk)
        except TimeoutError:
            message = f"the request body did not arrive within {self.config.body_timeout_s:g} s"
            raise ApiError(408, message, code="request_timeout") from None
        if too_large:
            raise ApiError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
        try:
            return json.loads(b"".join(chunks), parse_constant=_not_json)
        except RecursionError:
            raise ApiError(400, "the request body is nested too deeply", code="invalid_json") from None
        except ValueError as e:  # JSONDecodeError, bad UTF-8, an integer of thousands of digits, NaN
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
        except ApiError as e:  # the run failed mid-stream: the status line is sent, so say it in the stream
            yield sse(e.body())
        except Exception as e:
            yield sse(internal_error(e).body())
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

    async def health(self, request: Request) -> Response:
        self.authorize(request)
        status, body = await self.backend.health()
        return JSONResponse(body, status)

    async def render_metrics(self, request: Request) -> bytes:
        self.authorize(request)
        return self.metrics.render(await self.backend.snapshot())


def sse(chunk: dict) -> str:
    return f"data: {json.dumps(chunk, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _not_json(constant: str) -> None:
    raise ValueError(f"{constant} is not a JSON number")


def internal_error(error: BaseException) -> ApiError:
    """An unexpected exception as the client sees it: a request id to find its traceback in the log."""
    request_id = uuid.uuid4().hex
    log.error("request %s failed", request_id, exc_info=error)
    message = f"internal server error (request id {request_id}); the server's log has the details"
    return ApiError(500, message, type="server_error", code="internal_error", headers={"X-Request-Id": request_id})


async def disconnected(receive: Receive) -> None:
    """Returns when the client has gone (the body is read by then, so only `http.disconnect` can come)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class Guard:
    """ASGI middleware around everything: refuses a foreign `Host` (400) or `Origin` (403), turns an unexpected
    exception into a 500 JSON body, and counts every response by endpoint and status (streams at their status
    line)."""

    def __init__(self, app: ASGIApp, server: Server) -> None:
        self.app = app
        self.server = server

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
        started = False

        async def counting(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                self.server.metrics.requests.labels(endpoint, str(message["status"])).inc()
            await send(message)

        refused = self.refuse(Headers(scope=scope))
        if refused is not None:
            return await error_response(refused)(scope, receive, counting)
        try:
            await self.app(scope, receive, counting)
        except Exception as e:
            if started:  # the status line is out: nothing left to tell the client but a closed connection
                raise
            await error_response(internal_error(e))(scope, receive, counting)

    def refuse(self, headers: Headers) -> ApiError | None:
        config = self.server.config
        authority = headers.get("host", "")
        if not config.allows_host(authority):
            return ApiError(400, "the Host header does not name this server", code="host_not_allowed")
        origin = headers.get("origin")
        if origin is not None and not config.allows_origin(origin, authority):
            message = "cross-origin requests are refused; allow an origin with hogwild serve --cors-origin"
            return ApiError(403, message, type="permission_error", code="origin_not_allowed")
        return None


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


class TimedH11(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request's head: a connection that has not sent a whole
    request line and headers `header_timeout_s` after it opened (or after its last response) is closed, so slow
    clients cannot hold connections open one byte at a time."""

    def __init__(self, *args, header_timeout_s: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout_s = header_timeout_s

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()

    def _arm(self) -> None:
        self.loop.call_later(self.header_timeout_s, self._expire, self.cycle)

    def _expire(self, cycle: object) -> None:
        if self.cycle is cycle and not self.transport.is_closing():  # no new request began since
            self.transport.close()


def uvicorn_server(app: FastAPI, **settings) -> uvicorn.Server:
    """The uvicorn server for `app` (hogwild's header deadline, `settings`: uvicorn.Config's), which stops when
    the engine fails; after `run()`, `app.state.server.failed` says whether it did."""
    config: ServerConfig = app.state.server.config
    http = functools.partial(TimedH11, header_timeout_s=config.header_timeout_s)
    server = uvicorn.Server(uvicorn.Config(app, http=http, timeout_graceful_shutdown=5, **settings))

    def stop() -> None:
        server.should_exit = True

    app.state.server.stop_serving = stop
    return server


def create_app(engine: Engine | Replicas, config: ServerConfig | None = None) -> FastAPI:
    """The app serving `engine` (its loop thread starts with the app and stops with it), or Ray replicas."""
    config = config or ServerConfig()
    server = Server(EngineService(engine, config) if isinstance(engine, Engine) else engine, config)
    app = FastAPI(title="hogwild", lifespan=server.lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    if config.cors_origins:
        cors = ["*"] if "*" in config.cors_origins else list(config.cors_origins)
        app.add_middleware(
            CORSMiddleware, allow_origins=cors, allow_methods=["GET", "HEAD", "POST"], allow_headers=["*"]
        )
    app.add_middleware(Guard, server=server)  # added last: the outermost

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        message = f"no such endpoint: {request.method} {request.url.path}" if error.status_code == 404 else error.detail
        return error_response(ApiError(error.status_code, str(message), headers=error.headers))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await server.generate(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await server.generate(request, "completion")

    # HEAD wherever GET is (uvicorn sends the headers without the body)
    @app.api_route("/v1/models", methods=["GET", "HEAD"])
    async def models(request: Request) -> dict:
        return server.models(request)

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health(request: Request) -> Response:
        return await server.health(request)

    @app.api_route("/metrics", methods=["GET", "HEAD"])
    async def metrics(request: Request) -> Response:
        return Response(await server.render_metrics(request), media_type=CONTENT_TYPE_LATEST)

    @app.api_route("/", methods=["GET", "HEAD"])
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
