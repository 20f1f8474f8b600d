"""The OpenAI-compatible server, live on loopback, through the official `openai` client and raw HTTP.

A tiny random model serves most tests (the protocol, not the model's quality, is under test): a streamed reply
equals the same seeded run unstreamed, a plain reply equals the engine's own run, bad input gets OpenAI error
bodies, a request gets 429 only when its run would wait behind a full queue, a client that goes away frees its KV
blocks. One bad request never stops the engine: a run that fails ends alone while the others finish, and only a
failing forward pass stops the server (which exits non-zero). One test asks the real default model.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from serving import live_server
from tiny import tiny_engine

from hogwild import engine as engine_module
from hogwild.cli import main
from hogwild.collab import prompts
from hogwild.engine import Engine, EngineConfig
from hogwild.errors import HogwildError
from hogwild.runs import Sampled
from hogwild.sampling import SamplingParams, sample_rows
from hogwild.server import command
from hogwild.server.app import create_app
from hogwild.server.config import ServerConfig

torch.set_num_threads(1)
MODEL = "smollm2-135m"
QUESTION = [{"role": "user", "content": "What is 2 + 3? Answer in \\boxed{}."}]


@pytest.fixture(scope="module")
def live(tokenizer):
    with live_server(tiny_engine(tokenizer)) as server:
        yield server


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def hogwild_of(obj) -> dict | None:
    return (obj.model_extra or {}).get("hogwild")


def chat(client, stream: bool, workers: int | None, **kwargs):
    extra = {"workers": workers, "budget": 24} if workers else {}
    return client.chat.completions.create(
        model=MODEL, messages=QUESTION, stream=stream, extra_body=extra or None, **kwargs
    )


def complete(client, stream: bool, workers: int | None, **kwargs):
    extra = {"workers": workers, "budget": 24} if workers else {}
    return client.completions.create(
        model=MODEL, prompt="Once upon a time", stream=stream, extra_body=extra or None, **kwargs
    )


def read_stream(chunks, kind: str) -> dict:
    """A stream's content per choice, worker texts, finish reasons and usage."""
    content: dict[int, str] = {}
    workers: dict[int, str] = {}
    finish: dict[int, str] = {}
    usage, done = None, None
    for chunk in chunks:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text = choice.delta.content if kind == "chat" else choice.text
            content[choice.index] = content.get(choice.index, "") + (text or "")
            event = hogwild_of(choice.delta if kind == "chat" else choice)
            if event and event["type"] == "text":
                workers[event["worker"]] = workers.get(event["worker"], "") + event["text"]
            if event and event["type"] == "done":
                done = event
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    return {"content": content, "workers": workers, "finish": finish, "usage": usage, "done": done}


@pytest.mark.parametrize("kind", ["chat", "completion"])
@pytest.mark.parametrize("workers", [None, 1, 2])
def test_streamed_reply_equals_the_unstreamed_one(client, kind, workers):
    ask = chat if kind == "chat" else complete
    seeded = dict(seed=7, temperature=0.9, max_tokens=12)
    whole = ask(client, False, workers, **seeded)
    streamed = read_stream(ask(client, True, workers, stream_options={"include_usage": True}, **seeded), kind)
    (choice,) = whole.choices
    text = choice.message.content if kind == "chat" else choice.text
    assert streamed["content"] == {0: text}
    assert streamed["finish"] == {0: choice.finish_reason}
    assert streamed["usage"].model_dump() == whole.usage.model_dump()
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    assert whole.usage.prompt_tokens > 0 and whole.usage.completion_tokens > 0
    if workers is None:
        assert choice.finish_reason in ("stop", "length") and streamed["workers"] == {}
        assert whole.usage.completion_tokens <= 12
        return
    # a collaboration: the content is the answer and the words it came from, readable by any client; the stream
    # spells out each worker's whole transcript
    result = hogwild_of(choice.message if kind == "chat" else choice)
    assert text == result["content"] and text.startswith(result["answer"] or "No answer in")
    assert streamed["done"]["answer"] == result["answer"]
    assert streamed["workers"] == {w: worker["text"] for w, worker in enumerate(result["workers"])}
    assert len(result["workers"]) == workers and all(worker["text"] for worker in result["workers"])
    assert whole.usage.completion_tokens >= sum(worker["tokens"] for worker in result["workers"])


