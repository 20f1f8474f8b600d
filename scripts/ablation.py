"""Ablation of the Hogwild! protocol: one `hogwild eval` of hogwild:N per setting (the defaults, then each choice
changed alone), beside one of `single`, each in its own folder under --out, and one table of them side by side.
The stepped protocol's settings start from the plan opening (its steps, nudges and guards are what they vary);
--assigned, from the assigned parts' defaults.

Each setting is a set of `hogwild eval` flags (see `hogwild eval --help`, group "protocol"); a folder that holds
results already is resumed, so an interrupted ablation goes on where it stopped.

    .venv/bin/python scripts/ablation.py --model qwen2.5-coder-1.5b --threads 2 --limit 8 --budgets 256,512 \\
        --out docs/eval/ablation-1.5b
    .venv/bin/python scripts/ablation.py --assigned --model qwen2.5-coder-1.5b --threads 2 --limit 8 \\
        --budgets 512,1024 --out docs/eval/ablation-1.5b-assigned
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

SETTINGS = {
    "default": [],
    "sampled": ["--temperature", "0.6"],  # the paper's sampling (the default is greedy)
    "no mask": ["--no-mask"],
    "line steps": ["--min-step-tokens", "0"],
    "no repeat guard": ["--repeat-guard", "off"],
    "resample first": ["--repeat-guard", "resample"],
    "copy guard": ["--copy-guard"],
    "no self-check": ["--self-check-every", "0"],
    "self-check every 128": ["--self-check-every", "128"],
    "symmetric opening": ["--opening", "symmetric"],
    "paper opening": ["--opening", "paper"],
    "cross-check opening": ["--opening", "crosscheck"],  # every worker solves it all apart (the default opening)
    "assigned parts": ["--assign"],
}
# the stepped protocol's settings start from the plan opening (a later --opening in a setting takes its place)
STEPPED = ["--opening", "plan"]
# --assigned: the engine splits the parts (--assign); its defaults, then each of its choices changed alone
ASSIGNED = {
    "default": [],
    "sampled": ["--temperature", "0.6"],
    "no quote": ["--no-quote-parts"],  # the model copies each part's statement itself
    "paragraph steps": ["--no-part-steps"],  # a step ends at a paragraph break, not at the part's answer
    "no steal": ["--no-steal"],
    "contiguous layout": ["--layout", "contiguous"],
    "combined layout": ["--layout", "combined"],
    "no repeat guard": ["--repeat-guard", "off"],
}


def folder(name: str) -> str:
    return name.replace(" ", "-")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-1.5b")
    parser.add_argument("--weights", default="auto")
    parser.add_argument("--threads", default="0")
    parser.add_argument("--task", default="gsm8k-multi")
    parser.add_argument("--k", default="4")
    parser.add_argument("--limit", default="8")
    parser.add_argument("--budgets", default="256,512")
    parser.add_argument("--workers", default="2")
    parser.add_argument("--assigned", action="store_true", help="the assigned parts' settings (with --assign)")
    parser.add_argument("--only", default="", help="comma-separated setting names (default: all, and single)")
    parser.add_argument("--out", default="docs/eval/ablation")
    args = parser.parse_args()
    settings = ASSIGNED if args.assigned else SETTINGS
    names = [n.strip() for n in args.only.split(",") if n.strip()] or ["single", *settings]
    unknown = [n for n in names if n != "single" and n not in settings]
    if unknown:
        parser.error(f"unknown settings {unknown}: choose from single, {', '.join(settings)}")
    common = [
        "--task", args.task, "--k", args.k, "--limit", args.limit, "--budgets", args.budgets,
        "--model", args.model, "--weights", args.weights, "--threads", args.threads,
    ]  # fmt: skip
    hogwild = str(Path(sys.executable).with_name("hogwild"))
    for name in names:
        strategy = "single" if name == "single" else f"hogwild:{args.workers}"
        flags = [] if name == "single" else (["--assign"] if args.assigned else STEPPED) + settings[name]
        out = Path(args.out) / folder(name)
        print(f"ablation: {name}: hogwild eval --strategies {strategy} {' '.join(flags)}", file=sys.stderr, flush=True)
        done = subprocess.run([hogwild, "eval", *common, "--strategies", strategy, *flags, "--out", str(out)])
        if done.returncode:
            return done.returncode
    print(table(Path(args.out), names))
    return 0


def table(out: Path, names: list[str]) -> str:
    """One row per setting: per-question accuracy at every budget, then the largest budget's all-right share,
    mean passes and redundancy."""
    rows = {name: json.loads((out / folder(name) / "summary.json").read_text())["rows"] for name in names}
    budgets = sorted({r["budget"] for got in rows.values() for r in got})
    head = "| setting | " + " | ".join(f"accuracy at {b}" for b in budgets)
    lines = [head + f" | all right at {budgets[-1]} | mean passes | redundancy |"]
    lines.append("|---|" + "---:|" * (len(budgets) + 3))
    for name, got in rows.items():
        by = {r["budget"]: r for r in got}
        last = by[budgets[-1]]
        share = "" if last.get("redundancy") is None else f"{last['redundancy']:.1%}"
        cells = [f"{by[b]['accuracy']:.1%}" if b in by else "" for b in budgets]
        lines.append(
            f"| {name} | {' | '.join(cells)} | {last['all_correct']:.1%} | {last['mean_passes']:.0f} | {share} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
