"""The evaluation harness: answer extraction and grading, the tasks, flag errors, an end-to-end eval on a tiny random
model (every file written, the table equal to a recount of results.jsonl, resume), and probes that leave the runs
they read exactly as they were."""

from __future__ import annotations

import json
import signal
from collections import defaultdict

import pytest
import torch
from tiny import tiny_engine

from hogwild.cli import main
from hogwild.collab.protocol import Collaboration
from hogwild.errors import HogwildError
from hogwild.eval import grading, report, tasks
from hogwild.eval.cli import evaluate
from hogwild.eval.runner import EvalConfig, Job, make_jobs, parse_budgets, run_jobs, seed_for
from hogwild.runs import Sampled
from hogwild.strategies import parse as parse_strategies

torch.set_num_threads(1)


# grading


@pytest.mark.parametrize(
    "text, answer",
    [
        ("so 3 + 4 = 7, and \\boxed{7}. Then more words 9", "7"),
        ("nested \\boxed{\\frac{1}{2}} done", "\\frac{1}{2}"),
        ("first \\boxed{1} then \\boxed{2}", "2"),
        ("Therefore, the answer is $18.", "$18"),
        ("The final answer is: 42\nextra 7", "42"),
        ("She has 12 apples and gives away 5, leaving 7", "7"),
        ("no number here", None),
    ],
)
def test_extract_answer(text, answer):
    assert grading.extract_answer(text) == answer


@pytest.mark.parametrize(
    "answer, gold",
    [
        ("18", "18"),
        ("$18", "18"),
        ("\\$18.00", "18"),
        ("1,000", "1000"),
        ("70,000 dollars", "70000"),
        ("18 eggs", "18"),
        ("\\text{18 eggs}", "18"),
        ("-3", "-3"),
        ("−3", "-3"),
        ("0.5", "1/2"),
        ("\\frac{1}{2}", "0.5"),
        ("\\dfrac{3}{4}", "3/4"),
        ("1 1/2", "1.5"),
        ("x = 5", "5"),
        ("25\\%", "25"),
        ("2\\sqrt{2}", "\\sqrt{8}"),  # math-verify: symbolic equality
        ("\\frac{\\pi}{2}", "\\pi/2"),
    ],
)
def test_grade_accepts_equal_answers(answer, gold):
    assert grading.grade(answer, gold), (answer, gold)


@pytest.mark.parametrize(
    "answer, gold",
    [
        ("17", "18"),
        ("-18", "18"),
        ("1,2", "12"),
        ("1/3", "0.33"),
        ("", "5"),
        (None, "5"),
        ("\\sqrt{2}", "2"),
        ("2 + 5 + 2 * 18 + 21", "64"),
        ("(13 - 25) + 19 \\times 15", "273"),
        ("8 \\cdot 8", "64"),
    ],  # fmt: skip
)
def test_grade_rejects_different_answers(answer, gold):
    assert not grading.grade(answer, gold), (answer, gold)


def test_grade_all_needs_every_answer_in_order():
    assert grading.grade_all("18; 3; 70,000", ["18", "3", "70000"])
    assert grading.grade_all("18, 3, 70000", ["18", "3", "70000"])
    assert not grading.grade_all("3; 18; 70000", ["18", "3", "70000"])
    assert not grading.grade_all("18; 3", ["18", "3", "70000"])


def test_a_multi_question_answer_is_scored_per_question():
    golds = ["18", "3", "70000", "540"]
    assert grading.grade_parts("18; 3; 70,000; 540", golds) == 4
    assert grading.grade_parts("18; 4; 70000; 541", golds) == 2  # two of four right: half the questions
    assert grading.grade_parts("3; 18; 70000; 540", golds) == 2  # in order
    assert grading.grade_parts("18; 3; 70000", golds) == 0  # not four answers: none can be placed
    assert grading.grade_parts(None, golds) == 0 and grading.grade_parts("7", ["7"]) == 1
    # the answer of a problem of k questions: the last box with k answers, else the last k boxes
    text = "\\boxed{1} then \\boxed{18; 3; 70000; 540} and \\boxed{9}"
    assert grading.extract_answer(text, 4) == "18; 3; 70000; 540" and grading.extract_answer(text) == "9"
    assert grading.extract_answer("\\boxed{18} \\boxed{3} \\boxed{70000} \\boxed{540}", 4) == "18; 3; 70000; 540"