def test_samples_equal_the_engines_own_run(client, tokenizer):
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=3, max_tokens=6, stop=("\n\n",))
    whole = client.chat.completions.create(
        model=MODEL, messages=QUESTION, n=3, seed=3, top_p=0.9, max_tokens=6, stop="\n\n"
    )
    alone = tiny_engine(tokenizer)  # the same seeded weights
    prompt = tokenizer.encode_chat(QUESTION)
    run = Sampled(alone, prompt, params, n=3)
    list(alone.stream(run))
    expected = run.final.samples
    assert [c.message.content for c in whole.choices] == [s.text for s in expected]
    assert [c.finish_reason for c in whole.choices] == [s.finish_reason for s in expected]
    assert whole.usage.prompt_tokens == len(prompt)
    assert whole.usage.completion_tokens == sum(len(s.tokens) for s in expected)


def test_stop_strings_and_max_tokens(client):
    greedy = client.completions.create(model=MODEL, prompt="1, 2, 3,", max_tokens=20, temperature=0)
    text = greedy.choices[0].text
    assert greedy.usage.completion_tokens == 20 or greedy.choices[0].finish_reason == "stop"
    stop = text[6:9]
    assert stop, f"the greedy reply is too short to cut: {text!r}"
    cut = client.completions.create(model=MODEL, prompt="1, 2, 3,", max_tokens=20, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    short = client.completions.create(model=MODEL, prompt="1, 2, 3,", max_tokens=3, temperature=0)
    if short.choices[0].finish_reason == "length":
        assert short.usage.completion_tokens == 3
    default = client.completions.create(model=MODEL, prompt="1, 2, 3,", temperature=0)  # OpenAI's default: 16
    assert default.usage.completion_tokens == 16 or default.choices[0].finish_reason == "stop"


def post(live, path: str, body, **headers) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"content-type": "application/json", **headers}
    return httpx.post(live.url + path, content=content, headers=headers, timeout=60)


def test_bad_requests_get_openai_errors_and_the_server_goes_on(live):
    good = {"model": MODEL, "messages": QUESTION, "max_tokens": 4}
    long_prompt = "hello " * 5000  # the tiny model's context is 4096 tokens
    cases = [
        ("/v1/chat/completions", b"{not json", 400, "invalid_json", None),
        ("/v1/chat/completions", {"model": MODEL}, 400, None, "messages"),
        ("/v1/chat/completions", {**good, "messages": []}, 400, None, "messages"),
        ("/v1/chat/completions", {**good, "model": "gpt-4"}, 404, "model_not_found", "model"),
        ("/v1/chat/completions", {**good, "workers": 0}, 400, None, "workers"),
        ("/v1/chat/completions", {**good, "workers": 17}, 400, None, "workers"),
        ("/v1/chat/completions", {**good, "workers": 2, "layout": "spiral"}, 400, None, "layout"),
        ("/v1/chat/completions", {**good, "workers": 2, "n": 2}, 400, None, "n"),
        ("/v1/chat/completions", {**good, "budget": 64}, 400, None, "budget"),
        ("/v1/chat/completions", {**good, "max_tokens": 10**6}, 400, "context_length_exceeded", "max_tokens"),
        ("/v1/chat/completions", {**good, "temperature": 3}, 400, None, "temperature"),
        ("/v1/chat/completions", {**good, "stop": ["a", "b", "c", "d", "e"]}, 400, None, "stop"),
        ("/v1/chat/completions", {**good, "messages": [{"role": "user", "content": long_prompt}]}, 400,
         "context_length_exceeded", "messages"),
        ("/v1/completions", {"model": MODEL, "prompt": long_prompt}, 400, "context_length_exceeded", "prompt"),
        ("/v1/completions", {"model": MODEL}, 400, None, "prompt"),
        ("/v1/completions", {"model": MODEL, "prompt": ["a", ""]}, 400, None, "prompt"),
        ("/v1/completions", [1, 2], 400, None, None),
        ("/v1/chat/completions", b"x" * (10 * 2**20), 413, "request_too_large", None),
        ("/v1/nothing", good, 404, None, None),
    ]  # fmt: skip
    for path, body, status, code, param in cases:
        response = post(live, path, body)
        assert response.status_code == status, (body if not isinstance(body, bytes) else body[:20], response.text)
        error = response.json()["error"]
        assert error["message"] and error["type"], error
        if code:
            assert error["code"] == code, error
        if param:
            assert error["param"] == param, error
    assert post(live, "/v1/chat/completions", good).status_code == 200
    assert live.metric("hogwild_requests_total", endpoint="/v1/chat/completions", status="413") >= 1
    live.wait_idle()


