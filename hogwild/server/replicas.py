"""`hogwild serve --ray --replicas N`: N engines in Ray actors behind the one FastAPI app.

Each `ReplicaActor` is an asyncio Ray actor holding an `EngineService` (its own engine, loop thread and queue), so a
replica checks and runs a request exactly as a single server does. `Replicas` is the app's backend (the contract
is in `hogwild/server/service.py`): it sends each request body to the live replica with the least load (the rows
of its open requests: a collaboration's workers, or `n`), and relays the replica's messages over a Ray streaming
generator: ("error", ...) for a refused request, ("ok", stream), then ("chunk", chunk)... and ("end", response).
A client that goes away cancels the run on its replica; /health and /metrics add up the replicas'. A replica that
dies fails its open requests (their streams say so) and gets no new ones.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator

from hogwild.cluster import Cluster, actor_config, actor_options, failure
from hogwild.engine import Engine, EngineConfig
from hogwild.errors import HogwildError
from hogwild.server.config import ServerConfig
from hogwild.server.metrics import Snapshot
from hogwild.server.protocol import ApiError
from hogwild.server.service import EngineService, Opened

HEALTH_TIMEOUT_S = 10.0


class ReplicaActor:
    """One engine served in a Ray actor (asyncio: many requests at once, each an async generator)."""

    def __init__(self, engine_config: EngineConfig, config: ServerConfig) -> None:
        self.service: EngineService | None = None
        self.error: str | None = None
        self.opened: dict[str, Opened] = {}
        try:
            self.service = EngineService(Engine.load(engine_config), config)
        except HogwildError as e:  # said by `ready`, so the front prints one line instead of Ray's traceback
            self.error = str(e)

    async def ready(self) -> dict:
        if self.service is None:
            return {"pid": os.getpid(), "error": self.error}
        await self.service.start()
        engine = self.service.engine
        return {"pid": os.getpid(), "error": None, "model": self.service.model, "card": self.service.card(),
                "kernels": engine.describe()}  # fmt: skip

    async def generate(self, request_id: str, kind: str, body: object) -> AsyncIterator[tuple]:
        assert self.service is not None, "generate on a replica whose engine did not load"
        try:
            opened = await self.service.open(kind, body)
        except ApiError as e:
            yield ("error", e.status, e.message, e.type, e.code, e.param, e.headers)
            return
        self.opened[request_id] = opened
        try:
            yield ("ok", opened.stream)
            async for chunk in opened.chunks():
                yield ("chunk", chunk)
            yield ("end", None if opened.stream else opened.response())
        finally:
            self.opened.pop(request_id, None)
            opened.close()

    async def cancel(self, request_id: str) -> None:
        """Stop a request's run; its generator then ends with the run's Done."""
        opened = self.opened.get(request_id)
        if opened is not None:
            opened.close()

    async def health(self) -> tuple[int, dict]:
        assert self.service is not None
        return await self.service.health()

    async def snapshot(self) -> Snapshot:
        assert self.service is not None
        return await self.service.snapshot()


def request_rows(body: object) -> int:
    """A request's weight for routing: its workers (a collaboration) or its samples, 1 for anything unclear."""
    if not isinstance(body, dict):
        return 1
    for key in ("workers", "n"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return min(value, 64)
    return 1


class RemoteOpened:
    """A request accepted by a replica, read from its streaming generator."""

    def __init__(self, replicas: Replicas, replica: int, request_id: str, generator, rows: int, stream: bool) -> None:
        self.replicas = replicas
        self.replica = replica
        self.request_id = request_id
        self.generator = generator
        self.rows = rows
        self.stream = stream
        self.final: dict | None = None
        self.ended = False
        self.closed = False

    async def chunks(self) -> AsyncIterator[dict]:
        ray = self.replicas.cluster.ray
        try:
            async for ref in self.generator:
                message = await ref
                if message[0] == "chunk":
                    yield message[1]
                elif message[0] == "end":
                    self.final, self.ended = message[1], True
        except ray.exceptions.RayActorError:
            self.replicas.died(self.replica)
            raise RuntimeError(f"replica {self.replica} died") from None
        except ray.exceptions.RayTaskError as e:
            raise RuntimeError(f"replica {self.replica}: {failure(e)}") from None

    def response(self) -> dict:
        assert self.final is not None, "the request is not done"
        return self.final

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.replicas.load[self.replica] -= self.rows
        if not self.ended and self.replicas.alive[self.replica]:
            self.replicas.handles[self.replica].cancel.remote(self.request_id)


class Replicas:
    """N `ReplicaActor`s on a Ray cluster, routed least-loaded first; `launch` loads them (blocking, before the app
    starts, so a load error is one line), `close` kills them."""

    def __init__(self, cluster: Cluster, engine_config: EngineConfig, config: ServerConfig, count: int) -> None:
        self.cluster = cluster
        self.engine_config = actor_config(engine_config)
        self.config = config
        self.count = count
        self.handles: list = []
        self.alive: list[bool] = []
        self.load: list[int] = []  # rows of the open requests, per replica
        self.info: dict = {}
        self.model = ""
        self.load_s = 0.0

    def launch(self) -> None:
        ray = self.cluster.ray
        remote = ray.remote(**actor_options(self.engine_config), max_restarts=0)(ReplicaActor)
        start = time.perf_counter()
        self.handles = [remote.remote(self.engine_config, self.config) for _ in range(self.count)]
        try:
            readies = ray.get([h.ready.remote() for h in self.handles])
        except ray.exceptions.RayError as e:
            self.close()
            raise HogwildError(f"a replica did not start: {failure(e)}") from None
        self.load_s = time.perf_counter() - start
        errors = [r["error"] for r in readies if r["error"]]
        if errors:
            self.close()
            raise HogwildError(errors[0])
        self.info = readies[0]
        self.model = self.info["model"]
        self.alive = [True] * self.count
        self.load = [0] * self.count

    def close(self) -> None:
        for handle in self.handles:
            self.cluster.ray.kill(handle)
        self.handles = []

    def died(self, replica: int) -> None:
        if self.alive[replica]:
            self.alive[replica] = False
            print(f"hogwild: replica {replica} died; {sum(self.alive)} left", file=sys.stderr)

    # the backend contract

    async def start(self) -> None:
        pass  # `launch` loaded the replicas before the app started

    async def stop(self) -> None:
        pass  # the command that launched the replicas closes them, after the app

    def card(self) -> dict:
        return self.info["card"]

    async def open(self, kind: str, body: object) -> RemoteOpened:
        live = [i for i in range(self.count) if self.alive[i]]
        if not live:
            raise ApiError(503, "every replica has died", type="server_error")
        replica = min(live, key=lambda i: (self.load[i], i))
        rows = request_rows(body)
        request_id = uuid.uuid4().hex
        generator = self.handles[replica].generate.remote(request_id, kind, body)
        self.load[replica] += rows
        try:
            first = await (await generator.__anext__())
        except self.cluster.ray.exceptions.RayActorError:
            self.load[replica] -= rows
            self.died(replica)
            raise ApiError(503, f"replica {replica} died; retry", type="server_error") from None
        except BaseException:
            self.load[replica] -= rows
            raise
        if first[0] == "error":
            self.load[replica] -= rows
            status, message, type_, code, param, headers = first[1:]
            raise ApiError(status, message, type=type_, code=code, param=param, headers=headers)
        return RemoteOpened(self, replica, request_id, generator, rows, stream=first[1])

    async def health(self) -> tuple[int, dict]:
        replies = await self._gather("health")
        ok = [body for status, body in replies if status == 200]
        if not ok:
            return 503, {"status": "error", "error": "no replica is serving", "replicas": 0}
        running = sum(body["running"] for body in ok)
        return 200, {"status": "ok", "model": self.model, "running": running, "replicas": len(ok)}

    async def snapshot(self) -> Snapshot:
        total = Snapshot()
        for snapshot in await self._gather("snapshot"):
            total = total + snapshot
        return total

    async def _gather(self, method: str) -> list:
        """`method` of every live replica; one that does not answer is left out (and marked dead if it died)."""
        live = [i for i in range(self.count) if self.alive[i]]
        refs = [getattr(self.handles[i], method).remote() for i in live]
        results = await asyncio.gather(
            *(asyncio.wait_for(asyncio.wrap_future(ref.future()), HEALTH_TIMEOUT_S) for ref in refs),
            return_exceptions=True,
        )
        out = []
        for i, result in zip(live, results, strict=True):
            if isinstance(result, self.cluster.ray.exceptions.RayActorError):
                self.died(i)
            elif not isinstance(result, BaseException):
                out.append(result)
        return out
