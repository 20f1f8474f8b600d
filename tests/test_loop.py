"""The engine in a background thread: runs submitted from threads and asyncio tasks, batched, cancelled; a run
that fails ends alone, a failing forward pass stops the loop."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch
from tiny import tiny_engine

from hogwild.collab.protocol import CollabConfig, Collaboration
from hogwild.errors import HogwildError
from hogwild.loop import EngineLoop
from hogwild.runs import Done, Failed, Sampled, Token
from hogwild.sampling import SamplingParams

torch.set_num_threads(1)


def test_threads_submit_and_each_gets_its_own_run(tokenizer):
    engine = tiny_engine(tokenizer)
    loop = EngineLoop(engine)
    expected, steps = {}, {}
    for n in (5, 9, 13):
        alone = tiny_engine(tokenizer)
        expected[n] = "".join(alone.generate_text(alone.encode_prompt(f"Count {n}"), SamplingParams(max_tokens=n)))
        steps[n] = alone.stats.steps
    texts = {}
    # the loop thread is held between two steps until every thread has submitted, so the three runs are added
    # together and must share forward passes, however the threads are scheduled
    submitted = threading.Semaphore(0)
    release = threading.Event()
    held = loop.call(lambda engine: release.wait(timeout=60))

    def consume(n: int) -> None:
        ticket = loop.submit(Sampled(engine, engine.encode_prompt(f"Count {n}"), SamplingParams(max_tokens=n)))
        submitted.release()
        events = list(ticket)
        assert isinstance(events[-1], Done)
        texts[n] = "".join(e.text for e in events if isinstance(e, Token))

    threads = [threading.Thread(target=consume, args=(n,)) for n in expected]
    for t in threads:
        t.start()
    for _ in threads:
        assert submitted.acquire(timeout=60)
    release.set()
    for t in threads:
        t.join(timeout=60)
    loop.close()
    assert held.result() is True
    assert texts == expected
    # the engine's step records: from the first forward pass on (one prompt row of each run) the three runs went
    # side by side, one row each, each for as many passes as it took alone
    assert engine.stats.per_step_rows == [sum(k < s for s in steps.values()) for k in range(max(steps.values()))]
    assert engine.pool.in_use_bytes == 0


def test_asyncio_consumers_cancel_and_the_event_loop_stays_free(tokenizer):
    engine = tiny_engine(tokenizer)
    loop = EngineLoop(engine)

    async def main() -> tuple[bool, object, object]:
        aio = asyncio.get_running_loop()
        # mid-run the engine thread waits, between two steps, for another task of this event loop to answer: the
        # task runs only if the consumer awaits its events without blocking the event loop (else no answer comes
        # and the wait times out)
        asked, answered = asyncio.Event(), threading.Event()

        def ask(engine) -> bool:
            aio.call_soon_threadsafe(asked.set)
            return answered.wait(timeout=60)

        async def answer() -> None:
            await asked.wait()
            answered.set()

        answering = asyncio.create_task(answer())
        long_run = Collaboration(engine, "Add 2 and 3.", CollabConfig(workers=3, budget=400, self_check_every=0))
        ticket = loop.submit(long_run, aio)
        short = loop.submit(Sampled(engine, engine.encode_prompt("Hi"), SamplingParams(max_tokens=12)), aio)
        seen, held = 0, None
        async for event in ticket:
            if isinstance(event, Token):
                seen += 1
                if seen == 10:
                    held = asyncio.wrap_future(loop.call(ask))
                if seen == 30:
                    ticket.cancel()
            last = event
        short_events = [e async for e in short]
        await answering
        return await held, last, short_events[-1]

    answered, last, short_done = asyncio.run(main())
    loop.close()
    assert answered, "the event loop was blocked while the engine ran"
    assert isinstance(last, Done) and last.result.finished_by == "cancelled"
    assert last.result.forward_passes < 400
    assert isinstance(short_done, Done) and short_done.result.samples[0].finish_reason in ("stop", "length")
    assert engine.pool.in_use_bytes == 0


def test_a_run_too_large_is_refused_in_submit(tokenizer):
    engine = tiny_engine(tokenizer, kv_memory="1MiB")
    loop = EngineLoop(engine)
    with pytest.raises(HogwildError, match="raise --kv-memory"):
        loop.submit(Sampled(engine, [1, 2, 3], SamplingParams(max_tokens=4000)))
    loop.close()
    with pytest.raises(HogwildError, match="stopped"):
        loop.submit(Sampled(engine, [1, 2, 3], SamplingParams(max_tokens=4)))


class Broken(Sampled):
    """A run whose own code fails at its third step."""

    def script(self):
        steps = super().script()
        feeds = next(steps)
        for _ in range(2):
            feeds = steps.send((yield feeds))
        raise ValueError("a bug in this run's script")


def test_a_run_that_fails_ends_alone_and_the_loop_goes_on(tokenizer):
    engine = tiny_engine(tokenizer)
    loop = EngineLoop(engine)
    params = SamplingParams(max_tokens=12)
    alone = tiny_engine(tokenizer)
    expected = "".join(alone.generate_text(alone.encode_prompt("Count"), params))
    broken = loop.submit(Broken(engine, engine.encode_prompt("Hi"), params))
    good = loop.submit(Sampled(engine, engine.encode_prompt("Count"), params))
    events = list(broken)
    failed = [e for e in events if isinstance(e, Failed)]
    assert len(failed) == 1 and isinstance(failed[0].error, ValueError)
    assert isinstance(events[-1], Done) and events[-1].result.samples[0].finish_reason == "error"
    good_events = list(good)
    assert "".join(e.text for e in good_events if isinstance(e, Token)) == expected
    assert loop.alive and engine.pool.in_use_bytes == 0
    # a plain engine.stream raises the run's error to its caller, as before
    with pytest.raises(ValueError, match="a bug"):
        list(engine.stream(Broken(engine, engine.encode_prompt("Hi"), params)))
    loop.close()


def test_a_failing_forward_pass_stops_the_loop_and_says_so(tokenizer, monkeypatch):
    engine = tiny_engine(tokenizer)
    told = []
    loop = EngineLoop(engine, on_fatal=told.append)
    assert loop.call(lambda e: threading.current_thread().name).result(timeout=10) == "hogwild-engine"
    with pytest.raises(KeyError):
        loop.call(lambda e: {}["missing"]).result(timeout=10)  # the caller's failure, not the loop's
    assert loop.alive

    def broken(rows, wanted):
        raise RuntimeError("the forward pass failed")

    monkeypatch.setattr(engine, "run_model", broken)
    ticket = loop.submit(Sampled(engine, [1, 2, 3], SamplingParams(max_tokens=4)))
    with pytest.raises(RuntimeError, match="forward pass"):
        list(ticket)
    assert not loop.alive and told == [loop.error]
    with pytest.raises(HogwildError, match="stopped"):
        loop.submit(Sampled(engine, [1, 2, 3], SamplingParams(max_tokens=4)))
