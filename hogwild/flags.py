"""The flags every command shares: the engine's (model, weights, threads, KV memory), sampling's and the
Hogwild! protocol's, and the configs they make.

A leaf below every command (`hogwild generate`, `solve`, `bench`, `serve`, `eval`): each imports its flags from
here, so no command reaches up into the root command for them. Defaults come from the config dataclasses, never
restated here.
"""

from __future__ import annotations

import argparse
import dataclasses

from hogwild.collab import prompts
from hogwild.collab.protocol import REPEAT_GUARDS, TOP_P, CollabConfig
from hogwild.engine import EngineConfig
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
        help="how the linears' weights are stored: gguf (a GGUF's own quantized blocks, multiplied where they lie "
        "by hogwild's kernels, CPU), int8 (per-channel scales, fbgemm, CPU), int4 (groups of 32, bf16 activations, "
        "CPU), bf16 or fp32; auto, on CPUs with AVX2 or better: gguf for a GGUF model (every named model), else "
        "int4 for 4-bit weights and int8 for the rest; bf16 on GPUs",
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
        "--mmap",
        action="store_true",
        help="multiply a GGUF's blocks where the file is mapped (pages shared with the page cache and other "
        "processes) instead of reading them into private memory, 2 MB pages where the kernel gives them; reading "
        "is the default when the memory is there, as a step streams those pages faster (the 1.5B's matrices: "
        "28 ms a step against 37 ms mapped, Zen 4)",
    )
    group.add_argument(
        "--step-tokens",
        type=int,
        default=default(EngineConfig, "step_tokens"),
        help="tokens fed per forward pass at most, all rows together (longer prompts go in chunks)",
    )


def add_sampling_arguments(parser: argparse.ArgumentParser, max_tokens: bool = True) -> None:
    """Sampling flags; without `max_tokens` (a collaboration), temperature, top-p and top-k default to the
    workers' sampling (`default_sampling`): greedy unless a temperature is given, then the model's generation
    settings for the rest, else top-p 0.95."""
    group = parser.add_argument_group("sampling")
    workers = "" if max_tokens else "; default: the model's generation settings, else "
    group.add_argument(
        "--temperature",
        type=float,
        default=default(SamplingParams, "temperature") if max_tokens else None,
        help="0 means greedy (argmax)"
        + ("" if max_tokens else "; default: greedy, which measured best for collaborations; a temperature samples"),
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

    def switch(flag: str, help: str) -> None:
        """An on/off flag (`--x` / `--no-x`) for the CollabConfig field it names, defaulting to that field's."""
        field = flag.removeprefix("--").replace("-", "_")
        group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default(CollabConfig, field), help=help)

    group.add_argument(
        "--opening",
        choices=prompts.OPENINGS,
        default=default(CollabConfig, "opening"),
        help="first steps: crosscheck (every worker solves the whole problem apart, as a lone worker would, the "
        "first with the run's sampling and the others sampled; answers that differ are settled by a check that "
        "reads all the solutions), plan (the first worker proposes a split, the others start once it is "
        "written), paper (the Hogwild! paper's openers, everyone at once) or symmetric (headers only); --assign "
        "takes the place of the opening on a problem of several parts",
    )
    switch(
        "--mask",
        "never draw tokens that forge the scratchpad's structure (markup, special tokens, headers)",
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
    switch(
        "--copy-guard",
        "a worker never writes an 8-token run that another worker already wrote: the token that would end it "
        "is not drawn",
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
    switch(
        "--part-steps",
        "with --assign: a step is a part's whole solution, ended by its answer (not a paragraph)",
    )
    switch(
        "--steal",
        "with --assign: a worker done with its parts takes the last part another worker has not begun",
    )
    switch(
        "--quote-parts",
        "with --assign: the engine writes each part's statement (from the problem's 'Problem N:' lines) after "
        "its heading, in one forward pass, where the model would copy it a token a pass",
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
    "opening", "mask", "min_step_tokens", "max_step_tokens", "repeat_guard", "repeat_threshold", "copy_guard",
    "self_check_every", "assign", "part_steps", "steal", "quote_parts",
    "parts",
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
        mmap=args.mmap,
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
