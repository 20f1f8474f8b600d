"""Load test of `hogwild serve` on loopback: N concurrent streaming chat requests of mixed worker counts.

By default it starts two servers of the default model in turn, one batching every request into each forward pass
(the normal scheduler) and one with `--max-runs 1` (one request at a time); with `--replicas N` instead one engine,
then `--ray --replicas 1` and `--ray --replicas N` (engines in Ray actors behind one endpoint). It sends each the
same requests all at once: most are good, one in ten disconnects mid-stream (after its first text) and one in ten
is a bad body. It checks every good response is whole (status 200, no error event, a finish reason, usage,
`data: [DONE]`, and for a collaboration every worker's text and the closing `done` event), every bad body got a
4xx OpenAI error, no response at all was a 5xx, and the KV cache went back to idle; and prints one table side by
side: requests/s, p50/p95 latency, time to the first text, sampled tokens/s (of the good requests), and the mean
rows per forward pass read from /metrics.
With `--url` it measures a server already running on loopback instead. Bounded: at most 256 requests, each with a
timeout, the whole run with a deadline; it only ever connects to 127.0.0.0/8 or ::1.

    flock /tmp/hogwild-cpu.lock .venv/bin/python scripts/load_test.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from urllib.parse import urlparse

import httpx

from hogwild.server.config import is_loopback

PROBLEMS = [
    "What is 17 * 23? Answer in \\boxed{}.",
    "A train travels 60 km in 45 minutes. What is its speed in km/h? Answer in \\boxed{}.",
    "What is the sum of the first 20 positive integers? Answer in \\boxed{}.",
    "How many minutes are there in 3.5 hours? Answer in \\boxed{}.",
    "What is 2 to the power 10? Answer in \\boxed{}.",
    "A box holds 12 eggs. How many boxes do 150 eggs fill completely? Answer in \\boxed{}.",
    "What is 15% of 240? Answer in \\boxed{}.",
    "What is the greatest common divisor of 84 and 126? Answer in \\boxed{}.",
]
WORKER_MIX = (None, 1, 2, 4)  # None: a plain single-stream completion
MAX_REQUESTS = 256
CUT, BAD = 7, 3  # request i disconnects mid-stream when i % 10 == CUT, sends a bad body when i % 10 == BAD


def bad_body(i: int, model: str) -> bytes:
    """What a buggy or hostile client sends, each to get a 4xx OpenAI error body."""
    chat = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "stream": True}
    bodies = [
        {**chat, "seed": 2**64},
        {**chat, "messages": [{"role": "user", "content": "\ud800"}]},
        {**chat, "max_tokens": "2"},
        {**chat, "tools": [{"type": "function", "function": {"name": "f"}}]},
    ]
    deep = b'{"model": "' + model.encode() + b'", "user": ' + b"[" * 1000 + b"]" * 1000 + b"}"
    return deep if i // 10 % 5 == 4 else json.dumps(bodies[i // 10 % 5]).encode()


@dataclass
class Outcome:
    workers: int | None
    kind: str = "good"  # "good", "cut" (disconnects mid-stream) or "bad" (a bad body)
    latency: float = 0.0
    first_text: float | None = None
    tokens: int = 0
    error: str | None = None


@dataclass
class Load:
    scheduler: str
    model: str
    outcomes: list[Outcome] = field(default_factory=list)
    wall: float = 0.0
    passes: float = 0.0
    rows: float = 0.0
    server_errors: float = 0.0  # 5xx responses
    idle: bool = False  # KV back to 0 bytes in use and no run left, once every request was over


def body(i: int, model: str, workers: int | None, tokens: int) -> dict:
    request = {
        "model": model,
        "messages": [{"role": "user", "content": PROBLEMS[i % len(PROBLEMS)]}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0.7,
        "seed": i,
    }
    if workers is None:
        return {**request, "max_tokens": tokens}
    return {**request, "workers": workers, "budget": tokens}


async def one(client: httpx.AsyncClient, url: str, request: dict | bytes, kind: str, timeout: float) -> Outcome:
    if kind == "bad":
        return await refused(client, url, request, timeout)
    outcome = Outcome(request.get("workers"), kind)
    start = time.perf_counter()
    finish, usage, done, ended = None, None, None, False
    names: list[str] = []
    texts: dict[int, str] = {}
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=request, timeout=timeout) as response:
            if response.status_code != 200:
                outcome.error = f"status {response.status_code}: {(await response.aread())[:200]!r}"
                return outcome
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    ended = True
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    outcome.error = chunk["error"]["message"]
                    return outcome
                usage = chunk.get("usage") or usage
                for choice in chunk["choices"]:
                    delta = choice["delta"]
                    event = delta.get("hogwild") or {}
                    if (delta.get("content") or event.get("type") == "text") and outcome.first_text is None:
                        outcome.first_text = time.perf_counter() - start
                    if event.get("type") == "start":
                        names = event["workers"]
                    elif event.get("type") == "text":
                        texts[event["worker"]] = texts.get(event["worker"], "") + event["text"]
                    elif event.get("type") == "done":
                        done = event
                    finish = choice["finish_reason"] or finish
                if kind == "cut" and outcome.first_text is not None:
                    return outcome  # leaving the stream closes the connection mid-run
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as e:
        outcome.error = f"{type(e).__name__}: {e}"
        return outcome
    outcome.latency = time.perf_counter() - start
    outcome.tokens = usage["completion_tokens"] if usage else 0
    whole = ended and finish in ("stop", "length") and usage and usage["completion_tokens"] > 0
    if request.get("workers"):
        whole = whole and done is not None and len(names) == request["workers"]
        whole = whole and all(texts.get(w) for w in range(len(names)))
    if not whole:
        outcome.error = f"incomplete response (done {ended}, finish {finish}, usage {usage}, workers {len(texts)})"
    return outcome


async def refused(client: httpx.AsyncClient, url: str, request: bytes, timeout: float) -> Outcome:
    outcome = Outcome(None, "bad")
    headers = {"content-type": "application/json"}
    try:
        response = await client.post(url + "/v1/chat/completions", content=request, headers=headers, timeout=timeout)
        error = response.json()["error"]
        if not 400 <= response.status_code < 500 or not error["message"]:
            outcome.error = f"a bad body got {response.status_code}: {response.text[:200]}"
    except (httpx.HTTPError, json.JSONDecodeError, KeyError, TypeError) as e:
        outcome.error = f"a bad body got no JSON error: {type(e).__name__}: {e}"
    return outcome


def metrics(url: str) -> dict[str, float]:
    """The counters and gauges load_test reads, 5xx responses summed."""
    values = {"server_errors": 0.0}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        name, _, value = line.rpartition(" ")
        if name in ("hogwild_forward_passes_total", "hogwild_rows_total", "hogwild_kv_bytes_in_use",
                    "hogwild_running_runs"):  # fmt: skip
            values[name] = float(value)
        elif name.startswith("hogwild_requests_total{") and 'status="5' in name:
            values["server_errors"] += float(value)
    return values


async def run_load(url: str, scheduler: str, requests: int, tokens: int, timeout: float) -> Load:
    model = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
    before = metrics(url)
    kinds = ["bad" if i % 10 == BAD else "cut" if i % 10 == CUT else "good" for i in range(requests)]
    bodies = [
        bad_body(i, model) if kind == "bad" else body(i, model, WORKER_MIX[i % len(WORKER_MIX)], tokens)
        for i, kind in enumerate(kinds)
    ]
    limits = httpx.Limits(max_connections=requests, max_keepalive_connections=requests)
    async with httpx.AsyncClient(limits=limits) as client:
        start = time.perf_counter()
        outcomes = await asyncio.wait_for(
            asyncio.gather(*(one(client, url, b, k, timeout) for b, k in zip(bodies, kinds, strict=True))),
            timeout=timeout + 30,
        )
        wall = time.perf_counter() - start
    after = metrics(url)
    deadline = time.time() + 30  # a disconnected run is freed a step after its client left
    while (after["hogwild_kv_bytes_in_use"] or after["hogwild_running_runs"]) and time.time() < deadline:
        await asyncio.sleep(0.1)
        after = metrics(url)
    load = Load(scheduler, model, list(outcomes), wall)
    load.passes = after["hogwild_forward_passes_total"] - before["hogwild_forward_passes_total"]
    load.rows = after["hogwild_rows_total"] - before["hogwild_rows_total"]
    load.server_errors = after["server_errors"] - before["server_errors"]
    load.idle = not after["hogwild_kv_bytes_in_use"] and not after["hogwild_running_runs"]
    return load


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(port: int, threads: int, max_runs: int, extra: list[str]) -> subprocess.Popen:
    command = [sys.executable, "-m", "hogwild", "serve", "--port", str(port), "--threads", str(threads)]
    command += ["--max-runs", str(max_runs), *extra]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while time.time() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"load_test: the server exited: {server.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    server.kill()
    raise SystemExit("load_test: the server did not come up in 180 s")


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        name = next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name"))
        return name + (" with AVX-512" if "avx512f" in info else "")
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def table(loads: list[Load], args: argparse.Namespace) -> str:
    mix = ", ".join("plain" if w is None else f"{w} worker{'s' * (w > 1)}" for w in WORKER_MIX)
    each = " each (engine or replica)" if args.replicas else ""
    lines = [
        f"{args.requests} concurrent streaming chat requests ({mix} in turn; max_tokens / budget {args.tokens};",
        "one in ten disconnects after its first text, one in ten is a bad body),",
        f"{loads[0].model}, {args.threads} torch thread{'s' * (args.threads > 1)}{each} on {cpu_name()}, "
        f"{os.cpu_count()} cores",
        "",
        f"{'scheduler':<28} {'whole':>5} {'cut':>5} {'4xx':>5} {'5xx':>3} {'idle':>4} {'req/s':>6} {'p50 s':>6} "
        f"{'p95 s':>6} {'first text p50 s':>16} {'tokens/s':>8} {'passes':>6} {'rows/pass':>9}",
    ]
    for load in loads:
        counts = {kind: [o for o in load.outcomes if o.kind == kind] for kind in ("good", "cut", "bad")}
        done = {kind: f"{sum(o.error is None for o in group)}/{len(group)}" for kind, group in counts.items()}
        ok = [o for o in counts["good"] if o.error is None]
        latencies = [o.latency for o in ok] or [float("nan")]
        firsts = [o.first_text for o in ok if o.first_text is not None] or [float("nan")]
        tokens = sum(o.tokens for o in ok)
        lines.append(
            f"{load.scheduler:<28} {done['good']:>5} {done['cut']:>5} {done['bad']:>5} {load.server_errors:>3.0f} "
            f"{'yes' if load.idle else 'NO':>4} {len(ok) / load.wall:>6.2f} {percentile(latencies, 50):>6.1f} "
            f"{percentile(latencies, 95):>6.1f} {percentile(firsts, 50):>16.1f} {tokens / load.wall:>8.1f} "
            f"{load.passes:>6.0f} {load.rows / max(load.passes, 1):>9.2f}"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=32, help=f"concurrent requests (at most {MAX_REQUESTS})")
    parser.add_argument("--tokens", type=int, default=32, help="max_tokens of plain requests, budget of the others")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the servers started here")
    parser.add_argument("--timeout", type=float, default=600, help="seconds each request may take")
    parser.add_argument("--url", help="measure this running server (loopback only) instead of starting two")
    parser.add_argument(
        "--replicas", type=int, help="compare one engine, `serve --ray --replicas 1` and `--ray --replicas N`"
    )
    parser.add_argument("--json", action="store_true", help="also print each load's outcomes as JSON")
    parser.add_argument("server_args", nargs="*", help="extra `hogwild serve` arguments, after --")
    args = parser.parse_args()
    if not 1 <= args.requests <= MAX_REQUESTS:
        parser.error(f"--requests must be between 1 and {MAX_REQUESTS}")
    loads = []
    if args.url:
        if not is_loopback(urlparse(args.url).hostname or ""):
            parser.error("--url must be a loopback address (127.0.0.0/8, ::1 or localhost)")
        loads.append(
            asyncio.run(run_load(args.url.rstrip("/"), "given server", args.requests, args.tokens, args.timeout))
        )
    else:
        servers = [("all runs batched", 0, []), ("one at a time (--max-runs 1)", 1, [])]
        if args.replicas is not None:
            if args.replicas < 1:
                parser.error("--replicas must be >= 1")
            ray = ["--ray", "--replicas"]
            servers = [("one engine", 0, []), ("Ray, 1 replica", 0, [*ray, "1"])]
            servers += [(f"Ray, {args.replicas} replicas", 0, [*ray, str(args.replicas)])] * (args.replicas > 1)
        for scheduler, max_runs, extra in servers:
            port = free_port()
            print(f"load_test: {scheduler}: starting a server on 127.0.0.1:{port}", file=sys.stderr)
            server = start_server(port, args.threads, max_runs, [*extra, *args.server_args])
            try:
                url = f"http://127.0.0.1:{port}"
                loads.append(asyncio.run(run_load(url, scheduler, args.requests, args.tokens, args.timeout)))
            finally:
                server.terminate()
                server.wait(timeout=30)
    print(table(loads, args))
    failed = [
        f"{load.scheduler}: a {o.kind} request (workers={o.workers}) failed: {o.error}"
        for load in loads
        for o in load.outcomes
        if o.error
    ]
    failed += [f"{load.scheduler}: the KV cache did not go back to idle" for load in loads if not load.idle]
    failed += [f"{load.scheduler}: {load.server_errors:.0f} responses were 5xx" for load in loads if load.server_errors]
    for line in failed:
        print(f"load_test: {line}", file=sys.stderr)
    if args.json:
        print(
            json.dumps(
                [{"scheduler": load.scheduler, "outcomes": [o.__dict__ for o in load.outcomes]} for load in loads]
            )
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
