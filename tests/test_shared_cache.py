"""The Hogwild! shared cache: the fast block attention against the flat reference, visibility per layout, storage."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny import FAMILIES, TinyModel, step_rows

from hogwild.attention import FlatReference, Row
from hogwild.collab.layouts import LAYOUTS, SharedCache

TOL = 1e-4


class Pair:
    """The fast path and the reference, driven through the same operations on one tiny model."""

    def __init__(self, tm: TinyModel, workers: int, layout: str) -> None:
        self.tm = tm
        self.shared = SharedCache(tm.ledger(), workers, layout)
        self.ref = FlatReference(tm.config)
        self.worst = 0.0

    def step(self, rows: list[Row]) -> list[torch.Tensor]:
        expected = self.ref.step(self.tm.model, rows)
        fast = self.tm.step(rows)
        for r, row in enumerate(rows):
            err = (fast[r] - expected[r]).abs().max().item()
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


_MODELS: dict[tuple[str, bool], TinyModel] = {}


def tiny(family: str, fused: bool = False) -> TinyModel:
    """`fused`: the compiled kernels (norms, decode attention), else torch ops; the same weights either way."""
    if (family, fused) not in _MODELS:
        _MODELS[family, fused] = TinyModel(family, seed=1, fused=fused)
    return _MODELS[family, fused]


operation = st.one_of(
    st.tuples(st.just("decode"), st.lists(st.integers(1, 3), min_size=1, max_size=4)),  # tokens per worker
    st.tuples(st.just("finish"), st.integers(0, 3)),
    st.tuples(st.just("history"), st.integers(1, 4)),  # text inserted into the shared history
    st.tuples(st.just("clear"), st.integers(0, 3)),
)


@pytest.mark.parametrize("fused", [False, True], ids=["torch-ops", "fused"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=20, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    workers=st.integers(1, 4),
    prompt=st.integers(1, 9),
    ops=st.lists(operation, min_size=3, max_size=10),
    seed=st.integers(0, 2**16),
)
def test_fast_path_equals_flat_reference(fused, layout, family, workers, prompt, ops, seed):
    """Both fast paths: torch ops, and the compiled kernels (decode steps attend through the fused kernel, the
    prompt through torch ops)."""
    rng = random.Random(seed)
    pair = Pair(tiny(family, fused), workers, layout)
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
    shared = SharedCache(tm.ledger(), 3, "interleaved")
    rng = random.Random(0)
    prompt = [rng.randrange(tm.config.vocab_size) for _ in range(7)]
    tm.step([Row([shared.prompt], prompt)])
    seqs = [[], [], []]
    for _ in range(8):
        rows = [
            Row([shared.prompt, shared.current[w]], [rng.randrange(211) for _ in range(rng.randint(1, 3))])
            for w in range(3)
        ]
        logits = tm.step(rows)
        for w, row in enumerate(rows):
            seqs[w] += row.tokens
            expected = tm.hf_logits(prompt + seqs[w])[-1]
            assert (logits[w][-1] - expected).abs().max().item() < TOL


def _next_distribution(tm: TinyModel, shared: SharedCache, worker: int) -> torch.Tensor:
    """Worker's next-token logits, computed on a fork of its own block (copied on write) so nothing is committed."""
    own = shared.current[worker]
    probe = shared.ledger.fork(own)
    before = own.kv[:, :, :, : own.length].clone()
    logits = tm.step([Row(shared.view(worker)[:-1] + [probe], [5])])[0][-1]
    assert probe.storage is not own.storage and torch.equal(own.kv[:, :, :, : own.length], before)
    return logits


def _run_visibility(layout: str, alice_tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    tm = tiny("llama")
    shared = SharedCache(tm.ledger(), 2, layout)
    for rows in (
        [Row([shared.prompt], [3, 14, 15, 92, 65])],
        [Row(shared.view(0), [7, 8]), Row(shared.view(1), [9, 10])],
        [Row(shared.view(0), alice_tokens), Row(shared.view(1), [11])],
    ):
        tm.step(rows)
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


def test_block_grows_by_a_quarter_and_keeps_data():
    tm = tiny("llama")
    ledger = tm.ledger()
    block = ledger.new_block("b")
    capacities = []
    for i in range(300):
        tm.step([Row([block], [i % 200])])
        capacities.append(block.capacity)
    grown = sorted(set(capacities))
    # geometric growth: appends copy an amortised O(1) per token
    assert len(grown) <= 14 and all(b >= 1.25 * a for a, b in zip(grown, grown[1:], strict=False))
    assert ledger.charged == block.capacity and ledger.pool.in_use_bytes == block.storage.nbytes
    first_keys = block.kv[:, :, :, :4].clone()
    block.reserve(1000)
    assert torch.equal(block.kv[:, :, :, :4], first_keys)


def test_move_rerotates_keys_once_to_their_new_position():
    """A moved span's keys equal keys rotated directly at their new positions."""
    tm = tiny("mistral")
    ledger = tm.ledger()
    history, step, direct = ledger.new_block("history"), ledger.new_block("step"), ledger.new_block("direct")
    for block, tokens in ((history, [1, 2, 3, 4, 5]), (step, [6, 7, 8]), (direct, [9])):
        tm.step([Row([block], tokens)])
    raw_step_keys = step.kv[:, 0, :, :3].clone()
    ledger.pool.move(step, history)
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
    ledger = engine.pool.open(4096)
    shared = SharedCache(ledger, workers, "combined")
    ref = FlatReference(engine.model_config)
    prompt = engine.encode_prompt("Two friends split 12 apples fairly. How many does each get?")
    rows = [Row([shared.prompt], prompt)]
    headers = [engine.tokenizer.encode(f"**Worker {w} [1]:** ") for w in range(workers)]
    feeds = headers
    for step in range(6):
        expected = ref.step(engine.model, rows)
        fast = step_rows(engine.model, engine.rope, rows)
        for r in range(len(rows)):
            assert (fast[r][-1] - expected[r][-1]).abs().max().item() < TOL
        if step == 3:
            ref.move(shared.current[0], shared.history)
            shared.finish_step(0)
        feeds = feeds if step == 0 else [[int(f[-1].argmax())] for f in fast][:workers]
        rows = [Row(shared.view(w), feeds[w]) for w in range(workers)]
    ledger.release()
