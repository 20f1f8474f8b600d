"""Hostile-but-fair input against one live loopback server (tiny random model), through raw HTTP.

A generated corpus of bad requests (every field with each wrong JSON type, out-of-range and oversized values,
invalid Unicode, deep nesting, fields hogwild does not implement, bodies that are not JSON) gets only 4xx OpenAI
error bodies, and the server answers a valid request after each tenth of them. Web pages cannot drive a key-less
loopback server: a cross-site `text/plain` POST, a foreign `Origin` and a rebound `Host` are refused, the server's
own page origin is not. An unexpected exception is a 500 JSON body with a request id, counted in the metrics.
"""

from __future__ import annotations

import json
import socket

import httpx
import pytest
import torch
from serving import live_server
from tiny import tiny_engine

torch.set_num_threads(1)
MODEL = "smollm2-135m"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
COMPLETION = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}
SURROGATE = "\ud800"  # json.dumps writes it as the escape "\\ud800": valid JSON, not valid Unicode

# one value of each JSON type
VALUES = {"string": "2", "integer": 2, "number": 1.5, "bool": True, "null": None, "list": [1], "object": {"a": 1}}
# the JSON types each field takes (a number field takes integers too); null where the field may be left out
FIELDS = {
    "model": {"string"},
    "n": {"integer"},
    "temperature": {"number", "integer"},
    "top_p": {"number", "integer"},
    "top_k": {"integer"},
    "max_tokens": {"integer", "null"},
    "seed": {"integer", "null"},
    "stream": {"bool"},
    "stop": {"string", "null"},  # a list of strings too (the list here holds a number)
    "stream_options": {"object", "null"},  # the object here lacks nothing and has an unknown key
    "workers": {"integer", "null"},
    "layout": {"null"},
    "mode": {"null"},
    "budget": {"null"},
    "opening": {"null"},
    "hogwild": {"null"},  # the reply's extension object: in a request its fields go at the top level
}
CHAT_FIELDS = {
    "messages": set(),
    "logprobs": {"bool"},
    "top_logprobs": {"null"},
    "max_completion_tokens": {"integer", "null"},
}
COMPLETION_FIELDS = {"prompt": {"string", "list"}, "logprobs": {"integer", "null"}, "echo": {"bool"}}


def nested(good: dict, name: str, depth: int, inside=lambda deep: deep) -> bytes:
    """`good` with field `name` holding a string `depth` lists deep (`inside` wraps it), written as JSON."""
    body = json.dumps({**good, name: inside("DEEP")})
    return body.replace('"DEEP"', "[" * depth + '"x"' + "]" * depth).encode()


