"""`hogwild bench quality`: what a weights choice costs in quality, against float32 weights, in one run.

For each choice (fp32 first, the reference) the same model is loaded and measured on GSM8K problems:

- greedy agreement: each question (chat prompt) gets `--tokens` greedy tokens; the share of them equal to the
  fp32 continuation, counting up to the first difference (identical continuations count fully).
- greedy flips: teacher-forced on fp32's continuations, the share of positions whose argmax is not fp32's token.
  This is how often the choice changes a greedy token, without the divergence that follows a first change.
- log-likelihood: the mean log-probability per token of the reference solutions (the `answer` field), given
  the question as the chat prompt. The gate for quantized (8-bit, 4-bit) weights is that they lose at most 2% of fp32's;
  a GGUF's own blocks (whose fp32 reference is the same blocks dequantized, so only the kernels' 8-bit activations
  differ) at most 0.5%.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.console import Console

from hogwild.bench.common import format_table
from hogwild.engine import Engine
from hogwild.errors import HogwildError
from hogwild.eval.tasks import read_jsonl
from hogwild.flags import add_engine_arguments, engine_config
from hogwild.model.loading import is_gguf_folder
from hogwild.model.registry import resolve_model_dir
from hogwild.runs import Done, GenerationResult, Sampled
from hogwild.sampling import SamplingParams
from hogwild.scoring import score

CHOICES = ("fp32", "gguf", "bf16", "int8", "int4")
SHARED_GSM8K = Path(__file__).resolve().parents[3] / "shared" / "data" / "gsm8k" / "test_dev.jsonl"
SAMPLE_GSM8K = Path(__file__).parents[1] / "eval" / "data" / "gsm8k_sample.jsonl"
# the most mean log-likelihood a choice may lose against fp32, as a fraction
LOGLIK_BAR = {"int8": 0.02, "int4": 0.02, "gguf": 0.005}


@dataclass
class Quality:
    weights: str
    describe: str
    agreement: float  # share of greedy tokens equal to fp32's, up to the first difference
    identical: int  # prompts whose whole continuation equals fp32's
    flips: float  # teacher-forced share of positions whose argmax differs from fp32's token
    loglik: float  # mean log-probability per solution token
    loglik_loss: float  # (fp32 - this) / |fp32|
    seconds: float


def greedy(engine: Engine, prompts: list[list[int]], tokens: int) -> list[list[int]]:
    """Greedy continuations of every prompt, all in flight at once (they stop at eos)."""
    params = SamplingParams(temperature=0.0, max_tokens=tokens)
    runs = [engine.add(Sampled(engine, prompt, params)) for prompt in prompts]
    results: dict[int, list[int]] = {}
    while len(results) < len(runs):
        for run in engine.step():
            while run.outbox:
                event = run.outbox.popleft()
                if isinstance(event, Done):
                    assert isinstance(event.result, GenerationResult)
                    results[id(run)] = event.result.samples[0].tokens
    return [results[id(run)] for run in runs]


def _agreement(reference: list[int], other: list[int]) -> int:
    same = 0
    for a, b in zip(reference, other, strict=False):
        if a != b:
            break
        same += 1
    return same


def measure(
    engine: Engine, weights: str, questions: list[list[int]], solutions: list[list[int]], tokens: int, reference
) -> tuple[Quality, list[list[int]]]:
    """One weights choice; `reference` is fp32's (continuations, loglik), or None while measuring fp32 itself."""
    start = time.perf_counter()
    continuations = greedy(engine, questions, tokens)
    ref_continuations, ref_loglik = reference or (continuations, None)
    same = [_agreement(r, c) for r, c in zip(ref_continuations, continuations, strict=True)]
    lengths = [max(len(r), len(c), 1) for r, c in zip(ref_continuations, continuations, strict=True)]
    flips = positions = 0
    for question, ref in zip(questions, ref_continuations, strict=True):
        if not ref:
            continue
        best = score(engine, question + ref).top_ids[len(question) - 1 :, 0]
        flips += int((best != torch.tensor(ref)).sum())
        positions += len(ref)
    total = count = 0.0
    for question, solution in zip(questions, solutions, strict=True):
        total += float(score(engine, question + solution).token[len(question) - 1 :].sum())
        count += len(solution)
    loglik = total / count
    base = loglik if ref_loglik is None else ref_loglik
    quality = Quality(
        weights=weights,
        describe=engine.describe(),
        agreement=sum(same) / sum(lengths),
        identical=sum(s == n for s, n in zip(same, lengths, strict=True)),
        flips=flips / max(positions, 1),
        loglik=loglik,
        loglik_loss=(base - loglik) / abs(base),
        seconds=time.perf_counter() - start,
    )
    return quality, continuations


