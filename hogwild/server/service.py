"""The engine behind the HTTP app: what turns a request body into a run on an engine and the run's events into
OpenAI chunks, apart from HTTP, so that the same code serves one engine in this process (`EngineService`) and each
replica of `hogwild serve --ray` (`hogwild/server/replicas.py`, which holds an `EngineService` per Ray actor).

The contract the app reads (`EngineService` and `Replicas` both keep it):
- `model`: the model id clients send; `card()`: the `hogwild` extension of /v1/models.
- `async start()` / `async stop()`: around the app's life.
- `async open(kind, body) -> Opened`: check the body (model, fields, context, KV budget, a full queue: each an
  `ApiError` with its 4xx status; 503 when no engine runs) and submit its run. A request gets 429 only when its
  run would have to wait for KV room or a run slot behind `max_queue` others (`Scheduler.backlog`).
- `async health() -> (status, body)` and `async snapshot() -> Snapshot` (the engine counters of /metrics).
An `Opened` request has `stream` (whether the client asked for a stream), `async chunks()` (every stream chunk in
order; an `ApiError` if its run fails, the others go on), `response()` (the whole unstreamed response, once the
chunks are read) and `close()` (cancels the run if it is still going; called once the request is over, however it
ended).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable

from hogwild import strategies
from hogwild.collab.layouts import LAYOUTS
from hogwild.collab.prompts import OPENINGS
from hogwild.collab.protocol import CollabConfig
from hogwild.engine import Engine
from hogwild.errors import HogwildError
from hogwild.loop import EngineLoop, Ticket
from hogwild.runs import Failed, Run
from hogwild.scoring import score
from hogwild.server.config import ServerConfig
from hogwild.server.metrics import RowsHistogram, Snapshot
from hogwild.server.protocol import OPENAI_TEMPERATURE, ApiError, Job, Reply, build_job, model_name, parse

RETRY_AFTER_S = 1
ENGINE_FAILED = "the engine failed and stopped; the server exits so that it can be restarted"
log = logging.getLogger("hogwild.server")


def busy(message: str, code: str) -> ApiError:
    return ApiError(429, message, type="rate_limit_error", code=code, headers={"Retry-After": str(RETRY_AFTER_S)})


class Opened:
    """One request accepted by an `EngineService`: its ticket on the engine loop and the reply being built."""

    def __init__(self, service: EngineService, reply: Reply, ticket: Ticket) -> None:
        self.service = service
        self.reply = reply
        self.ticket = ticket
        self.stream = reply.job.stream

    async def chunks(self) -> AsyncIterator[dict]:
        for chunk in self.reply.start():
            yield chunk
        try:
            async for event in self.ticket:
                if isinstance(event, Failed):  # this run alone failed (logged with its traceback by the run)
                    log.error("request %s was %s, which failed", self.reply.job.id, self.ticket.run)
                    raise run_failed(event.error, self.reply.job.id)
                for chunk in self.reply.push(event):
                    yield chunk
        except Exception as e:
            if e is self.ticket.loop.error:  # the engine itself failed (logged by the loop)
                raise ApiError(500, ENGINE_FAILED, type="server_error", code="engine_failed") from None
            raise

    def response(self) -> dict:
        return self.reply.response()

    def close(self) -> None:
        self.service.close(self)


class EngineService:
    """One engine in this process: its loop thread, the open requests, the token counts."""

    def __init__(self, engine: Engine, config: ServerConfig) -> None:
        self.engine = engine
        self.config = config
        self.model = config.model_name or model_name(engine)
        self.loop: EngineLoop | None = None
        self.requests: set[Opened] = set()
        self.prompt_tokens = 0  # of the requests closed so far
        self.completion_tokens = 0
        self.rows = RowsHistogram()
        self.on_fatal: Callable[[BaseException], None] | None = None  # told when the engine fails and stops

    async def start(self) -> None:
        if self.loop is None:
            self.loop = EngineLoop(self.engine, on_fatal=lambda error: self.on_fatal and self.on_fatal(error))

    async def stop(self) -> None:
        if self.loop is not None:
            self.loop.close()

    def pending(self) -> list[Run]:
        """The runs submitted and not started yet, oldest first."""
        runs = [o.ticket.run for o in list(self.requests) if o.ticket.run.ledger is None and not o.ticket.run.done]
        return sorted(runs, key=lambda run: run.id)

    def queued(self) -> int:
        """Requests that wait for a run slot or KV room (submitted ones that fit now are about to start)."""
        return self.engine.scheduler.backlog(self.pending())

    async def open(self, kind: str, body: object) -> Opened:
        job = build_job(self.engine, kind, parse(kind, body), self.model, self.config)
        waiting = self.engine.scheduler.backlog([*self.pending(), job.run])
        if waiting > self.config.max_queue:
            raise busy(f"the server is busy: {waiting - 1} requests wait for KV room; retry in a moment", "queue_full")
        if self.loop is None or not self.loop.alive:
            raise ApiError(503, "the engine loop has stopped", type="server_error")
        if job.echo is not None and job.logprobs is not None:
            await self._score_echo(job)
        try:
            ticket = self.loop.submit(job.run, aio=asyncio.get_running_loop())
        except HogwildError as e:  # build_job checked the KV budget: what is left is an engine loop that stopped
            raise ApiError(503, str(e), type="server_error") from None
        opened = Opened(self, Reply(job, self.engine.tokenizer), ticket)
        self.requests.add(opened)
        return opened

    async def _score_echo(self, job: Job) -> None:
        """The echoed prompts' own log-probabilities, computed on the engine's thread between two steps."""
        assert self.loop is not None and job.echo is not None and job.logprobs is not None
        ids, top = job.echo.ids, max(job.logprobs, 1)
        try:
            job.echo.scores = await asyncio.wrap_future(self.loop.call(lambda e: [score(e, p, top) for p in ids]))
        except HogwildError as e:  # no KV room to score the prompts now
            raise busy(str(e), "kv_full") from None

    def close(self, opened: Opened) -> None:
        """The request is over (answered, failed or abandoned): cancel its run if still going, count its tokens."""
        if opened in self.requests:
            self.requests.discard(opened)
            if not opened.ticket.done:
                opened.ticket.cancel()
            self.prompt_tokens += opened.reply.prompt_tokens
            self.completion_tokens += opened.reply.completion_tokens

    def card(self) -> dict:
        collab = dataclasses.asdict(CollabConfig())
        return {
            "context_window": self.engine.context_window,
            "max_workers": collab["max_workers"],
            "layouts": list(LAYOUTS),
            "openings": list(OPENINGS),
            "modes": strategies.served_names(),
            "strategies": [{"name": n, "summary": strategies.get(n).summary} for n in strategies.served_names()],
            "defaults": {
                **{k: collab[k] for k in ("workers", "layout", "mode", "budget", "opening")},
                "temperature": OPENAI_TEMPERATURE,
            },
        }

    async def health(self) -> tuple[int, dict]:
        if self.loop is None or not self.loop.alive:
            error = ENGINE_FAILED if self.loop and self.loop.error else "the engine loop has stopped"
            return 503, {"status": "error", "error": error}
        return 200, {"status": "ok", "model": self.model, "running": len(self.engine.scheduler.running)}

    async def snapshot(self) -> Snapshot:
        stats, pool = self.engine.stats, self.engine.pool
        self.rows.update(stats.per_step_rows)
        return Snapshot(
            forward_passes=stats.steps,
            rows=stats.rows,
            tokens_fed=stats.tokens,
            rows_buckets=list(self.rows.buckets),
            rows_sum=self.rows.total,
            queued=self.queued(),
            running=len(self.engine.scheduler.running),
            kv_bytes_in_use=pool.in_use_bytes,
            kv_bytes_budget=pool.budget_bytes,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
        )


def run_failed(error: BaseException, request_id: str) -> ApiError:
    """What the client of a failed run hears: a `HogwildError`'s own message, else the request id to look up in
    the server's log (never the exception itself)."""
    if isinstance(error, HogwildError):
        return ApiError(500, f"the request failed: {error}", type="server_error", code="run_failed")
    message = f"the request failed in the engine (request id {request_id}); the server's log has the details"
    return ApiError(500, message, type="server_error", code="run_failed")
