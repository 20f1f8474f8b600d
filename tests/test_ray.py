"""Ray: `hogwild eval --ray` and `hogwild serve --ray` on a real local cluster (2 CPUs, no dashboard), with the tiny
random model written to a folder so each actor loads it as a user's model would be loaded.

An eval over 2 actors writes the same results.jsonl as the same eval in one process, problem for problem; an actor
killed mid-eval has its problems finished by the other, each counted once; 2 replicas behind one endpoint take two
of four concurrent requests each, cancel the runs of clients that leave, and answer as one engine in this process
does, streamed or not, and the page over them shows what the API gives; without Ray installed, or with a bad flag,
--ray is one line and exit 2.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from contextlib import ExitStack

import httpx
import openai
import pytest
import torch
from serving import live_server
from tiny import tiny_model_folder

from hogwild.cli import main
from hogwild.cluster import Cluster
from hogwild.engine import Engine, EngineConfig
from hogwild.eval import tasks
from hogwild.eval.cluster import RayEval
from hogwild.eval.runner import EvalConfig, make_jobs, run_jobs
from hogwild.server.config import ServerConfig
from hogwild.server.replicas import Replicas

ray = pytest.importorskip("ray")
torch.set_num_threads(1)
QUESTION = [{"role": "user", "content": "What is 2 + 3? Answer in \\boxed{}."}]


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield Cluster(ray, owned=False)
    ray.shutdown()


@pytest.fixture(scope="module")
def model(default_model_dir, tmp_path_factory):
    return tiny_model_folder(default_model_dir, tmp_path_factory.mktemp("tiny"))


def engine_flags(model) -> list[str]:
    return ["--model", str(model), "--dtype", "float32", "--threads", "1", "--kv-memory", "256MiB"]


def read(path) -> dict[tuple[str, str, int], dict]:
    """results.jsonl by (problem, strategy, budget), each record without its wall time (the one field that is
    a measurement); a key written twice fails."""
    records = [json.loads(line) for line in path.read_text().splitlines()]
    keyed = {(r["problem"], r["strategy"], r["budget"]): {k: v for k, v in r.items() if k != "wall_s"} for r in records}
    assert len(keyed) == len(records), "a (problem, strategy, budget) was written twice"
    return keyed


# eval


def test_eval_over_two_actors_equals_the_eval_in_one_process(cluster, model, tmp_path):
    flags = ["eval", "--task", "arithmetic", "--limit", "4", "--strategies", "single,hogwild:2,groupthink:2",
             "--budgets", "8,16", *engine_flags(model)]  # fmt: skip
    assert main([*flags, "--out", str(tmp_path / "one")]) == 0
    assert main([*flags, "--out", str(tmp_path / "ray"), "--ray", "--actors", "2"]) == 0
    one, two = read(tmp_path / "one" / "results.jsonl"), read(tmp_path / "ray" / "results.jsonl")
    assert len(one) == 4 * 3 * 2 and one.keys() == two.keys()
    for key in one:
        assert two[key] == one[key], key
    assert any(r["answer"] for r in one.values()) and len({r["transcript"] for r in one.values()}) > 4
    run = json.loads((tmp_path / "ray" / "summary.json").read_text())["run"]
    assert run["runs"] == 12 and sorted(run["runs_by_actor"]) == [6, 6], run  # problems dealt round-robin
    rows = [json.loads((tmp_path / d / "summary.json").read_text())["rows"] for d in ("one", "ray")]
    assert [{k: v for k, v in r.items() if k != "mean_wall_s"} for r in rows[0]] == [
        {k: v for k, v in r.items() if k != "mean_wall_s"} for r in rows[1]
    ]
    # a re-run resumes from the driver's results.jsonl: nothing left to send to the actors
    assert main([*flags, "--out", str(tmp_path / "ray"), "--ray", "--actors", "2"]) == 0
    assert read(tmp_path / "ray" / "results.jsonl") == two


def test_an_actor_killed_mid_eval_has_its_problems_finished_by_the_other_once(cluster, model):
    engine_config = EngineConfig(model=str(model), dtype="float32", threads=1, kv_memory="256MiB")
    config = EvalConfig(strategies="single,hogwild:2", budgets="16,48", concurrency=1)  # one job at a time
    problems = tasks.load(tasks.TaskConfig("arithmetic", limit=6))
    evaluation = RayEval(cluster, engine_config, config, actors=2)
    evaluation.start()
    written: list[dict] = []
    share_of_actor_0 = {p.id for p in problems[0::2]}  # dealt round-robin
    killed = []

    def on_records(records: list[dict]) -> None:
        written.extend(records)
        if records[0]["problem"] in share_of_actor_0 and not killed:  # its first job is done, five are not
            os.kill(evaluation.pids[0], signal.SIGKILL)
            killed.append(records[0]["problem"])

    try:
        outcome = evaluation.run(problems, on_records=on_records)
    finally:
        evaluation.close()
    keys = [(r["problem"], r["strategy"], r["budget"]) for r in written]
    assert len(keys) == len(set(keys)) == 6 * 2 * 2, "every (problem, strategy, budget) exactly once"
    assert killed and outcome.retried >= 1 and not outcome.gave_up and not outcome.interrupted
    assert outcome.by_actor[0] < 6 < outcome.by_actor[1] and sum(outcome.by_actor) == outcome.jobs_done == 12
    # the retried problems' records are the ones a single process writes
    engine = Engine.load(engine_config)
    alone = run_jobs(engine, make_jobs(engine, problems, config), config).records
    strip = lambda r: {k: v for k, v in r.items() if k != "wall_s"}  # noqa: E731
    assert sorted(map(json.dumps, map(strip, written))) == sorted(map(json.dumps, map(strip, alone)))


# flags


def test_without_ray_installed_the_flag_says_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setitem(__import__("sys").modules, "ray", None)  # `import ray` raises ImportError
    for argv in (["eval", "--ray", "--limit", "1"], ["serve", "--ray", "--replicas", "2"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "pip install 'hogwild[ray]'" in err, err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["eval", "--actors", "2"], "--actors needs --ray"),
        (["eval", "--ray", "--actors", "0"], "--actors must be >= 1"),
        (["eval", "--ray", "127.0.0.1:1"], "no Ray cluster answers at 127.0.0.1:1"),
        (["eval", "--ray", "not an address"], "--ray takes a cluster address"),
        (["eval", "--ray", "--actors", "3"], "--actors 3 at --threads 1 need 3 CPUs; the Ray cluster has 2"),
        (["eval", "--ray", "--actors", "1", "--threads", "3"], "--actors 1 at --threads 3 need 3 CPUs"),
        (["serve", "--replicas", "2"], "--replicas needs --ray"),
        (["serve", "--ray", "--replicas", "0"], "--replicas must be >= 1"),
        (["serve", "--ray", "ray://127.0.0.1:1"], "no Ray cluster answers at ray://127.0.0.1:1"),
        (["serve", "--ray", "--replicas", "3"], "--replicas 3 at --threads 1 need 3 CPUs; the Ray cluster has 2"),
    ],
)
def test_ray_flag_mistakes_are_one_line_and_exit_2(cluster, capsys, argv, message):
    assert main([*argv, "--threads", "1"] if "--threads" not in argv else argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("hogwild: error: ") and message in err, err


# serve


def ask(url: str, stream: bool, workers: int | None) -> dict:
    """One seeded chat request: its content, finish reason, usage and (a collaboration) each worker's text."""
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    extra = {"workers": workers, "budget": 16} if workers else None
    reply = client.chat.completions.create(
        model="tiny", messages=QUESTION, stream=stream, seed=7, temperature=0.9, max_tokens=12, extra_body=extra,
        **({"stream_options": {"include_usage": True}} if stream else {}),
    )  # fmt: skip
    if not stream:
        choice = reply.choices[0]
        workers_of = (choice.message.model_extra or {}).get("hogwild", {}).get("workers", [])
        texts = {i: w["text"] for i, w in enumerate(workers_of)}
        return {"content": choice.message.content, "finish": choice.finish_reason,
                "usage": reply.usage.model_dump(), "workers": texts}  # fmt: skip
    content, finish, usage, texts = "", None, None, {}
    for chunk in reply:
        usage = chunk.usage.model_dump() if chunk.usage else usage
        for choice in chunk.choices:
            content += choice.delta.content or ""
            finish = choice.finish_reason or finish
            event = (choice.delta.model_extra or {}).get("hogwild") or {}
            if event.get("type") == "text":
                texts[event["worker"]] = texts.get(event["worker"], "") + event["text"]
    return {"content": content, "finish": finish, "usage": usage, "workers": texts}


