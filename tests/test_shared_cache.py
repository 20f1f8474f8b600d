"""The Hogwild! shared cache: the fast block attention against the flat reference, visibility per layout, storage."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny import FAMILIES, TinyModel

from hogwild.attention import FlatReference, Row, StepPlan
from hogwild.cache.blocks import KVCache
from hogwild.cache.layouts import LAYOUTS, SharedCache

TOL = 1e-4


class Pair:
    """The fast path and the reference, driven through the same operations on one tiny model."""

    def __init__(self, tm: TinyModel, workers: int, layout: str, capacity: int = 2) -> None:
        self.tm = tm
        self.shared = SharedCache(KVCache(tm.config, tm.rope, torch.float32, capacity=capacity), workers, layout)
        self.ref = FlatReference(tm.config)
        self.worst = 0.0

    def step(self, rows: list[Row]) -> torch.Tensor:
        width = max(len(r.tokens) for r in rows)
        tokens = torch.tensor([r.tokens + [0] * (width - len(r.tokens)) for r in rows])
        plan = StepPlan(rows, self.tm.config, self.tm.rope)
        fast = self.tm.model.forward(tokens, plan, logits_at=torch.tensor([len(r.tokens) - 1 for r in rows]))
        expected = self.ref.step(self.tm.model, rows)
        plan.commit()
        for r, row in enumerate(rows):
            err = (fast[r] - expected[r][-1]).abs().max().item()
            self.worst = max(self.worst, err)
            assert err < TOL, f"row {r} ({row.own.name}) differs from the flat reference by {err}"
        return fast

    def finish(self, w: int) -> None:
        if self.shared.has_history:
            self.ref.move(self.shared.current[w], self.shared.history)
        self.shared.finish_step(w)

    def clear(self, w: int) -> None:
        self.ref.clear(self.shared.current[w])
        self.shared.current[w].clear()


_MODELS: dict[str, TinyModel] = {}


def tiny(family: str) -> TinyModel:
    if family not in _MODELS:
        _MODELS[family] = TinyModel(family, seed=1)
    return _MODELS[family]


operation = st.one_of(
    st.tuples(st.just("decode"), st.lists(st.integers(1, 3), min_size=1, max_size=4)),  # tokens per worker
    st.tuples(st.just("finish"), st.integers(0, 3)),
    st.tuples(st.just("history"), st.integers(1, 4)),  # text inserted into the shared history
    st.tuples(st.just("clear"), st.integers(0, 3)),
)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=20, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    workers=st.integers(1, 4),
    prompt=st.integers(1, 9),
    ops=st.lists(operation, min_size=3, max_size=10),
    seed=st.integers(0, 2**16),
)
def test_fast_path_equals_flat_reference(layout, family, workers, prompt, ops, seed):
    rng = random.Random(seed)
    pair = Pair(tiny(family), workers, layout)
    vocab = pair.tm.config.vocab_size
    pair.step([Row([pair.shared.prompt], [rng.randrange(vocab) for _ in range(prompt)])])
    for kind, arg in ops:
        if kind == "decode":
            counts = arg[:workers]
            rows = [Row(pair.shared.view(w), [rng.randrange(vocab) for _ in range(n)]) for w, n in enumerate(counts)]
            pair.step(rows)
        elif kind == "finish":
            pair.finish(arg % workers)
        elif kind == "history" and pair.shared.has_history:
            pair.step([Row(pair.shared.history_view(), [rng.randrange(vocab) for _ in range(arg)])])
        elif kind == "clear":
            pair.clear(arg % workers)
    # every worker reads its whole view once more, with keys that have moved between blocks
    pair.step([Row(pair.shared.view(w), [rng.randrange(vocab)]) for w in range(workers)])


def test_independent_rows_match_transformers_from_scratch():
    """Views [prompt, own] are prefix-consistent, so the fast path equals recomputing the tokens from scratch."""
    tm = tiny("qwen2")
    shared = SharedCache(KVCache(tm.config, tm.rope, torch.float32, capacity=2), 3, "interleaved")
    rng = random.Random(0)
    prompt = [rng.randrange(tm.config.vocab_size) for _ in range(7)]
    plan = StepPlan([Row([shared.prompt], prompt)], tm.config, tm.rope)
    tm.model.forward(torch.tensor([prompt]), plan, logits_at=None)
    plan.commit()
    seqs = [[], [], []]
    for _ in range(8):
        rows = [
            Row([shared.prompt, shared.current[w]], [rng.randrange(211) for _ in range(rng.randint(1, 3))])
            for w in range(3)
        ]
        width = max(len(r.tokens) for r in rows)
        plan = StepPlan(rows, tm.config, tm.rope)
        logits = tm.model.forward(
            torch.tensor([r.tokens + [0] * (width - len(r.tokens)) for r in rows]),
            plan,
            logits_at=torch.tensor([len(r.tokens) - 1 for r in rows]),
        )
        plan.commit()
        for w, row in enumerate(rows):
            seqs[w] += row.tokens
            expected = tm.hf_logits(prompt + seqs[w])[-1]
            assert (logits[w] - expected).abs().max().item() < TOL


def _next_distribution(tm: TinyModel, shared: SharedCache, worker: int) -> torch.Tensor:
    """Worker's next-token logits, computed on a throwaway copy of its own block so nothing is committed."""
    probe = shared.cache.new_block(f"probe{len(shared.cache.blocks)}")
    own = shared.current[worker]
    probe.reserve(own.capacity)
    probe.kv[:, :, :, : own.length] = own.kv[:, :, :, : own.length]
    probe.tokens = list(own.tokens)
    view = shared.view(worker)[:-1] + [probe]
    plan = StepPlan([Row(view, [5])], tm.config, tm.rope)
    return tm.model.forward(torch.tensor([[5]]), plan, logits_at=torch.tensor([0]))[0]


