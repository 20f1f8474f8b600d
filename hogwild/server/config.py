"""`ServerConfig`: where `hogwild serve` listens, who may call it, and how much it accepts at once.

Validated once: a host other than loopback needs an API key (or `insecure`), so a server is never opened to the
network by accident. `allows_host` and `allows_origin` are what keeps a key-less loopback server safe from the web
pages its user visits: a request must name this server in `Host` (not a name rebound to 127.0.0.1) and, when a
browser sends an `Origin`, come from the server's own page or an origin given with `--cors-origin`.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from urllib.parse import urlsplit

from hogwild.errors import HogwildError


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_name(authority: str) -> str:
    """'127.0.0.1:8000' -> '127.0.0.1', '[::1]:8000' -> '::1', 'Example.com' -> 'example.com'."""
    try:
        return (urlsplit(f"//{authority}").hostname or "").lower()
    except ValueError:  # an unbalanced bracket, a port that is not a number
        return ""


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
    max_prompts: int = 64  # prompts in one completions request (each with its own n samples)
    cors_origins: tuple[str, ...] = ()  # origins besides the server's own whose pages may call it ("*": any)
    header_timeout_s: float = 10.0  # a connection that has not sent a request's headers by then is closed
    body_timeout_s: float = 30.0  # a request whose body has not arrived by then gets 408

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise HogwildError(f"port must be between 0 and 65535, got {self.port}")
        if self.max_queue < 0:
            raise HogwildError(f"max_queue must be >= 0, got {self.max_queue}")
        if self.max_body_bytes < 1024 or self.max_n < 1 or self.max_prompts < 1:
            raise HogwildError("max_body_bytes must be >= 1024, max_n and max_prompts >= 1")
        if self.header_timeout_s <= 0 or self.body_timeout_s <= 0:
            raise HogwildError("the header and body timeouts must be > 0 seconds")
        for origin in self.cors_origins:
            parts = urlsplit(origin)
            if origin != "*" and (parts.scheme not in ("http", "https") or not parts.netloc or parts.path):
                raise HogwildError(f"--cors-origin takes an origin like https://example.com or *, got {origin!r}")
        if self.api_key is not None and not self.api_key.strip():
            raise HogwildError("the API key is empty")
        if not is_loopback(self.host) and self.api_key is None and not self.insecure:
            raise HogwildError(
                f"refusing to listen on {self.host} without an API key: anyone who can reach it could use it; "
                "pass --api-key KEY, or --insecure to serve it open anyway"
            )

    def allows_host(self, authority: str) -> bool:
        """Whether a request's `Host` names this server: the address it listens on or localhost (any name when it
        listens on every address, where an API key or --insecure was asked for)."""
        if self.host in ("0.0.0.0", "::", ""):
            return True
        name = host_name(authority)
        return name in (host_name(self.host) or self.host, "localhost") or (
            is_loopback(self.host) and is_loopback(name)
        )

    def allows_origin(self, origin: str, authority: str) -> bool:
        """Whether a browser's `Origin` may call the server reached as `authority` (its `Host`): its own page, or
        an origin given with --cors-origin."""
        return origin in (f"http://{authority}", f"https://{authority}") or any(
            allowed in ("*", origin) for allowed in self.cors_origins
        )
