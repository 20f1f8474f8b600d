"""Reports from `results.jsonl`: accuracy, mean tokens, mean passes and wall time per strategy and budget, written
as `summary.json`, a markdown table (`results.md`) and `accuracy.png` (accuracy against sequential forward passes,
one curve per strategy). Everything here is recomputed from the records alone, so `hogwild eval report DIR`
redraws the same files after a run, an interrupted run or a resumed one.
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
        rows.append({
            "strategy": strategy, "budget": budget, "problems": n,
            "correct": sum(bool(r["correct"]) for r in group),
            "accuracy": sum(bool(r["correct"]) for r in group) / n,
            "mean_tokens": sum(r["tokens"] for r in group) / n,
            "mean_passes": sum(r["passes"] for r in group) / n,
            "mean_wall_s": sum(r["wall_s"] for r in group) / n,
        })  # fmt: skip
    return rows


def markdown(rows: list[dict], title: str = "") -> str:
    lines = [f"{title}\n" if title else ""]
    lines.append("| strategy | budget | problems | accuracy | mean tokens | mean passes | mean wall s |")
    lines.append("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        lines.append(
            f"| {r['strategy']} | {r['budget']} | {r['problems']} | {r['accuracy']:.1%} ({r['correct']}) | "
            f"{r['mean_tokens']:.1f} | {r['mean_passes']:.1f} | {r['mean_wall_s']:.1f} |"
        )
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
    ax.set_ylabel("accuracy (%)")
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
        gold = r["gold"]
        correct = grading.grade_all(r["answer"], gold) if isinstance(gold, list) else grading.grade(r["answer"], gold)
        changed += correct != r["correct"]
        r["correct"] = correct
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
    summary = {"config": config, "rows": rows}
    before = out / "summary.json"
    if run is None and before.exists():  # a redraw keeps what the run that wrote the results measured
        run = json.loads(before.read_text()).get("run")
    if run:
        summary["run"] = run
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "results.md").write_text(markdown(rows, f"**{title}**" if title else ""))
    plot(rows, out / "accuracy.png", title)
    return rows
