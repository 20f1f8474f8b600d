"""A live hogwild server on loopback for tests: uvicorn in a thread, on a free port, stopped on exit."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
from prometheus_client.parser import text_string_to_metric_families

from hogwild.engine import Engine
from hogwild.server.app import Server, create_app, uvicorn_server
from hogwild.server.config import ServerConfig


class Live:
    def __init__(self, url: str, server: Server, thread: threading.Thread) -> None:
        self.url = url
        self.server = server
        self.thread = thread  # uvicorn's: it ends when the server stops
        key = server.config.api_key
        self.headers = {"authorization": f"Bearer {key}"} if key else {}

    def metrics(self) -> dict[tuple[str, tuple], float]:
        """/metrics as {(sample name, sorted labels): value}."""
        text = httpx.get(self.url + "/metrics", headers=self.headers).text
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics().get((name, tuple(sorted(labels.items()))), 0.0)

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Until no run holds KV blocks (the engine thread frees them a step after a cancel)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.metric("hogwild_kv_bytes_in_use") == 0 and self.metric("hogwild_running_runs") == 0:
                return
            time.sleep(0.02)
        raise AssertionError(f"still busy after {timeout} s: {self.metric('hogwild_kv_bytes_in_use')} KV bytes")


@contextmanager
def live_server(engine: Engine, **config) -> Iterator[Live]:
    app = create_app(engine, ServerConfig(**config))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn_server(app, log_level="warning")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield Live(f"http://127.0.0.1:{sock.getsockname()[1]}", app.state.server, thread)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
