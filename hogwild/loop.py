"""The engine in a background thread: submit runs from any thread or asyncio task, receive their events, cancel.

Only the loop thread touches the engine. `submit` and `cancel` leave requests in a queue that the loop reads
between steps; events go back through each run's `Ticket`, a blocking iterator for threads or an async iterator
whose events are handed to the event loop with `call_soon_threadsafe`, so a server's event loop never waits on a
forward pass. A run too large for the KV budget is refused in `submit` itself, with the engine's error; `call`
runs a function of the engine on the loop thread between two steps (scoring a text, for the server's `echo`).

A run that fails ends alone (the engine isolates it: its ticket gets `Failed`, then `Done`). An exception out of
the engine's step itself (a failed forward pass: the cache is in an unknown state) stops the loop: every open
ticket gets the exception, `alive` turns false, and `on_fatal` is called so that a server can exit and be
restarted.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from hogwild.engine import Engine
from hogwild.errors import HogwildError
from hogwild.runs import Done, Event, Run

log = logging.getLogger("hogwild")


class Ticket:
    """A submitted run's events, as they come; the last one is `Done` (also after `cancel`)."""

    def __init__(self, loop: EngineLoop, run: Run, aio: asyncio.AbstractEventLoop | None) -> None:
        self.loop = loop
        self.run = run
        self._aio = aio
        self._events: queue.SimpleQueue | asyncio.Queue = asyncio.Queue() if aio else queue.SimpleQueue()
        self.done = False

    def _deliver(self, event: Event | BaseException) -> None:
        if self._aio is not None:
            self._aio.call_soon_threadsafe(self._events.put_nowait, event)
        else:
            self._events.put(event)

    def cancel(self) -> None:
        """Stop the run and free its blocks; its `Done` (the result so far) still arrives."""
        self.loop._requests.put(("abort", self))
        self.loop._wake.set()

    def __iter__(self) -> Iterator[Event]:
        assert self._aio is None, "this ticket was submitted from an event loop: use `async for`"
        while not self.done:
            yield self._unwrap(self._events.get())

    async def __aiter__(self) -> AsyncIterator[Event]:
        assert self._aio is not None, "this ticket was submitted from a thread: use `for`"
        while not self.done:
            yield self._unwrap(await self._events.get())

    def _unwrap(self, event: Event | BaseException) -> Event:
        if isinstance(event, BaseException):
            self.done = True
            raise event
        if isinstance(event, Done):
            self.done = True
        return event


class EngineLoop:
    """Runs `engine.step()` in one daemon thread while there is work, and sleeps when there is none."""

    def __init__(self, engine: Engine, on_fatal: Callable[[BaseException], None] | None = None) -> None:
        self.engine = engine
        self.on_fatal = on_fatal  # called on the loop thread when the engine fails and the loop stops
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._tickets: dict[int, Ticket] = {}
        self._closed = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="hogwild-engine", daemon=True)
        self._thread.start()

    def submit(self, run: Run, aio: asyncio.AbstractEventLoop | None = None) -> Ticket:
        """Queue `run` (from any thread); `aio`: the event loop of an asyncio consumer, for `async for`."""
        if self._closed or self.error is not None:
            raise HogwildError("the engine loop has stopped")
        self.engine.check_fits_pool(run)
        ticket = Ticket(self, run, aio)
        self._requests.put(("add", ticket))
        self._wake.set()
        return ticket

    def call(self, fn: Callable[[Engine], Any]) -> concurrent.futures.Future:
        """Run `fn(engine)` on the loop thread between two steps; its result or its exception comes in the future
        (`asyncio.wrap_future` it to await it)."""
        if self._closed or self.error is not None:
            raise HogwildError("the engine loop has stopped")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._requests.put(("call", (fn, future)))
        self._wake.set()
        return future

    @property
    def alive(self) -> bool:
        """The loop thread is running and takes runs (not closed, no engine failure)."""
        return not self._closed and self.error is None and self._thread.is_alive()

    @property
    def queued(self) -> int:
        """Runs waiting for KV room (read without a lock: a snapshot for metrics)."""
        return len(self.engine.scheduler.waiting)

    def close(self) -> None:
        """Cancel every run and stop the thread."""
        self._closed = True
        self._requests.put(("close", None))
        self._wake.set()
        self._thread.join(timeout=30)

    def _main(self) -> None:
        try:
            while True:
                while not self._requests.empty():
                    kind, ticket = self._requests.get()
                    if kind == "close":
                        for open_ticket in list(self._tickets.values()):
                            self._route(self.engine.abort(open_ticket.run, "cancelled"))
                        return
                    if kind == "add":
                        self._tickets[ticket.run.id] = ticket
                        self._route(self._add(ticket))
                    elif kind == "abort":
                        self._route(self.engine.abort(ticket.run, "cancelled"))
                    elif kind == "call":
                        self._call(*ticket)
                if self.engine.has_work:
                    self._route(self.engine.step())
                else:
                    self._wake.wait()
                    self._wake.clear()
        except BaseException as e:  # the engine itself failed: every consumer hears of it, nobody hangs
            self.error = e
            log.critical("the engine failed; its loop stops", exc_info=e)
            for ticket in self._tickets.values():
                ticket._deliver(e)
            while not self._requests.empty():
                kind, item = self._requests.get()
                if kind == "add":
                    item._deliver(e)
                elif kind == "call":
                    item[1].set_exception(e)
            if self.on_fatal is not None:
                self.on_fatal(e)

    def _call(self, fn: Callable[[Engine], Any], future: concurrent.futures.Future) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn(self.engine))
        except Exception as e:  # the caller's failure, raised where it awaits the future
            future.set_exception(e)

    def _add(self, ticket: Ticket) -> list[Run]:
        try:
            self.engine.add(ticket.run)
        except HogwildError as e:  # an immediate run (a probe) that found no room now
            ticket._deliver(e)
            self._tickets.pop(ticket.run.id)
        return []

    def _route(self, runs: list[Run]) -> None:
        """Hand the runs' new events from their outboxes to their tickets (a run without one: dropped)."""
        for run in runs:
            ticket = self._tickets.get(run.id)
            while run.outbox:
                event = run.outbox.popleft()
                if ticket is None:
                    continue
                ticket._deliver(event)
                if isinstance(event, Done):
                    self._tickets.pop(run.id, None)
