"""lm-evaluation-harness as a real client of `hogwild serve`: its `local-completions` model against a server this
script starts on loopback, on two tasks it writes (no network: local YAML and JSONL, the model's own tokenizer
folder), at `--batch_size 4`:

- `hogwild_arith_gen`, generate_until: short arithmetic questions, greedy answers cut at a newline (lists of
  prompts in one completions request);
- `hogwild_arith_mc`, multiple_choice: the same questions with four candidate answers, scored by loglikelihood
  (`echo` with `logprobs`: the prompt's own token log-probabilities).

Both must finish, and every loglikelihood lm-eval read from the server must equal hogwild's own scoring of the
same tokens (`hogwild.scoring.score`, on an engine loaded here with the same settings); the script prints the
tasks' metrics, the timings and the largest difference, and exits non-zero on a mismatch.
lm-eval is not a dependency of hogwild: `.venv/bin/pip install 'lm-eval[api]==0.4.13'`.

    .venv/bin/python scripts/lm_eval_check.py
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from load_test import free_port, start_server  # scripts/ is on the path when a script in it runs

from hogwild.engine import Engine, EngineConfig
from hogwild.model.registry import resolve_model_dir
from hogwild.scoring import score

GEN_TASK = """task: hogwild_arith_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: " {{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: true
"""
MC_TASK = """task: hogwild_arith_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def write_tasks(folder: Path, count: int) -> None:
    """Seeded arithmetic questions, each with its answer and four candidates."""
    rng = random.Random(0)
    rows = []
    for _ in range(count):
        a, b = rng.randint(2, 30), rng.randint(2, 30)
        answer = a + b
        wrong = rng.sample([answer + d for d in (-10, -2, -1, 1, 2, 10) if answer + d > 0], 3)
        choices = [str(c) for c in [answer, *wrong]]
        rng.shuffle(choices)
        rows.append({"question": f"What is {a} + {b}?", "answer": str(answer), "choices": [" " + c for c in choices],
                     "label": choices.index(str(answer))})  # fmt: skip
    data = folder / "arith.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / "hogwild_arith_gen.yaml").write_text(GEN_TASK.format(data=data))
    (folder / "hogwild_arith_mc.yaml").write_text(MC_TASK.format(data=data))


