"""The collaboration loop: N workers decode together, one forward pass per token for all of them.

Hogwild! mode: each worker writes steps that open with a header (`**Alice [3]:** `); a step ends at a paragraph
break after a finished sentence, and the finished step moves into the shared history (in the layouts that have
one). Every `self_check_every` tokens a worker's next step opens with a short self-check question. Group Think
mode: no steps; each thinker has a private prompt and sees every other thinker's tokens at every forward pass.

The run stops when a finished step holds a parsable \\boxed{} answer, or at the budget of sequential forward passes,
where a finisher asks one worker for the answer now and decodes it briefly. A `Collaboration` is a run of the
engine (`runs.py`): the engine batches its workers with every other run's rows; its events (the last one `Done`)
are what the CLI, the server, the evaluation harness and `hogwild.solve` consume. `probe()` forks a throwaway
finisher off the live cache to ask for the answer at any point without disturbing the run.
"""

from __future__ import annotations

import time
from collections.abc import Generator
from dataclasses import dataclass, field

from hogwild.collab import prompts
from hogwild.collab.layouts import LAYOUTS, SharedCache
from hogwild.collab.text import boxed_answer, step_ends
from hogwild.engine import Engine
from hogwild.errors import HogwildError
from hogwild.model.tokenizer import TextStream
from hogwild.runs import Done, Feed, Probe, Run, Sample, Token
from hogwild.sampling import GREEDY, SamplingParams

MODES = ("hogwild", "groupthink")


@dataclass(frozen=True)
class CollabConfig:
    workers: int = 2
    mode: str = "hogwild"
    layout: str = "combined"
    budget: int = 512  # sequential forward passes, the finisher excluded
    max_workers: int = prompts.MAX_WORKERS
    self_check_every: int = 128  # tokens a worker writes between self-check questions; 0: never
    max_step_tokens: int = 192  # past this a step may end at any line break outside code and math; at 2x, anywhere
    finisher_tokens: int = 24
    format: str | None = None  # prompt preset (chat, think, plain); None: the model family's default

    def __post_init__(self) -> None:
        if not 1 <= self.max_workers <= prompts.MAX_WORKERS:
            raise HogwildError(f"max_workers must be between 1 and {prompts.MAX_WORKERS}")
        if not 1 <= self.workers <= self.max_workers:
            raise HogwildError(f"workers must be between 1 and {self.max_workers}, got {self.workers}")
        if self.mode not in MODES:
            raise HogwildError(f"unknown mode {self.mode!r}: choose one of {', '.join(MODES)}")
        if self.layout not in LAYOUTS:
            raise HogwildError(f"unknown layout {self.layout!r}: choose one of {', '.join(LAYOUTS)}")
        if self.budget < 1:
            raise HogwildError(f"budget must be at least 1 forward pass, got {self.budget}")
        if self.self_check_every < 0 or self.max_step_tokens < 1 or self.finisher_tokens < 1:
            raise HogwildError("self_check_every must be >= 0, max_step_tokens and finisher_tokens >= 1")
        if self.format is not None and self.format not in prompts.FORMATS:
            raise HogwildError(f"unknown format {self.format!r}: choose one of {', '.join(prompts.FORMATS)}")


# events, in the order a consumer sees them (Token and Done come from runs.py)
@dataclass
class StepStarted:
    worker: int
    step: int
    text: str  # the header inserted


@dataclass
class NudgeInserted:
    worker: int
    text: str


@dataclass
class StepFinished:
    worker: int
    step: int
    text: str  # the whole step, header included


@dataclass
class Pass:
    forward_passes: int
    budget: int


@dataclass
class AnswerFound:
    worker: int
    answer: str


@dataclass
class HistoryEntry:
    worker: int
    step: int
    text: str


@dataclass
class WorkerTranscript:
    name: str
    text: str
    tokens: int
    steps: int