def open_streams(live, bodies: list[dict]) -> tuple[ExitStack, list]:
    """Streams opened and read up to their first worker text; they stay open until the stack closes."""
    stack = ExitStack()
    lines = []
    for body in bodies:
        response = stack.enter_context(httpx.stream("POST", live.url + "/v1/chat/completions", json=body, timeout=60))
        assert response.status_code == 200
        events = (json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {"))
        next(e for e in events if (e["choices"][0]["delta"].get("hogwild") or {}).get("type") == "text")
        lines.append(events)
    return stack, lines


PAGE_PROBLEM = "A farmer has 17 rows of 23 apple trees. How many trees are there? Answer in \\boxed{}."


def solve_on_the_page(url: str) -> list[str]:
    """The page's problem solved by 2 workers (budget 16, seed 3) in headless Chromium: each column's text."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from test_server_page import CHROMIUM, ask, chromedriver, columns, wait

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(chromedriver()), options=options)
    try:
        browser.get(url + "/")
        assert browser.find_element(By.ID, "problem").get_attribute("value") == PAGE_PROBLEM
        ask(browser, workers=2, budget=16, seed=3)
        wait(lambda: browser.find_element(By.ID, "answer").get_attribute("data-done"), what="the run to end")
        texts = columns(browser)
    finally:
        browser.quit()
    # the default cross-check: each worker writes a solution of its own, the first greedily, the second sampled
    assert len(texts) == 2 and all(texts) and texts[0] != texts[1]
    return texts


def test_two_replicas_serve_one_endpoint(cluster, model):
    engine_config = EngineConfig(model=str(model), dtype="float32", threads=1, kv_memory="256MiB")
    replicas = Replicas(cluster, engine_config, ServerConfig(model_name="tiny"), 2)
    replicas.launch()
    try:
        with live_server(replicas, model_name="tiny") as live:
            assert httpx.get(live.url + "/health").json() == {"status": "ok", "model": "tiny", "running": 0,
                                                              "replicas": 2}  # fmt: skip
            page = httpx.get(live.url + "/")
            assert page.status_code == 200 and "/static/app.js" in page.text
            # four long collaborations at once: two on each replica (2 workers each: 4 rows a replica)
            body = {"model": "tiny", "messages": QUESTION, "workers": 2, "budget": 3000, "stream": True}
            stack, _ = open_streams(live, [body] * 4)
            with stack:
                assert replicas.load == [4, 4]
                assert live.metric("hogwild_running_runs") == 4 and live.metric("hogwild_kv_bytes_in_use") > 0
                for i in range(2):
                    assert ray.get(replicas.handles[i].snapshot.remote()).running == 2
            # the clients went away: each replica cancelled its runs and freed their blocks
            live.wait_idle()
            assert replicas.load == [0, 0]
            # replies through the replicas equal the same seeded requests to one engine in this process
            through = {(s, w): ask(live.url, s, w) for s in (False, True) for w in (None, 2)}
            passes = live.metric("hogwild_forward_passes_total")
            # the page, in headless Chromium, over the replicas: the columns are the transcripts the API gives
            page_columns = solve_on_the_page(live.url)
            page_body = {
                "model": "tiny", "messages": [{"role": "user", "content": PAGE_PROBLEM}], "workers": 2, "budget": 16,
                "temperature": 1, "seed": 3, "layout": "combined", "mode": "hogwild",
            }  # fmt: skip
            message = httpx.post(live.url + "/v1/chat/completions", json=page_body, timeout=60).json()
            assert page_columns == [w["text"] for w in message["choices"][0]["message"]["hogwild"]["workers"]]
        with live_server(Engine.load(engine_config), model_name="tiny") as single:
            alone = {(s, w): ask(single.url, s, w) for s in (False, True) for w in (None, 2)}
        assert through == alone
        assert through[(True, 2)]["workers"] == through[(False, 2)]["workers"] and len(alone[(True, 2)]["workers"]) == 2
        assert passes >= sum(r["usage"]["completion_tokens"] for (_, w), r in through.items() if w is None)
    finally:
        replicas.close()


@pytest.mark.parametrize("argv", [["eval", "--ray", "--actors", "1"], ["serve", "--ray", "--replicas", "1"]])
def test_a_model_an_actor_cannot_load_is_one_error_line(cluster, capsys, argv):
    assert main([*argv, "--threads", "1", "--model", "/no/such/model"]) == 2
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1]
    assert "Traceback" not in err and last.startswith("hogwild: error: model path /no/such/model"), err