def test_a_request_larger_than_the_kv_budget_is_refused(tokenizer):
    with live_server(tiny_engine(tokenizer, kv_memory="1MiB")) as live:  # 2048 tokens of the tiny model's KV
        body = {"model": MODEL, "messages": QUESTION, "max_tokens": 3000}  # within the 4096-token context
        response = post(live, "/v1/chat/completions", body)
        assert response.status_code == 400 and "KV" in response.json()["error"]["message"], response.text
        assert post(live, "/v1/chat/completions", {**body, "max_tokens": 8}).status_code == 200


def read_sse(response: httpx.Response) -> tuple[list[dict], bool]:
    """A stream's chunks and whether it ended with `data: [DONE]`."""
    chunks, done = [], False
    for line in response.iter_lines():
        if line == "data: [DONE]":
            done = True
        elif line.startswith("data: "):
            chunks.append(json.loads(line[6:]))
    return chunks, done


class Stream(threading.Thread):
    """Another client's streaming request, read to its end in a thread."""

    def __init__(self, live, body: dict) -> None:
        super().__init__()
        self.live, self.body = live, body
        self.chunks: list[dict] = []
        self.done = False
        self.start()

    def run(self) -> None:
        with httpx.stream("POST", self.live.url + "/v1/chat/completions", json=self.body, timeout=60) as response:
            self.chunks, self.done = read_sse(response)

    def whole(self) -> bool:
        self.join(timeout=60)
        finish = [c["choices"][0]["finish_reason"] for c in self.chunks if c.get("choices")]
        return self.done and not any("error" in c for c in self.chunks) and finish[-1] in ("stop", "length")


def test_an_out_of_range_seed_is_refused_while_another_stream_goes_on(live):
    other = Stream(live, {"model": MODEL, "messages": QUESTION, "max_tokens": 200, "stream": True, "seed": 1})
    for seed in (2**64, 2**63, -1, -(2**63) - 1):
        response = post(live, "/v1/chat/completions", {"model": MODEL, "messages": QUESTION, "seed": seed})
        assert response.status_code == 400 and response.json()["error"]["param"] == "seed", response.text
    assert other.whole(), other.chunks[-1:]
    good = {"model": MODEL, "messages": QUESTION, "max_tokens": 3, "seed": 2**63 - 1}
    assert post(live, "/v1/chat/completions", good).status_code == 200
    assert httpx.get(live.url + "/health").json()["status"] == "ok"


