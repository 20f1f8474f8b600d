"""Runs: the units of work the engine schedules, each a small state machine over the shared KV pool.

A run says which rows it feeds next (`feed`), takes back the tokens sampled for them (`take`), updates its own
state and returns events. A run whose own code fails (building its first feed, reading its samples) ends there:
it emits `Failed` and then `Done`, its blocks are freed, and every other run goes on. Kinds: `Sampled` (a plain
generation, or N independent samples of each of its prompts sharing that prompt's block), `Probe` (a throwaway
greedy continuation forked from another run's live blocks), and, in `collab/`, the Hogwild! collaboration and
Group Think. Each run writes its logic as a `script()` generator that yields the feeds of its next step and
receives the samples for them, which keeps a multi-phase protocol readable.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Protocol

import torch

from hogwild.cache.blocks import Block
from hogwild.cache.pool import Ledger
from hogwild.errors import HogwildError
from hogwild.model.tokenizer import TextStream, Tokenizer
from hogwild.sampling import GREEDY, Sample, SamplingParams


@dataclass(frozen=True)
class ModelContext:
    """What a run reads of the model it runs on: the tokenizer (the text of the tokens it samples), the tokens that
    end a reply, and the context window. The engine holds the one copy (`Engine.context`)."""

    tokenizer: Tokenizer
    eos_ids: frozenset[int]
    window: int  # the most tokens one row's view may hold

    def fits(self, tokens: int) -> bool:
        return tokens <= self.window

    def check(self, tokens: int, what: str) -> None:
        """The one context-window check for user input: `what` names what is too long."""
        if not self.fits(tokens):
            raise HogwildError(f"{what} the model's context window is {self.window} tokens")


class HasContext(Protocol):
    """What a run is made on: the engine, of which a run reads only its `ModelContext`."""

    context: ModelContext


@dataclass
class Feed:
    """One row of a run's next step: `tokens` appended to `view[-1]`, reading the view; `sampling` None when the
    row's logits are not needed (text written into the cache, not continued from)."""

    view: list[Block]
    tokens: list[int]
    sampling: SamplingParams | None = None
    generator: torch.Generator | None = None

    @property
    def own(self) -> Block:
        return self.view[-1]

    @property
    def context(self) -> int:
        return sum(block.published for block in self.view[:-1]) + self.own.length + len(self.tokens)


# events of the plain kinds; the collaboration adds its own in collab/protocol.py
@dataclass
class Token:
    worker: int  # the sample, worker or probe row that wrote it
    token: int  # -1 for text inserted by the run itself (a header, a finisher question), or for end-of-sequence
    text: str  # newly printable text (may be empty while a multi-byte character is incomplete)
    sample: Sample | None = None  # the sample behind a sampled token, end-of-sequence included (log-probabilities)


@dataclass
class Done:
    result: object  # the run's result: GenerationResult, ProbeResult, SolveResult


@dataclass
class Failed:
    """The run failed and ends here (`Done` follows); `error` is what went wrong, logged with its traceback."""

    error: BaseException


Event = object
_ids = itertools.count(1)
log = logging.getLogger("hogwild")