@dataclass
class SolveResult:
    answer: str | None
    finished_by: str  # "answer", "budget", "context", "memory", "eos" (a lone worker ended its reply), "interrupted"
    workers: list[WorkerTranscript]
    history: list[HistoryEntry]
    forward_passes: int
    wall_s: float
    prompt_tokens: int

    @property
    def tokens(self) -> int:
        return sum(w.tokens for w in self.workers)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else 0.0

    def to_dict(self) -> dict:
        return {
            "answer": self.answer,
            "finished_by": self.finished_by,
            "forward_passes": self.forward_passes,
            "elapsed_s": round(self.wall_s, 3),
            "tokens_per_s": round(self.tokens_per_s, 2),
            "prompt_tokens": self.prompt_tokens,
            "tokens_per_worker": {w.name: w.tokens for w in self.workers},
            "workers": [{"name": w.name, "text": w.text, "tokens": w.tokens, "steps": w.steps} for w in self.workers],
            "history": [{"worker": self.workers[h.worker].name, "step": h.step, "text": h.text} for h in self.history],
        }


Event = Token | StepStarted | NudgeInserted | StepFinished | Pass | AnswerFound | Done


@dataclass
class _Worker:
    """One worker's state: its name, what it writes, what it feeds next."""

    index: int
    name: str
    stream: TextStream
    feed: list[int] = field(default_factory=list)  # tokens for the next forward pass
    step: int = 0
    step_text: str = ""  # the current step, header included
    step_tokens: int = 0
    text: str = ""  # everything it wrote, headers included
    tokens: int = 0  # sampled tokens
    since_check: int = 0
    closing: bool = False  # the fed token ends the step: move it once the pass is done