def test_a_stuck_verifier_is_killed_at_its_timeout_and_restarted():
    # a helper that never answers: it is killed (SIGKILL), not waited for until it exits by itself
    sleeper = "import json, time; print(json.dumps('ready'), flush=True); time.sleep(60)"
    verifier = grading._Verifier(timeout_s=0.3, code=sleeper)
    verifier.available = True
    helpers = []
    start = verifier._start

    def start_and_keep() -> None:
        start()
        helpers.append(verifier.process)

    verifier._start = start_and_keep
    assert verifier.equal("1", "1") is None
    assert verifier.process is None and len(helpers) == 1
    assert helpers[0].returncode == -signal.SIGKILL, "the stuck helper was not killed"
    answering = (
        "import json, sys; print(json.dumps('ready'), flush=True)\nfor _ in sys.stdin: print('true', flush=True)"
    )
    verifier.code = answering
    assert verifier.equal("1", "1") is True  # a fresh helper
    verifier.stop()


# tasks


def test_gsm8k_sample_and_multi():
    problems = tasks.load(tasks.TaskConfig("gsm8k"))
    assert len(problems) == 20
    assert problems[0].golds == ("18",) and "Janet" in problems[0].question and "\\boxed{}" in problems[0].question
    multi = tasks.load(tasks.TaskConfig("gsm8k-multi", k=3, limit=2, data=str(tasks.SAMPLE)))
    assert len(multi) == 2 and multi[0].parts == 3 and problems[0].parts == 1
    assert multi[1].golds == tuple(p.golds[0] for p in problems[3:6])
    assert "Problem 3:" in multi[0].question and "semicolons" in multi[0].question
    # gsm8k-multi reads the shared GSM8K split beside the checkout when there is one (its first 20 are the sample)
    assert tasks.default_data("gsm8k-multi") == (tasks.SHARED if tasks.SHARED.is_file() else tasks.SAMPLE)
    assert tasks.default_data("gsm8k") == tasks.SAMPLE


def test_arithmetic_is_seeded_and_its_golds_are_right():
    a = tasks.load(tasks.TaskConfig("arithmetic", difficulty=2, limit=30, seed=1))
    assert a == tasks.load(tasks.TaskConfig("arithmetic", difficulty=2, limit=30, seed=1))
    assert a != tasks.load(tasks.TaskConfig("arithmetic", difficulty=2, limit=30, seed=2))
    for p in a:
        expr = p.question.removeprefix("Compute ").split(".")[0]
        assert expr.count(" ") == 2 * 3, "difficulty 2: four operands"
        assert str(eval(expr)) == p.golds[0]
    assert len(tasks.load(tasks.TaskConfig("arithmetic"))) == tasks.TaskConfig().arithmetic_problems


def test_jsonl_task_with_its_own_fields(tmp_path):
    path = tmp_path / "math.jsonl"
    path.write_text(
        '{"problem": "What is 1/2 + 1/4?", "solution": "\\\\frac{3}{4}"}\n\n{"problem": "2+2?", "solution": 4}\n'
    )
    problems = tasks.load(tasks.TaskConfig("jsonl", data=str(path), question_field="problem", answer_field="solution"))
    assert [p.golds for p in problems] == [("\\frac{3}{4}",), ("4",)]


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no dataset file"),
        ('{"question": "q", "answer": "#### 1"}\n{"question": "q"\n', ":2: not JSON"),
        ('{"question": "q", "answer": "#### 1"}\n{"question": "q"}\n', ":2: no 'answer' field"),
        ('["q", "a"]\n', ":1: a line must be a JSON object"),
        ('{"question": "q", "answer": "1"}\n', "no '#### ' line"),
        ("\n", "holds no problems"),
    ],
)
def test_bad_dataset_files_are_one_clear_error(tmp_path, content, message):
    path = tmp_path / "data.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(HogwildError, match=message):
        tasks.load(tasks.TaskConfig("gsm8k", data=str(path)))


