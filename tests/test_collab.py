"""Collaboration mechanics: steps, history, self-check cadence, stopping, the finisher, Group Think, bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import transformers

import hogwild
from hogwild.attention import Row
from hogwild.collab import prompts
from hogwild.collab.protocol import CollabConfig, Collaboration, NudgeInserted, StepFinished, StepStarted
from hogwild.collab.text import boxed_answer, step_ends
from hogwild.engine import Engine, EngineConfig
from hogwild.errors import HogwildError
from hogwild.model.config import ModelConfig
from hogwild.model.decoder import Decoder
from hogwild.model.tokenizer import Tokenizer
from hogwild.runs import Done, Token


class ScriptedEngine(Engine):
    """A real engine over a tiny random model whose next-token choice follows a script per worker.

    The cache, the views and the protocol run for real; only the logits are replaced: worker i's row gets a one-hot
    on the next token of its script. The script advances when the row feeds exactly that token back (a sampled
    token), so header insertions and passes whose logits the protocol discards do not consume it."""

    def __init__(self, tokenizer: Tokenizer, scripts: list[str]) -> None:
        torch.manual_seed(0)
        hf = transformers.LlamaConfig(
            vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=8192, tie_word_embeddings=True,
        )  # fmt: skip
        model = transformers.LlamaForCausalLM(hf)
        config = ModelConfig.from_hf(hf.to_dict())
        super().__init__(Decoder(config, dict(model.state_dict()), torch.float32), tokenizer, EngineConfig())
        self.scripts = [tokenizer.encode(s, add_special_tokens=False) for s in scripts]
        self.pointer = [0] * len(scripts)

    def run_model(self, rows: list[Row], wanted: list[int]) -> torch.Tensor:
        logits = super().run_model(rows, wanted)
        forced = torch.full_like(logits, -1e9)
        for r, row in enumerate(rows[i] for i in wanted):
            name = row.own.name
            w = int(name.removeprefix("worker")) if name.startswith("worker") else 0
            script, p = self.scripts[w], self.pointer[w]
            if p < len(script) and row.tokens == [script[p]]:
                p = self.pointer[w] = p + 1
            forced[r, script[p] if p < len(script) else next(iter(self.eos_ids))] = 0
        return forced


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    return Tokenizer.from_folder(default_model_dir)


def run_scripted(tokenizer, scripts, **config) -> tuple[list, object, Collaboration]:
    engine = ScriptedEngine(tokenizer, scripts)
    run = Collaboration(engine, "Add 2 and 3.", CollabConfig(workers=len(scripts), **config))
    events = list(engine.stream(run))
    assert isinstance(events[-1], Done)
    return events, events[-1].result, run


def test_steps_move_into_history_at_paragraph_ends_not_inside_code_or_math(tokenizer):
    alice = "First I add 2 and 3.\n\nCode:\n```\nx = 2\n\ny = 3\n```\n\nSo $$x +\n\ny$$ is 5.\n\nThis keeps going on"
    bob = "I check Alice.\n\nIt is right.\n\n"
    events, result, run = run_scripted(tokenizer, [alice, bob], budget=120, self_check_every=0)
    steps = [(e.worker, e.text) for e in events if isinstance(e, StepFinished)]
    alice_steps = [text for w, text in steps if w == 0]
    assert alice_steps[:3] == [
        "**Alice [1]:** First I add 2 and 3.\n\n",
        "**Alice [2]:** Code:\n```\nx = 2\n\ny = 3\n```\n\n",
        "**Alice [3]:** So $$x +\n\ny$$ is 5.\n\n",
    ]
    assert [text for w, text in steps if w == 1][:2] == [
        "**Bob [1]:** I check Alice.\n\n",
        "**Bob [2]:** It is right.\n\n",
    ]
    # the result's history lists the finished steps in completion order, and so does the cache's history block
    assert [(h.worker, h.text) for h in result.history] == steps
    assert tokenizer.decode(run.shared.history.tokens) == prompts.HISTORY_TITLE + "".join(text for _, text in steps)


def test_self_check_question_opens_steps_at_the_configured_cadence(tokenizer):
    sentence = "One more small step is done.\n\n"
    per_step = len(tokenizer.encode(sentence, add_special_tokens=False))
    events, result, run = run_scripted(tokenizer, [sentence * 12, sentence * 12], budget=150, self_check_every=10)
    every = -(-10 // per_step)  # steps it takes to write 10 tokens
    for w, name in enumerate(["Alice", "Bob"]):
        nudged = [e for e in events if isinstance(e, NudgeInserted) and e.worker == w]
        started = [e.step for e in events if isinstance(e, StepStarted) and e.worker == w]
        nudged_steps = [
            s for s in started if f"{prompts.header(name, s)}{prompts.SELF_CHECK}" in result.workers[w].text
        ]
        assert len(nudged) == len(nudged_steps) >= 2
        assert nudged_steps == [1 + every * k for k in range(1, len(nudged_steps) + 1)]


def test_run_stops_on_a_boxed_answer(tokenizer):
    alice = "Two plus three is five.\n\nSo the answer is \\boxed{5}.\n\nMore text that never comes."
    events, result, run = run_scripted(tokenizer, [alice, "I agree with Alice.\n\n"], budget=200, self_check_every=0)
    assert result.answer == "5"
    assert result.finished_by == "answer"
    assert result.forward_passes < 60
    assert "never comes" not in result.workers[0].text
    assert result.workers[0].text.endswith("So the answer is \\boxed{5}.\n\n")  # no header opened after the answer


def test_budget_ends_the_run_through_the_finisher(tokenizer):
    # the script runs into the finisher: after the budget, the finisher prompt and then "7}" from the script
    alice = "Let me think about it slowly and carefully" + " and more" * 40
    events, result, run = run_scripted(tokenizer, [alice], budget=30, self_check_every=0)
    assert result.finished_by == "budget"
    assert result.forward_passes > 30  # the budget plus the finisher's passes
    assert prompts.finisher("Alice").strip() in result.workers[0].text


def test_one_worker_is_plain_chain_of_thought(tokenizer):
    """One worker, no headers: the text equals ordinary greedy generation from the same prompt."""
    engine = hogwild.load(EngineConfig(dtype="float32", threads=1))
    result = hogwild.solve("What is 6 times 7?", engine=engine, workers=1, budget=48)
    run = Collaboration(engine, "What is 6 times 7?", CollabConfig(workers=1, budget=48))
    prompt_ids = run.prompt_ids + run.first_feed[0]
    plain = engine.tokenizer.decode(list(engine.generate(prompt_ids, hogwild.SamplingParams(max_tokens=48))))
    written = result.workers[0].text.split(prompts.finisher("Alice"))[0]
    assert len(written) > 20 and written == plain
    assert "**Alice" not in written


def test_group_think_thinkers_write_without_steps(tokenizer):
    events, result, run = run_scripted(
        tokenizer, ["I take the first half.\n\n", "I take the second half.\n\n"], budget=20, mode="groupthink"
    )
    assert result.history == []
    assert not any(isinstance(e, StepStarted) for e in events)
    assert result.workers[0].text.startswith("I take the first half.")
    assert result.workers[1].text.startswith("I take the second half.")


def test_default_model_two_workers_collaborate(default_model_dir):
    engine = hogwild.load(EngineConfig(threads=1))
    events = list(
        hogwild.solve_stream(
            "What is 12 + 30? Answer in \\boxed{}.", engine=engine, workers=2, budget=64, seed=0, temperature=0.7
        )
    )
    result = events[-1].result
    tokens = [e for e in events if isinstance(e, Token) and e.token >= 0]
    assert {e.worker for e in tokens} == {0, 1}
    for i, name in enumerate(["Alice", "Bob"]):
        assert result.workers[i].text.startswith(f"**{name} [1]:** ")
    assert all(h.text.startswith(f"**{result.workers[h.worker].name} [{h.step}]:** ") for h in result.history)
    assert result.forward_passes >= min(64, result.forward_passes)
    assert result.to_dict()["answer"] == result.answer


def test_text_rules():
    assert step_ends("It is 5.\n\n")
    assert not step_ends("It is 5.\n")
    assert not step_ends("We have:\n\n")
    assert not step_ends("```py\nx = 1\n\n")
    assert not step_ends("$$ a +\n\n")
    assert step_ends("line one\n", force=True)
    assert boxed_answer("so \\boxed{\\frac{1}{2}} and") == "\\frac{1}{2}"
    assert boxed_answer("first \\boxed{1} then \\boxed{2}") == "2"
    assert boxed_answer("\\boxed{unclosed") is None
    assert boxed_answer("write it as \\boxed{...}.") is None  # the prompt's placeholder, copied
    assert boxed_answer("\\boxed{7} then \\boxed{ }") == "7"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"workers": 0}, "workers must be between 1 and 16"),
        ({"workers": 17}, "workers must be between 1 and 16"),
        ({"layout": "diagonal"}, "unknown layout 'diagonal'"),
        ({"mode": "chaos"}, "unknown mode 'chaos'"),
        ({"budget": 0}, "budget must be at least 1"),
    ],
)
def test_bad_config(kwargs, message):
    with pytest.raises(HogwildError, match=message):
        CollabConfig(**kwargs)


def test_bad_problem_and_small_budget(tokenizer):
    engine = ScriptedEngine(tokenizer, ["x"])
    with pytest.raises(HogwildError, match="problem is empty"):
        Collaboration(engine, "  ", CollabConfig())
    with pytest.raises(HogwildError, match="too small"):
        Collaboration(engine, "Add 2 and 3.", CollabConfig(budget=3))


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hogwild", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "args",
    [
        ["solve", "Q", "--workers", "0"],
        ["solve", "Q", "--workers", "99"],
        ["solve", "", "--workers", "2"],
        ["solve", "Q", "--layout", "diagonal"],
        ["solve", "Q", "--mode", "chaos"],
        ["solve", "Q", "--budget", "2"],
    ],
)
def test_cli_bad_input_one_line(args):
    proc = _cli(*args, "--threads", "1")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hogwild: error: "), proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_solve_json_on_default_model():
    proc = _cli(
        "solve",
        "What is 17 * 23? Answer in \\boxed{}.",
        "--workers",
        "2",
        "--budget",
        "256",
        "--json",
        "--threads",
        "1",
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert "answer" in out and out["forward_passes"] >= 1
    assert [w["name"] for w in out["workers"]] == ["Alice", "Bob"]
    assert all(w["tokens"] > 0 for w in out["workers"])
    assert out["elapsed_s"] < 60
