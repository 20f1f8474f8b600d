"""The `hogwild` command line: generate, solve, bench, serve.

Every subcommand is a thin consumer of the Python API. Defaults come from the config dataclasses, never restated
here. User mistakes (a wrong flag value, a missing model folder, a prompt longer than the context) print one line
`hogwild: error: ...` and exit 2; Ctrl-C stops cleanly, keeping what was printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import torch

from hogwild.collab import prompts
from hogwild.collab.protocol import REPEAT_GUARDS, TEMPERATURE, TOP_P, CollabConfig
from hogwild.engine import Engine, EngineConfig, Generation
from hogwild.errors import HogwildError
from hogwild.model.kernels import DTYPE_CHOICES, LINEARS, WEIGHTS
from hogwild.sampling import SamplingParams


def default(cls: type, name: str):
    """The default of a config dataclass field: the one place defaults are defined."""
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        default=default(EngineConfig, "model"),
        help="a named model (see `hogwild models`), a Hugging Face model folder (config.json, *.safetensors, "
        "tokenizer.json) or a .gguf file; default: smollm2-135m (SmolLM2-135M-Instruct)",
    )
    group.add_argument(
        "--weights",
        choices=WEIGHTS,
        default=default(EngineConfig, "weights"),
        help="how the linears' weights are stored: int8 (per-channel scales, fbgemm, CPU), int4 (groups of 32, "
        "bf16 activations, CPU), bf16 or fp32; auto, on CPUs with AVX2 or better: int4 for a model whose weights "
        "are 4-bit already (the default model), else int8; bf16 on GPUs",
    )
    group.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default=default(EngineConfig, "dtype"),
        help="float dtype (with float weights); auto: bf16 on GPUs and on CPUs with native bf16, else float32. "
        "Giving it asks for float weights",
    )
    group.add_argument(
        "--linear",
        choices=LINEARS,
        default=default(EngineConfig, "linear"),
        help="linear kernel: onednn (weights prepacked for oneDNN, CPU) or aten (F.linear); auto: by machine",
    )
    group.add_argument(
        "--threads", type=int, default=default(EngineConfig, "threads"), help="CPU threads for torch (0: one per core)"
    )
    group.add_argument("--device", default=default(EngineConfig, "device"), help="cpu or cuda")
    group.add_argument(
        "--kv-memory",
        default=default(EngineConfig, "kv_memory"),
        help="KV cache budget shared by all runs, e.g. 2GiB or 512MB (default: 30%% of available memory on CPU, "
        "80%% of free GPU memory)",
    )
    group.add_argument(
        "--step-tokens",
        type=int,
        default=default(EngineConfig, "step_tokens"),
        help="tokens fed per forward pass at most, all rows together (longer prompts go in chunks)",
    )


def add_sampling_arguments(parser: argparse.ArgumentParser, max_tokens: bool = True) -> None:
    """Sampling flags; without `max_tokens` (a collaboration), temperature, top-p and top-k default to the
    workers' sampling (`default_sampling`): the model's generation settings, else 0.6 and 0.95."""
    group = parser.add_argument_group("sampling")
    workers = "" if max_tokens else "; default: the model's generation settings, else "
    group.add_argument(
        "--temperature",
        type=float,
        default=default(SamplingParams, "temperature") if max_tokens else None,
        help="0 means greedy (argmax)" + (f"{workers}{TEMPERATURE}" if workers else ""),
    )
    group.add_argument(
        "--top-p",
        type=float,
        default=default(SamplingParams, "top_p") if max_tokens else None,
        help="nucleus sampling mass" + (f"{workers}{TOP_P}" if workers else ""),
    )
    group.add_argument(
        "--top-k",
        type=int,
        default=default(SamplingParams, "top_k") if max_tokens else None,
        help="0: no top-k filter" + (f"{workers}0" if workers else ""),
    )
    group.add_argument("--seed", type=int, default=default(SamplingParams, "seed"), help="random seed")
    if max_tokens:
        group.add_argument(
            "--max-tokens", type=int, default=default(SamplingParams, "max_tokens"), help="new tokens at most"
        )
        group.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def add_protocol_arguments(parser: argparse.ArgumentParser, parts: bool = True) -> None:
    """How Hogwild! workers work together: the CollabConfig fields an ablation varies (defaults from there);
    `parts`: whether --parts is a flag (an evaluation reads it from each problem)."""
    group = parser.add_argument_group("protocol")
    group.add_argument(
        "--opening",
        choices=prompts.OPENINGS,
        default=default(CollabConfig, "opening"),
        help="first steps: plan (the first worker proposes a split, the others start once it is written), paper "
        "(the Hogwild! paper's openers, everyone at once) or symmetric (headers only)",
    )
    group.add_argument(
        "--mask",
        action=argparse.BooleanOptionalAction,
        default=default(CollabConfig, "mask"),
        help="never draw tokens that forge the scratchpad's structure (markup, special tokens, headers)",
    )
    group.add_argument(
        "--min-step-tokens",
        type=int,
        default=default(CollabConfig, "min_step_tokens"),
        help="a step ends at a paragraph break only once it holds this many tokens",
    )
    group.add_argument(
        "--max-step-tokens",
        type=int,
        default=default(CollabConfig, "max_step_tokens"),
        help="past this a step ends at any line break; at twice this, anywhere",
    )
    group.add_argument(
        "--repeat-guard",
        choices=REPEAT_GUARDS,
        default=default(CollabConfig, "repeat_guard"),
        help="a step that repeats an earlier one is not taken: drawn again (then nudged), nudged at once, or off",
    )
    group.add_argument(
        "--repeat-threshold",
        type=float,
        default=default(CollabConfig, "repeat_threshold"),
        help="share of a step's word 4-grams found in one earlier step that makes it a repeat",
    )
    group.add_argument(
        "--self-check-every",
        type=int,
        default=default(CollabConfig, "self_check_every"),
        help="tokens written by all workers between self-check questions (0: never)",
    )
    group.add_argument(
        "--assign",
        action="store_true",
        help="a problem of several parts (--parts, or gsm8k-multi's k): the engine writes each worker's first line "
        "naming the parts it takes",
    )
    if not parts:
        return
    group.add_argument(
        "--parts",
        type=int,
        default=default(CollabConfig, "parts"),
        help="independent questions in the problem: an answer gives all of them in one \\boxed{}",
    )


PROTOCOL = (
    "opening", "mask", "min_step_tokens", "max_step_tokens", "repeat_guard", "repeat_threshold", "self_check_every",
    "assign", "parts",
)  # fmt: skip


def protocol_fields(args: argparse.Namespace, parts: bool = True) -> dict:
    """The CollabConfig fields given by `add_protocol_arguments`' flags."""
    return {name: getattr(args, name) for name in PROTOCOL if parts or name != "parts"}


