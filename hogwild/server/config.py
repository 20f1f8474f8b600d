"""`ServerConfig`: where `hogwild serve` listens, who may call it, and how much it accepts at once.

Validated once: a host other than loopback needs an API key (or `insecure`), so a server is never opened to the
network by accident.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from hogwild.errors import HogwildError


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # checked as `Authorization: Bearer <key>` on /v1/*
    insecure: bool = False  # allow a non-loopback host without an API key
    max_queue: int = 64  # requests waiting for a run slot or KV room; past this, 429 with Retry-After
    max_body_bytes: int = 2 * 2**20  # larger request bodies get 413
    max_n: int = 16  # samples per request
    model_name: str | None = None  # the model id in /v1/models; None: the engine's model name

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise HogwildError(f"port must be between 0 and 65535, got {self.port}")
        if self.max_queue < 0:
            raise HogwildError(f"max_queue must be >= 0, got {self.max_queue}")
        if self.max_body_bytes < 1024 or self.max_n < 1:
            raise HogwildError("max_body_bytes must be >= 1024 and max_n >= 1")
        if self.api_key is not None and not self.api_key.strip():
            raise HogwildError("the API key is empty")
        if not is_loopback(self.host) and self.api_key is None and not self.insecure:
            raise HogwildError(
                f"refusing to listen on {self.host} without an API key: anyone who can reach it could use it; "
                "pass --api-key KEY, or --insecure to serve it open anyway"
            )
