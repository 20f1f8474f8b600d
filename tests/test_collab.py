"""Collaboration mechanics: steps, history, the logits mask, per-worker generators, openings, the self-check
cadence, the repeated-step guard, stopping, the finisher, the readable reply, Group Think, Skeleton-of-Thought,
redundancy, bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import transformers
from tiny import tiny_engine

import hogwild
from hogwild.attention import Row
from hogwild.collab import prompts
from hogwild.collab.masks import masks
from hogwild.collab.protocol import (
    CollabConfig,
    Collaboration,
    NudgeInserted,
    Pass,
    StepDiscarded,
    StepFinished,
    StepStarted,
    default_sampling,
)
from hogwild.collab.redundancy import N, copied, redundancy, repeated
from hogwild.collab.text import boxed_answer, step_ends
from hogwild.engine import Engine, EngineConfig
from hogwild.errors import HogwildError
from hogwild.model.config import ModelConfig
from hogwild.model.decoder import Decoder
from hogwild.model.tokenizer import Tokenizer
from hogwild.runs import Done, Token
from hogwild.sampling import GREEDY, SamplingParams, sample


class ScriptedEngine(Engine):
    """A real engine over a tiny random model whose next-token choice follows a script per worker.

    The cache, the views and the protocol run for real; only the logits are replaced: worker i's row gets a one-hot
    on the next token of its script. The script advances when the row feeds exactly that token back (a sampled
    token, which may come with a paragraph break the protocol ends a step with), so header insertions and passes
    whose logits the protocol discards do not consume it."""

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
            fed = row.tokens[:1] == [script[p]] if p < len(script) else False
            if fed and not self.tokenizer.decode(row.tokens[1:]).strip():  # a sampled token (and a paragraph break)
                p = self.pointer[w] = p + 1
            forced[r, script[p] if p < len(script) else next(iter(self.eos_ids))] = 0
        return forced


# the step mechanics alone: every worker starts at once, a paragraph break ends a step, nothing is left out
MECHANICS = {"opening": "symmetric", "min_step_tokens": 0, "repeat_guard": "off"}


def run_scripted(
    tokenizer, scripts, engine=None, sampling=None, problem="Add 2 and 3.", **config
) -> tuple[list, object, Collaboration]:
    """The scripts' run, sampled at 0.6 unless told: past its script a row writes filler, which greedy decoding
    would repeat (and the repeat guard then leave out) where sampling writes something new each time."""
    engine = engine or ScriptedEngine(tokenizer, scripts)
    sampling = sampling or default_sampling(engine, temperature=0.6)
    run = Collaboration(engine, problem, CollabConfig(workers=len(scripts), **(MECHANICS | config)), sampling)
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


def test_self_check_counts_every_workers_tokens_and_is_answered_yes_or_no(tokenizer):
    sentence = "One more small step is done.\n\n"
    per_step = len(tokenizer.encode(sentence, add_special_tokens=False))
    events, result, run = run_scripted(tokenizer, [sentence * 12, sentence * 12], budget=150, self_check_every=10)
    answers = masks(tokenizer, run.names, run.engine.eos_ids, run.engine.model_config.vocab_size).answers
    written, since, nudged, pending = 0, [], [], {}
    for e in events:
        if isinstance(e, Token) and e.token >= 0:
            written += 1
            if e.worker in pending:  # the first token after a question is its answer
                assert e.token in answers and pending.pop(e.worker) is not None
        if isinstance(e, NudgeInserted):
            assert e.text == prompts.SELF_CHECK
            since.append(written)
            nudged.append(e.worker)
            pending[e.worker] = e
            written = 0
    assert len(since) >= 4 and set(nudged) == {0, 1}
    # every question waits for 10 tokens of both workers together, and comes with the next step that opens
    assert all(10 <= n < 10 + 2 * per_step for n in since), since


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


class LuredEngine(ScriptedEngine):
    """A scripted engine whose every row gives `lure` the logit `weight`: above the script's token (0) it is liked
    best, below it it comes second."""

    def __init__(self, tokenizer: Tokenizer, scripts: list[str], lure: int, weight: float = 5.0) -> None:
        super().__init__(tokenizer, scripts)
        self.lure, self.weight = lure, weight

    def run_model(self, rows: list[Row], wanted: list[int]) -> torch.Tensor:
        forced = super().run_model(rows, wanted)
        forced[:, self.lure] = torch.clamp(forced[:, self.lure], min=self.weight)
        return forced


@pytest.mark.parametrize("mask", [True, False])
def test_masked_tokens_are_never_drawn_and_steps_still_end(tokenizer, mask):
    (lure,) = tokenizer.encode("###", add_special_tokens=False)
    script = "I add 2 and 3.\n\nIt makes 5.\n\n"
    engine = LuredEngine(tokenizer, [script, script], lure)
    events, result, run = run_scripted(
        tokenizer, [script, script], engine=engine, budget=40, self_check_every=0, mask=mask
    )
    end = next(i for i, e in enumerate(events) if isinstance(e, Token) and e.text == run.finisher_text)
    drawn = [e.token for e in events[:end] if isinstance(e, Token) and e.token >= 0]  # the finisher is unmasked
    finished = [e.text for e in events if isinstance(e, StepFinished)]
    assert (lure in run.params["write"].banned) == mask
    if mask:
        assert lure not in drawn and "#" not in "".join(w.text.split(run.finisher_text)[0] for w in result.workers)
        assert "**Alice [1]:** I add 2 and 3.\n\n" in finished and "**Bob [2]:** It makes 5.\n\n" in finished
    else:  # without the mask the lure wins every draw and no step ends at a paragraph break
        assert drawn and all(t == lure for t in drawn) and finished == []
        return
    # right after a `*` a worker's name is banned too (a forged `**Bob [2]:**`), never otherwise
    (bob,) = tokenizer.encode("Bob", add_special_tokens=False)
    assert bob in run.params["star"].banned and bob not in run.params["write"].banned


def test_each_worker_draws_from_its_own_generator(tokenizer):
    engine = ScriptedEngine(tokenizer, ["x", "x"])
    logits = torch.zeros(2, 64)  # the same view for both rows: the same logits, every token equally likely

    def draws(temperature: float, seed: int) -> list[tuple[int, int]]:
        sampling = SamplingParams(temperature=temperature, top_p=1.0, seed=seed)
        run = Collaboration(engine, "Add 2 and 3.", CollabConfig(workers=2), sampling)
        alice, bob = (w.generator for w in run.workers)
        rows = [(sample(logits[:1], sampling, alice), sample(logits[1:], sampling, bob)) for _ in range(12)]
        return [(int(a), int(b)) for a, b in rows]

    sampled = draws(1.0, seed=3)
    assert sum(a != b for a, b in sampled) >= 8  # two workers, two streams
    assert draws(1.0, seed=3) == sampled != draws(1.0, seed=4)  # seeded: the same run draws the same tokens
    assert all(a == b == 0 for a, b in draws(0.0, seed=3))  # greedy: argmax for both, no generator


def test_a_run_given_no_sampling_decodes_greedily_and_a_temperature_samples(tokenizer):
    engine = ScriptedEngine(tokenizer, ["x"])
    run = Collaboration(engine, "Add 2 and 3.")
    assert (run.sampling.temperature, run.sampling.seed) == (0, 0) and run.sampling.greedy
    sampled = Collaboration(engine, "Add 2 and 3.", sampling=default_sampling(engine, temperature=0.6))
    assert (sampled.sampling.temperature, sampled.sampling.top_p) == (0.6, 0.95)  # no model settings: the paper's
    assert all(w.generator is not None for w in sampled.workers)
    assert default_sampling(engine, sampled=True).temperature == 0.6  # independent samples sample by default


def test_plan_opening_the_others_start_once_the_plan_is_written(tokenizer):
    alice = " add the numbers, Bob checks.\n\nTwo plus three is five.\n\n"
    bob = " the check of the sum.\n\nIt is right.\n\n"  # Bob's first line: "Alice's plan gives me"
    events, result, run = run_scripted(tokenizer, [alice, bob], budget=60, self_check_every=0, opening="plan")
    plan = next(i for i, e in enumerate(events) if isinstance(e, StepFinished) and e.worker == 0)
    first_bob = next(i for i, e in enumerate(events) if isinstance(e, Token) and e.worker == 1 and e.token >= 0)
    assert plan < first_bob
    assert result.workers[0].text.startswith("**Alice [1]:** Hi, I'm Alice. Here is how we split the work: I add")
    assert result.workers[1].text.startswith("**Bob [1]:** Hi, I'm Bob. Alice's plan gives me the check")
    assert prompts.opening("plan", run.names, 0, parts=4).endswith("split the 4 problems: I take problem")


def test_paper_opening_and_assigned_parts(tokenizer):
    events, result, run = run_scripted(tokenizer, ["x\n\n", "y\n\n"], budget=20, opening="paper")
    assert result.workers[0].text.startswith("**Alice [1]:** Hi, I'm Alice. Here's how we can")
    assert result.workers[1].text.startswith("**Bob [1]:** Hi, I'm Bob.")
    events, result, run = run_scripted(tokenizer, ["x\n\n", "y\n\n"], budget=20, parts=4, assign=True)
    assert result.workers[0].text.startswith("**Alice [1]:** I take problems 1 and 2 (Bob takes problems 3 and 4).")
    assert result.workers[1].text.startswith("**Bob [1]:** I take problems 3 and 4 (Alice takes problems 1 and 2).")
    assert prompts.assignment(["Alice", "Bob", "Carol"], 2, 5) == (
        "I take problem 5 (Alice takes problems 1 and 2; Bob takes problems 3 and 4). Problem 5:"
    )
    assert "Back to my own problems 1 and 2:" in prompts.repeat_nudge(run.names, 0, 1, None, [1, 2])
    # a problem of one part has nothing to assign: the opening is the plan's
    events, result, run = run_scripted(tokenizer, ["x\n\n", "y\n\n"], budget=20, assign=True, opening="plan")
    assert result.workers[0].text.startswith("**Alice [1]:** Hi, I'm Alice. Here is how we split the work: I")


@pytest.mark.parametrize("layout", ["contiguous", "combined"])
def test_assigned_parts_go_part_by_part_and_their_answers_make_the_answer(tokenizer, layout):
    # each worker boxes its first part's answer, then its second's; the engine opens each next part, a worker with
    # every part answered stops, and the answer is the parts' answers in part order (Bob's 3 and 4 after Alice's)
    alice = " 2 + 3 = 5, \\boxed{5} and more. 4 \\boxed{4}. Then I keep talking for a long while here.\n\n"
    bob = " 7. \\boxed{7} 9 is \\boxed{9}\n\n"
    events, result, run = run_scripted(
        tokenizer, [alice, bob], budget=120, parts=4, assign=True, layout=layout, min_step_tokens=48
    )
    assert result.answer == "5; 4; 7; 9" and result.finished_by == "answer"
    assert run.part_answers == {1: "5", 2: "4", 3: "7", 4: "9"}
    a, b = (w.text for w in result.workers)
    assert "Problem 1: 2 + 3 = 5, \\boxed{5}" in a
    assert "keep talking" not in a  # done with its parts, Alice writes no more
    if layout == "contiguous":  # one text per worker: no header after the first
        assert a.count("**Alice [") == 1 and "\\boxed{5}\n\nProblem 2: and more. 4 \\boxed{4}" in a
        assert b.count("**Bob [") == 1 and "\\boxed{7}\n\nProblem 4: 9 is \\boxed{9}" in b
    else:
        assert "**Alice [2]:** Problem 2: and more. 4 \\boxed{4}" in a
        assert "**Bob [2]:** Problem 4: 9 is \\boxed{9}" in b
    assert "one after another" in prompts.collaboration_prompt("Problem 1: x", run.names, 4, assign=True)


def test_assigned_parts_at_the_budget_the_finisher_box_opens_with_the_known_answers(tokenizer):
    # Alice answers her two parts; Bob never boxes his: at the budget the finisher's box repeats 1 and 2 and the
    # model writes the rest
    alice = " \\boxed{5} \\boxed{4}\n\n"
    bob = " I am thinking about this problem for a long time without ever reaching any answer at all, " * 4
    events, result, run = run_scripted(tokenizer, [alice, bob], budget=60, parts=4, assign=True, layout="contiguous")
    assert result.finished_by == "budget" and run.part_answers == {1: "5", 2: "4"}
    assert run._question(run.workers[0]).endswith("are \\boxed{5; 4; ")
    assert "\\boxed{5; 4; " in result.workers[0].text


def test_coarse_steps_hold_a_paragraph_of_work(tokenizer):
    alice = "One.\n\nTwo.\n\nThree is here, and it is a longer line.\n\nFour.\n\n"
    _, fine, _ = run_scripted(tokenizer, [alice], budget=40, self_check_every=0)
    _, coarse, _ = run_scripted(tokenizer, [alice], budget=40, self_check_every=0, min_step_tokens=10)
    fine_steps = [h.text for h in fine.history]
    assert fine_steps[:2] == ["One.\n\n", "Two.\n\n"]  # one worker: no headers
    assert coarse.history[0].text == "One.\n\nTwo.\n\nThree is here, and it is a longer line.\n\n"


@pytest.mark.parametrize("guard", ["nudge", "resample"])
def test_a_repeated_step_is_not_taken(tokenizer, guard):
    same = "I add 2 and 3 to get 5 in total.\n\n"
    alice = same * 3 + "Now I check the sum twice over.\n\n"
    bob = "Bob looks at the question first.\n\nThen Bob thinks of another way.\n\nAnd he waits quietly now.\n\n"
    sampling = SamplingParams(temperature=0.7, seed=1) if guard == "resample" else SamplingParams()
    events, result, run = run_scripted(
        tokenizer, [alice, bob], sampling=sampling, budget=90, self_check_every=0, repeat_guard=guard,
        repeat_retries=1,
    )  # fmt: skip
    left_out = [e for e in events if isinstance(e, StepDiscarded) and e.worker == 0]  # Bob's script runs out
    nudges = [e.text for e in events if isinstance(e, NudgeInserted) and e.worker == 0]
    nudge = prompts.repeat_nudge(run.names, 0, 0, 1)
    # nudge: the repeat is left out and its step opens again with a nudge naming Alice [1]; the next try (the
    # script's second copy) is taken as it is. resample: drawn again once, then nudged, then the new text is taken
    assert [(e.worker, e.step, e.repeats) for e in left_out] == [(0, 2, 0)] * (1 if guard == "nudge" else 2)
    assert nudges == [nudge]
    alice_steps = [h.text for h in result.history if h.worker == 0]
    assert alice_steps[0] == "**Alice [1]:** " + same
    assert alice_steps[1].startswith(f"**Alice [2]:** {nudge}")
    assert prompts.discarded(run.names, 0, 0, 1) in result.workers[0].text
    # the shared cache holds the steps taken, and nothing of those left out
    kept = tokenizer.decode(run.shared.history.tokens)
    assert kept == prompts.HISTORY_TITLE + "".join(h.text for h in result.history)
    assert kept.count(same) == (2 if guard == "nudge" else 1)
    assert result.workers[0].discarded / len(left_out) in (15, 16)  # the tokens of `same`, as the script splits it


def test_a_repeat_is_cut_short_while_it_is_written(tokenizer):
    long = (
        "First I add two and three, which gives five. Then I double five to get ten in all, and check it by counting "
        "up from three: four, five, six, seven, eight, nine and ten, so the doubling was right after all.\n\n"
    )
    alice = long * 2 + "Now the answer is ten.\n\n"
    events, result, run = run_scripted(
        tokenizer, [alice, "Bob waits.\n\n"], budget=200, self_check_every=0, repeat_guard="nudge"
    )
    (left_out,) = [e for e in events if isinstance(e, StepDiscarded)]
    assert left_out.worker == 0 and left_out.repeats == 0
    # the guard looks every 16 tokens: the copy leaves after 32 of its tokens, not at its end; the try after the
    # nudge is taken whole
    assert result.workers[0].discarded == 32 < len(tokenizer.encode(long, add_special_tokens=False))
    assert [h.step for h in result.history if h.worker == 0][:2] == [1, 2]


def test_a_copy_of_text_being_written_is_cut_short(tokenizer):
    alice = (
        "Janet has sixteen eggs, eats three for breakfast, bakes muffins with four, and sells every one left. That "
        "leaves nine eggs, which at two dollars each make eighteen dollars a day at the market.\n\n"
    )
    bob = "Let me see. " + alice  # the same text, a few passes behind Alice's
    events, result, run = run_scripted(tokenizer, [alice, bob], budget=60, self_check_every=0, repeat_guard="nudge")
    (left_out,) = [e for e in events if isinstance(e, StepDiscarded)]
    assert (left_out.worker, left_out.repeats, left_out.text) == (1, 0, "[not taken: it copies Alice]\n\n")
    assert prompts.repeat_nudge(run.names, 1, 0, None) in result.workers[1].text
    assert result.workers[1].discarded == 32 and result.workers[0].discarded == 0
    # what was left out counts in no one's redundancy: Alice's text is fresh
    assert result.workers[0].redundancy == 0.0


@pytest.mark.parametrize("guard", [True, False])
def test_the_copy_guard_never_lets_a_worker_write_out_anothers_text(tokenizer, guard):
    alice = (
        "Janet has sixteen eggs, eats three for breakfast, bakes muffins with four, and sells every one left. That "
        "leaves nine eggs, which at two dollars each make eighteen dollars a day at the market.\n\n"
    )
    bob = "Let me see. " + alice  # the same text, a few passes behind Alice's
    (fallback,) = tokenizer.encode(" so", add_special_tokens=False)
    engine = LuredEngine(tokenizer, [alice, bob], fallback, weight=-1.0)  # second to the script
    events, result, run = run_scripted(
        tokenizer,
        [alice, bob],
        engine=engine,
        sampling=SamplingParams(),
        budget=70,
        self_check_every=0,
        copy_guard=guard,
    )
    drawn = [[e.token for e in events if isinstance(e, Token) and e.worker == w and e.token >= 0] for w in (0, 1)]
    # Alice writes first: nothing of hers is blocked, her text is her script (then the fallback: it has run out)
    script = tokenizer.encode(alice, add_special_tokens=False)
    assert drawn[0][: len(script)] == script
    from_alice = run.workers[1].sources.count(0)  # Bob's n-grams that stood in Alice's text when he wrote them
    if not guard:  # Bob copies Alice's n-grams as they stand
        assert fallback not in drawn[1][: len(script)] and from_alice > len(script) // 2
        return
    # every time Bob's next token would end an 8-token run that stood in Alice's text, he draws the fallback
    # instead (his script waits), so none of his n-grams stood in her text; otherwise he writes his script
    assert from_alice == 0
    assert drawn[1].count(fallback) >= len(drawn[1]) // N - 1 > 2
    script = tokenizer.encode(bob, add_special_tokens=False)
    mine = [t for t in drawn[1] if t != fallback]
    assert mine[: len(script)] == script


def test_a_copy_of_the_prompts_own_box_is_no_answer(tokenizer):
    engine = ScriptedEngine(tokenizer, ["So it is \\boxed{a; b}.\n\nIt is \\boxed{5; 6}.\n\n"])
    problem = "Add 2 and 3, then 3 and 3. Answer like \\boxed{a; b}."
    config = CollabConfig(workers=1, parts=2, **MECHANICS)
    result = list(engine.stream(Collaboration(engine, problem, config)))[-1].result
    assert result.answer == "5; 6" and result.finished_by == "answer"


def test_repeated_steps_and_redundancy_on_constructed_text():
    earlier = ["Janet has 16 eggs and eats 3 of them.", "She sells the rest for $2 each."]
    assert repeated("janet has 16 eggs, and eats 3 of them", earlier, 0.5) == 0
    assert repeated("She sells the rest for $2 each, so she", earlier, 0.5) == 1
    assert repeated("She sells the rest for $2 each, so 9 * 2 = 18 dollars.", earlier, 0.5) is None  # new work
    assert repeated("Bob bakes 24 rolls and sells three quarters.", earlier, 0.5) is None
    assert repeated("$2 each", earlier, 0.5) == 1 and repeated("3 each", earlier, 0.5) is None

    def stamped(tokens, first_pass=1):
        return [(first_pass + i, t) for i, t in enumerate(tokens)]

    fresh = list(range(100))
    assert redundancy([stamped(fresh), stamped([t + 1000 for t in fresh])]) == (0.0, [0.0, 0.0])
    # a copy of what the other wrote earlier: every n-gram of the copy stood there already
    total, each = redundancy([stamped(fresh), stamped(fresh, first_pass=200)])
    assert each == [0.0, 1.0] and total == 0.5
    # the same text written in the same passes: neither saw the other's (a row sees them one pass later)
    assert redundancy([stamped(fresh), stamped(fresh)]) == (0.0, [0.0, 0.0])
    # a worker looping on its own line: everything after the first copy is redundant
    loop = list(range(20)) * 5
    total, (share,) = redundancy([stamped(loop)])
    assert (
        share == total == pytest.approx(73 / 93)
    )  # 93 n-grams; the 20 that end in the first copy or wrap into the second are new
    assert redundancy([stamped([1, 2, 3])]) == (None, [None])
    # whose text a piece of writing copies: the source most of its n-grams stood in, once they are enough
    assert copied([None] * 4 + [1] * 10 + [0] * 3, 0.5, least=16) == 1
    assert copied([None] * 10 + [1] * 7, 0.5, least=16) is None and copied([1] * 8, 0.5, least=16) is None


def test_skeleton_of_thought_outlines_expands_apart_and_answers(tokenizer):
    engine = tiny_engine(tokenizer)
    views: list[list[str]] = []
    inner = engine.run_model

    def recording(rows, wanted):
        views.extend([b.name for b in row.view] for row in rows if row.own.name == "worker1")
        return inner(rows, wanted)

    engine.run_model = recording
    run = Collaboration(engine, "Add 2 and 3, then double it.", CollabConfig(workers=2, mode="sot", budget=120))
    result = list(engine.stream(run))[-1].result
    assert "skeleton" in tokenizer.decode(run.prompt_ids) and "exactly 2 numbered points" in tokenizer.decode(
        run.prompt_ids
    )
    outline, *points = result.history
    assert (outline.worker, outline.step) == (0, 1)
    assert [(h.worker, h.text[: len(prompts.sot_expand(h.worker + 1))]) for h in points] == [
        (0, prompts.sot_expand(1)), (1, prompts.sot_expand(2)),
    ]  # fmt: skip
    assert views and all("worker0" not in view for view in views)  # Bob never sees Alice's point
    assert prompts.sot_answer() in result.workers[0].text
    assert 120 < result.forward_passes <= 120 + run.config.finisher_tokens
    assert result.redundancy is not None


def test_the_readable_reply_is_the_answer_with_the_words_it_came_from(tokenizer):
    alice = "Two plus three is five.\n\nSo the answer is \\boxed{5}.\n\n"
    _, result, _ = run_scripted(tokenizer, [alice, "I agree with Alice.\n\n"], budget=200, self_check_every=0)
    assert result.content == "5\n\n**Alice [2]:** So the answer is \\boxed{5}."
    assert result.to_dict()["content"] == result.content
    _, late, _ = run_scripted(tokenizer, ["Let me think it over" + " and more" * 40], budget=30)
    assert late.finished_by == "budget" and "[final]:** We are out of time" in late.content
    assert late.content.startswith(late.answer if late.answer is not None else "No answer in")


def test_one_worker_is_plain_chain_of_thought(tokenizer):
    """One worker, no headers: the text equals ordinary greedy generation from the same prompt."""
    engine = hogwild.load(EngineConfig(dtype="float32", threads=1))
    result = hogwild.solve("What is 6 times 7?", engine=engine, workers=1, budget=48, temperature=0)
    run = Collaboration(engine, "What is 6 times 7?", CollabConfig(workers=1, budget=48), SamplingParams())
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
            "What is 12 + 30? Answer in \\boxed{}.",
            engine=engine,
            workers=2,
            budget=64,
            seed=0,
            temperature=0.7,
            opening="plan",
        )
    )
    result = events[-1].result
    tokens = [e for e in events if isinstance(e, Token) and e.token >= 0]
    assert {e.worker for e in tokens} == {0, 1}
    for i, name in enumerate(["Alice", "Bob"]):
        assert result.workers[i].text.startswith(f"**{name} [1]:** ")
    assert all(h.text.startswith(f"**{result.workers[h.worker].name} [{h.step}]:** ") for h in result.history)
    # one Pass event per forward pass of the workers, counted once each; the finisher's passes come after them
    passes = [e.forward_passes for e in events if isinstance(e, Pass)]
    assert passes == list(range(1, len(passes) + 1))
    if result.finished_by == "budget":  # all 64 passes spent, then the finisher wrote a few tokens
        assert passes[-1] == 64 and 64 < result.forward_passes <= 64 + CollabConfig().finisher_tokens
    else:
        assert result.finished_by == "answer" and result.answer is not None
        assert passes[-1] == result.forward_passes <= 64
    # a pass samples at most one token per worker
    assert all(0 < w.tokens <= result.forward_passes for w in result.workers)
    assert result.to_dict()["answer"] == result.answer


def test_default_model_crosscheck_first_worker_writes_the_lone_solution(default_model_dir):
    # the default opening: the first worker, greedy, writes what one worker alone writes (fp32 weights: tokens do
    # not depend on what shares a forward pass); the second samples a solution of its own
    engine = hogwild.load(EngineConfig(threads=1, weights="fp32"))
    problem = "Tom has 3 bags of 4 apples and eats 2. How many apples are left?"
    lone = hogwild.solve(problem, engine=engine, workers=1, budget=80)
    team = hogwild.solve(problem, engine=engine, workers=2, budget=80)
    alice, bob = (w.text.split("\n\n**Alice [final]")[0] for w in team.workers)
    alice = alice.split("I solved this problem twice")[0].rstrip("\n")
    assert len(alice) > 20 and not alice.startswith("**")
    assert lone.workers[0].text.startswith(alice)
    assert bob.split("\n\n")[:3] != alice.split("\n\n")[:3]
    assert team.forward_passes <= 80 + CollabConfig().finisher_tokens


def test_text_rules():
    assert step_ends("It is 5.\n\n")
    assert not step_ends("It is 5.\n")
    assert not step_ends("We have:\n\n")
    assert not step_ends("```py\nx = 1\n\n")
    assert not step_ends("$$ a +\n\n")
    assert step_ends("One glass costs $5, two cost $8.\n\n") and not step_ends("So $x +\n\n")  # money is no math
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
    assert out["tokens_per_worker"] == {w["name"]: w["tokens"] for w in out["workers"]}
    if out["finished_by"] == "budget":  # the budget ran out: the finisher's passes come on top of it
        assert out["forward_passes"] > 256
    elif out["finished_by"] == "eos":  # every worker ended its reply without a box: the finisher asked
        assert out["forward_passes"] <= 256 + CollabConfig().finisher_tokens
    else:
        assert out["finished_by"] == "answer" and out["answer"] is not None and out["forward_passes"] <= 256


@pytest.mark.parametrize("steal", [True, False])
def test_a_worker_done_with_its_parts_takes_a_part_not_begun(tokenizer, steal):
    # Bob answers problems 3 and 4 while Alice still works on problem 1: with `steal` he takes problem 2, which
    # she has not begun, and she stops after problem 1; without it he stops and she goes on to problem 2
    alice = " I work on the first problem for a good long while before I reach its answer, which is \\boxed{5}"
    alice += " and then 4 \\boxed{4}\n\n"
    bob = " 7. \\boxed{7} 9 is \\boxed{9} and 4 \\boxed{4}\n\n"
    events, result, run = run_scripted(
        tokenizer, [alice, bob], budget=120, parts=4, assign=True, layout="interleaved", steal=steal
    )
    assert result.answer == "5; 4; 7; 9" and result.finished_by == "answer"
    a, b = (w.text for w in result.workers)
    taken = "**Bob [3]:** My problems are done, so I take problem 2 from Alice. Problem 2: and 4 \\boxed{4}"
    if steal:
        assert [w.parts for w in run.workers] == [[1], [3, 4, 2]]
        assert taken in b and "Problem 2" not in a
    else:
        assert [w.parts for w in run.workers] == [[1, 2], [3, 4]]
        assert "Problem 2" not in b and "**Alice [2]:** Problem 2: and then 4 \\boxed{4}" in a
    assert prompts.taken_part("Alice", 2, headed=False) == (
        "\n\nMy problems are done, so I take problem 2 from Alice. Problem 2:"
    )


@pytest.mark.parametrize("part_steps", [True, False])
def test_an_assigned_part_is_one_step(tokenizer, part_steps):
    # with part steps a part's solution is one step, paragraph breaks and all, ended by its answer; without them
    # its paragraphs past min_step_tokens are steps of their own
    alice = "One line of work.\n\nTwo lines of work here.\n\nThree, and so \\boxed{5}\n\n"
    events, result, run = run_scripted(
        tokenizer, [alice, " \\boxed{7} \\boxed{9}"], budget=80, parts=3, assign=True, layout="interleaved",
        min_step_tokens=0, part_steps=part_steps, steal=False,
    )  # fmt: skip
    alices = [h.text for h in result.history if h.worker == 0]
    if part_steps:
        assert alices == ["**Alice [1]:** I take problems 1 and 2 (Bob takes problem 3). Problem 1:" + alice]
    else:
        assert len(alices) == 3 and alices[0].endswith("One line of work.\n\n")


def test_a_repeat_nudge_names_the_parts_still_open(tokenizer):
    # Alice answers problem 1, then goes in circles in problem 2: the nudge sends her back to problem 2 alone (a
    # nudge naming both her parts had her solve problem 1 again and box its answer as problem 2's)
    circle = "I add 2 and 3 to get 5 in total. "
    alice = " \\boxed{5}" + circle * 8
    events, result, run = run_scripted(
        tokenizer, [alice, " \\boxed{7} \\boxed{9}"], budget=120, parts=4, assign=True, layout="interleaved",
        steal=False, repeat_guard="nudge",
    )  # fmt: skip
    nudges = [e.text for e in events if isinstance(e, NudgeInserted) and e.worker == 0]
    assert nudges and nudges[0] == "Wait, I am repeating myself. Back to my own problem 2:"


@pytest.mark.parametrize("quote", [True, False])
def test_assigned_parts_are_quoted_after_their_headings(tokenizer, quote):
    # the engine writes each part's statement after its heading (one pass each), where a model would copy it a
    # token a pass; a problem that does not list its parts as "Problem N:" is not quoted
    problem = "Solve both.\n\nProblem 1: Add 2 and 3.\n\nProblem 2: Add 4 and 5.\n\nGive both answers."
    events, result, run = run_scripted(
        tokenizer, [" 5 \\boxed{5}", " 9 \\boxed{9}"], problem=problem, budget=60, parts=2, assign=True,
        quote_parts=quote,
    )  # fmt: skip
    a, b = (w.text for w in result.workers)
    assert result.answer == "5; 9"
    if quote:
        assert a.startswith("**Alice [1]:** I take problem 1 (Bob takes problem 2). Problem 1: Add 2 and 3.\n\n 5 ")
        assert b.startswith("**Bob [1]:** I take problem 2 (Alice takes problem 1). Problem 2: Add 4 and 5.\n\n 9 ")
    else:
        assert a.startswith("**Alice [1]:** I take problem 1 (Bob takes problem 2). Problem 1: 5 \\boxed{5}")
    if quote:  # a worker's next part is quoted after its heading too
        four = "Problem 1: One.\n\nProblem 2: Two.\n\nProblem 3: Three.\n\nProblem 4: Four."
        _, result, _ = run_scripted(
            tokenizer, [" 1 \\boxed{1} 2 \\boxed{2}", " 3 \\boxed{3} 4 \\boxed{4}"], problem=four, budget=80,
            parts=4, assign=True, layout="interleaved", steal=False,
        )  # fmt: skip
        assert result.answer == "1; 2; 3; 4"
        assert "\\boxed{1}\n\n**Alice [2]:** Problem 2: Two.\n\n 2 \\boxed{2}" in result.workers[0].text
    assert prompts.part_texts(problem, 2) == ["Add 2 and 3.", "Add 4 and 5."]
    assert prompts.part_texts("Problem 1: a. Problem 2: b?", 2) == ["a.", "b?"]  # one line, as the demo's
    assert prompts.part_texts(problem, 3) is None and prompts.part_texts("Problem 2: a Problem 1: b", 2) is None


def test_crosscheck_agreeing_solutions_are_the_answer(tokenizer):
    # every worker solves the whole problem apart, as a lone worker would (its prompt, no headers), in one step
    # ended by its answer; the same answer twice is the run's, with no check
    solution = " Two and three.\n\nThat makes five.\n\nSo \\boxed{5}\n\nNever written."
    engine = ScriptedEngine(tokenizer, [solution, solution])
    events, result, run = run_scripted(
        tokenizer, [solution, solution], engine, GREEDY, opening="crosscheck", repeat_guard="nudge", budget=120
    )
    assert result.answer == "5" and result.finished_by == "answer" and run.checker is None
    written = solution.split("Never")[0]
    assert [(h.worker, h.step, h.text) for h in result.history] == [(0, 1, written), (1, 1, written)]
    assert not any(isinstance(e, (StepDiscarded, NudgeInserted)) for e in events)
    # the first worker decodes as the run does (greedy here: a lone worker's solution), the others sample
    assert run.workers[0].generator is None and run.workers[1].generator is not None
    lone = Collaboration(engine, "Add 2 and 3.", CollabConfig(workers=1))
    assert run.prompt_ids + run.first_feed[1] == lone.prompt_ids + lone.first_feed[0]
    assert run.layout == "interleaved"


def test_crosscheck_answers_that_differ_are_settled_by_the_first_to_finish(tokenizer):
    # Alice answers 5 first and waits; Bob answers 6; they differ, so Alice opens a step that reads both
    # solutions and looks for the mistake, and her answer there is the run's
    alice = " Two and three make five. \\boxed{5} The second added wrong: 2 + 3 = 5, so \\boxed{5}"
    bob = " I think it over for a good long while, and two and three make six. \\boxed{6}"
    events, result, run = run_scripted(tokenizer, [alice, bob], budget=150, opening="crosscheck")
    assert result.answer == "5" and result.finished_by == "answer" and run.answer_worker == 0
    assert run.solutions == {0: "5", 1: "6"} and run.checker is run.workers[0]
    assert [(h.worker, h.step) for h in result.history] == [(0, 1), (1, 1), (0, 2)]
    check = result.history[2].text
    assert check.startswith("I solved this problem twice above and got different answers: 5 and 6.")
    assert check.endswith("The second added wrong: 2 + 3 = 5, so \\boxed{5}\n\n")
    # Alice waited: she wrote nothing between her answer and the check
    assert result.workers[0].text == result.history[0].text + check
    # answers that say the same number agree
    _, result, run = run_scripted(
        tokenizer, [" \\boxed{5}", " It is \\boxed{\\$5.00}"], budget=60, opening="crosscheck"
    )
    assert result.answer == "5" and run.checker is None
