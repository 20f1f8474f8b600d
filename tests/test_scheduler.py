"""The engine loop over many runs: batched equals alone, chunked prompts keep the visibility rule, probes leave the
run they fork untouched, and the KV pool never leaks or overdraws (a hypothesis-driven random workload)."""

from __future__ import annotations

import random
from collections import defaultdict

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny import tiny_engine

from hogwild.attention import FlatReference
from hogwild.collab.protocol import CollabConfig, Collaboration
from hogwild.engine import Engine
from hogwild.errors import HogwildError
from hogwild.runs import Done, Feed, Probe, Run, Sampled
from hogwild.sampling import GREEDY, SamplingParams

torch.set_num_threads(1)
TOL = 1e-4


class Recorder:
    """Wraps an engine's `run_model` to keep, per run, the logits of every row it sampled, in order."""

    def __init__(self, engine: Engine) -> None:
        self.logits: dict[int, list[torch.Tensor]] = defaultdict(list)
        self.engine = engine
        inner = engine.run_model

        def run_model(rows, wanted):
            out = inner(rows, wanted)
            for i, r in enumerate(wanted):
                self.logits[id(rows[r].own.ledger)].append(out[i].clone())
            return out

        engine.run_model = run_model

    def of(self, run: Run) -> list[torch.Tensor]:
        return self.logits[id(run.ledger)]


def make_runs(engine: Engine) -> list[Run]:
    """One run of every kind, with other worker counts, layouts and prompt lengths."""
    sampled = SamplingParams(temperature=0.9, top_p=0.95, seed=11, max_tokens=18)
    return [
        Collaboration(engine, "Add 2 and 3.", CollabConfig(workers=2, budget=20, self_check_every=8)),
        Sampled(engine, engine.encode_prompt("Tell me a story about a dragon."), sampled, n=3),
        Collaboration(engine, "Name a prime.", CollabConfig(workers=3, layout="interleaved", budget=14)),
        Sampled(engine, engine.encode_prompt("Hi"), SamplingParams(max_tokens=9)),
        Collaboration(engine, "Count to ten.", CollabConfig(workers=3, mode="groupthink", budget=12)),
        # symmetric: with the plan opening, the waiting worker's first line (a row without logits) can be cut into
        # chunks batched, and the contiguous layout then shows its first worker part of it (known, open)
        Collaboration(
            engine, "Sort 3, 1, 2.", CollabConfig(workers=2, layout="contiguous", budget=16, opening="symmetric")
        ),
    ]


def transcript(run: Run) -> object:
    assert run.done
    result = run.final
    if hasattr(result, "samples"):
        return [(s.text, s.tokens) for s in result.samples]
    return [(w.text, w.tokens) for w in result.workers], result.answer, result.forward_passes


def test_batched_runs_equal_each_run_alone(tokenizer):
    # alone: each run in an engine of its own, prompts in one piece
    alone = []
    for i in range(6):
        engine = tiny_engine(tokenizer)
        recorder = Recorder(engine)
        run = make_runs(engine)[i]
        for _ in engine.stream(run):
            pass
        alone.append((transcript(run), recorder.of(run)))

    # batched: one engine, prompts in chunks of 48 tokens, runs joining mid-way and ending at different times
    engine = tiny_engine(tokenizer, step_tokens=48)
    recorder = Recorder(engine)
    runs = make_runs(engine)
    for run in runs[:3]:
        engine.add(run)
    for _ in range(7):
        engine.step()
    for run in runs[3:]:
        engine.add(run)
    rows_per_step = []
    while engine.has_work:
        engine.step()
        rows_per_step.append(engine.stats.per_step_rows[-1])
    assert max(rows_per_step) >= 8, "the runs were never batched together"
    for run, (expected, logits) in zip(runs, alone, strict=True):
        assert transcript(run) == expected, f"{run} wrote something else batched"
        got = recorder.of(run)
        assert len(got) == len(logits)
        worst = max((a - b).abs().max().item() for a, b in zip(got, logits, strict=True))
        assert worst < TOL, f"{run}: logits differ by {worst} batched"
    assert engine.pool.in_use_bytes == 0 and engine.pool.reserved == 0


class TwoLongRows(Run):
    """One step of two long rows where the second row's view holds the first row's block."""

    def __init__(self, length: int) -> None:
        super().__init__()
        self.length = length

    @property
    def kv_tokens(self) -> int:
        return 4 + 2 * self.length

    def script(self):
        prompt = self.ledger.new_block("p", limit=4)
        a, b = (self.ledger.new_block(n, limit=self.length) for n in ("a", "b"))
        yield [Feed([prompt], [5, 6, 7, 8])]
        rng = random.Random(0)
        tokens = [[rng.randrange(1000) for _ in range(self.length)] for _ in range(2)]
        self.rows = [Feed([prompt, a], tokens[0], GREEDY), Feed([prompt, a, b], tokens[1], GREEDY)]
        yield self.rows
        self.emit(Done(None))


def test_chunked_rows_see_only_what_was_published_before_the_step(tokenizer):
    engine = tiny_engine(tokenizer, step_tokens=7)  # each 30-token row is fed in 5 chunks
    recorder = Recorder(engine)
    ref = FlatReference(engine.model_config)
    run = TwoLongRows(30)
    engine.add(run)
    engine.step()
    while run.feed is not None and not hasattr(run, "rows"):
        engine.step()
    prompt = run.rows[0].view[0]
    from hogwild.attention import Row

    ref.step(engine.model, [Row([prompt], [5, 6, 7, 8])])
    expected = ref.step(engine.model, [Row(f.view, f.tokens) for f in run.rows])
    while not run.done:
        engine.step()
    got = recorder.of(run)
    assert engine.stats.steps >= 10
    for r in range(2):
        assert (got[r] - expected[r][-1]).abs().max().item() < TOL, f"row {r} saw the other row's first chunks"