def run_lm_eval(url: str, model: str, tokenizer: Path, tasks: Path, out: Path, batch_size: int) -> float:
    model_args = {
        "base_url": url + "/v1/completions",
        "model": model,
        "tokenizer_backend": "huggingface",
        "tokenizer": str(tokenizer),
        "max_retries": 1,
        "timeout": 600,
    }
    command = [sys.executable, "-m", "lm_eval", "run", "--model", "local-completions"]
    command += ["--model_args", ",".join(f"{k}={v}" for k, v in model_args.items())]
    command += ["--tasks", "hogwild_arith_gen,hogwild_arith_mc", "--include_path", str(tasks)]
    command += ["--batch_size", str(batch_size), "--output_path", str(out), "--log_samples", "--seed", "0"]
    offline = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    start = time.perf_counter()
    done = subprocess.run(command, env=offline, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise SystemExit(f"lm_eval_check: lm-eval failed:\n{done.stderr[-4000:]}")
    return time.perf_counter() - start


def read_outputs(out: Path) -> tuple[dict, dict[str, list[dict]]]:
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    samples = {}
    for task in ("hogwild_arith_gen", "hogwild_arith_mc"):
        path = next(out.rglob(f"samples_{task}_*.jsonl"))
        samples[task] = [json.loads(line) for line in path.read_text().splitlines()]
    return results, samples


def compare_loglikelihoods(samples: list[dict], tokenizer: Path, args: argparse.Namespace) -> tuple[int, float, int]:
    """hogwild's own score of every (context, continuation) lm-eval asked for, tokenized as lm-eval did; returns
    (pairs compared, the largest difference of the summed log-probability, greedy flags that differ)."""
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    # lm-eval's own tokenization of each pair (its model object; nothing is sent)
    lm = LocalCompletionsAPI(base_url="http://127.0.0.1:1/v1/completions", model="none",
                             tokenizer_backend="huggingface", tokenizer=str(tokenizer))  # fmt: skip
    engine = Engine.load(EngineConfig(model=args.model, threads=args.threads, weights=args.weights))
    pairs, worst, greedy_differs = 0, 0.0, 0
    for sample in samples:
        # lm-eval logs each request's arguments as {"gen_args_i": {"arg_0": context, "arg_1": continuation}} and its
        # responses as strings: [["-3.25", "False"]] (str of a float gives it back exactly)
        for arguments, response in zip(sample["arguments"].values(), sample["resps"], strict=True):
            context, continuation = arguments["arg_0"], arguments["arg_1"]
            context_ids, continuation_ids = lm._encode_pair(context, continuation)
            scores = score(engine, context_ids + continuation_ids)
            ours = scores.token[len(context_ids) - 1 :].tolist()
            greedy = scores.top_ids[len(context_ids) - 1 :, 0].tolist() == continuation_ids
            loglikelihood, is_greedy = response[0]
            worst = max(worst, abs(sum(ours) - float(loglikelihood)))
            greedy_differs += greedy != (is_greedy == "True")
            pairs += 1
    return pairs, worst, greedy_differs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="the model to serve (default: the default model)")
    parser.add_argument("--weights", default="auto", help="the server's and the scoring engine's weights")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server and of the scoring")
    parser.add_argument("--questions", type=int, default=16, help="questions in each task")
    parser.add_argument("--batch-size", type=int, default=4, help="lm-eval's --batch_size")
    args = parser.parse_args()
    try:
        import lm_eval  # noqa: F401
        import tenacity  # noqa: F401  (lm-eval's API models need it: its `api` extra)
    except ImportError:
        print("lm_eval_check: needs lm-eval: .venv/bin/pip install 'lm-eval[api]==0.4.13'", file=sys.stderr)
        return 2
    tokenizer = resolve_model_dir(args.model)
    with tempfile.TemporaryDirectory(prefix="hogwild-lm-eval-") as tmp:
        folder = Path(tmp)
        write_tasks(folder, args.questions)
        port = free_port()
        extra = ["--weights", args.weights] + (["--model", args.model] if args.model else [])
        server = start_server(port, args.threads, 0, extra)
        try:
            url = f"http://127.0.0.1:{port}"
            model = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
            seconds = run_lm_eval(url, model, tokenizer, folder, folder / "out", args.batch_size)
        finally:
            server.terminate()
            server.wait(timeout=30)
        results, samples = read_outputs(folder / "out")
    generated = [s for s in samples["hogwild_arith_gen"] if s["resps"] and isinstance(s["resps"][0][0], str)]
    pairs, worst, greedy_differs = compare_loglikelihoods(samples["hogwild_arith_mc"], tokenizer, args)
    gen, mc = results["results"]["hogwild_arith_gen"], results["results"]["hogwild_arith_mc"]
    print(f"lm-eval {results.get('lm_eval_version', '?')} local-completions against hogwild serve, --batch_size "
          f"{args.batch_size}, {model}, {args.threads} torch thread(s), {os.cpu_count()} cores")  # fmt: skip
    print(f"  generate_until:  {len(generated)}/{args.questions} answered, exact_match {gen['exact_match,none']:.3f}")
    print(f"  multiple_choice: {len(samples['hogwild_arith_mc'])}/{args.questions} scored ({pairs} loglikelihoods), "
          f"acc {mc['acc,none']:.3f}")  # fmt: skip
    print(f"  both tasks in {seconds:.1f} s (lm-eval's run, with its start)")
    print(f"  loglikelihoods against hogwild's own scoring: largest difference {worst:.2e}, "
          f"greedy flags that differ {greedy_differs}")  # fmt: skip
    ok = len(generated) == args.questions and pairs == 4 * args.questions and worst <= 1e-4 and not greedy_differs
    if not ok:
        print("lm_eval_check: FAILED: a task did not finish whole, or the numbers differ", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
