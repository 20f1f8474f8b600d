"""Ray, for spreading work over several engines: `hogwild eval --ray` (problems sharded over actors) and `hogwild
serve --ray` (replicas behind one endpoint). This module is what both share: the optional import (Ray is the `ray`
extra; without it a --ray flag is one line saying how to install it), connecting to a cluster or starting a local
one, and how many actors of what size fit it. An actor is one engine: one GPU with `--device cuda`, else
`--threads` CPUs (at least one).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import socket
from dataclasses import dataclass
from types import ModuleType

from hogwild.engine import EngineConfig
from hogwild.errors import HogwildError

INSTALL = "pip install 'hogwild[ray]'"
CONNECT_TIMEOUT_S = 5.0


def add_arguments(parser: argparse.ArgumentParser, ray_does: str, count: str, count_does: str) -> None:
    """The Ray flags of a command: `--ray [ADDRESS]`, and `count` (`--actors`, `--replicas`), engines to start."""
    group = parser.add_argument_group("Ray cluster (pip install 'hogwild[ray]')")
    group.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help=f"{ray_does}; ADDRESS: a cluster (host:port, ray://host:port or auto; default RAY_ADDRESS, a cluster "
        "started here with `ray start`, else a new local one)",
    )
    group.add_argument(
        count,
        type=int,
        default=None,
        help=f"with --ray: engines to start{count_does}; not given: one per GPU with --device cuda, else as many as "
        "the cluster's CPUs hold at --threads each",
    )


def import_ray() -> ModuleType:
    try:
        import ray
    except ImportError:
        raise HogwildError(f"--ray needs Ray, which is not installed: {INSTALL}") from None
    return ray


def check_address(address: str) -> None:
    """A cluster address must name a host and port that answer (or be `auto`/`local`, which Ray resolves):
    without this, Ray retries an unreachable address for minutes."""
    if address in ("auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise HogwildError(
            f"--ray takes a cluster address like 10.0.0.5:6379, ray://head:10001 or auto, got {address!r}"
        )
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise HogwildError(f"no Ray cluster answers at {address}: {e.strerror or e}") from None


@dataclass
class Cluster:
    """A connection to a Ray cluster; `owned`: this process called `ray.init`, so `close` disconnects (and stops
    the local cluster it started)."""

    ray: ModuleType
    owned: bool

    def close(self) -> None:
        if self.owned and self.ray.is_initialized():
            self.ray.shutdown()

    def resources(self) -> dict[str, float]:
        return self.ray.cluster_resources()


def connect(address: str | None) -> Cluster:
    """Connect to the cluster at `address` (None: RAY_ADDRESS, a cluster started on this machine with `ray start`,
    else a new local one); a process already connected keeps its connection."""
    ray = import_ray()
    if address:
        check_address(address)
    if ray.is_initialized():
        return Cluster(ray, owned=False)
    try:
        ray.init(address=address or None, include_dashboard=False, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = f" at {address}" if address else ""
        raise HogwildError(f"cannot start or join the Ray cluster{where}: {first}") from None
    return Cluster(ray, owned=True)


def actor_config(config: EngineConfig) -> EngineConfig:
    """An actor's engine: `--threads 0` (one per core) would take every core of its node, so an actor runs 1."""
    return dataclasses.replace(config, threads=config.threads or 1)


def actor_options(config: EngineConfig) -> dict:
    """Ray resources of one actor (one engine)."""
    if config.device.startswith("cuda"):
        return {"num_gpus": 1, "num_cpus": 1}
    return {"num_cpus": config.threads or 1}


def plan_actors(cluster: Cluster, requested: int, config: EngineConfig, what: str) -> int:
    """How many actors to start: `requested`, or when 0 one per GPU (`--device cuda`) or as many as the CPUs hold
    at `--threads` each; more than the cluster holds is an error (Ray would wait for them forever)."""
    resources = cluster.resources()
    if config.device.startswith("cuda"):
        have = int(resources.get("GPU", 0))
        if have == 0:
            raise HogwildError("--device cuda, but the Ray cluster has no GPU")
        if requested > have:
            raise HogwildError(f"--{what} {requested} need a GPU each; the Ray cluster has {have}")
        return requested or have
    cpus, each = int(resources.get("CPU", 0)), config.threads or 1
    if requested * each > cpus or cpus < each:
        asked = f"--{what} {requested}" if requested else f"one of the {what}"
        need = max(requested, 1) * each
        raise HogwildError(f"{asked} at --threads {each} need {need} CPUs; the Ray cluster has {cpus}")
    return requested or cpus // each


def failure(error: BaseException) -> str:
    """One line for an error raised in an actor: the hogwild error itself, else its type and first line."""
    cause = getattr(error, "cause", None) or error
    text = str(cause).strip().splitlines()
    return str(cause) if isinstance(cause, HogwildError) else f"{type(cause).__name__}: {text[0] if text else ''}"