def test_a_fault_in_one_runs_sampling_ends_that_run_alone(live, monkeypatch):
    """The test hook: sampling raises for any batch holding a row seeded 666, as a broken sampler would. The other
    run's first sampling waits until the bad request is submitted, so the fault comes in a batch they share."""
    loop = live.server.backend.loop
    submit, bad_submitted = loop.submit, threading.Event()
    batches = []

    def submit_and_tell(run, aio=None):
        ticket = submit(run, aio)
        if isinstance(run, Sampled) and run.params.seed == 666:
            bad_submitted.set()
        return ticket

    def faulty(logits, params, generators, kernels=None):
        seeds = sorted(p.seed for p in params if p.seed is not None)
        batches.append(seeds)
        if 666 in seeds:
            raise RuntimeError("a secret detail of a broken sampler")
        if seeds == [1]:
            bad_submitted.wait(timeout=60)  # on the engine thread: the bad run is added before the next step
        return sample_rows(logits, params, generators, kernels)

    monkeypatch.setattr(loop, "submit", submit_and_tell)
    monkeypatch.setattr(engine_module, "sample_rows", faulty)
    other = Stream(live, {"model": MODEL, "messages": QUESTION, "max_tokens": 200, "stream": True, "seed": 1})
    bad = {"model": MODEL, "messages": QUESTION, "max_tokens": 50, "seed": 666}
    response = post(live, "/v1/chat/completions", bad)
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["code"] == "run_failed" and "request id" in error["message"] and "secret" not in response.text
    with httpx.stream("POST", live.url + "/v1/chat/completions", json={**bad, "stream": True}, timeout=60) as streamed:
        chunks, _ = read_sse(streamed)
    assert chunks[-1]["error"]["code"] == "run_failed"
    assert other.whole(), other.chunks[-1:]
    assert [1, 666] in batches, "the bad run never shared a batch with the other one"
    live.wait_idle()  # the failed runs' blocks were freed
    assert post(live, "/v1/chat/completions", {**bad, "seed": 5}).status_code == 200
    assert httpx.get(live.url + "/health").json()["status"] == "ok"
    assert live.metric("hogwild_requests_total", endpoint="/v1/chat/completions", status="500") == 1


def test_a_failing_forward_pass_stops_the_server(tokenizer, monkeypatch):
    engine = tiny_engine(tokenizer)

    def broken(rows, wanted):
        raise RuntimeError("a secret detail of a broken forward pass")

    with live_server(engine) as live:
        stopped = []
        stop, live.server.stop_serving = live.server.stop_serving, lambda: stopped.append(True)
        monkeypatch.setattr(engine, "run_model", broken)
        response = post(live, "/v1/chat/completions", {"model": MODEL, "messages": QUESTION, "max_tokens": 3})
        assert response.status_code == 500 and response.json()["error"]["code"] == "engine_failed"
        health = httpx.get(live.url + "/health")
        assert health.status_code == 503 and "restarted" in health.json()["error"] and "secret" not in health.text
        assert stopped == [True] and live.server.failed
        stop()  # what `serve` wires up: uvicorn shuts down
        live.thread.join(timeout=10)
        assert not live.thread.is_alive()


def test_serve_exits_non_zero_when_the_engine_fails(tokenizer, monkeypatch):
    engine = tiny_engine(tokenizer)
    monkeypatch.setattr(engine, "run_model", lambda rows, wanted: 1 / 0)
    app = create_app(engine, ServerConfig(port=0))

    def fail_once_started() -> None:
        while app.state.server.backend.loop is None:
            threading.Event().wait(0.01)
        app.state.server.backend.loop.submit(Sampled(engine, [1, 2, 3], SamplingParams(max_tokens=2)))

    threading.Thread(target=fail_once_started, daemon=True).start()
    assert command._run(app, app.state.server.config) == 1


def test_a_temperature_too_small_to_divide_by_samples_greedily(client):
    greedy = complete(client, False, None, temperature=0, max_tokens=12).choices[0].text
    for temperature in (1e-38, 1e-45, 1e-6):
        tiny = complete(client, False, None, temperature=temperature, seed=3, max_tokens=12).choices[0].text
        assert tiny == greedy, temperature


def test_admission_follows_the_kv_budget(tokenizer):
    """A burst of small requests that the KV budget holds all starts at once, whatever --max-queue says."""
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 4}
    for max_queue in (2, 0):
        with live_server(tiny_engine(tokenizer), max_queue=max_queue) as live:
            with ThreadPoolExecutor(8) as pool:
                statuses = list(pool.map(lambda _: post(live, "/v1/chat/completions", body).status_code, range(8)))
            assert statuses == [200] * 8, (max_queue, statuses)


