"""Reports from `results.jsonl`: accuracy, mean tokens, mean passes, redundancy and wall time per strategy and
budget, written as `summary.json`, a markdown table (`results.md`) and `accuracy.png` (accuracy against sequential
forward passes, one curve per strategy). Accuracy is per question (a problem of k questions counts k); beside it,
for multi-question problems, the share of problems with every answer right. Below the table: the fewest passes
at which each strategy reaches `single`'s accuracy at the largest budget. Everything here is recomputed from the
records alone, so `hogwild eval report DIR` redraws the same files after a run, an interrupted run or a resumed one.
"""

from __future__ import annotations

import json
from pathlib import Path

from hogwild.errors import HogwildError

RESULTS = "results.jsonl"
CONFIG = "config.json"


def summarize(records: list[dict], strategies: list[str] = ()) -> list[dict]:
    """One row per (strategy, budget), strategies in the order given (then as they first appear), budgets
    increasing."""
    groups: dict[tuple[str, int], list[dict]] = {}
    order: dict[str, int] = {name: i for i, name in enumerate(strategies)}
    for r in records:
        order.setdefault(r["strategy"], len(order))
        groups.setdefault((r["strategy"], r["budget"]), []).append(r)
    rows = []
    for (strategy, budget), group in sorted(groups.items(), key=lambda kv: (order[kv[0][0]], kv[0][1])):
        n = len(group)
        # records written before per-question scores count as one question each
        parts = sum(r.get("parts", 1) for r in group)
        right = sum(r.get("parts_correct", int(bool(r["correct"]))) for r in group)
        shares = [r["redundancy"] for r in group if r.get("redundancy") is not None]
        rows.append({
            "strategy": strategy, "budget": budget, "problems": n, "questions": parts,
            "correct": sum(bool(r["correct"]) for r in group),
            "questions_correct": right,
            "accuracy": right / parts,
            "all_correct": sum(bool(r["correct"]) for r in group) / n,
            "mean_tokens": sum(r["tokens"] for r in group) / n,
            "mean_passes": sum(r["passes"] for r in group) / n,
            "redundancy": sum(shares) / len(shares) if shares else None,
            "mean_wall_s": sum(r["wall_s"] for r in group) / n,
        })  # fmt: skip
    return rows


def reaching(rows: list[dict], reference: str = "single") -> list[dict]:
    """For each other strategy, the smallest budget at which it reaches the reference's accuracy at the largest
    budget, with its mean passes there against the reference's: [] without the reference, or when it answers
    nothing right (every strategy would "reach" 0% at once)."""
    mine = [r for r in rows if r["strategy"] == reference]
    if not mine:
        return []
    target = max(mine, key=lambda r: r["budget"])
    if target["accuracy"] == 0:
        return []
    out = []
    for strategy in dict.fromkeys(r["strategy"] for r in rows if r["strategy"] != reference):
        hit = next((r for r in rows if r["strategy"] == strategy and r["accuracy"] >= target["accuracy"]), None)
        out.append({
            "strategy": strategy, "target": target["accuracy"], "budget": hit and hit["budget"],
            "mean_passes": hit and hit["mean_passes"],
            "of_reference": hit and hit["mean_passes"] / max(target["mean_passes"], 1e-9),
        })  # fmt: skip
    return out


