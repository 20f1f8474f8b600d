"""`hogwild serve`: load the engine once, then serve the OpenAI-compatible API and the web page with uvicorn.

Registered by `hogwild/cli.py` through `add_parser`; the server's modules (FastAPI, uvicorn, prometheus-client)
are imported only when the command runs, so the rest of the CLI works without the `serve` extra.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from hogwild.cluster import add_arguments as add_ray_arguments
from hogwild.engine import EngineConfig
from hogwild.errors import HogwildError
from hogwild.flags import add_engine_arguments, default, engine_config
from hogwild.server.config import ServerConfig


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `hogwild serve`."""
    serve = sub.add_parser(
        "serve",
        help="serve the OpenAI-compatible API and a web page",
        description="Serve /v1/chat/completions, /v1/completions and /v1/models (OpenAI's API; the extension "
        "fields workers, layout, mode, budget and opening make a request a collaboration), /health, /metrics, and "
        "at / a web page that shows each worker writing. Every request is a run of one shared scheduler.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    serve.add_argument("--host", default=default(ServerConfig, "host"), help="address to listen on")
    serve.add_argument("--port", type=int, default=default(ServerConfig, "port"), help="port to listen on")
    serve.add_argument(
        "--api-key",
        default=default(ServerConfig, "api_key"),
        help="require this Bearer token (visible to other users in `ps`: prefer --api-key-file or HOGWILD_API_KEY)",
    )
    serve.add_argument("--api-key-file", type=Path, help="require the Bearer token this file holds")
    serve.add_argument(
        "--cors-origin",
        action="append",
        default=list(default(ServerConfig, "cors_origins")),
        help="an origin (https://example.com) whose web pages may call the server; repeat for more, * for any",
    )
    serve.add_argument(
        "--insecure", action="store_true", help="allow a non-loopback --host without an API key (anyone may use it)"
    )
    serve.add_argument(
        "--max-queue",
        type=int,
        default=default(ServerConfig, "max_queue"),
        help="requests waiting to start before new ones get 429",
    )
    serve.add_argument(
        "--max-runs",
        type=int,
        default=default(EngineConfig, "max_runs"),
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
    serve.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    if args.replicas is not None and args.ray is None:
        raise HogwildError("--replicas needs --ray: without it one engine serves in this process")
    if args.replicas is not None and args.replicas < 1:
        raise HogwildError(f"--replicas must be >= 1, got {args.replicas}")
    config = ServerConfig(
        host=args.host,
        port=args.port,
        api_key=api_key(args),
        insecure=args.insecure,
        max_queue=args.max_queue,
        model_name=args.model_name,
        cors_origins=tuple(args.cors_origin),
    )  # checked before the model loads: a refused --host fails at once
    engine_settings = engine_config(args, max_runs=args.max_runs)
    try:
        from hogwild.server.app import create_app
    except ImportError as e:
        raise HogwildError(f"hogwild serve needs the serve extra ({e}): pip install 'hogwild[serve]'") from e
    if args.ray is not None:
        return _serve_replicas(args, config, engine_settings, create_app)
    from hogwild.engine import Engine

    engine = Engine.load(engine_settings)
    app = create_app(engine, config)
    print(
        f"hogwild: serving {app.state.server.model} ({engine.describe()}) at "
        f"http://{config.host}:{config.port}/ (API under /v1)",
        file=sys.stderr,
    )
    return _run(app, config)


def api_key(args: argparse.Namespace) -> str | None:
    """The key from --api-key, --api-key-file or HOGWILD_API_KEY (one of them)."""
    given = [name for name in ("api_key", "api_key_file") if getattr(args, name) is not None]
    if len(given) > 1:
        raise HogwildError("give the key once: --api-key or --api-key-file")
    if args.api_key_file is not None:
        try:
            key = args.api_key_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise HogwildError(f"cannot read the API key from {args.api_key_file}: {e}") from None
        if not key:
            raise HogwildError(f"{args.api_key_file} holds no API key")
        return key
    return args.api_key if args.api_key is not None else os.environ.get("HOGWILD_API_KEY") or None


def _run(app, config: ServerConfig) -> int:
    """Serve until stopped; 1 when the engine failed (its traceback is in the log), so a supervisor restarts it."""
    from hogwild.server.app import uvicorn_server

    uvicorn_server(app, host=config.host, port=config.port, log_level="info").run()
    if app.state.server.failed:
        print("hogwild: the engine failed (see the log above); exiting", file=sys.stderr)
        return 1
    return 0


def _serve_replicas(args: argparse.Namespace, config: ServerConfig, engine_settings: EngineConfig, create_app):
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
            return _run(app, config)
        finally:
            replicas.close()
    finally:
        cluster.close()
