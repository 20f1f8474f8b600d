"""The collaboration loop: N workers decode together, one forward pass per token for all of them.

Hogwild! mode: each worker writes steps that open with a header (`**Alice [3]:** `); a step ends at a paragraph
break after a finished sentence, and the finished step moves into the shared history (in the layouts that have
one). Every `self_check_every` tokens a worker's next step opens with a short self-check question. Group Think
mode: no steps; each thinker has a private prompt and sees every other thinker's tokens at every forward pass.

The run stops when a finished step holds a parsable \\boxed{} answer, or at the budget of sequential forward passes,
where a finisher asks one worker for the answer now and decodes it briefly. `run()` is a generator of events that
the CLI, the server, the evaluation harness and `hogwild.solve` all consume; the last event is `Done`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from hogwild.attention import Row
from hogwild.cache.layouts import LAYOUTS, SharedCache
from hogwild.collab import prompts
from hogwild.collab.text import boxed_answer, step_ends
from hogwild.engine import Engine
from hogwild.errors import HogwildError
from hogwild.model.tokenizer import TextStream
from hogwild.sampling import SamplingParams, sample

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


# events, in the order a consumer sees them
@dataclass
class Token:
    worker: int
    token: int
    text: str  # newly printable text (may be empty while a multi-byte character is incomplete)


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
    finished_by: str  # "answer", "budget", "context", "eos" (one worker ended its reply) or "interrupted"
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


@dataclass
class Done:
    result: SolveResult


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


class Collaboration:
    """One collaborative run of `config.workers` workers on `problem`."""

    def __init__(
        self, engine: Engine, problem: str, config: CollabConfig | None = None, sampling: SamplingParams | None = None
    ) -> None:
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
        layout = "contiguous" if self.groupthink else config.layout
        self.shared = SharedCache(engine.new_cache(), config.workers, layout, private=self.groupthink)
        self.tokenizer = engine.tokenizer
        self.history: list[HistoryEntry] = []
        self.prompt_ids, self.setup_rows = self._setup_rows()
        self.finisher_ids = self.tokenizer.encode(prompts.finisher(self.names[0]), add_special_tokens=False)
        reserve = len(self.finisher_ids) + config.finisher_tokens
        room = engine.context_window - max(self._context_after_setup(w) for w in range(config.workers)) - reserve
        if room < 8:
            raise HogwildError(
                f"the prompt takes {len(self.prompt_ids)} tokens and leaves no room to work in the model's "
                f"{engine.context_window}-token context; shorten the problem or use fewer workers"
            )
        minimum = max(len(self.tokenizer.encode(prompts.header(n, 1), add_special_tokens=False)) for n in self.names)
        if config.budget <= minimum:
            raise HogwildError(
                f"a budget of {config.budget} forward passes is too small: the step headers alone take {minimum}; "
                f"give at least {minimum + 8}"
            )

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _setup_rows(self) -> tuple[list[int], list[Row]]:
        """Prompt token ids and the rows that write the prompt and the section titles into the cache."""
        shared = self.shared
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
        rows = []
        if self.groupthink:
            for w in range(self.config.workers):
                private = self._encode(prompts.groupthink_prompt(self.problem, self.names, w)[1])
                rows.append(Row([shared.prompt, shared.private[w]], private[:-1]))
                self.first_feed[w] = private[-1:]
        elif self.solo:
            prompt_ids, self.first_feed[0] = prompt_ids[:-1], prompt_ids[-1:]
        else:
            if shared.has_history:
                rows.append(Row(shared.history_view(), self._encode(prompts.HISTORY_TITLE)))
            if shared.layout != "interleaved":
                rows.append(Row([shared.prompt, shared.others_title], self._encode(prompts.OTHERS_TITLE)))
            rows.append(Row([shared.prompt, shared.own_title], self._encode(prompts.OWN_TITLE)))
        return prompt_ids, rows

    def _context_after_setup(self, worker: int) -> int:
        extra = sum(len(row.tokens) for row in self.setup_rows if row.own in self.shared.view(worker))
        return len(self.prompt_ids) + extra + len(self.first_feed[worker])

    def _start_step(self, w: _Worker) -> list[Event]:
        w.step += 1
        w.step_text, w.step_tokens, w.closing = "", 0, False
        if self.solo or self.groupthink:
            w.feed = self.first_feed[w.index] if w.step == 1 else []
            return []
        text = prompts.header(w.name, w.step)
        events: list[Event] = [StepStarted(w.index, w.step, text)]
        if self.config.self_check_every and w.since_check >= self.config.self_check_every:
            text += prompts.SELF_CHECK
            w.since_check = 0
            events.append(NudgeInserted(w.index, prompts.SELF_CHECK))
        w.feed = self._encode(text)
        w.step_text = text
        w.text += text
        return events

    def _finish_step(self, w: _Worker) -> list[Event]:
        """Move the worker's finished step into the shared history and open its next step."""
        self.shared.finish_step(w.index)
        self.history.append(HistoryEntry(w.index, w.step, w.step_text))
        events: list[Event] = [StepFinished(w.index, w.step, w.step_text)]
        self._look_for_answer(w, w.step_text)
        return events if self.answer is not None else events + self._start_step(w)

    def _look_for_answer(self, w: _Worker, text: str) -> None:
        found = boxed_answer(text)
        if found is not None and self.answer is None:
            self.answer, self.answer_worker = found, w.index

    def _write(self, w: _Worker, token: int) -> list[Event]:
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
        return [Token(w.index, token, delta)]

    def run(self) -> Iterator[Event]:
        """Yield events as the workers write; the last one is `Done` with the result."""
        engine, config, shared = self.engine, self.config, self.shared
        start = time.perf_counter()
        generator = self.sampling.generator()
        workers = [_Worker(i, name, TextStream(self.tokenizer)) for i, name in enumerate(self.names)]
        engine.step([Row([shared.prompt], self.prompt_ids)])
        if self.setup_rows:
            engine.step(self.setup_rows)
        for w in workers:
            yield from self._start_step(w)
        self.answer, self.answer_worker = None, 0
        passes, finished_by = 0, "budget"
        reserve = len(self.finisher_ids) + config.finisher_tokens
        try:
            while passes < config.budget and self.answer is None:
                feeding = [w for w in workers if w.feed]
                rows = [Row(shared.view(w.index), w.feed) for w in feeding]
                if max(row.context for row in rows) + reserve > engine.context_window:
                    finished_by = "context"
                    break
                logits = engine.step(rows)
                passes += 1
                tokens = sample(logits, self.sampling, generator).tolist()
                ended = False
                for w, token in zip(feeding, tokens, strict=True):
                    w.feed = []
                    if w.closing:  # the step's last token is in the cache now: move the step, open the next
                        yield from self._finish_step(w)
                        if w.feed or self.answer is not None:
                            continue  # a header goes in first; the logits of this pass are not used
                    if token not in engine.eos_ids:
                        yield from self._write(w, token)
                    elif self.solo:  # a lone worker ending its turn has finished its chain of thought
                        ended = True
                    else:  # the model ended its turn: write a paragraph break instead, which closes a step
                        w.feed, w.closing = self._encode("\n\n"), not self.groupthink
                        w.step_text += "\n\n"
                        w.text += "\n\n"
                yield Pass(passes, config.budget)
                if ended:
                    finished_by = "eos"
                    break
        except KeyboardInterrupt:
            finished_by = "interrupted"
        if self.answer is not None:
            finished_by = "answer"
        elif finished_by != "interrupted":
            self.answer_worker = 0
            self.answer, extra = yield from self._finisher(workers[0])
            passes += extra
        if self.answer is not None:
            yield AnswerFound(self.answer_worker, self.answer)
        result = SolveResult(
            answer=self.answer,
            finished_by=finished_by,
            workers=[WorkerTranscript(w.name, w.text, w.tokens, w.step) for w in workers],
            history=list(self.history),
            forward_passes=passes,
            wall_s=time.perf_counter() - start,
            prompt_tokens=len(self.prompt_ids) + len(self.first_feed[0]),
        )
        yield Done(result)

    def _finisher(self, w: _Worker) -> Iterator[Event]:
        """Ask worker `w` for the answer now and decode it briefly (greedy); returns (answer or None, passes)."""
        view = self.shared.view(w.index)
        feed = w.feed + self.finisher_ids
        text = prompts.finisher(w.name)
        w.text += text
        yield Token(w.index, -1, text)
        stream = TextStream(self.tokenizer)
        passes = 0
        for _ in range(self.config.finisher_tokens):
            if Row(view, feed).context > self.engine.context_window:
                break
            logits = self.engine.step([Row(view, feed)])
            passes += 1
            token = int(logits[0].argmax())
            if token in self.engine.eos_ids:
                break
            delta = stream.push(token)
            text += delta
            w.text += delta
            yield Token(w.index, token, delta)
            feed = [token]
            found = boxed_answer(text)
            if found is not None:
                return found, passes
        return boxed_answer(text + "}"), passes