class Run:
    """Contract between a run and the engine:

    - `kv_tokens`: the most tokens of K/V the run can hold at once; the engine admits it when that fits the pool.
    - `start(ledger)`: called once on admission; the run makes its blocks in the ledger and sets its first feed.
    - `feed`: the rows of the run's next step, [] while it waits, or None once it is done. Rows of one step write
      distinct blocks and see each other's tokens only from the next step on.
    - `take(samples)`: the samples for the feeds that asked for logits, in feed order; the run advances.
    - `abort(reason)`: stop now; the run still ends with `Done` (its result so far).
    - `fail(error)`: the run's own code or its sampling failed: `Failed(error)`, then `Done` (finished by "error").
    Events accumulate in `events` (drained by the engine into `outbox` for the run's consumer); the result in
    the last one, `Done`, is also kept in `final`.
    """

    def __init__(self) -> None:
        self.id = next(_ids)
        self.ledger: Ledger | None = None
        self.feed: list[Feed] | None = []
        self.events: list[Event] = []
        self.outbox: deque[Event] = deque()  # events not yet read by the run's consumer
        self.final: object | None = None  # the result, once `Done` is emitted
        self.immediate = False  # start at once when added, or be refused (never queued)
        self._script: Generator[list[Feed], list[Sample], None] | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}#{self.id}"

    @property
    def kv_tokens(self) -> int:
        raise NotImplementedError

    @property
    def done(self) -> bool:
        return self.feed is None

    def script(self) -> Generator[list[Feed], list[Sample], None]:
        raise NotImplementedError

    def emit(self, event: Event) -> None:
        self.events.append(event)
        if isinstance(event, Done):
            self.final = event.result

    def start(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self._script = self.script()
        self._advance(None)

    def take(self, samples: list[Sample]) -> None:
        self._advance(samples)

    def _advance(self, samples: list[Sample] | None) -> None:
        assert self._script is not None
        try:
            self.feed = self._script.send(samples)
        except StopIteration:
            self.feed = None
        except Exception as e:  # this run's own fault: it ends, the engine and the other runs go on
            self.fail(e)

    def abort(self, reason: str = "interrupted") -> None:
        if self._script is not None:
            self._script.close()
        self.feed = None
        self.emit(Done(self.result(reason)))

    def fail(self, error: BaseException) -> None:
        if isinstance(error, HogwildError):  # said to the run's consumer, who shows the message
            log.info("%s failed: %s", self, error)
        else:
            log.error("%s failed", self, exc_info=error)
        self.emit(Failed(error))
        self.abort("error")

    def result(self, finished_by: str) -> object:
        """The run's result so far, ended by `finished_by`."""
        raise NotImplementedError


# plain generation and independent samples


@dataclass
class SampleResult:
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    finish_reason: str = ""  # "stop" (eos or a stop string), "length", or the reason it was aborted
    logprob: float = 0.0  # sum over the sampled tokens

    @property
    def mean_logprob(self) -> float:
        return self.logprob / len(self.tokens) if self.tokens else float("-inf")


@dataclass
class GenerationResult:
    samples: list[SampleResult]
    prompt_tokens: int
    wall_s: float

    @property
    def completion_tokens(self) -> int:
        return sum(len(s.tokens) for s in self.samples)


class _Stream:
    """One sample's text as it streams: incremental detokenizing, cut before the first stop string."""

    def __init__(self, tokenizer, stops: tuple[str, ...]) -> None:
        self.text = TextStream(tokenizer)
        self.stops = stops
        self.held = ""  # text that may be the start of a stop string
        self.result = SampleResult()

    def push(self, sample: Sample) -> tuple[str, bool]:
        """Record a sampled token -> (text that is now final, whether a stop string ended the sample)."""
        self.result.tokens.append(sample.token)
        self.result.logprob += sample.logprob
        self.held += self.text.push(sample.token)
        return self._release(final=False)

    def close(self) -> str:
        self.held += self.text.flush()
        return self._release(final=True)[0]

    def _release(self, final: bool) -> tuple[str, bool]:
        cut = find_stop(self.held, self.stops)
        if cut is not None:
            out, self.held = self.held[:cut], ""
            self.result.text += out
            return out, True
        keep = 0 if final else stop_prefix_length(self.held, self.stops)
        out, self.held = self.held[: len(self.held) - keep], self.held[len(self.held) - keep :]
        self.result.text += out
        return out, False


class Sampled(Run):
    """`n` independent samples of a prompt (n=1: a plain generation), or of each of several prompts (`prompt_ids`
    a list of token lists; sample p * n + j is the j-th of prompt p), all fed in the same steps. A prompt with one
    sample is fed in its own block; with n > 1 it is written once into a shared block and each sample continues it
    in a block of its own. Each sample stops at eos, a stop string or `params.max_tokens`. Events:
    `Token(sample, id, text, Sample)`, then `Done(GenerationResult)`."""

    def __init__(
        self,
        engine: HasContext,
        prompt_ids: list[int] | list[list[int]],
        params: SamplingParams | None = None,
        n: int = 1,
    ) -> None:
        super().__init__()
        params = params or SamplingParams()
        several = bool(prompt_ids) and isinstance(prompt_ids[0], list)
        self.prompts: list[list[int]] = [list(p) for p in prompt_ids] if several else [list(prompt_ids)]
        if not all(self.prompts):
            raise HogwildError("the prompt is empty")
        if n < 1:
            raise HogwildError(f"n must be >= 1, got {n}")
        longest = max(len(p) for p in self.prompts)
        self.context = context = engine.context
        context.check(longest + 1, what=f"the prompt has {longest} tokens;")
        self.prompt_ids = prompt_ids  # as given, one prompt or several
        self.params = params
        self.n = n
        self.max_tokens = min(params.max_tokens, context.window - longest)
        self.streams = [_Stream(context.tokenizer, params.stop) for _ in range(n * len(self.prompts))]
        self.started = time.perf_counter()

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def kv_tokens(self) -> int:
        return self.prompt_tokens + len(self.streams) * self.max_tokens

    def script(self) -> Generator[list[Feed], list[Sample], None]:
        assert self.ledger is not None
        generator = self.params.generator()
        views, feeds, shared_feeds = [], [], []
        for prompt in self.prompts:
            if self.n == 1:
                views.append([self.ledger.new_block("sequence", limit=len(prompt) + self.max_tokens)])
                feeds.append(prompt)
                continue
            shared = self.ledger.new_block("prompt", limit=len(prompt) - 1)
            if len(prompt) > 1:
                shared_feeds.append(Feed([shared], prompt[:-1]))
            views += [[shared, self.ledger.new_block(f"sample{j}", limit=self.max_tokens)] for j in range(self.n)]
            feeds += [prompt[-1:]] * self.n
        if shared_feeds:
            yield shared_feeds
        live = list(range(len(self.streams)))
        while live:
            samples = yield [Feed(views[i], feeds[i], self.params, generator) for i in live]
            still = []
            for i, sample in zip(live, samples, strict=True):
                stream = self.streams[i]
                if sample.token in self.context.eos_ids:
                    stream.result.finish_reason = "stop"
                    self._close(i)
                    self.emit(Token(i, -1, "", sample))
                    continue
                text, stopped = stream.push(sample)
                self.emit(Token(i, sample.token, text, sample))
                if stopped:
                    stream.result.finish_reason = "stop"
                elif len(stream.result.tokens) >= self.max_tokens:
                    stream.result.finish_reason = "length"
                    self._close(i)
                else:
                    feeds[i] = [sample.token]
                    still.append(i)
            live = still
        self.emit(Done(self.result("")))

    def _close(self, i: int) -> None:
        text = self.streams[i].close()
        if text:
            self.emit(Token(i, -1, text))

    def result(self, finished_by: str) -> GenerationResult:
        for stream in self.streams:
            if not stream.result.finish_reason:
                stream.result.finish_reason = finished_by
        return GenerationResult(
            [s.result for s in self.streams], self.prompt_tokens, time.perf_counter() - self.started
        )


# probes


@dataclass
class ProbeResult:
    text: str
    tokens: list[int]
    answer: str | None


class Probe(Run):
    """A throwaway greedy continuation of a live view. The view's blocks are forked when the probe is added to the
    engine (it starts at once, or is refused: it never queues), sharing their storage and never writing it;
    `prefix` is written into a block of the probe's own after them, and up to `max_tokens` are decoded. The run it
    forks from goes on untouched; the probe's blocks are freed when it ends. `answer(text, final)` reads the answer
    from the text so far (final: decoding is over); the probe stops as soon as it finds one."""

    def __init__(
        self, engine: HasContext, view: list[Block], prefix: list[int], max_tokens: int, answer=None, worker: int = 0
    ) -> None:
        super().__init__()
        assert prefix, "a probe feeds at least one token"
        self.context = engine.context
        self.source = list(view)
        self.prefix = list(prefix)
        self.max_tokens = max_tokens
        self.answer_of = answer
        self.worker = worker
        self.stream = TextStream(self.context.tokenizer)
        self.text = ""
        self.tokens: list[int] = []
        self.immediate = True  # the forks must be taken now, before the source run moves on

    @property
    def kv_tokens(self) -> int:
        # forks are charged for the storage they share (it may outlive the blocks it was forked from)
        return sum(block.capacity for block in self.source) + len(self.prefix) + self.max_tokens

    def script(self) -> Generator[list[Feed], list[Sample], None]:
        assert self.ledger is not None
        view = [self.ledger.fork(block) for block in self.source]
        view.append(self.ledger.new_block("probe", limit=len(self.prefix) + self.max_tokens))
        feed = self.prefix
        for _ in range(self.max_tokens):
            if not self.context.fits(sum(b.length for b in view) + len(feed)):
                break
            (sample,) = yield [Feed(view, feed, GREEDY)]
            if sample.token in self.context.eos_ids:
                break
            delta = self.stream.push(sample.token)
            self.text += delta
            self.tokens.append(sample.token)
            self.emit(Token(self.worker, sample.token, delta))
            feed = [sample.token]
            if self.answer_of is not None and self.answer_of(self.text, False) is not None:
                break
        self.emit(Done(self.result("")))

    def result(self, finished_by: str) -> ProbeResult:
        answer = self.answer_of(self.text, True) if self.answer_of is not None else None
        return ProbeResult(self.text, list(self.tokens), answer)


def find_stop(text: str, stops: tuple[str, ...]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def stop_prefix_length(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best