def test_a_stopped_engine_answers_503(tokenizer):
    with live_server(tiny_engine(tokenizer)) as live:
        live.server.backend.loop.close()
        assert httpx.get(live.url + "/health").status_code == 503
        response = post(live, "/v1/chat/completions", {"model": MODEL, "messages": QUESTION, "max_tokens": 2})
        assert response.status_code == 503 and "stopped" in response.json()["error"]["message"]


def test_api_key(tokenizer):
    with live_server(tiny_engine(tokenizer), api_key="sesame") as live:
        body = {"model": MODEL, "messages": QUESTION, "max_tokens": 2}
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "sesame"}):
            response = post(live, "/v1/chat/completions", body, **headers)
            assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        for path in ("/v1/models", "/health", "/metrics"):
            assert httpx.get(live.url + path).status_code == 401, path
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="sesame", max_retries=0)
        assert client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=2).choices
        assert httpx.get(live.url + "/health", headers=live.headers).json()["status"] == "ok"
        assert live.metric("hogwild_requests_total", endpoint="/health", status="401") == 1


def test_the_key_from_a_file_or_the_environment(tmp_path, monkeypatch, capsys):
    key_file = tmp_path / "key"
    key_file.write_text("from-a-file\n")
    args = type("Args", (), {"api_key": None, "api_key_file": key_file})
    assert command.api_key(args) == "from-a-file"
    monkeypatch.setenv("HOGWILD_API_KEY", "from-the-env")
    args.api_key_file = None
    assert command.api_key(args) == "from-the-env"
    args.api_key = "given"
    assert command.api_key(args) == "given"
    args.api_key_file = key_file
    with pytest.raises(HogwildError, match="once"):
        command.api_key(args)
    args.api_key, args.api_key_file = None, tmp_path / "missing"
    with pytest.raises(HogwildError, match="cannot read"):
        command.api_key(args)
    # without a key an open host is refused before the model loads
    monkeypatch.delenv("HOGWILD_API_KEY")
    assert main(["serve", "--host", "192.168.1.5", "--port", "1"]) == 2
    assert "without an API key" in capsys.readouterr().err


def test_open_hosts_need_a_key_or_insecure(capsys):
    with pytest.raises(HogwildError, match="--api-key"):
        ServerConfig(host="0.0.0.0")
    ServerConfig(host="0.0.0.0", api_key="k")
    ServerConfig(host="0.0.0.0", insecure=True)
    ServerConfig(host="::1")
    ServerConfig(host="localhost")
    assert main(["serve", "--host", "192.168.1.5", "--port", "1"]) == 2
    assert "without an API key" in capsys.readouterr().err


def stream_lines(response: httpx.Response):
    for line in response.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[6:])


def test_a_client_that_disconnects_cancels_its_run(live):
    assert live.metric("hogwild_kv_bytes_in_use") == 0
    body = {"model": MODEL, "messages": QUESTION, "workers": 2, "budget": 3000, "stream": True, "temperature": 0}
    with httpx.stream("POST", live.url + "/v1/chat/completions", json=body, timeout=60) as response:
        texts = 0
        for chunk in stream_lines(response):
            event = chunk["choices"][0]["delta"].get("hogwild") or {}
            texts += event.get("type") == "text"
            if texts == 20:
                assert live.metric("hogwild_kv_bytes_in_use") > 0 and live.metric("hogwild_running_runs") == 1
                break  # leaving the stream's iterator closes the connection
    live.wait_idle()  # the run was cancelled: its blocks are free, well before 3000 passes
    passes = live.server.backend.engine.stats.steps
    assert live.metric("hogwild_forward_passes_total") == passes
    # a non-streaming request whose client gives up is cancelled too (499 in the metrics)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(live.url + "/v1/chat/completions", json={**body, "stream": False}, timeout=0.5)
    live.wait_idle()
    assert live.metric("hogwild_requests_total", endpoint="/v1/chat/completions", status="499") == 1
    assert not live.server.backend.requests


