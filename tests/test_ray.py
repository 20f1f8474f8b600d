"""Ray: `hogwild eval --ray` and `hogwild serve --ray` on a real local cluster (2 CPUs, no dashboard), with the tiny
random model written to a folder so each actor loads it as a user's model would be loaded.

An eval over 2 actors writes the same results.jsonl as the same eval in one process, problem for problem; an actor
killed mid-eval has its problems finished by the other, each counted once; without Ray installed, or with a bad
flag, --ray is one line and exit 2.
"""

from __future__ import annotations

import json
import logging
import os
import signal

import pytest
import torch
from tiny import tiny_model_folder

from hogwild.cli import main
from hogwild.cluster import Cluster
from hogwild.engine import Engine, EngineConfig
from hogwild.eval import tasks
from hogwild.eval.cluster import RayEval
from hogwild.eval.runner import EvalConfig, make_jobs, run_jobs

ray = pytest.importorskip("ray")
torch.set_num_threads(1)


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
