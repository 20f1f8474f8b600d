"""`hogwild eval`: run a task's problems through every strategy at every budget and write the results, and
`hogwild eval report DIR` to redraw the tables and plot from a results.jsonl. Defaults come from `EvalConfig` and
`TaskConfig`; a bad flag, task, strategy, budget list or dataset file is one line and exit 2 (HogwildError)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from hogwild import strategies
from hogwild.cluster import add_arguments as add_ray_arguments
from hogwild.collab.protocol import TEMPERATURE, TOP_P, CollabConfig
from hogwild.errors import HogwildError
from hogwild.eval import report, tasks
from hogwild.eval.runner import EvalConfig, Progress, done_pairs, make_jobs, plan_jobs, read_results, run_jobs
from hogwild.flags import add_engine_arguments, add_protocol_arguments, default, engine_config, protocol_fields

# what a results folder's numbers depend on: a re-run must match them to resume (strategies may be added)
SETTINGS = ("model", "task", "budgets", "layout", "temperature", "top_p", "protocol", "seed", "probe_tokens")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `hogwild eval` (and `hogwild eval report DIR`) on the main parser's subcommands."""
    p = sub.add_parser(
        "eval",
        help="accuracy against sequential forward passes, per strategy",
        description="Evaluate strategies on a task: each problem runs once per strategy to the largest budget of "
        "sequential forward passes, and a finisher probe forked off the live cache reads its answer at each "
        "smaller budget. Writes results.jsonl, summary.json, results.md and accuracy.png to --out; a re-run with "
        "the same --out resumes, skipping what is done. `hogwild eval report DIR` redraws the files.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    t = p.add_argument_group("task")
    t.add_argument("--task", default=default(tasks.TaskConfig, "name"), help=f"one of {', '.join(tasks.TASKS)}")
    t.add_argument(
        "--data",
        default=None,
        help=f"JSONL dataset (gsm8k: default the shipped 20-problem sample; gsm8k-multi: {tasks.SHARED} when it "
        "exists, else the sample)",
    )
    t.add_argument("--limit", type=int, default=default(tasks.TaskConfig, "limit"), help="first N problems (0: all)")
    t.add_argument("--k", type=int, default=default(tasks.TaskConfig, "k"), help="gsm8k-multi: problems per prompt")
    t.add_argument(
        "--difficulty", type=int, default=default(tasks.TaskConfig, "difficulty"), help="arithmetic: 1 and up"
    )
    t.add_argument("--question-field", default=default(tasks.TaskConfig, "question_field"), help="jsonl: field")
    t.add_argument("--answer-field", default=default(tasks.TaskConfig, "answer_field"), help="jsonl: field")
    e = p.add_argument_group("evaluation")
    e.add_argument(
        "--strategies",
        default=default(EvalConfig, "strategies"),
        help=f"comma-separated: {strategies.help_text()}",
    )
    e.add_argument(
        "--budgets", default=default(EvalConfig, "budgets"), help="increasing sequential forward pass budgets"
    )
    e.add_argument(
        "--layout",
        default=default(EvalConfig, "layout"),
        help="hogwild:N's cache layout (the cross-check opening's workers solve apart, in the interleaved layout)",
    )
    e.add_argument(
        "--temperature",
        type=float,
        default=default(EvalConfig, "temperature"),
        help="every strategy (0: greedy); default: greedy, except vote:N and best:N, which sample with the model's "
        f"generation settings, else {TEMPERATURE}",
    )
    e.add_argument(
        "--top-p",
        type=float,
        default=default(EvalConfig, "top_p"),
        help=f"every strategy; default: the model's generation settings, else {TOP_P}",
    )
    e.add_argument(
        "--seed",
        type=int,
        default=default(EvalConfig, "seed"),
        help="seeds every run (per problem and strategy) and picks the arithmetic problems",
    )
    e.add_argument(
        "--concurrency",
        type=int,
        default=default(EvalConfig, "concurrency"),
        help="runs in flight at once (0: as many as the KV budget holds, with room kept for probes)",
    )
    e.add_argument("--out", default="eval-results", help="folder for results.jsonl and the reports")
    e.add_argument(
        "--throughput",
        action="store_true",
        help="measure instead: run the problems at --concurrency, then again one at a time (with --ray: in this "
        "process, then over the actors), print both throughputs; writes nothing",
    )
    add_protocol_arguments(p, parts=False)
    add_ray_arguments(p, "shard the problems over Ray actors, one engine each", "--actors", "")
    add_engine_arguments(p)
    p.set_defaults(func=cmd_eval)
    reports = p.add_subparsers(dest="eval_command", metavar="report DIR")
    r = reports.add_parser("report", help="redraw summary.json, results.md and accuracy.png from DIR/results.jsonl")
    r.add_argument("dir", help="a folder written by hogwild eval")
    r.add_argument("--regrade", action="store_true", help="grade the stored answers again with the current grader")
    r.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    out = Path(args.dir)
    if args.regrade:
        if not (out / report.RESULTS).exists():
            raise HogwildError(f"no {report.RESULTS} in {out}")
        print(f"hogwild: regraded: {report.regrade(out)} grades changed", file=sys.stderr)
    rows = report.write(out)
    print(report.markdown(rows), end="")
    print(f"hogwild: wrote {out / 'summary.json'}, {out / 'results.md'}, {out / 'accuracy.png'}", file=sys.stderr)
    return 0


def _configs(args: argparse.Namespace) -> tuple[tasks.TaskConfig, EvalConfig]:
    task = tasks.TaskConfig(
        name=args.task, data=args.data, limit=args.limit, k=args.k, difficulty=args.difficulty, seed=args.seed,
        question_field=args.question_field, answer_field=args.answer_field,
    )  # fmt: skip
    config = EvalConfig(
        strategies=args.strategies, budgets=args.budgets, layout=args.layout, temperature=args.temperature,
        top_p=args.top_p, seed=args.seed, concurrency=args.concurrency,
        protocol=CollabConfig(**protocol_fields(args, parts=False)),
    )  # fmt: skip
    return task, config


def cmd_eval(args: argparse.Namespace) -> int:
    from hogwild.engine import Engine

    task, config = _configs(args)  # flags first: a mistake costs no model load
    if args.actors is not None and args.actors < 1:
        raise HogwildError(f"--actors must be >= 1, got {args.actors}")
    if args.actors is not None and args.ray is None:
        raise HogwildError("--actors needs --ray: without it the problems run in this process")
    problems = tasks.load(task)
    settings = {
        "model": args.model or "smollm2-135m",
        "task": dataclasses.asdict(task) | {"data": str(Path(task.data).resolve()) if task.data else None},
        **{k: v for k, v in dataclasses.asdict(config).items() if k in SETTINGS},
    }
    out = Path(args.out)
    if not args.throughput:
        _check_resume(out, settings)
    if args.ray is not None:
        return _on_ray(args, engine_config(args), problems, task, config, out, settings)
    engine = Engine.load(engine_config(args))
    if args.throughput:
        return _throughput(engine, problems, config)

    outcome = evaluate(engine, problems, task, config, out, settings)
    return 130 if outcome.interrupted else 0


def _on_ray(args, engine_config, problems, task, config, out: Path, settings: dict) -> int:
    from hogwild.cluster import connect, import_ray, plan_actors
    from hogwild.eval.cluster import RayEval

    import_ray()
    if args.throughput:  # the one process first, alone on the machine, before any actor starts
        from hogwild.engine import Engine

        engine = Engine.load(engine_config)
        print(f"{engine.config.model or 'smollm2-135m'}: {engine.describe()}")
        one = _measure(engine, problems, config)
        del engine
        if one is None:
            return 130
    cluster = connect(args.ray or None)
    try:
        actors = plan_actors(cluster, args.actors or 0, engine_config, "actors")
        cluster_eval = RayEval(cluster, engine_config, config, actors)
        print(f"hogwild: starting {actors} actor{'s' * (actors > 1)} on the Ray cluster", file=sys.stderr)
        try:
            cluster_eval.start()
            print(f"hogwild: {actors} actors loaded the model in {cluster_eval.load_s:.1f} s", file=sys.stderr)
            if args.throughput:
                many = cluster_eval.run(problems)
                if many.interrupted:
                    return 130
                threads = engine_config.threads or 1
                _print_throughput(
                    problems, config,
                    [(f"1 process x {threads}", one), (f"{actors} actors x {threads}", many)], "threads", baseline=0,
                )  # fmt: skip
                return 0
            outcome = evaluate(cluster_eval, problems, task, config, out, settings)
        finally:
            cluster_eval.close()
    finally:
        cluster.close()
    for problem in outcome.gave_up:
        print(f"hogwild: {problem} was not evaluated (its actor died every time)", file=sys.stderr)
    return 130 if outcome.interrupted else 1 if outcome.gave_up else 0


def evaluate(
    runner, problems: list[tasks.Problem], task: tasks.TaskConfig, config: EvalConfig, out: Path, settings: dict
):
    """Run what `out` does not hold yet, append it to out/results.jsonl, and write the reports; returns the outcome.
    `runner`: an Engine (every job in this process) or a started `RayEval` (the problems over its actors)."""
    from hogwild.engine import Engine

    records_path = out / report.RESULTS
    _, budgets = config.plan
    skip = done_pairs(read_results(records_path), budgets)
    jobs = len(plan_jobs(problems, config, skip))
    out.mkdir(parents=True, exist_ok=True)
    (out / report.CONFIG).write_text(json.dumps(settings | {"strategies": config.strategies}, indent=2) + "\n")
    if skip:
        print(f"hogwild: resuming: {len(skip)} (problem, strategy) pairs already in {records_path}", file=sys.stderr)
    if isinstance(runner, Engine):
        engine = runner

        def run(on_records, on_progress, extra):
            return run_jobs(engine, make_jobs(engine, problems, config, skip), config, on_records, on_progress, extra)

    else:

        def run(on_records, on_progress, extra):
            return runner.run(problems, skip, on_records, on_progress, extra)

    outcome = _run_with_progress(run, jobs, budgets[-1], records_path, task.name)
    if outcome.interrupted:
        print(
            f"\nhogwild: interrupted after {outcome.jobs_done} of {jobs} runs; run the same command again to resume",
            file=sys.stderr,
        )
    if read_results(records_path):
        run = {
            "wall_s": round(outcome.wall_s, 2), "runs": outcome.jobs_done, "steps": outcome.steps,
            "sampled_tokens": outcome.sampled_tokens, "max_in_flight": outcome.max_in_flight,
            "interrupted": outcome.interrupted,
        }  # fmt: skip
        if outcome.by_actor:
            run["runs_by_actor"] = outcome.by_actor
        # a re-run with nothing left to do keeps the facts of the run that wrote the results
        rows = report.write(out, run if outcome.jobs_done or outcome.interrupted else None)
        print(report.markdown(rows, f"**{report.title_of(json.loads((out / report.CONFIG).read_text()))}**"))
        print(
            f"hogwild: {outcome.jobs_done} runs in {outcome.wall_s:.1f} s ({outcome.sampled_tokens} tokens, "
            f"{outcome.sampled_tokens / max(outcome.wall_s, 1e-9):.1f} tok/s); wrote {out}",
            file=sys.stderr,
        )
    return outcome


def _check_resume(out: Path, settings: dict) -> None:
    path = out / report.CONFIG
    if not path.exists() or not (out / report.RESULTS).exists():
        return
    try:
        before = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise HogwildError(f"{path} is not JSON; remove it or use another --out") from None
    differ = [k for k in SETTINGS if before.get(k) != settings[k]]
    if differ:
        raise HogwildError(
            f"{out} holds results with other settings ({', '.join(differ)}); use another --out to start afresh"
        )


def _run_with_progress(run, jobs: int, passes_per_job: int, records_path: Path, task: str):
    """`run(on_records, on_progress, extra)` with a progress bar, each job's records appended to `records_path`
    (and flushed) the moment they come."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from rich.progress import Progress as Bar

    console = Console(stderr=True)
    records_path.parent.mkdir(parents=True, exist_ok=True)

    with records_path.open("a", encoding="utf-8") as sink:

        def on_records(records: list[dict]) -> None:
            sink.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
            sink.flush()

        with Bar(
            TextColumn("[bold]eval[/bold] {task.fields[runs]}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("passes"), TimeElapsedColumn(), TimeRemainingColumn(), console=console,
            disable=not console.is_terminal,
        ) as bar:  # fmt: skip
            progress_task = bar.add_task("eval", total=jobs * passes_per_job, runs=f"0/{jobs} runs")
            last = [0, time.perf_counter()]

            def on_progress(p: Progress) -> None:
                bar.update(progress_task, completed=p.passes, runs=f"{p.jobs_done}/{p.jobs} runs")
                if not console.is_terminal and p.jobs_done != last[0] and time.perf_counter() - last[1] > 30:
                    last[:] = [p.jobs_done, time.perf_counter()]
                    print(f"hogwild: {p.jobs_done}/{p.jobs} runs done, {p.passes}/{p.total} passes", file=sys.stderr)

            return run(on_records, on_progress, {"task": task})


def _throughput(engine, problems, config: EvalConfig) -> int:
    """The same problems at --concurrency and one at a time, on this engine, side by side."""
    rows = []
    for concurrency in (config.concurrency, 1):
        outcome = _measure(engine, problems, dataclasses.replace(config, concurrency=concurrency))
        if outcome is None:
            return 130
        rows.append(("default (0)" if concurrency == 0 else str(concurrency), outcome))
    _print_throughput(problems, config, rows, "concurrency", baseline=1)
    return 0


def _measure(engine, problems, config: EvalConfig):
    """Every job of `problems` on `engine`; None when interrupted."""
    outcome = run_jobs(engine, make_jobs(engine, problems, config), config)
    if outcome.interrupted:
        print("hogwild: interrupted", file=sys.stderr)
        return None
    return outcome


def _print_throughput(problems, config: EvalConfig, rows: list, label: str, baseline: int) -> None:
    """A table of (name, Outcome) rows; the speed-up is of the other row over `rows[baseline]`."""
    n = len(problems)
    print(f"{n} problems, strategies {config.strategies}, budgets {config.budgets}")
    width = max(len(label), *(len(name) for name, _ in rows))
    print(f"{label:>{width}}  runs  max in flight  wall s  problems/min  sampled tok/s  steps")
    for name, o in rows:
        print(
            f"{name:>{width}}  {o.jobs_done:>4}  {o.max_in_flight:>13}  {o.wall_s:>6.1f}  {60 * n / o.wall_s:>12.2f}  "
            f"{o.sampled_tokens / o.wall_s:>13.1f}  {o.steps:>5}"
        )
    print(f"speed-up: {rows[baseline][1].wall_s / rows[1 - baseline][1].wall_s:.2f}x")
