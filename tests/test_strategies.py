"""The strategy registry: a strategy defined outside hogwild (`tests/toy_strategy.py`) and registered here becomes
a choice of the CLI (`hogwild solve --mode`, `hogwild eval --strategies`), a `mode` the server serves (and lists in
its model card, which the web page reads) and a strategy the evaluation runs, with no other file changed; before
it is registered, every one of them refuses it. The built-ins keep their names and order."""

from __future__ import annotations

import json

import httpx
import pytest
import torch
from serving import live_server
from tiny import tiny_engine, tiny_model_folder
from toy_strategy import TALLY

from hogwild import strategies
from hogwild.cli import main
from hogwild.errors import HogwildError
from hogwild.eval import tasks
from hogwild.eval.runner import EvalConfig, make_jobs, run_jobs

torch.set_num_threads(1)
MODEL = "smollm2-135m"
QUESTION = [{"role": "user", "content": "What is 2 + 3? Answer in \\boxed{}."}]


@pytest.fixture
def tally():
    strategies.register(TALLY)
    try:
        yield TALLY
    finally:
        del strategies.REGISTRY[TALLY.name]


def tallied(answer: str | None, tokens: int) -> bool:
    return answer == f"tally {tokens}" and tokens > 0


def test_the_built_in_strategies():
    assert list(strategies.REGISTRY) == ["single", "hogwild", "groupthink", "sot", "vote", "best"]
    assert strategies.served_names() == ["hogwild", "groupthink", "sot"]
    assert [s.name for s in strategies.parse("single,hogwild:2,vote:3")] == ["single", "hogwild:2", "vote:3"]
    # vote:N and best:N of one N read one run; every other strategy its own
    groups = [s.group for s in strategies.parse("vote:2,best:2,best:3,hogwild:2,sot:2")]
    assert groups == ["sampled:2", "sampled:2", "sampled:3", "hogwild:2", "sot:2"]
    with pytest.raises(HogwildError, match="registered already"):
        strategies.register(strategies.REGISTRY["vote"])


def test_an_unregistered_strategy_is_refused_everywhere(tokenizer, capsys):
    with pytest.raises(HogwildError, match="unknown strategy 'tally:2'"):
        strategies.parse("tally:2")
    assert main(["solve", "Q", "--mode", "tally"]) == 2
    assert "unknown mode 'tally': choose one of hogwild, groupthink, sot" in capsys.readouterr().err
    with live_server(tiny_engine(tokenizer)) as live:
        body = {"model": MODEL, "messages": QUESTION, "workers": 2, "mode": "tally", "budget": 24}
        response = httpx.post(live.url + "/v1/chat/completions", json=body, timeout=60)
        assert response.status_code == 400 and response.json()["error"]["param"] == "mode"
        assert "tally" not in httpx.get(live.url + "/v1/models").json()["data"][0]["hogwild"]["modes"]


def test_a_registered_strategy_is_run_by_the_evaluation(tokenizer, tally):
    engine = tiny_engine(tokenizer)
    problems = tasks.load(tasks.TaskConfig("arithmetic", limit=2))
    config = EvalConfig(strategies="single,tally:2", budgets="24")
    jobs = make_jobs(engine, problems, config)
    outcome = run_jobs(engine, jobs, config)
    assert outcome.jobs_done == 4 and not outcome.interrupted
    by = {(r["problem"], r["strategy"]): r for r in outcome.records}
    assert set(by) == {(p.id, s) for p in problems for s in ("single", "tally:2")}
    for p in problems:
        toy, single = by[(p.id, "tally:2")], by[(p.id, "single")]
        assert tallied(toy["answer"], toy["tokens"]), toy["answer"]
        assert "[Alice]" in toy["transcript"] and "[Bob]" in toy["transcript"]  # the reader's two-worker transcript
        assert not single["answer"] or not single["answer"].startswith("tally")


def test_a_registered_strategy_is_served(tokenizer, tally):
    with live_server(tiny_engine(tokenizer)) as live:
        card = httpx.get(live.url + "/v1/models").json()["data"][0]["hogwild"]
        assert card["modes"] == ["hogwild", "groupthink", "sot", "tally"]
        assert {"name": "tally", "summary": TALLY.summary} in card["strategies"]
        body = {"model": MODEL, "messages": QUESTION, "workers": 2, "mode": "tally", "budget": 24, "seed": 3}
        whole = httpx.post(live.url + "/v1/chat/completions", json=body, timeout=60)
        assert whole.status_code == 200, whole.text
        message = whole.json()["choices"][0]["message"]
        result = message["hogwild"]
        assert tallied(result["answer"], sum(w["tokens"] for w in result["workers"]))
        assert message["content"] == f"{result['answer']}\n\ncounted, not solved"
        events = []
        with httpx.stream("POST", live.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    delta = json.loads(line[6:])["choices"][0]["delta"]
                    events += [delta["hogwild"]] if "hogwild" in delta else []
        # the default cross-check opening's workers solve apart: the interleaved layout
        assert events[0] == {"type": "start", "workers": ["Alice", "Bob"], "budget": 24, "layout": "interleaved",
                             "mode": "tally"}  # fmt: skip
        assert events[-1]["type"] == "done" and events[-1]["answer"] == result["answer"]  # the same seeded run


def test_a_registered_strategy_is_a_choice_of_the_cli(tally, default_model_dir, tmp_path, capsys):
    model = tiny_model_folder(default_model_dir, tmp_path / "tiny")
    flags = ["--model", str(model), "--dtype", "float32", "--threads", "1", "--kv-memory", "256MiB"]
    assert main(["solve", "What is 2 + 3?", "--mode", "tally", "-n", "2", "--budget", "24", "--json", *flags]) == 0
    out = json.loads(capsys.readouterr().out)
    assert tallied(out["answer"], sum(out["tokens_per_worker"].values())) and len(out["workers"]) == 2
    folder = tmp_path / "eval"
    eval_flags = ["--task", "arithmetic", "--limit", "1", "--budgets", "24", "--out", str(folder)]
    assert main(["eval", "--strategies", "tally:3", *eval_flags, *flags]) == 0
    (record,) = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]
    assert record["strategy"] == "tally:3" and tallied(record["answer"], record["tokens"])
    with pytest.raises(SystemExit):
        main(["solve", "--help"])
    assert "tally (N workers, answered with the count of their tokens)" in " ".join(capsys.readouterr().out.split())
