"""`hogwild serve`: load the engine once, then serve the OpenAI-compatible API and the web page with uvicorn.

Registered by `hogwild/cli.py` through `add_parser`; the server's modules (FastAPI, uvicorn, prometheus-client)
are imported only when the command runs, so the rest of the CLI works without the `serve` extra.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable

from hogwild.cluster import add_arguments as add_ray_arguments
from hogwild.engine import EngineConfig
from hogwild.errors import HogwildError
from hogwild.server.config import ServerConfig


def _default(cls: type, name: str):
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


def add_parser(
    sub: argparse._SubParsersAction,
    add_engine_arguments: Callable[[argparse.ArgumentParser], None],
    engine_config: Callable[[argparse.Namespace], EngineConfig],
) -> None:
    """Register `hogwild serve`; `engine_config` turns the engine arguments into an EngineConfig."""
    serve = sub.add_parser(
        "serve",
        help="serve the OpenAI-compatible API and a web page",
        description="Serve /v1/chat/completions, /v1/completions and /v1/models (OpenAI's API; the extension "
        "fields workers, layout, mode and budget make a request a collaboration), /health, /metrics, and at / a "
        "web page that shows each worker writing. Every request is a run of one shared scheduler.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    serve.add_argument("--host", default=_default(ServerConfig, "host"), help="address to listen on")
    serve.add_argument("--port", type=int, default=_default(ServerConfig, "port"), help="port to listen on")
    serve.add_argument("--api-key", default=_default(ServerConfig, "api_key"), help="require this Bearer token")
    serve.add_argument(
        "--insecure", action="store_true", help="allow a non-loopback --host without an API key (anyone may use it)"
    )
    serve.add_argument(
        "--max-queue",
        type=int,
        default=_default(ServerConfig, "max_queue"),
        help="requests waiting to start before new ones get 429",
    )
    serve.add_argument(
        "--max-runs",
        type=int,
        default=_default(EngineConfig, "max_runs"),
        help="runs in flight at once (0: as many as the KV budget holds; 1: one request at a time)",
    )
    serve.add_argument(
        "--model-name", default=None, help="the model id clients send (None: the name the model was loaded by)"
    )
    add_ray_arguments(
        serve,
        "serve engine replicas in Ray actors behind this one endpoint",
        "--replicas",
        ", each request going to the least loaded",
    )
    add_engine_arguments(serve)
    serve.set_defaults(func=lambda args: cmd_serve(args, engine_config))


def cmd_serve(args: argparse.Namespace, engine_config: Callable[[argparse.Namespace], EngineConfig]) -> int:
    if args.replicas is not None and args.ray is None:
        raise HogwildError("--replicas needs --ray: without it one engine serves in this process")
    if args.replicas is not None and args.replicas < 1:
        raise HogwildError(f"--replicas must be >= 1, got {args.replicas}")
    config = ServerConfig(
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        insecure=args.insecure,
        max_queue=args.max_queue,
        model_name=args.model_name,
    )  # checked before the model loads: a refused --host fails at once
    engine_settings = dataclasses.replace(engine_config(args), max_runs=args.max_runs)
    try:
        import uvicorn

        from hogwild.server.app import create_app
    except ImportError as e:
        raise HogwildError(f"hogwild serve needs the serve extra ({e}): pip install 'hogwild[serve]'") from e
    if args.ray is not None:
        return _serve_replicas(args, config, engine_settings, uvicorn, create_app)
    from hogwild.engine import Engine

    engine = Engine.load(engine_settings)
    app = create_app(engine, config)
    print(
        f"hogwild: serving {app.state.server.model} ({engine.describe()}) at "
        f"http://{config.host}:{config.port}/ (API under /v1)",
        file=sys.stderr,
    )
    uvicorn.run(app, host=config.host, port=config.port, log_level="info", timeout_graceful_shutdown=5)
    return 0


def _serve_replicas(args: argparse.Namespace, config: ServerConfig, engine_settings: EngineConfig, uvicorn, create_app):
    from hogwild.cluster import connect, import_ray, plan_actors
    from hogwild.server.replicas import Replicas

    import_ray()
    cluster = connect(args.ray or None)
    try:
        count = plan_actors(cluster, args.replicas or 0, engine_settings, "replicas")
        replicas = Replicas(cluster, engine_settings, config, count)
        print(f"hogwild: starting {count} replica{'s' * (count > 1)} on the Ray cluster", file=sys.stderr)
        try:
            replicas.launch()
            app = create_app(replicas, config)
            print(
                f"hogwild: serving {replicas.model} ({replicas.info['kernels']}) on {count} replicas, loaded in "
                f"{replicas.load_s:.1f} s, at http://{config.host}:{config.port}/ (API under /v1)",
                file=sys.stderr,
            )
            uvicorn.run(app, host=config.host, port=config.port, log_level="info", timeout_graceful_shutdown=5)
        finally:
            replicas.close()
    finally:
        cluster.close()
    return 0