def corpus() -> list[tuple[str, object, str | None]]:
    """(path, body, the param the error must name, or None: any) for every bad request."""
    cases: list[tuple[str, object, str | None]] = []
    kinds = (("/v1/chat/completions", CHAT, CHAT_FIELDS), ("/v1/completions", COMPLETION, COMPLETION_FIELDS))
    for path, good, own in kinds:
        for name, takes in {**FIELDS, **own}.items():
            for kind, value in VALUES.items():
                if kind not in takes and not (name == "stream_options" and kind == "object"):
                    cases.append((path, {**good, name: value}, name))
    chat = "/v1/chat/completions"
    ranges = {
        "n": [0, -1, 17, 10**30],
        "temperature": [-0.1, 2.1, 1e308],
        "top_p": [-0.5, 1.5],
        "top_k": [-1],
        "max_tokens": [0, -1, 10**30],
        "seed": [-1, 2**63, 2**64, -(2**63) - 1, 10**30],
        "workers": [0, -1, 17, 10**30],
        "budget": [0, -5],
        "top_logprobs": [-1, 21],
    }
    for name, values in ranges.items():
        for value in values:
            extra = {"logprobs": True} if name == "top_logprobs" else {"workers": 2} if name == "budget" else {}
            cases.append((chat, {**CHAT, **extra, name: value}, name))
    cases += [
        (chat, {**CHAT, "top_logprobs": 2}, "top_logprobs"),  # without logprobs
        (chat, {**CHAT, "workers": 2, "layout": "spiral"}, "layout"),
        (chat, {**CHAT, "workers": 2, "mode": "chaos"}, "mode"),
        (chat, {**CHAT, "budget": 64}, "budget"),  # without workers
        (chat, {**CHAT, "workers": 2, "opening": "debate"}, "opening"),
        (chat, {**CHAT, "opening": "plan"}, "opening"),  # without workers
        (chat, {**CHAT, "workers": 2, "n": 2}, "n"),
        (chat, {**CHAT, "workers": 2, "logprobs": True}, "logprobs"),
        (chat, {**CHAT, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        (chat, {**CHAT, "stop": [""]}, "stop"),
        (chat, {**CHAT, "stop": ["a", 1]}, "stop"),
        (chat, {**CHAT, "messages": []}, "messages"),
        (chat, {**CHAT, "messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
        (chat, {**CHAT, "messages": [{"content": "x"}]}, "messages.0.role"),
        (chat, {**CHAT, "messages": [{"role": "user", "content": [{"type": "image", "text": "x"}]}]}, None),
        (chat, {**CHAT, "messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
        (chat, {**CHAT, "model": "gpt-4"}, "model"),
        (chat, {**CHAT, "model": "m" * 100_000}, "model"),
        (chat, {**CHAT, "messages": [{"role": "user", "content": "hello " * 5000}]}, "messages"),
        (chat, {**CHAT, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
        ("/v1/completions", {**COMPLETION, "prompt": ""}, "prompt"),
        ("/v1/completions", {**COMPLETION, "prompt": []}, "prompt"),
        ("/v1/completions", {**COMPLETION, "prompt": [[]]}, "prompt"),
        ("/v1/completions", {**COMPLETION, "prompt": [-1]}, "prompt"),
        ("/v1/completions", {**COMPLETION, "prompt": [10**9]}, "prompt"),
        ("/v1/completions", {**COMPLETION, "prompt": ["a", ""]}, "prompt"),
        ("/v1/completions", {**COMPLETION, "prompt": ["a"] * 65}, "prompt"),
        ("/v1/completions", {**COMPLETION, "prompt": [1, "a"]}, "prompt"),
        ("/v1/completions", {**COMPLETION, "logprobs": 21}, "logprobs"),
        ("/v1/completions", {**COMPLETION, "prompt": ["a", "b"], "workers": 2}, "prompt"),
        ("/v1/completions", {**COMPLETION, "echo": True, "workers": 2}, "echo"),
    ]
    # invalid Unicode wherever text goes in, a collaboration's problem included
    cases += [
        (chat, {**CHAT, "messages": [{"role": "user", "content": SURROGATE}]}, "messages.0.content"),
        (chat, {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": "a" + SURROGATE}]}]},
         "messages.0.content.0.text"),
        (chat, {**CHAT, "workers": 2, "messages": [{"role": "user", "content": SURROGATE}]}, "messages.0.content"),
        (chat, {**CHAT, "stop": SURROGATE}, "stop"),
        (chat, {**CHAT, "stop": ["a", SURROGATE]}, "stop.1"),
        (chat, {**CHAT, "model": SURROGATE}, "model"),
        (chat, {**CHAT, "workers": 2, "layout": SURROGATE}, "layout"),
        ("/v1/completions", {**COMPLETION, "prompt": SURROGATE}, "prompt"),
        ("/v1/completions", {**COMPLETION, "prompt": ["a", SURROGATE]}, "prompt.1"),
        ("/v1/completions", {**COMPLETION, "workers": 2, "prompt": "x" + SURROGATE}, "prompt"),
    ]  # fmt: skip
    # nesting: deeper than the JSON parser goes (even in a field hogwild ignores), and deep but parseable
    cases += [
        (chat, nested(CHAT, "user", 1000), None),
        (chat, nested(CHAT, "messages", 1000), None),
        ("/v1/completions", nested(COMPLETION, "prompt", 1000), None),
        (chat, nested(CHAT, "messages", 500, lambda deep: [{"role": "user", "content": deep}]), "messages.0.content"),
        ("/v1/completions", nested(COMPLETION, "prompt", 500), "prompt"),
        (chat, nested(CHAT, "stop", 500), "stop"),
    ]
    # OpenAI fields hogwild does not implement, asking for something
    unsupported = {
        "tools": [{"type": "function", "function": {"name": "f"}}],
        "tool_choice": "required",
        "functions": [{"name": "f"}],
        "function_call": {"name": "f"},
        "response_format": {"type": "json_object"},
        "logit_bias": {"1": 5},
        "presence_penalty": 0.5,
        "frequency_penalty": 1,
        "best_of": 2,
        "audio": {"voice": "alloy"},
    }
    cases += [(chat, {**CHAT, name: value}, name) for name, value in unsupported.items()]
    cases.append(("/v1/completions", {**COMPLETION, "suffix": "the end"}, "suffix"))
    # bodies that are not a JSON object
    raw = [
        b"",
        b"{not json",
        b'{"model": NaN}',
        b'{"temperature": Infinity}',
        b'{"max_tokens": ' + b"9" * 5000 + b"}",
        b'{"model": "\xff\xfe"}',
        b"[1, 2]",
        b'"a string"',
        b"null",
        json.dumps(CHAT).encode() + b" trailing",
    ]
    cases += [(chat, body, None) for body in raw]
    return cases


@pytest.fixture(scope="module")
def live(tokenizer):
    with live_server(tiny_engine(tokenizer)) as server:
        yield server


def post(url: str, body: object, **headers: str) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(url, content=content, headers={"content-type": "application/json", **headers}, timeout=60)


def test_a_corpus_of_bad_requests_gets_only_4xx_json_errors(live):
    cases = corpus()
    assert len(cases) >= 100
    statuses = []
    for i, (path, body, param) in enumerate(cases, 1):
        response = post(live.url + path, body)
        shown = body[:60] if isinstance(body, bytes) else json.dumps(body)[:120]
        assert 400 <= response.status_code < 500, (shown, response.status_code, response.text[:300])
        assert response.headers["content-type"] == "application/json", (shown, response.text[:300])
        error = response.json()["error"]
        assert error["message"] and error["type"], (shown, error)
        assert "Traceback" not in error["message"] and "Error(" not in error["message"], error
        if param is not None:  # the field, or a place inside it
            assert error["param"] == param or error["param"].startswith(param + "."), (shown, error)
        statuses.append(response.status_code)
        if i % 10 == 0:
            assert post(live.url + "/v1/chat/completions", CHAT).status_code == 200, f"after bad request {i}"
    assert set(statuses) <= {400, 404, 413}
    metrics = live.metrics()
    errors = {labels: value for (name, labels), value in metrics.items() if name == "hogwild_requests_total"}
    counted = sum(v for labels, v in errors.items() if dict(labels)["status"].startswith("4"))
    assert counted >= len(cases)
    assert not any(dict(labels)["status"].startswith("5") for labels in errors), errors
    live.wait_idle()
    assert live.metric("hogwild_kv_bytes_in_use") == 0


def test_the_extension_object_in_a_request_says_where_its_fields_go(live):
    """A client that mirrors the reply's `hogwild` object in its request would otherwise get a plain generation."""
    response = post(live.url + "/v1/chat/completions", {**CHAT, "hogwild": {"workers": 2}})
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] == "hogwild", error
    assert "top level" in error["message"] and "workers" in error["message"], error


def test_web_pages_cannot_drive_the_server(live):
    url = live.url + "/v1/chat/completions"
    body = json.dumps(CHAT).encode()
    # a cross-site form or fetch without preflight: text/plain, from another origin
    cross = httpx.post(url, content=body, headers={"content-type": "text/plain", "origin": "https://evil.example"})
    assert cross.status_code == 403 and cross.json()["error"]["code"] == "origin_not_allowed"
    plain = httpx.post(url, content=body, headers={"content-type": "text/plain"})
    assert plain.status_code == 415 and plain.json()["error"]["code"] == "unsupported_media_type"
    assert post(url, CHAT, origin="https://evil.example").status_code == 403
    assert post(url, CHAT, origin="null").status_code == 403  # a sandboxed frame or a file
    # DNS rebinding: a name of the attacker's that resolves to 127.0.0.1
    for path in ("/v1/models", "/", "/health"):
        rebound = httpx.get(live.url + path, headers={"host": "rebind.evil.example"})
        assert rebound.status_code == 400 and rebound.json()["error"]["code"] == "host_not_allowed", path
    assert post(url, CHAT, host="rebind.evil.example:80").status_code == 400
    # the server's own page, by any of its loopback names
    port = live.url.rsplit(":", 1)[1]
    assert post(url, CHAT, origin=live.url).status_code == 200
    assert post(url, CHAT, host=f"localhost:{port}", origin=f"http://localhost:{port}").status_code == 200
    assert live.metric("hogwild_requests_total", endpoint="/v1/chat/completions", status="403") >= 3


def test_a_cors_origin_may_call_the_server(tokenizer):
    with live_server(tiny_engine(tokenizer), cors_origins=("https://app.example",)) as live:
        url = live.url + "/v1/chat/completions"
        preflight = httpx.options(
            url,
            headers={
                "origin": "https://app.example",
                "access-control-request-method": "POST",
                "access-control-request-headers": "content-type",
            },
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "https://app.example"
        allowed = post(url, CHAT, origin="https://app.example")
        assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == "https://app.example"
        assert post(url, CHAT, origin="https://other.example").status_code == 403


def test_an_unexpected_exception_is_a_500_json_body_with_a_request_id(live, monkeypatch):
    def broken(request):
        raise RuntimeError("a secret detail")

    monkeypatch.setattr(live.server, "models", broken)
    response = httpx.get(live.url + "/v1/models")
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["code"] == "internal_error" and response.headers["x-request-id"] in error["message"]
    assert "secret" not in response.text and "RuntimeError" not in response.text
    assert live.metric("hogwild_requests_total", endpoint="/v1/models", status="500") == 1


def test_head_where_get_is_and_405_says_allow(live):
    for path in ("/", "/health", "/v1/models", "/metrics", "/static/app.js"):
        head = httpx.head(live.url + path)
        assert head.status_code == 200 and head.content == b"", path
    wrong = httpx.post(live.url + "/health")
    assert wrong.status_code == 405 and "GET" in wrong.headers["allow"] and wrong.json()["error"]["message"]
    wrong = httpx.get(live.url + "/v1/chat/completions")
    assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"


def test_slow_headers_and_bodies_time_out(tokenizer):
    with live_server(tiny_engine(tokenizer), header_timeout_s=0.3, body_timeout_s=0.3) as live:
        host, port = live.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # the head never ends
            assert sock.recv(1024) == b"", "the server kept a connection whose headers never came"
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            head = "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            sock.sendall((head + "Content-Length: 100\r\n\r\n{").encode())  # 1 byte of 100
            reply = b""
            while b"}}" not in reply and (part := sock.recv(65536)):  # the head and the body may come apart
                reply += part
            reply = reply.decode()
        assert reply.startswith("HTTP/1.1 408") and "request_timeout" in reply
        assert httpx.get(live.url + "/health").status_code == 200