def test_strategies_and_budgets_parse():
    assert [s.name for s in parse_strategies("single,hogwild:2,groupthink:3,sot:2,vote:4,best:4")] == [
        "single", "hogwild:2", "groupthink:3", "sot:2", "vote:4", "best:4",
    ]  # fmt: skip
    assert parse_budgets("16,32,64") == (16, 32, 64)
    for bad in ("hogwild", "single:2", "vote:0", "mcts:2", "single,single"):
        with pytest.raises(HogwildError):
            parse_strategies(bad)
    for bad in ("", "64,32", "0,16", "a,b", "32,32", "-8,16"):
        with pytest.raises(HogwildError):
            parse_budgets(bad)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--strategies", "single,mcts:2"], "unknown strategy 'mcts:2'"),
        (["--task", "mmlu"], "unknown task 'mmlu'"),
        (["--budgets", "256,128"], "--budgets takes increasing"),
        (["--budgets", "128,x"], "--budgets takes increasing"),
        (["--data", "/no/such/file.jsonl"], "no dataset file at /no/such/file.jsonl"),
        (["--task", "jsonl"], "--task jsonl needs --data"),
        (["--concurrency", "-1"], "--concurrency must be >= 0"),
        (["--layout", "spiral"], "unknown layout 'spiral'"),
    ],
)
def test_eval_flag_mistakes_are_one_line_and_exit_2(capsys, flags, message):
    assert main(["eval", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("hogwild: error: ") and message in err, err


def test_a_malformed_dataset_exits_2(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text("not json\n")
    assert main(["eval", "--data", str(path)]) == 2
    assert f"{path}:1: not JSON" in capsys.readouterr().err


# end to end


def _recount(records: list[dict]) -> dict[tuple[str, int], tuple[int, int, float]]:
    groups = defaultdict(list)
    for r in records:
        groups[(r["strategy"], r["budget"])].append(r)
    return {
        key: (len(g), sum(r["correct"] for r in g), sum(r["tokens"] for r in g) / len(g)) for key, g in groups.items()
    }


def _check_table(out, records: list[dict]) -> None:
    recount = _recount(records)
    first = (out / "results.md").read_text().split("\n\n")[1]  # the title, the table, then passes to match single
    table = [line.split("|")[1:-1] for line in first.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(recount)
    for cells in table[1:]:
        strategy, budget, n, accuracy, tokens = (c.strip() for c in cells[:5])
        count, correct, mean_tokens = recount[(strategy, int(budget))]
        assert int(n) == count and accuracy == f"{correct / count:.1%} ({correct})"
        assert float(tokens) == round(mean_tokens, 1)


def test_end_to_end_eval_writes_every_file_and_the_table_is_a_recount(tokenizer, tmp_path, capsys):
    engine = tiny_engine(tokenizer)
    task = tasks.TaskConfig("gsm8k", limit=3)
    problems = tasks.load(task)
    config = EvalConfig(strategies="single,hogwild:2,groupthink:2,sot:2,vote:2,best:2", budgets="16,32")
    out = tmp_path / "eval"
    settings = {"model": "tiny", "task": {"name": "gsm8k"}}
    outcome = evaluate(engine, problems, task, config, out, settings)
    assert outcome.jobs_done == 3 * 5 and not outcome.interrupted  # vote:2 and best:2 share one run
    for name in ("results.jsonl", "summary.json", "results.md", "accuracy.png", "config.json"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(records) == 3 * 6 * 2
    assert {(r["problem"], r["strategy"], r["budget"]) for r in records} == {
        (p.id, s, b) for p in problems for s in config.strategies.split(",") for b in (16, 32)
    }
    for r in records:
        assert r["passes"] <= r["budget"] and r["transcript"] and r["gold"] and r["tokens"] > 0
        assert r["correct"] == grading.grade(r["answer"], r["gold"]) == bool(r["parts_correct"])
        # every collaboration records its redundancy, independent samples none
        assert (r["redundancy"] is None) == (r["strategy"] in ("vote:2", "best:2"))
        assert r["redundancy"] is None or 0 <= r["redundancy"] <= 1
    # the markdown table and summary.json equal a recount from results.jsonl
    _check_table(out, records)
    recount = _recount(records)
    summary = json.loads((out / "summary.json").read_text())
    assert [r["strategy"] for r in summary["rows"]][::2] == config.strategies.split(",")
    for row in summary["rows"]:
        count, correct, mean_tokens = recount[(row["strategy"], row["budget"])]
        assert (row["problems"], row["correct"]) == (count, correct) and row["mean_tokens"] == pytest.approx(
            mean_tokens
        )
    # vote:2 and best:2 read the same samples: same token counts at every budget
    by = {(r["problem"], r["strategy"], r["budget"]): r for r in records}
    assert all(
        by[(p.id, "vote:2", b)]["tokens"] == by[(p.id, "best:2", b)]["tokens"] for p in problems for b in (16, 32)
    )
    assert engine.pool.reserved == 0 and engine.pool.in_use_bytes == 0

    # a re-run resumes: nothing left to do, and the first run's facts stay in summary.json; a lost record is run
    # again, alone
    first_run = summary["run"]
    assert first_run["runs"] == 3 * 5 and first_run["sampled_tokens"] > 0
    outcome = evaluate(engine, problems, task, config, out, settings)
    assert outcome.jobs_done == 0 and len((out / "results.jsonl").read_text().splitlines()) == len(records)
    assert json.loads((out / "summary.json").read_text())["run"] == first_run
    kept = [r for r in records if not (r["problem"] == problems[1].id and r["strategy"] == "hogwild:2")]
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    outcome = evaluate(engine, problems, task, config, out, settings)
    assert outcome.jobs_done == 1 and len((out / "results.jsonl").read_text().splitlines()) == len(records)

    # `hogwild eval report DIR` redraws the table from results.jsonl alone (here with some answers marked right,
    # which a random model never gives)
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    for i, r in enumerate(records):
        r["correct"] = i % 3 == 0
        r["parts_correct"] = int(r["correct"])
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (out / "accuracy.png").unlink()
    assert main(["eval", "report", str(out)]) == 0
    _check_table(out, records)
    assert (out / "accuracy.png").exists() and "| single | 16 | 3 |" in capsys.readouterr().out
    # --regrade grades the stored answers again: the random model's answers are all wrong
    assert main(["eval", "report", str(out), "--regrade"]) == 0
    assert f"regraded: {sum(r['correct'] for r in records)} grades changed" in capsys.readouterr().err
    _check_table(out, [r | {"correct": False, "parts_correct": 0} for r in records])


def test_the_report_scores_per_question_and_finds_the_passes_to_match_single():
    def record(strategy, budget, problem, right, passes, redundancy=None):
        return {
            "problem": problem, "strategy": strategy, "budget": budget, "correct": right == 4, "parts": 4,
            "parts_correct": right, "tokens": passes, "passes": passes, "wall_s": 1.0, "redundancy": redundancy,
        }  # fmt: skip

    records = [
        record("single", 100, "a", 1, 100), record("single", 100, "b", 1, 100),
        record("single", 200, "a", 4, 200), record("single", 200, "b", 2, 190),
        record("hogwild:2", 100, "a", 4, 90, 0.1), record("hogwild:2", 100, "b", 2, 100, 0.3),
        record("vote:2", 100, "a", 0, 100), record("vote:2", 200, "b", 1, 200),
    ]  # fmt: skip
    rows = report.summarize(records)
    table = report.markdown(rows)
    # 6 of 8 questions right, 1 of 2 problems all right, redundancy the mean over the collaboration's problems
    assert "| hogwild:2 | 100 | 2 | 75.0% (6) | 50.0% (1) | 95.0 | 95.0 | 20.0% | 1.0 |" in table
    assert "| single | 100 | 2 | 25.0% (2) | 0.0% (0) | 100.0 | 100.0 |  | 1.0 |" in table
    # single reaches 75.0% at its largest budget in 195 passes; hogwild:2 does at budget 100 in 95 (0.49x)
    assert "single's accuracy at its largest budget (75.0%)" in table
    assert "| hogwild:2 | 100 | 95.0 | 0.49 |" in table and "| vote:2 | not reached | | |" in table
    # a single that answers nothing right gives nothing to reach: no table, not "reached at once"
    nothing = [r for r in records if r["strategy"] != "single"] + [
        {**r, "correct": False, "parts_correct": 0} for r in records if r["strategy"] == "single"
    ]
    assert report.reaching(report.summarize(nothing)) == [] and "to reach" not in report.markdown(
        report.summarize(nothing)
    )


def test_a_resume_with_other_settings_is_refused(tmp_path, capsys):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "results.jsonl").write_text("")
    (out / "config.json").write_text(json.dumps({"model": "other"}))
    assert main(["eval", "--out", str(out), "--limit", "1"]) == 2
    assert "holds results with other settings (model" in capsys.readouterr().err


def test_concurrency_limits_the_runs_in_flight(tokenizer):
    engine = tiny_engine(tokenizer)
    problems = tasks.load(tasks.TaskConfig("arithmetic", limit=3))
    for concurrency, most in ((0, 6), (1, 1), (2, 2)):
        config = EvalConfig(strategies="single,vote:2", budgets="16,24", concurrency=concurrency)
        outcome = run_jobs(engine, make_jobs(engine, problems, config), config)
        assert outcome.max_in_flight == most and outcome.jobs_done == 6


# probes leave the runs they read untouched


class Recorder:
    """Keeps, per run, the logits of every row it sampled (probes excluded)."""

    def __init__(self, engine, run) -> None:
        self.logits: list[torch.Tensor] = []
        inner = engine.run_model

        def run_model(rows, wanted):
            out = inner(rows, wanted)
            self.logits += [out[i].clone() for i, r in enumerate(wanted) if rows[r].own.ledger is run.ledger]
            return out

        engine.run_model = run_model


def _fresh(engine, run):
    """A copy of `run`, not started, on `engine`."""
    if isinstance(run, Collaboration):
        return Collaboration(engine, run.problem, run.config, run.sampling)
    return Sampled(engine, run.prompt_ids, run.params, n=run.n)


def _written(run) -> list[list[int]]:
    result = run.final
    return [w.tokens for w in result.workers] if isinstance(run, Collaboration) else [s.tokens for s in result.samples]


@pytest.mark.parametrize("strategy", ["hogwild:2", "vote:2"])
def test_eval_probes_leave_the_run_untouched(tokenizer, monkeypatch, strategy):
    """The job probes at 12 and 24 passes; the same run alone, never probed, computes the same next-token logits
    at every step and writes the same transcript. (The collaboration's own probe has its check in
    test_scheduler.py::test_probe_leaves_the_collaboration_untouched; this one goes through the eval's jobs and
    covers the probes forked off independent samples too.)"""
    config = EvalConfig(strategies=strategy, budgets="12,24,40")
    problem = tasks.load(tasks.TaskConfig("arithmetic", limit=1))[0]
    engine = tiny_engine(tokenizer)
    (job,) = make_jobs(engine, [problem], config)
    probed = Recorder(engine, job.run)
    probes = []
    add_probe = Job.add_probe

    def counting(self, probe, record):
        probes.append(probe)
        return add_probe(self, probe, record)

    monkeypatch.setattr(Job, "add_probe", counting)
    run_jobs(engine, [job], config)
    assert len(probes) >= 2 and all(p.done and p.final.tokens for p in probes), "the job never probed"

    alone = tiny_engine(tokenizer)
    again = _fresh(alone, job.run)
    plain = Recorder(alone, again)
    for _ in alone.stream(again):
        pass
    if isinstance(again, Collaboration):
        assert [w.text for w in again.final.workers] == [w.text for w in job.run.final.workers]
        assert len(plain.logits) == len(probed.logits)
    else:  # the job stops its samples once every budget is read (at 41 tokens): compare up to there
        assert [t[:41] for t in _written(again)] == _written(job.run)
    assert len(probed.logits) >= 40
    worst = max((a - b).abs().max().item() for a, b in zip(probed.logits, plain.logits, strict=False))
    assert worst < 1e-5, f"the probes changed the run's next-token logits by {worst}"


def test_limit_seed_and_layout_reach_the_runs(tokenizer):
    from hogwild.cli import build_parser
    from hogwild.eval.cli import _configs

    engine = tiny_engine(tokenizer)

    def jobs(*flags):
        task, config = _configs(build_parser().parse_args(["eval", "--strategies", "hogwild:2,vote:2", *flags]))
        problems = tasks.load(task)
        return problems, make_jobs(engine, problems, config)

    problems, a = jobs("--task", "arithmetic", "--limit", "3", "--layout", "interleaved", "--seed", "5")
    assert len(problems) == 3 and len(a) == 6
    assert a[0].run.config.layout == "interleaved" and a[0].run.config.budget == 512
    _, b = jobs("--task", "arithmetic", "--limit", "3", "--seed", "5")
    _, c = jobs("--task", "arithmetic", "--limit", "3", "--seed", "6")
    assert b[0].run.config.layout == "combined"
    assert [j.problem for j in a] == [j.problem for j in b] != [j.problem for j in c]
    assert a[1].run.params.seed == b[1].run.params.seed and a[1].run.params.temperature == 0.6  # vote:2 samples
    assert a[0].run.sampling.temperature == 0 and a[0].run.config.opening == "crosscheck"  # greedy
    _, f = jobs("--task", "arithmetic", "--limit", "1", "--temperature", "0.8")
    assert f[0].run.sampling.temperature == f[1].run.params.temperature == 0.8  # a given temperature: every strategy
    _, d = jobs("--task", "arithmetic", "--limit", "1", "--temperature", "0", "--no-mask", "--repeat-guard", "off")
    assert d[0].run.sampling.temperature == 0 and not d[0].run.config.mask and d[0].run.config.repeat_guard == "off"
    _, e = jobs("--task", "gsm8k-multi", "--k", "2", "--limit", "1", "--data", str(tasks.SAMPLE), "--assign")
    assert e[0].run.config.parts == 2 and e[0].run.config.assign
    assert a[1].run.params.seed != seed_for(6, a[1].problem, "sampled:2")
