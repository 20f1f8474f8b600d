"""The engine behind the HTTP app: what turns a request body into a run on an engine and the run's events into
OpenAI chunks, apart from HTTP, so that the same code serves one engine in this process (`EngineService`) and each
replica of `hogwild serve --ray` (`hogwild/server/replicas.py`, which holds an `EngineService` per Ray actor).

The contract the app reads (`EngineService` and `Replicas` both keep it):
- `model`: the model id clients send; `card()`: the `hogwild` extension of /v1/models.
- `async start()` / `async stop()`: around the app's life.
- `async open(kind, body) -> Opened`: check the body (model, fields, context, KV budget, a full queue: each an
  `ApiError` with its 4xx status; 503 when no engine runs) and submit its run.
- `async health() -> (status, body)` and `async snapshot() -> Snapshot` (the engine counters of /metrics).
An `Opened` request has `stream` (whether the client asked for a stream), `async chunks()` (every stream chunk in
order; raises if the engine fails), `response()` (the whole unstreamed response, once the chunks are read) and
`close()` (cancels the run if it is still going; called once the request is over, however it ended).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

from hogwild.collab.layouts import LAYOUTS
from hogwild.collab.protocol import MODES, CollabConfig
from hogwild.engine import Engine
from hogwild.errors import HogwildError
from hogwild.loop import EngineLoop, Ticket
from hogwild.server.config import ServerConfig
from hogwild.server.metrics import RowsHistogram, Snapshot
from hogwild.server.protocol import OPENAI_TEMPERATURE, ApiError, Reply, build_job, model_name, parse

RETRY_AFTER_S = 1


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
        async for event in self.ticket:
            for chunk in self.reply.push(event):
                yield chunk

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

    async def start(self) -> None:
        if self.loop is None:
            self.loop = EngineLoop(self.engine)

    async def stop(self) -> None:
        if self.loop is not None:
            self.loop.close()

    def queued(self) -> int:
        """Requests submitted and not started yet (waiting for a run slot or KV room)."""
        return sum(1 for o in list(self.requests) if o.ticket.run.ledger is None and not o.ticket.run.done)

    async def open(self, kind: str, body: object) -> Opened:
        job = build_job(self.engine, kind, parse(kind, body), self.model, self.config.max_n)
        if self.queued() >= self.config.max_queue:
            raise ApiError(
                429,
                f"the server is busy: {self.queued()} requests are waiting to start; retry in a moment",
                type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        assert self.loop is not None, "the service was not started"
        try:
            ticket = self.loop.submit(job.run, aio=asyncio.get_running_loop())
        except HogwildError as e:  # build_job checked the KV budget: what is left is an engine loop that stopped
            raise ApiError(503, str(e), type="server_error") from None
        opened = Opened(self, Reply(job), ticket)
        self.requests.add(opened)
        return opened

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
            "modes": list(MODES),
            "defaults": {
                **{k: collab[k] for k in ("workers", "layout", "mode", "budget")},
                "temperature": OPENAI_TEMPERATURE,
            },
        }

    async def health(self) -> tuple[int, dict]:
        if self.loop is None or not self.loop.alive:
            error = repr(self.loop.error) if self.loop and self.loop.error else "the engine loop has stopped"
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