class Collaboration(Run):
    """One collaborative run of `config.workers` workers on `problem`."""

    def __init__(
        self, engine: Engine, problem: str, config: CollabConfig | None = None, sampling: SamplingParams | None = None
    ) -> None:
        super().__init__()
        config = config or CollabConfig()
        sampling = sampling or SamplingParams()
        if not problem.strip():
            raise HogwildError("the problem is empty")
        self.engine = engine
        self.config = config
        self.sampling = sampling
        self.problem = problem
        self.names = list(prompts.NAMES[: config.workers])
        self.format = prompts.format_for(engine.model_config.family, config.format)
        self.solo = config.workers == 1 and config.mode == "hogwild"  # plain chain of thought: no headers
        self.groupthink = config.mode == "groupthink"
        self.layout = "contiguous" if self.groupthink else config.layout
        self.tokenizer = engine.tokenizer
        self.history: list[HistoryEntry] = []
        self.shared: SharedCache | None = None
        self.workers = [_Worker(i, name, TextStream(self.tokenizer)) for i, name in enumerate(self.names)]
        self.answer: str | None = None
        self.answer_worker = 0
        self.passes = 0
        self.started = time.perf_counter()
        self.prompt_ids, self.setup = self._setup_texts()
        self.finisher_ids = self._encode(prompts.finisher(self.names[0]))
        self.reserve = len(self.finisher_ids) + config.finisher_tokens  # room the finisher needs at the end
        setup_tokens = sum(len(tokens) for _, tokens in self.setup) + sum(map(len, self.first_feed))
        longest_view = len(self.prompt_ids) + setup_tokens
        if engine.context_window - longest_view - self.reserve < 8:
            raise HogwildError(
                f"the prompt takes {len(self.prompt_ids)} tokens and leaves no room to work in the model's "
                f"{engine.context_window}-token context; shorten the problem or use fewer workers"
            )
        minimum = max(len(self._encode(prompts.header(n, 1))) for n in self.names)
        if config.budget <= minimum:
            raise HogwildError(
                f"a budget of {config.budget} forward passes is too small: the step headers alone take {minimum}; "
                f"give at least {minimum + 8}"
            )
        # K/V reserved: the prompt, the setup, each worker's tokens with room for headers and nudges, the finisher
        # (no worker writes more than the context window: the run ends at "context" first)
        per_worker = min(2 * config.budget + 128, engine.context_window)  # short steps: many headers
        self._kv_tokens = len(self.prompt_ids) + setup_tokens + self.reserve + config.workers * per_worker

    @property
    def kv_tokens(self) -> int:
        return self._kv_tokens

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _setup_texts(self) -> tuple[list[int], list[tuple[str, list[int]]]]:
        """Prompt token ids and the texts written after it: (which block, tokens) for the section titles or the
        thinkers' private prompts."""
        if self.groupthink:
            text, _ = prompts.groupthink_prompt(self.problem, self.names, 0)
        else:
            text = prompts.collaboration_prompt(self.problem, self.names)
        if self.format.chat:
            prompt_ids = self.tokenizer.encode_chat([{"role": "user", "content": text}])
            prompt_ids += self._encode(self.format.reply_prefix) if self.format.reply_prefix else []
        else:
            prompt_ids = self.tokenizer.encode(text + "\n\n")
        # without headers a worker's first pass feeds the last prompt token, held back from the prefill
        self.first_feed: list[list[int]] = [[] for _ in range(self.config.workers)]
        setup = []
        if self.groupthink:
            for w in range(self.config.workers):
                private = self._encode(prompts.groupthink_prompt(self.problem, self.names, w)[1])
                setup.append((f"private{w}", private[:-1]))
                self.first_feed[w] = private[-1:]
        elif self.solo:
            prompt_ids, self.first_feed[0] = prompt_ids[:-1], prompt_ids[-1:]
        else:
            if self.layout != "contiguous":
                setup.append(("history", self._encode(prompts.HISTORY_TITLE)))
            if self.layout != "interleaved":
                setup.append(("others", self._encode(prompts.OTHERS_TITLE)))
            setup.append(("own", self._encode(prompts.OWN_TITLE)))
        return prompt_ids, setup

    def _setup_feeds(self) -> list[Feed]:
        shared = self.shared
        assert shared is not None
        views = {
            "history": shared.history_view(),
            "others": [shared.prompt, shared.others_title],
            "own": [shared.prompt, shared.own_title],
        }
        if shared.private:
            views.update({f"private{w}": [shared.prompt, block] for w, block in enumerate(shared.private)})
        return [Feed(views[where], tokens) for where, tokens in self.setup if tokens]

    def _start_step(self, w: _Worker) -> None:
        w.step += 1
        w.step_text, w.step_tokens, w.closing = "", 0, False
        if self.solo or self.groupthink:
            w.feed = self.first_feed[w.index] if w.step == 1 else []
            return
        text = prompts.header(w.name, w.step)
        self.emit(StepStarted(w.index, w.step, text))
        if self.config.self_check_every and w.since_check >= self.config.self_check_every:
            text += prompts.SELF_CHECK
            w.since_check = 0
            self.emit(NudgeInserted(w.index, prompts.SELF_CHECK))
        w.feed = self._encode(text)
        w.step_text = text
        w.text += text

    def _finish_step(self, w: _Worker) -> None:
        """Move the worker's finished step into the shared history and open its next step."""
        assert self.shared is not None
        self.shared.finish_step(w.index)
        self.history.append(HistoryEntry(w.index, w.step, w.step_text))
        self.emit(StepFinished(w.index, w.step, w.step_text))
        self._look_for_answer(w, w.step_text)
        if self.answer is None:
            self._start_step(w)

    def _look_for_answer(self, w: _Worker, text: str) -> None:
        found = boxed_answer(text)
        if found is not None and self.answer is None:
            self.answer, self.answer_worker = found, w.index

    def _write(self, w: _Worker, token: int) -> None:
        """The worker sampled `token`: record it, feed it next, and see whether its step ends with it."""
        delta = w.stream.push(token)
        w.feed = [token]
        w.tokens += 1
        w.since_check += 1
        w.step_tokens += 1
        w.step_text += delta
        w.text += delta
        if self.groupthink:
            self._look_for_answer(w, w.text)
        elif w.step_tokens >= 2 * self.config.max_step_tokens or step_ends(
            w.step_text, force=w.step_tokens >= self.config.max_step_tokens
        ):
            w.closing = True  # at twice the soft limit a step ends wherever it is
        self.emit(Token(w.index, token, delta))

    def _fits(self, feeds: list[Feed]) -> str | None:
        """Why the next step cannot run ("context" or "memory"), or None when it fits with the finisher's room."""
        assert self.shared is not None and self.ledger is not None
        if max(feed.context for feed in feeds) + self.reserve > self.engine.context_window:
            return "context"
        needs = [(feed.own, feed.own.length + len(feed.tokens)) for feed in feeds]
        closing = sum(self.shared.current[w.index].length for w in self.workers if w.closing)
        if self.shared.has_history and closing:
            needs.append((self.shared.history, self.shared.history.length + closing))
        finisher = self.shared.current[0]
        needs.append((finisher, finisher.length + len(self.workers[0].feed) + self.reserve))
        return None if self.ledger.fits(needs) else "memory"

    def script(self) -> Generator[list[Feed], list[Sample], None]:
        assert self.ledger is not None
        config = self.config
        self.shared = shared = SharedCache(self.ledger, config.workers, self.layout, private=self.groupthink)
        self.ledger.keep = self.reserve + 64  # the finisher's room (and a last header) is never growth slack
        generator = self.sampling.generator()
        workers = self.workers
        yield [Feed([shared.prompt], self.prompt_ids)]
        setup = self._setup_feeds()
        if setup:
            yield setup
        for w in workers:
            self._start_step(w)
        finished_by = "budget"
        while self.passes < config.budget and self.answer is None:
            feeding = [w for w in workers if w.feed]
            feeds = [Feed(shared.view(w.index), w.feed, self.sampling, generator) for w in feeding]
            stop = self._fits(feeds)
            if stop:
                finished_by = stop
                break
            samples = yield feeds
            self.passes += 1
            ended = False
            for w, sample in zip(feeding, samples, strict=True):
                w.feed = []
                if w.closing:  # the step's last token is in the cache now: move the step, open the next
                    self._finish_step(w)
                    if w.feed or self.answer is not None:
                        continue  # a header goes in first; the logits of this pass are not used
                if sample.token not in self.engine.eos_ids:
                    self._write(w, sample.token)
                elif self.solo:  # a lone worker ending its turn has finished its chain of thought
                    ended = True
                else:  # the model ended its turn: write a paragraph break instead, which closes a step
                    w.feed, w.closing = self._encode("\n\n"), not self.groupthink
                    w.step_text += "\n\n"
                    w.text += "\n\n"
                    self.emit(Token(w.index, -1, "\n\n"))  # so a stream of the events spells out w.text
            self.emit(Pass(self.passes, config.budget))
            if ended:
                finished_by = "eos"
                break
        if self.answer is not None:
            finished_by = "answer"
        else:
            self.answer_worker = 0
            self.answer = yield from self._finisher(workers[0])
        if self.answer is not None:
            self.emit(AnswerFound(self.answer_worker, self.answer))
        self.emit(Done(self.result(finished_by)))

    def _finisher(self, w: _Worker) -> Generator[list[Feed], list[Sample], str | None]:
        """Ask worker `w` for the answer now and decode it briefly (greedy); returns the answer or None."""
        assert self.shared is not None
        view = self.shared.view(w.index)
        feed = w.feed + self.finisher_ids
        text = prompts.finisher(w.name)
        w.text += text
        self.emit(Token(w.index, -1, text))
        stream = TextStream(self.tokenizer)
        for _ in range(self.config.finisher_tokens):
            if Feed(view, feed).context > self.engine.context_window:
                break
            (sample,) = yield [Feed(view, feed, GREEDY)]
            self.passes += 1
            if sample.token in self.engine.eos_ids:
                break
            delta = stream.push(sample.token)
            text += delta
            w.text += delta
            self.emit(Token(w.index, sample.token, delta))
            feed = [sample.token]
            found = boxed_answer(text)
            if found is not None:
                return found
        return boxed_answer(text + "}")

    def probe(self, worker: int = 0, max_tokens: int | None = None) -> Probe:
        """A throwaway finisher forked off the live cache: asks `worker` for the answer now, greedily, in blocks of
        its own; add it to the engine. The run itself goes on exactly as it would have without it."""
        assert self.shared is not None, "the run has not started"
        w = self.workers[worker]
        question = prompts.finisher(w.name)

        def answer(text: str, final: bool) -> str | None:
            return boxed_answer(question + text + ("}" if final else ""))

        prefix = w.feed + self._encode(question)
        return Probe(self.engine, self.shared.view(worker), prefix, max_tokens or self.config.finisher_tokens, answer)

    def result(self, finished_by: str) -> SolveResult:
        return SolveResult(
            answer=self.answer,
            finished_by=finished_by,
            workers=[WorkerTranscript(w.name, w.text, w.tokens, w.step) for w in self.workers],
            history=list(self.history),
            forward_passes=self.passes,
            wall_s=time.perf_counter() - self.started,
            prompt_tokens=len(self.prompt_ids) + len(self.first_feed[0]),
        )