def markdown(rows: list[dict], title: str = "") -> str:
    multi = any(r.get("questions", r["problems"]) > r["problems"] for r in rows)
    lines = [f"{title}\n" if title else ""]
    head = "| strategy | budget | problems | accuracy |" + (" all right |" if multi else "")
    lines.append(head + " mean tokens | mean passes | redundancy | mean wall s |")
    lines.append("|---|---:|---:|---:|" + ("---:|" if multi else "") + "---:|---:|---:|---:|")
    for r in rows:
        share = "" if r.get("redundancy") is None else f"{r['redundancy']:.1%}"
        right = r.get("questions_correct", r["correct"])
        every = f" {r['all_correct']:.1%} ({r['correct']}) |" if multi else ""
        lines.append(
            f"| {r['strategy']} | {r['budget']} | {r['problems']} | {r['accuracy']:.1%} ({right}) |{every} "
            f"{r['mean_tokens']:.1f} | {r['mean_passes']:.1f} | {share} | {r['mean_wall_s']:.1f} |"
        )
    matches = reaching(rows)
    if matches:
        lines.append(
            f"\nSequential passes to reach single's accuracy at its largest budget ({matches[0]['target']:.1%}):\n"
        )
        lines.append("| strategy | at budget | mean passes | x single's |")
        lines.append("|---|---:|---:|---:|")
        for m in matches:
            if m["budget"] is None:
                lines.append(f"| {m['strategy']} | not reached | | |")
            else:
                lines.append(f"| {m['strategy']} | {m['budget']} | {m['mean_passes']:.1f} | {m['of_reference']:.2f} |")
    return "\n".join(lines).lstrip("\n") + "\n"


def plot(rows: list[dict], path: Path, title: str = "") -> None:
    try:
        import matplotlib
    except ImportError:
        raise HogwildError("drawing accuracy.png needs matplotlib: pip install 'hogwild[eval]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for strategy in dict.fromkeys(r["strategy"] for r in rows):
        points = [r for r in rows if r["strategy"] == strategy]
        ax.plot([r["budget"] for r in points], [100 * r["accuracy"] for r in points], marker="o", label=strategy)
    budgets = sorted({r["budget"] for r in rows})
    ax.set_xscale("log", base=2)
    ax.set_xticks(budgets, [str(b) for b in budgets])
    ax.minorticks_off()
    ax.set_xlabel("budget: sequential forward passes")
    ax.set_ylabel("accuracy per question (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def regrade(out: Path) -> int:
    """Grade every record of out/results.jsonl again with the current grader (its answers and golds are kept);
    rewrites the file and returns how many grades changed."""
    from hogwild.eval import grading
    from hogwild.eval.runner import read_results

    path = out / RESULTS
    records = read_results(path)
    changed = 0
    for r in records:
        golds = r["gold"] if isinstance(r["gold"], list) else [r["gold"]]
        right = grading.grade_parts(r["answer"], golds)
        changed += (right == len(golds)) != r["correct"] or right != r.get("parts_correct", right)
        r["correct"], r["parts"], r["parts_correct"] = right == len(golds), len(golds), right
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return changed


def title_of(config: dict) -> str:
    task = config.get("task", {})
    name = task.get("name", "?")
    detail = {"gsm8k-multi": f" k={task.get('k')}", "arithmetic": f" difficulty {task.get('difficulty')}"}
    return f"{config.get('model', '?')}, {name}{detail.get(name, '')}"


def write(out: Path, run: dict | None = None) -> list[dict]:
    """Recompute summary.json, results.md and accuracy.png in `out` from its results.jsonl; `run`: facts of the
    run that just finished (wall time, throughput) to add to the summary."""
    from hogwild.eval.runner import read_results

    path = out / RESULTS
    if not path.exists():
        raise HogwildError(f"no {RESULTS} in {out}")
    records = read_results(path)
    if not records:
        raise HogwildError(f"{path} holds no results yet")
    config = json.loads((out / CONFIG).read_text()) if (out / CONFIG).exists() else {}
    rows = summarize(records, [s.strip() for s in config.get("strategies", "").split(",") if s.strip()])
    title = title_of(config) if config else ""
    summary = {"config": config, "rows": rows, "reaching_single": reaching(rows)}
    before = out / "summary.json"
    if run is None and before.exists():  # a redraw keeps what the run that wrote the results measured
        run = json.loads(before.read_text()).get("run")
    if run:
        summary["run"] = run
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "results.md").write_text(markdown(rows, f"**{title}**" if title else ""))
    plot(rows, out / "accuracy.png", title)
    return rows