def _run_visibility(layout: str, alice_tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    tm = tiny("llama")
    shared = SharedCache(KVCache(tm.config, tm.rope, torch.float32), 2, layout)
    for rows in (
        [Row([shared.prompt], [3, 14, 15, 92, 65])],
        [Row(shared.view(0), [7, 8]), Row(shared.view(1), [9, 10])],
        [Row(shared.view(0), alice_tokens), Row(shared.view(1), [11])],
    ):
        plan = StepPlan(rows, tm.config, tm.rope)
        width = max(len(r.tokens) for r in rows)
        tm.model.forward(torch.tensor([r.tokens + [0] * (width - len(r.tokens)) for r in rows]), plan, None)
        plan.commit()
    before = _next_distribution(tm, shared, 1)  # Bob, while Alice's step is still open
    shared.finish_step(0)
    after = _next_distribution(tm, shared, 1)  # Bob, once Alice's step is in the history
    return before, after


@pytest.mark.parametrize("layout", ["combined", "interleaved"])
def test_visibility_of_another_workers_tokens(layout):
    before_a, after_a = _run_visibility(layout, [20, 21, 22])
    before_b, after_b = _run_visibility(layout, [40, 41, 42])
    if layout == "combined":
        # token-wise: Bob sees what Alice writes as soon as it is written
        assert (before_a - before_b).abs().max() > 1e-3
    else:
        # step-wise: Alice's open step is invisible to Bob ...
        assert (before_a - before_b).abs().max() == 0
    # ... and once her step is finished, Bob sees it in both layouts
    assert (after_a - after_b).abs().max() > 1e-3


def test_block_grows_by_doubling_and_keeps_data():
    tm = tiny("llama")
    cache = KVCache(tm.config, tm.rope, torch.float32, capacity=4)
    block = cache.new_block("b")
    capacities = []
    for i in range(40):
        plan = StepPlan([Row([block], [i % 200])], tm.config, tm.rope)
        tm.model.forward(torch.tensor([[i % 200]]), plan, None)
        plan.commit()
        capacities.append(block.capacity)
    assert sorted(set(capacities)) == [4, 8, 16, 32, 64]  # log2 growth: appends copy amortised O(1) per token
    first_keys = block.kv[:, :, :, :4].clone()
    block.reserve(1000)
    assert torch.equal(block.kv[:, :, :, :4], first_keys)


def test_move_rerotates_keys_once_to_their_new_position():
    """A moved span's keys equal keys rotated directly at their new positions."""
    tm = tiny("mistral")
    cache = KVCache(tm.config, tm.rope, torch.float32)
    history, step, direct = cache.new_block("history"), cache.new_block("step"), cache.new_block("direct")
    for block, tokens in ((history, [1, 2, 3, 4, 5]), (step, [6, 7, 8]), (direct, [9])):
        plan = StepPlan([Row([block], tokens)], tm.config, tm.rope)
        tm.model.forward(torch.tensor([tokens]), plan, None)
        plan.commit()
    raw_step_keys = step.kv[:, 0, :, :3].clone()
    cache.move(step, history)
    assert step.length == 0 and history.tokens == [1, 2, 3, 4, 5, 6, 7, 8]
    # rotating by +5 what was rotated at 0..2 equals rotation at 5..7; check through rope tables
    cos, sin = tm.rope.cos[5:8], tm.rope.sin[5:8]
    cos0, sin0 = tm.rope.cos[0:3], tm.rope.sin[0:3]
    # undo local rotation (rotate by -l), then rotate at the new positions
    half = cos.shape[-1] // 2

    def rot(x, c, s):
        return x * c + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * s

    unrotated = rot(raw_step_keys, cos0, -sin0)
    expected = rot(unrotated, cos, sin)
    assert torch.allclose(history.kv[:, 0, :, 5:8], expected, atol=1e-5)


@pytest.fixture(scope="module")
def engine32(default_model_dir):
    from hogwild.engine import Engine, EngineConfig

    return Engine.load(EngineConfig(model=str(default_model_dir), dtype="float32", threads=1))


@pytest.mark.parametrize("workers", [2, 4])
def test_default_model_workers_match_flat_reference(engine32, workers):
    """The real model, combined layout: every worker's logits equal the flat reference at every step."""
    engine = engine32
    shared = SharedCache(engine.new_cache(), workers, "combined")
    ref = FlatReference(engine.model_config)
    prompt = engine.encode_prompt("Two friends split 12 apples fairly. How many does each get?")
    rows = [Row([shared.prompt], prompt)]
    headers = [engine.tokenizer.encode(f"**Worker {w} [1]:** ") for w in range(workers)]
    feeds = headers
    for step in range(6):
        fast = engine.step(rows)
        expected = ref.step(engine.model, rows)
        for r in range(len(rows)):
            assert (fast[r] - expected[r][-1]).abs().max().item() < TOL
        if step == 3:
            ref.move(shared.current[0], shared.history)
            shared.finish_step(0)
        feeds = feeds if step == 0 else [[int(t)] for t in fast.argmax(-1)][:workers]
        rows = [Row(shared.view(w), feeds[w]) for w in range(workers)]