def engine_config(args: argparse.Namespace, **overrides: object) -> EngineConfig:
    """The engine flags of `args`, with `overrides` (EngineConfig fields) taking their place."""
    fields = dict(
        model=args.model,
        weights=args.weights,
        dtype=args.dtype,
        linear=args.linear,
        threads=args.threads,
        device=args.device,
        kv_memory=args.kv_memory,
        step_tokens=args.step_tokens,
    )
    return EngineConfig(**{**fields, **overrides})


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        max_tokens=getattr(args, "max_tokens", default(SamplingParams, "max_tokens")),
        stop=tuple(getattr(args, "stop", ())),
    )


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

    from hogwild.collab.protocol import Collaboration, default_sampling
    from hogwild.runs import Done
    from hogwild.view import LiveView

    config = CollabConfig(
        workers=args.workers,
        mode=args.mode,
        layout=args.layout,
        budget=args.budget,
        format=args.format,
        **protocol_fields(args),
    )
    engine = Engine.load(engine_config(args))
    params = default_sampling(engine, seed=args.seed, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    run = Collaboration(engine, args.problem, config, params)
    result = None
    if args.json:
        for event in engine.stream(run):
            if isinstance(event, Done):
                result = event.result
        assert result is not None, "a run always ends with Done"
        print(json.dumps(result.to_dict(), ensure_ascii=False, indent=2))
        return 130 if result.finished_by == "interrupted" else 0
    console = Console(stderr=False)
    title = f"hogwild {config.mode}: {config.workers} workers, {config.layout} layout | {args.problem}"
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
        help="hogwild (steps, shared history), groupthink (token-level) or sot (Skeleton-of-Thought: an outline, "
        "one point per worker, unseen by the others, then one answer)",
    )
    solve.add_argument(
        "--layout", default=default(CollabConfig, "layout"), help="cache layout: combined, interleaved or contiguous"
    )
    solve.add_argument(
        "--budget",
        type=int,
        default=default(CollabConfig, "budget"),
        help="sequential forward passes before the finisher",
    )
    solve.add_argument(
        "--format",
        default=default(CollabConfig, "format"),
        help="prompt preset: chat, think or plain (default: by model family)",
    )
    solve.add_argument("--json", action="store_true", help="print one JSON object instead of the live view")
    add_protocol_arguments(solve)
    add_engine_arguments(solve)
    add_sampling_arguments(solve, max_tokens=False)
    solve.set_defaults(func=cmd_solve)

    from hogwild import bench

    bench.add_parser(sub, add_engine_arguments)
    from hogwild.model import registry

    registry.add_parser(sub)
    from hogwild.server.command import add_parser as add_serve_parser

    add_serve_parser(sub, add_engine_arguments, engine_config)
    from hogwild.eval import cli as eval_cli

    eval_cli.add_parser(sub, add_engine_arguments)
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
