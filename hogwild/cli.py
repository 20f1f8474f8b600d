"""The `hogwild` command line: generate, solve, bench, serve.

Every subcommand is a thin consumer of the Python API. Defaults come from the config dataclasses, never restated
here. User mistakes (a wrong flag value, a missing model folder, a prompt longer than the context) print one line
`hogwild: error: ...` and exit 2; Ctrl-C stops cleanly, keeping what was printed.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from hogwild import bench, strategies
from hogwild.collab import prompts
from hogwild.collab.protocol import CollabConfig
from hogwild.engine import Engine, Generation
from hogwild.errors import HogwildError
from hogwild.eval import cli as eval_cli
from hogwild.flags import (
    add_engine_arguments,
    add_protocol_arguments,
    add_sampling_arguments,
    default,
    engine_config,
    protocol_fields,
    sampling_params,
)
from hogwild.model import registry
from hogwild.server import command as serve_command


def cmd_generate(args: argparse.Namespace) -> int:
    params = sampling_params(args)
    engine = Engine.load(engine_config(args))
    if args.verbose:
        print(f"hogwild: {engine.describe()}, {torch.get_num_threads()} threads", file=sys.stderr)
    prompt_ids = engine.encode_prompt(args.prompt, chat=not args.raw, system=args.system)
    result = Generation()
    start = time.perf_counter()
    failed = False
    try:
        for text in engine.generate_text(prompt_ids, params, result):
            sys.stdout.write(text)
            sys.stdout.flush()
    except HogwildError:
        failed = not result.tokens  # nothing streamed (the prompt does not fit): the error line is the only output
        raise
    finally:
        if not failed:
            sys.stdout.write("\n")
            sys.stdout.flush()  # before the stats line on stderr
        elapsed = time.perf_counter() - start
        if not args.quiet and not failed:
            rate = len(result.tokens) / elapsed if elapsed > 0 else 0.0
            print(f"[{len(result.tokens)} tokens, {rate:.1f} tok/s]", file=sys.stderr)
    if result.finish_reason == "interrupted":
        print("hogwild: interrupted", file=sys.stderr)
        return 130
    return 0


def cmd_solve(args: argparse.Namespace) -> int:
    import json

    from rich.console import Console
    from rich.live import Live

    from hogwild.collab.protocol import default_sampling
    from hogwild.runs import Done
    from hogwild.view import LiveView

    strategy = strategies.served(args.mode)
    config = CollabConfig(
        workers=args.workers,
        layout=args.layout,
        budget=args.budget,
        format=None if args.format == "family" else args.format,
        **protocol_fields(args),
    )
    engine = Engine.load(engine_config(args))
    params = default_sampling(
        engine, args.seed, strategy.samples, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k
    )
    run = strategy.live(engine, args.problem, config, params)
    result = None
    if args.json:
        for event in engine.stream(run):
            if isinstance(event, Done):
                result = event.result
        assert result is not None, "a run always ends with Done"
        print(json.dumps(result.to_dict(), ensure_ascii=False, indent=2))
        return 130 if result.finished_by == "interrupted" else 0
    console = Console(stderr=False)
    title = f"hogwild {strategy.name}: {config.workers} workers, {config.layout} layout | {args.problem}"
    view = LiveView(run.names, config.budget, console, title)
    with Live(view, console=console, refresh_per_second=8, screen=False, transient=False):
        for event in engine.stream(run):  # Ctrl-C aborts the run; its Done still arrives
            view.update(event)
            if isinstance(event, Done):
                result = event.result
    assert result is not None, "a run always ends with Done"
    if not console.is_terminal:
        console.line()  # a live view drawn to a pipe does not end its last line
    console.print(
        f"[bold]answer:[/bold] {result.answer if result.answer is not None else '(none)'}, "
        f"finished by {result.finished_by}, {result.forward_passes} forward passes, {result.tokens} tokens, "
        f"{result.wall_s:.1f} s, {result.tokens_per_s:.1f} tok/s"
        + (f", redundancy {result.redundancy:.0%}" if result.redundancy is not None else "")
    )
    if result.finished_by == "interrupted":
        for worker in result.workers:
            console.rule(worker.name)
            console.print(worker.text, markup=False, highlight=False)
        return 130
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hogwild",
        description="Collaborative parallel LLM inference: several workers of one model share one KV cache and "
        "see each other's tokens as they are written.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    gen = sub.add_parser(
        "generate",
        help="stream one completion",
        description="Stream the model's reply to PROMPT.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    gen.add_argument("prompt", help="the user message (or plain text with --raw)")
    gen.add_argument("--raw", action="store_true", help="plain completion: no chat template")
    gen.add_argument("--system", default=None, help="system message for the chat template")
    gen.add_argument("--quiet", "-q", action="store_true", help="no stats line on stderr")
    gen.add_argument(
        "--verbose", "-v", action="store_true", help="say on stderr which dtype and linear kernel run, and why"
    )
    add_engine_arguments(gen)
    add_sampling_arguments(gen)
    gen.set_defaults(func=cmd_generate)

    solve = sub.add_parser(
        "solve",
        help="several workers solve one problem together",
        description="Run N workers of one model on PROBLEM with one shared KV cache, shown side by side as they "
        "write. The run stops at the first finished step with a \\boxed{} answer, or at the budget of forward "
        "passes, where a finisher asks for the answer.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    solve.add_argument("problem", help="the problem to solve; ask for the answer in \\boxed{}")
    solve.add_argument(
        "--workers", "-n", type=int, default=default(CollabConfig, "workers"), help="number of workers (1 to 16)"
    )
    solve.add_argument(
        "--mode",
        default=default(CollabConfig, "mode"),
        help=f"the strategy: {strategies.help_text(served_only=True)}",
    )
    solve.add_argument(
        "--layout",
        default=default(CollabConfig, "layout"),
        help="cache layout: combined, interleaved or contiguous (the cross-check opening's workers solve apart, in "
        "the interleaved layout)",
    )
    solve.add_argument(
        "--budget",
        type=int,
        default=default(CollabConfig, "budget"),
        help="sequential forward passes before the finisher",
    )
    solve.add_argument(
        "--format",
        choices=("family", *prompts.FORMATS),
        default="family",
        help="prompt preset: chat, think or plain; family: the model family's (chat, think for qwen3)",
    )
    solve.add_argument("--json", action="store_true", help="print one JSON object instead of the live view")
    add_protocol_arguments(solve)
    add_engine_arguments(solve)
    add_sampling_arguments(solve, max_tokens=False)
    solve.set_defaults(func=cmd_solve)

    bench.add_parser(sub)
    registry.add_parser(sub)
    serve_command.add_parser(sub)
    eval_cli.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except HogwildError as e:
        print(f"hogwild: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nhogwild: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