def test_a_full_queue_answers_429(tokenizer):
    with live_server(tiny_engine(tokenizer, max_runs=1), max_queue=1) as live:
        long = {"model": MODEL, "messages": QUESTION, "workers": 2, "budget": 3000, "stream": True}
        with httpx.stream("POST", live.url + "/v1/chat/completions", json=long, timeout=60) as first:
            lines = stream_lines(first)  # kept referenced: a closed iterator would close the connection
            next(c for c in lines if c["choices"][0]["delta"].get("hogwild", {}).get("type") == "text")
            short = {"model": MODEL, "messages": QUESTION, "max_tokens": 3, "stream": True}
            with httpx.stream("POST", live.url + "/v1/chat/completions", json=short, timeout=60) as second:
                assert second.status_code == 200
                assert live.metric("hogwild_queue_length") == 1  # waiting for the one run slot
                third = post(live, "/v1/chat/completions", {**short, "stream": False})
                assert third.status_code == 429 and third.headers["retry-after"].isdigit()
                assert third.json()["error"]["code"] == "queue_full"
                first.close()  # the first client leaves: its run is cancelled and the second one starts
                chunks = list(stream_lines(second))
        assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
        live.wait_idle()
        assert live.metric("hogwild_queue_length") == 0


def test_models_health_metrics_and_page(live, client):
    (card,) = client.models.list().data
    assert card.id == MODEL and card.model_extra["hogwild"]["max_workers"] == 16
    ext = card.model_extra["hogwild"]
    assert ext["openings"] == list(prompts.OPENINGS) and ext["defaults"]["opening"] == "crosscheck"
    # a request picks the opening: the plan's steps open with headers, the default cross-check's solutions do not
    for opening, headed in (("plan", True), (None, False)):
        extra = {"workers": 2, "budget": 8} | ({"opening": opening} if opening else {})
        reply = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, extra_body=extra)
        workers = hogwild_of(reply.choices[0].message)["workers"]
        assert [w["text"].startswith(f"**{w['name']} [1]:**") for w in workers] == [headed, headed]
    assert httpx.get(live.url + "/health").json()["status"] == "ok"
    before = live.metrics()
    reply = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=5, temperature=0)
    after = live.metrics()

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("hogwild_requests_total", endpoint="/v1/chat/completions", status="200") == 1
    assert delta("hogwild_completion_tokens_total") == reply.usage.completion_tokens
    assert delta("hogwild_prompt_tokens_total") == reply.usage.prompt_tokens
    assert delta("hogwild_forward_passes_total") >= reply.usage.completion_tokens
    assert delta("hogwild_rows_per_step_count") == delta("hogwild_forward_passes_total")
    assert delta("hogwild_rows_total") == delta("hogwild_rows_per_step_sum")
    assert after[("hogwild_kv_bytes_budget", ())] == live.server.backend.engine.pool.budget_bytes
    page = httpx.get(live.url + "/")
    assert page.status_code == 200 and "/static/app.js" in page.text
    for asset in ("app.js", "style.css"):
        served = httpx.get(f"{live.url}/static/{asset}")
        assert served.status_code == 200
    for text in (page.text, httpx.get(live.url + "/static/app.js").text):
        assert "http://" not in text and "https://" not in text, "the page must work offline"


def test_the_default_model_through_the_openai_client():
    engine = Engine.load(EngineConfig(threads=1, kv_memory="1GiB"))
    capital = [{"role": "user", "content": "What is the capital of France?"}]
    # the server's greedy reply is the engine's own (the 135M on its Q4_1 blocks with 8-bit activations says
    # "L'Étoile, ..." here, as llama.cpp does on the same file; its float weights say "Paris")
    ids = engine.tokenizer.encode_chat(capital)
    own = engine.tokenizer.decode(list(engine.generate(ids, SamplingParams(temperature=0, max_tokens=10))))
    with live_server(engine) as live:
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        reply = client.chat.completions.create(model=MODEL, messages=capital, max_tokens=10, temperature=0)
        assert reply.choices[0].message.content == own and len(own) > 5
        both = read_stream(chat(client, True, 2, temperature=0), "chat")
        assert set(both["workers"]) == {0, 1} and all(both["workers"].values())
        assert both["done"]["forward_passes"] > 0