def test_probe_leaves_the_collaboration_untouched(tokenizer):
    config = CollabConfig(workers=2, budget=40, self_check_every=0)
    logits = []
    for with_probe in (False, True):
        engine = tiny_engine(tokenizer)
        recorder = Recorder(engine)
        run = engine.add(Collaboration(engine, "What is 6 times 7?", config))
        for _ in range(12):
            engine.step()
        probe = None
        if with_probe:
            probe = engine.add(run.probe(worker=1, max_tokens=32))
            while not probe.done:
                engine.step()
            # freed at once: what is in use is exactly the collaboration's own storage
            storages = {id(b.storage): b.storage for b in run.ledger.blocks if b.storage is not None}
            assert engine.pool.in_use_bytes == sum(s.nbytes for s in storages.values())
            assert probe.ledger not in engine.pool.ledgers
        while not run.done:
            engine.step()
        logits.append((transcript(run), recorder.of(run)))
        if probe is not None:
            assert len(probe.final.tokens) == 32  # a random model never writes the closing brace: all 32 decoded
    (plain, plain_logits), (probed, probed_logits) = logits
    assert probed == plain
    assert len(probed_logits) == len(plain_logits)
    assert max((a - b).abs().max().item() for a, b in zip(probed_logits, plain_logits, strict=True)) < 1e-5


def test_a_run_larger_than_the_pool_is_refused_and_one_that_waits_runs_later(tokenizer):
    engine = tiny_engine(tokenizer, kv_memory="1MiB")  # 512 bytes a token (2 layers, k and v, 2 x 16 float32)
    capacity = engine.pool.capacity
    assert capacity == 2048
    with pytest.raises(HogwildError, match="raise --kv-memory"):
        engine.add(Sampled(engine, [1, 2, 3], SamplingParams(max_tokens=4000)))
    big = SamplingParams(max_tokens=capacity // 2)
    first = engine.add(Sampled(engine, [1, 2, 3], big))
    second = engine.add(Sampled(engine, [4, 5, 6], big))
    engine.step()
    assert first in engine.scheduler.running and second in engine.scheduler.waiting  # FCFS: second waits
    engine.abort(first)
    engine.step()
    assert second in engine.scheduler.running
    assert first.final.samples[0].finish_reason == "interrupted"


KINDS = ("sample", "samples", "hogwild", "groupthink", "probe", "interleaved")


@settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    arrivals=st.lists(st.tuples(st.sampled_from(KINDS), st.integers(0, 6), st.integers(1, 3)), min_size=2, max_size=7),
    aborts=st.lists(st.integers(0, 40), max_size=3),
    step_tokens=st.sampled_from([16, 64, 512]),
    budget_kib=st.sampled_from([256, 1024]),
)
def test_random_workloads_end_without_leaks_or_overdraft(tokenizer_global, arrivals, aborts, step_tokens, budget_kib):
    engine = tiny_engine(tokenizer_global, step_tokens=step_tokens, kv_memory=f"{budget_kib}KiB")
    pool = engine.pool
    runs: list[Run] = []
    pending = sorted(arrivals, key=lambda a: a[1])
    step = 0
    while pending or engine.has_work:
        while pending and pending[0][1] <= step:
            kind, _, workers = pending.pop(0)
            run = _make(engine, kind, workers, runs)
            if run is None:
                continue
            try:
                engine.add(run)
            except HogwildError:
                continue  # can never fit this pool: refused up front
            runs.append(run)
        if step in aborts and engine.scheduler.running:
            engine.abort(engine.scheduler.running[step % len(engine.scheduler.running)])
        engine.step()
        step += 1
        # the budgets hold at every step
        assert pool.reserved <= pool.capacity
        assert pool.in_use_bytes <= pool.budget_bytes
        assert all(ledger.charged <= ledger.limit for ledger in pool.ledgers)
        assert engine.stats.per_step_rows == [] or engine.stats.tokens <= step * step_tokens
        assert step < 2000, "the workload never finished"
    assert all(run.done for run in runs)
    assert all(sum(isinstance(e, Done) for e in run.outbox) == 1 for run in runs)
    assert pool.in_use_bytes == 0 and pool.reserved == 0 and not pool.ledgers


def _make(engine: Engine, kind: str, workers: int, runs: list[Run]) -> Run | None:
    prompt = engine.encode_prompt("Think about numbers " * workers)
    if kind == "sample":
        return Sampled(engine, prompt, SamplingParams(max_tokens=6 * workers))
    if kind == "samples":
        return Sampled(engine, prompt, SamplingParams(temperature=1.0, seed=workers, max_tokens=8), n=workers)
    if kind == "probe":
        live = [r for r in runs if isinstance(r, Collaboration) and not r.done and r.shared is not None]
        return live[0].probe(max_tokens=5) if live else None
    mode = "groupthink" if kind == "groupthink" else "hogwild"
    layout = "interleaved" if kind == "interleaved" else "combined"
    return Collaboration(engine, "Split 12 apples.", CollabConfig(workers=workers, mode=mode, layout=layout, budget=24))


@pytest.fixture(scope="module")
def tokenizer_global(tokenizer):
    return tokenizer


def test_probe_is_refused_before_its_run_starts(tokenizer):
    engine = tiny_engine(tokenizer)
    run = Collaboration(engine, "Add 1 and 1.", CollabConfig(budget=16))
    with pytest.raises(AssertionError, match="not started"):
        run.probe()
    assert isinstance(engine.add(run), Collaboration)
    engine.step()
    assert isinstance(run.probe(), Probe)