def _problems(path: str | None, count: int) -> list[tuple[str, str]]:
    file = Path(path) if path else (SHARED_GSM8K if SHARED_GSM8K.is_file() else SAMPLE_GSM8K)
    rows = read_jsonl(file, "question", "answer")[:count]
    if len(rows) < count:
        raise HogwildError(f"{file} has {len(rows)} problems; --problems asks for {count}")
    return rows


def cmd_quality(args: argparse.Namespace) -> int:
    if args.problems < 1 or args.tokens < 1:
        raise HogwildError("--problems and --tokens must be at least 1")
    if args.choices is None:  # every choice that runs on this model
        gguf = is_gguf_folder(resolve_model_dir(args.model))
        args.choices = ",".join(c for c in CHOICES if gguf or c != "gguf")
    choices = tuple(dict.fromkeys(part.strip() for part in args.choices.split(",")))
    unknown = [c for c in choices if c not in CHOICES]
    if unknown:
        raise HogwildError(f"--choices takes {', '.join(CHOICES)}, got {', '.join(unknown)}")
    choices = ("fp32", *(c for c in choices if c != "fp32"))  # fp32 is the reference, measured first
    problems = _problems(args.data, args.problems)
    progress = Console(stderr=True, highlight=False, soft_wrap=True)
    rows: list[Quality] = []
    reference = None
    for weights in choices:
        progress.print(f"loading {weights} weights")
        engine = Engine.load(engine_config(args, weights=weights, dtype="auto", linear="auto"))
        questions = [engine.encode_prompt(q) for q, _ in problems]
        solutions = [
            engine.tokenizer.encode(a.replace("####", "The answer is"), add_special_tokens=False) for _, a in problems
        ]
        for ids in questions + solutions:
            engine.check_context(len(ids) + args.tokens, what=f"a problem of {len(ids)} tokens")
        progress.print(f"measuring {weights}: {len(problems)} problems, {args.tokens} greedy tokens each")
        quality, continuations = measure(engine, weights, questions, solutions, args.tokens, reference)
        if reference is None:
            reference = (continuations, quality.loglik)
        rows.append(quality)
        del engine
    if args.json:
        print(json.dumps([asdict(q) for q in rows], indent=2))
        return 0
    model = args.model or "smollm2-135m"
    print(f"{model}, {len(problems)} GSM8K problems, {args.tokens} greedy tokens, against fp32 weights\n")
    headers = ["weights", "greedy agreement", "identical", "greedy flips", "loglik/token", "loglik loss"]
    cells = [
        [
            q.weights,
            f"{q.agreement:.1%}",
            f"{q.identical}/{len(problems)}",
            f"{q.flips:.2%}",
            f"{q.loglik:.4f}",
            f"{q.loglik_loss:+.2%}",
        ]
        for q in rows
    ]
    print(format_table(headers, cells))
    for q in rows:
        print(f"\n{q.weights}: {q.describe}", end="")
        bar = LOGLIK_BAR.get(q.weights)
        if bar is not None:
            verdict = "passes" if q.loglik_loss <= bar else "FAILS"
            print(f"\n  {verdict} the bar: loses {q.loglik_loss:.2%} of fp32's log-likelihood (at most {bar:.1%})")
    print()
    if not all(math.isfinite(q.loglik) for q in rows):
        raise HogwildError("a log-likelihood is not finite: the weights are broken")
    return 0


def add_parser(benches: argparse._SubParsersAction) -> None:
    """Register `hogwild bench quality` on `hogwild bench`'s subcommands."""
    quality = benches.add_parser(
        "quality",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="what each weights choice (gguf, int8, int4, bf16) costs in quality against fp32 weights",
        description="Greedy agreement and flips against fp32 weights, and the mean log-likelihood of GSM8K "
        "reference solutions, for each weights choice, on the same model in one run.",
    )
    quality.add_argument(
        "--choices",
        default=None,
        help=f"weights choices among {','.join(CHOICES)}; fp32 is always measured (default: every one that runs on "
        "the model: gguf only for GGUF models)",
    )
    quality.add_argument("--problems", type=int, default=20, help="GSM8K problems (questions and solutions)")
    quality.add_argument("--tokens", type=int, default=64, help="greedy tokens per question")
    quality.add_argument(
        "--data", default=None, help="GSM8K JSONL (default: ../shared/data/gsm8k/test_dev.jsonl, else the sample)"
    )
    quality.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    add_engine_arguments(quality)
    quality.set_defaults(func=cmd_quality)
