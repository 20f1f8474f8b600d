"""The collaboration loop: N workers decode together, one forward pass per token for all of them.

Hogwild! mode: each worker writes steps that open with a header (`**Alice [3]:** `); a step ends at a paragraph
break after a finished sentence once it holds `min_step_tokens` (a paragraph of reasoning, not a line), and the
finished step moves into the shared history (in the layouts that have one). Workers decode greedily by default;
given a temperature they sample, each from its own seeded generator, with the model's generation settings for the
rest (else top-p 0.95; the paper's 0.6 / 0.95 when nothing is given but `sampled`); while they write, a
logits mask keeps them from forging the scratchpad's structure (`collab/masks.py`). The openings differ. With
`crosscheck`, the default (a small model solves one problem best alone), every worker solves the whole problem in
one step as a lone worker would, apart (the interleaved layout), the first with the run's sampling and the others
sampled; once all are in, answers that agree are the run's, and answers that differ open a check step in which
the first worker to finish reads every solution in the shared history and answers. With `plan` the first worker
proposes a split and the others start once that step is finished (`assign`: the engine
names each worker's parts of a multi-part problem instead and quotes each part's statement; a part's solution is
one step, and a worker done with its parts takes one another has not begun). A step that repeats earlier steps
of anyone's is not taken: its tokens leave the cache and it opens again with a nudge that names what it repeated
(or is drawn again first). A repeat says what a finished step said, or copies text as it is written (the
others' or its own): the guard looks every 16 tokens, so a copy is cut short. Every `self_check_every` tokens
written by all workers together, the next step to open asks its worker whether it is doing redundant work,
answered yes or no. Group Think mode: no steps; each thinker has a private prompt and sees every other
thinker's tokens at every forward pass. Skeleton-of-Thought (`sot`), the baseline: one worker writes an outline
of N points, N workers expand one point each without seeing each other, and one worker answers from all of them.

The run stops when a finished step holds a parsable \\boxed{} answer, or at the budget of sequential forward passes,
where a finisher asks one worker for the answer now and decodes it briefly. A `Collaboration` is a run of the
engine (`runs.py`): the engine batches its workers with every other run's rows; its events (the last one `Done`)
are what the CLI, the server, the evaluation harness and `hogwild.solve` consume. `probe()` forks a throwaway
finisher off the live cache to ask for the answer at any point without disturbing the run.
"""

from __future__ import annotations

import dataclasses
import re
import time
import zlib
from collections.abc import Generator
from dataclasses import dataclass, field

import torch

from hogwild.collab import prompts
from hogwild.collab.layouts import LAYOUTS, SharedCache
from hogwild.collab.masks import masks
from hogwild.collab.redundancy import N, SharedText, copied, repeated, shares
from hogwild.collab.text import boxed_answer, boxed_answers, step_ends
from hogwild.engine import Engine
from hogwild.errors import HogwildError
from hogwild.eval import grading
from hogwild.model.tokenizer import TextStream
from hogwild.runs import Done, Feed, Probe, Run, Sample, Token
from hogwild.sampling import GREEDY, SamplingParams

MODES = ("hogwild", "groupthink", "sot")
REPEAT_GUARDS = ("resample", "nudge", "off")
TEMPERATURE, TOP_P = 0.6, 0.95  # the Hogwild! paper's sampling, for models that ship no generation settings
PLAN_TOKENS = 64  # the plan step ends at a line break past this many tokens (at twice as many, anywhere)
REPEAT_CHECK = 16  # tokens between the repeat guard's looks at a step being written
KNOWN_CHARS = 24  # assigned parts: the finisher's box repeats each known part answer up to this many characters
SOT_ANSWER_ROOM = 64  # Skeleton-of-Thought: passes kept for the answer after the expansions


@dataclass(frozen=True)
class CollabConfig:
    workers: int = 2
    mode: str = "hogwild"
    layout: str = "combined"
    budget: int = 512  # sequential forward passes, the finisher excluded
    max_workers: int = prompts.MAX_WORKERS
    opening: str = "crosscheck"  # first steps: crosscheck, plan, paper or symmetric (see prompts.opening)
    parts: int = 1  # independent questions in the problem: an answer gives all of them, in one \\boxed{}
    assign: bool = False  # the engine writes each worker's first line naming the parts it takes (when parts > 1)
    part_steps: bool = True  # assigned parts: a step is a part's whole solution, ended by its answer
    steal: bool = True  # assigned parts: a worker done with its parts takes the last part another has not begun
    quote_parts: bool = True  # assigned parts: the engine writes each part's statement after its heading
    mask: bool = True  # workers never draw tokens that forge the scratchpad's structure (collab/masks.py)
    min_step_tokens: int = 48  # a step ends at a paragraph break only once it holds this many tokens
    max_step_tokens: int = 192  # past this a step may end at any line break outside code and math; at 2x, anywhere
    repeat_guard: str = "nudge"  # a step repeating earlier ones: nudge, resample (then nudge), or off
    repeat_threshold: float = 0.5  # share of a step's word 4-grams standing in one earlier step that makes a repeat
    repeat_retries: int = 2  # resample: draws of a repeated step before a nudge names what it repeats
    copy_guard: bool = False  # a worker never draws the token that completes an n-gram another worker wrote
    self_check_every: int = 512  # tokens written by all workers between self-check questions; 0: never
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
        if not 0 <= self.min_step_tokens <= self.max_step_tokens:
            raise HogwildError(f"min_step_tokens must be between 0 and max_step_tokens ({self.max_step_tokens})")
        if self.opening not in prompts.OPENINGS:
            raise HogwildError(f"unknown opening {self.opening!r}: choose one of {', '.join(prompts.OPENINGS)}")
        if self.repeat_guard not in REPEAT_GUARDS:
            raise HogwildError(f"unknown repeat guard {self.repeat_guard!r}: choose one of {', '.join(REPEAT_GUARDS)}")
        if not 0 < self.repeat_threshold <= 1 or self.repeat_retries < 0:
            raise HogwildError("repeat_threshold must be in (0, 1] and repeat_retries >= 0")
        if self.parts < 1:
            raise HogwildError(f"parts must be >= 1, got {self.parts}")
        if self.format is not None and self.format not in prompts.FORMATS:
            raise HogwildError(f"unknown format {self.format!r}: choose one of {', '.join(prompts.FORMATS)}")


def default_sampling(
    engine: Engine, seed: int | None = 0, sampled: bool = False, **given: float | int | None
) -> SamplingParams:
    """The workers' sampling: greedy unless `sampled` (a strategy of independent samples) or a temperature is given;
    sampling takes the model's generation settings (its generation_config.json), else temperature 0.6 and top-p
    0.95. `given` SamplingParams fields (None: not given) take their place. Seeded (0 unless told), so a run given
    no seed is reproducible. Greedy is the default because it measured best for collaborations of the models
    hogwild installs (docs/evaluation.md: 15.6% against 3.1-6.2% sampled on the ablation slice)."""
    settings = {"temperature": TEMPERATURE, "top_p": TOP_P, **dict(engine.model_config.generation)}
    if not sampled:
        settings["temperature"] = 0.0
    settings |= {k: v for k, v in given.items() if v is not None}
    return SamplingParams(seed=seed, **settings)


def worker_seed(seed: int | None, worker: int) -> int | None:
    """Worker `worker`'s own seed, drawn from the run's: distinct workers draw distinct streams."""
    return None if seed is None else zlib.crc32(f"{seed}:{worker}".encode())


# events, in the order a consumer sees them (Token and Done come from runs.py)
@dataclass
class StepStarted:
    worker: int
    step: int
    text: str  # the header inserted (with the worker's opening line on its first step)


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
class StepDiscarded:
    """A step that repeated worker `repeats` (a finished step of theirs, or text being written; the worker's own
    included) was not taken: it left the cache, and `text`, which marks it in the worker's transcript, follows it
    there. The step opens again (`StepStarted`)."""

    worker: int
    step: int
    repeats: int
    text: str


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
    text: str  # everything it wrote, headers, nudges and the steps that were not taken included
    tokens: int  # tokens it sampled, those of steps not taken included
    steps: int
    discarded: int = 0  # tokens of its steps that were not taken
    redundancy: float | None = None  # share of its 8-token n-grams that stood in the shared text already


@dataclass
class SolveResult:
    answer: str | None
    finished_by: str  # "answer", "budget", "context", "memory", "eos" (every worker ended its reply), "interrupted"
    workers: list[WorkerTranscript]
    history: list[HistoryEntry]
    forward_passes: int
    wall_s: float
    prompt_tokens: int
    redundancy: float | None = None  # share of all workers' 8-token n-grams that stood in the shared text already
    account: str = ""  # the step that holds the answer, or the finisher's words (with the last step before them)

    @property
    def tokens(self) -> int:
        return sum(w.tokens for w in self.workers)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def content(self) -> str:
        """The reply a reader sees: the answer, then the words it came from."""
        if self.answer is None:
            return f"No answer in {self.forward_passes} forward passes.\n\n{self.account}".strip()
        return f"{self.answer}\n\n{self.account}".strip()

    def to_dict(self) -> dict:
        return {
            "answer": self.answer,
            "finished_by": self.finished_by,
            "forward_passes": self.forward_passes,
            "elapsed_s": round(self.wall_s, 3),
            "tokens_per_s": round(self.tokens_per_s, 2),
            "prompt_tokens": self.prompt_tokens,
            "redundancy": _rounded(self.redundancy),
            "tokens_per_worker": {w.name: w.tokens for w in self.workers},
            "workers": [
                {
                    "name": w.name,
                    "text": w.text,
                    "tokens": w.tokens,
                    "steps": w.steps,
                    "discarded_tokens": w.discarded,
                    "redundancy": _rounded(w.redundancy),
                }
                for w in self.workers
            ],  # fmt: skip
            "history": [{"worker": self.workers[h.worker].name, "step": h.step, "text": h.text} for h in self.history],
            "content": self.content,
        }


def _rounded(share: float | None) -> float | None:
    return None if share is None else round(share, 4)


Event = Token | StepStarted | NudgeInserted | StepFinished | StepDiscarded | Pass | AnswerFound | Done
ACCOUNT_CHARS = 600  # the most of a step a readable account quotes (its end, where the answer is)


@dataclass
class _Worker:
    """One worker's state: its name, its generator, what it writes, what it feeds next."""

    index: int
    name: str
    stream: TextStream
    generator: torch.Generator | None = None
    feed: list[int] = field(default_factory=list)  # tokens for the next forward pass
    step: int = 0
    step_text: str = ""  # the current step, header included
    inserted: int = 0  # characters of step_text the run wrote (header, opening, nudge): the rest is sampled
    step_tokens: int = 0  # tokens sampled in the current step
    text: str = ""  # everything it wrote, headers included
    tokens: int = 0  # sampled tokens
    discarded: int = 0  # sampled tokens of steps that were not taken
    written: list[tuple[int, int]] = field(default_factory=list)  # (forward pass, token) of the tokens kept
    sources: list[int | None] = field(default_factory=list)  # per token kept: whose text its n-gram stood in
    step_start: int = 0  # len(written) when the current step opened
    tries: int = 0  # times the current step was not taken
    closing: bool = False  # the fed token ends the step: move it once the pass is done
    waiting: bool = False  # its first line is written; it samples once the first worker's plan is finished
    answering: bool = False  # its next token answers the self-check question
    done: bool = False  # Skeleton-of-Thought: its part is written; assigned parts: all its parts are answered
    parts: list[int] = field(default_factory=list)  # assigned parts: the parts (1-based) the engine gave it
    part: int = 0  # assigned parts: index in `parts` of the one it works on
    part_start: int = 0  # assigned parts: len(text) where that part began
    part_answered: bool = False  # assigned parts: the step closing now holds its part's \boxed{} answer

    @property
    def sampled_text(self) -> str:
        """What the worker itself wrote in the current step."""
        return self.step_text[self.inserted :]


class Collaboration(Run):
    """One collaborative run of `config.workers` workers on `problem`. `sampling`: the workers' sampling (the
    model's settings by default, see `default_sampling`); each worker draws from a generator of its own."""

    def __init__(
        self, engine: Engine, problem: str, config: CollabConfig | None = None, sampling: SamplingParams | None = None
    ) -> None:
        super().__init__()
        config = config or CollabConfig()
        if not problem.strip():
            raise HogwildError("the problem is empty")
        self.engine = engine
        self.config = config
        self.sampling = sampling or default_sampling(engine)
        self.problem = problem
        self.names = list(prompts.NAMES[: config.workers])
        self.format = prompts.format_for(engine.model_config.family, config.format)
        self.solo = config.workers == 1 and config.mode == "hogwild"  # plain chain of thought: no headers
        self.groupthink = config.mode == "groupthink"
        self.sot = config.mode == "sot"
        # cross-check: the first worker solves with the run's sampling (greedy by default: a lone worker's
        # solution); the others sample with the model's settings when the run is greedy, so their solutions differ
        resample = self._crosschecks and self.sampling.temperature == 0
        self.solver = default_sampling(engine, self.sampling.seed, sampled=True) if resample else self.sampling
        # Skeleton-of-Thought and cross-check workers write apart: each sees the finished work only
        apart = self.sot or self._crosschecks
        self.layout = "contiguous" if self.groupthink else "interleaved" if apart else config.layout
        self.tokenizer = engine.tokenizer
        self.history: list[HistoryEntry] = []
        self.bodies: list[str] = []  # what each history step's worker sampled, for the repeat test
        self.shared: SharedCache | None = None
        self.workers = [
            _Worker(i, name, TextStream(self.tokenizer), self._generator(i)) for i, name in enumerate(self.names)
        ]
        if self._assigns:
            for w in self.workers:
                w.parts = prompts.assigned(config.workers, w.index, config.parts)
        self.part_answers: dict[int, str] = {}  # assigned parts: part (1-based) -> the \boxed{} its worker wrote
        self.solutions: dict[int, str] = {}  # cross-check: worker -> the answer its solution boxed
        self.checker: _Worker | None = None  # cross-check: the worker settling answers that differ
        # assigned parts, quoted: each part's statement, written after its heading in one forward pass (a model
        # restates the problem it starts, token by token, a pass each)
        quoted = self._assigns and config.quote_parts
        self.part_texts = (prompts.part_texts(problem, config.parts) if quoted else None) or []
        self.answer: str | None = None
        self.answer_worker = 0
        self.account = ""
        self.passes = 0
        self.since_check = 0  # tokens written by all workers since the last self-check question
        self.ngrams = SharedText()  # every n-gram the workers wrote, for the repeat guard and the redundancy
        self.started = time.perf_counter()
        self.params = self._worker_params()
        self.prompt_ids, self.setup = self._setup_texts()
        self.finisher_text = prompts.finisher(self.names[0], config.parts)
        self.placeholders = set(boxed_answers(problem))
        self.finisher_ids = self._encode(self.finisher_text)
        # room the finisher needs at the end (with assigned parts, the answers it is given: KNOWN_CHARS each)
        known = (KNOWN_CHARS + 2) * config.parts if self._assigns else 0
        self.reserve = len(self.finisher_ids) + known + config.finisher_tokens
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

    def _generator(self, worker: int) -> torch.Generator | None:
        sampling = self.solver if worker > 0 else self.sampling  # the run's sampling unless cross-checking
        if sampling.temperature == 0:
            return None
        return dataclasses.replace(sampling, seed=worker_seed(sampling.seed, worker)).generator()

    def _worker_params(self) -> dict[str, SamplingParams]:
        """Sampling while a worker writes a step ("write"), at the start of a line ("line"), right after a `*`
        ("star"), and when it answers the self-check question ("answer"). Without the mask, and in runs without
        steps to forge, only the last is constrained."""
        config, sampling = self.config, self.sampling
        found = masks(self.tokenizer, self.names, self.engine.eos_ids, self.engine.model_config.vocab_size)
        answer = dataclasses.replace(sampling, only=found.answers)
        if not config.mask or self.solo or self.sot or self._crosschecks:  # no structure to forge
            plain = {"write": sampling, "line": sampling, "star": sampling, "answer": answer}
            return plain | {"solve": self.solver}

        def banning(*sets: tuple[int, ...]) -> SamplingParams:
            return dataclasses.replace(sampling, banned=tuple(sorted({i for ids in sets for i in ids})))

        return {
            "solve": self.solver,
            "write": banning(found.forging),
            "line": banning(found.forging, found.line_start),
            "star": banning(found.forging, found.after_star),
            "answer": answer,
        }

    def _params(self, w: _Worker) -> SamplingParams:
        if w.answering:
            return self.params["answer"]
        if self._crosschecks and w.index > 0 and w is not self.checker:
            return self.params["solve"]
        if w.step_text.endswith("*"):
            params = self.params["star"]
        else:
            params = self.params["line"] if w.step_text.endswith("\n") else self.params["write"]
        copies = self._copies(w)
        return dataclasses.replace(params, blocked=copies) if copies else params

    def _copies(self, w: _Worker) -> tuple[int, ...]:
        """With the copy guard, the tokens that would make the worker's next token end an n-gram (N tokens) that
        another worker already wrote where it could see it: a small model that reads a neighbour's solution in the
        shared cache goes on to write it out, token for token, in place of its own. A box's opening brace is never
        blocked (every worker answers the same way)."""
        apart = self.solo or self.sot or self._crosschecks
        if not self.config.copy_guard or apart or w.step_text.endswith("\\boxed"):
            return ()
        return self.ngrams.copies(w.index, w.written, self.passes + 1)

    def _setup_texts(self) -> tuple[list[int], list[tuple[str, list[int]]]]:
        """Prompt token ids and the texts written after it: (which block, tokens) for the section titles or the
        thinkers' private prompts."""
        if self.groupthink:
            text, _ = prompts.groupthink_prompt(self.problem, self.names, 0)
        elif self.sot:
            text = prompts.sot_prompt(self.problem, self.config.workers)
        else:
            names = self.names[:1] if self._crosschecks else self.names  # a cross-check worker reads a lone one's
            text = prompts.collaboration_prompt(self.problem, names, self.config.parts, self._assigns)
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
        elif self.solo or self.sot:
            prompt_ids, self.first_feed[0] = prompt_ids[:-1], prompt_ids[-1:]
        elif self._crosschecks:  # every worker's reply starts the way a lone worker's does
            prompt_ids, self.first_feed = prompt_ids[:-1], [prompt_ids[-1:]] * self.config.workers
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

    # steps

    def _first_line(self, w: _Worker) -> str:
        config = self.config
        if config.workers == 1:
            return ""
        if self._assigns:
            return prompts.assignment(self.names, w.index, config.parts) + self._quote(w.parts[0] if w.parts else 0)
        return prompts.opening(config.opening, self.names, w.index, config.parts)

    def _start_step(self, w: _Worker, nudge: str = "", line: str = "") -> None:
        """Open the worker's next step; with `nudge`, open its current step again (it was not taken), the nudge
        after its header; `line`: what the engine writes after the header of a new step."""
        if not nudge and not w.tries:
            w.step += 1
        w.step_text, w.step_tokens, w.closing, w.step_start = "", 0, False, len(w.written)
        if self.solo or self.groupthink or (self._crosschecks and not line):
            w.feed = self.first_feed[w.index] if w.step == 1 else []
            w.inserted = 0
            return
        taken_from = None
        if w.part_answered:  # its part is answered: on to its next part, another's part not begun, or it is done
            w.part_answered = False
            w.part += 1
            if w.part == len(w.parts):
                taken_from = self._steal(w)
                if taken_from is None:
                    w.done, w.feed = True, []
                    return
        text = prompts.header(w.name, w.step) if w.step == 1 or not self._headerless else ""
        if w.step == 1:
            text += self._first_line(w)
        elif line:
            text += line
        elif taken_from is not None:
            text += prompts.taken_part(self.names[taken_from.index], w.parts[w.part], headed=bool(text))
            text += self._quote(w.parts[w.part])
        elif w.parts and len(w.text) == w.part_start:
            text += prompts.next_part(w.parts[w.part], headed=bool(text))
            text += self._quote(w.parts[w.part])
        self.emit(StepStarted(w.index, w.step, text))
        # a given split, or a solution of one's own, needs no self-check
        checks = self.config.self_check_every and not self._assigns and not self._crosschecks
        if not nudge and checks and self.since_check >= self.config.self_check_every:
            nudge = prompts.SELF_CHECK
            self.since_check = 0
            w.answering = True
        if nudge:
            text += nudge
            self.emit(NudgeInserted(w.index, nudge))
        w.feed = self._encode(text)
        w.step_text = text
        w.inserted = len(text)
        w.text += text

    def _quote(self, part: int) -> str:
        """What follows part `part`'s heading: its statement and a paragraph break, when quoted (else nothing)."""
        return f" {self.part_texts[part - 1]}\n\n" if self.part_texts and part else ""

    def _steal(self, w: _Worker) -> _Worker | None:
        """Assigned parts, with `steal`: worker `w` has answered its parts; it takes the last part that another
        worker has not begun (from the one with the most such parts left), so the run does not wait on one worker
        with two parts to go while another sits idle. Returns the worker it took the part from, or None."""
        if not self.config.steal:
            return None
        waiting = [v for v in self.workers if v is not w and not v.done and len(v.parts) - v.part > 1]
        if not waiting:
            return None
        owner = max(waiting, key=lambda v: (len(v.parts) - v.part, -v.index))
        w.parts.append(owner.parts.pop())
        return owner

    def _step_over(self, w: _Worker) -> bool:
        """Whether the token just written ends the worker's step (with assigned parts in `part_steps`, only its
        part's answer does: `_part_answered`)."""
        if self._part_steps:
            return False
        if self._crosschecks:  # a step is a whole solution, or the check: ended by its answer
            found = boxed_answer(w.sampled_text, self.config.parts)
            return found is not None and found not in self.placeholders
        plan = w.index == 0 and w.step == 1 and self._plans
        soft = PLAN_TOKENS if plan else self.config.max_step_tokens
        if w.step_tokens >= 2 * soft:
            return True  # at twice the soft limit a step ends wherever it is
        answered = "\\boxed{" in w.step_text
        if w.step_tokens < self.config.min_step_tokens and not (plan or answered):
            return False  # a step is a paragraph of work, not a line
        return step_ends(w.step_text, force=w.step_tokens >= soft)

    @property
    def _plans(self) -> bool:
        """Whether the others wait for the first worker's plan."""
        config = self.config
        return config.mode == "hogwild" and config.opening == "plan" and not self._assigns and config.workers > 1

    @property
    def _assigns(self) -> bool:
        """Whether the engine splits the problem's parts between the workers."""
        return self.config.assign and self.config.parts > 1 and self.config.mode == "hogwild" and not self.solo

    @property
    def _crosschecks(self) -> bool:
        """Whether every worker solves the whole problem, and answers that differ are settled by a check."""
        config = self.config
        return config.opening == "crosscheck" and config.mode == "hogwild" and not self._assigns and not self.solo

    @property
    def _part_steps(self) -> bool:
        """Whether a step is a whole assigned part's solution, ended only by its answer."""
        return self._assigns and self.config.part_steps

    @property
    def _headerless(self) -> bool:
        """Whether steps after the first open without a header: assigned parts in the contiguous layout, where
        each worker's block holds its parts' solutions one after another, written as one text (a small model
        reads a header in the middle of its own solution as a cue to start over), and cross-check, whose workers
        write as lone workers do."""
        return (self._assigns and self.layout == "contiguous") or self._crosschecks

    def _part_answered(self, w: _Worker) -> bool:
        """Assigned parts: whether the worker has just closed a \boxed{} answer to the part it works on; the
        answer is recorded as that part's, and the step ends there."""
        if not w.parts or w.part >= len(w.parts) or "}" not in w.text[-8:]:  # a box may close mid-token
            return False
        found = boxed_answers(w.text[w.part_start :])
        if not found or found[-1] in self.placeholders:
            return False
        self.part_answers[w.parts[w.part]] = found[-1]
        w.part_answered = True
        w.part_start = len(w.text)  # the next part's text starts after this answer
        return True

    def _all_parts(self) -> str | None:
        """Assigned parts: the problem's answer once every part has its worker's answer (in part order), else
        None."""
        if not self._assigns or len(self.part_answers) < self.config.parts:
            return None
        return "; ".join(self.part_answers[p] for p in range(1, self.config.parts + 1))

    def _settle(self) -> bool:
        """Cross-check: once every worker's solution is in, the answer when those with an answer agree (True then);
        when they differ, the first worker to finish opens a step that reads all the solutions and finds the
        mistake, and its answer is the run's."""
        if not self._crosschecks or self.checker is not None or len(self.solutions) < self.config.workers:
            return False
        answered = [(h, self.solutions[h.worker]) for h in self.history if self.solutions[h.worker] is not None]
        if not answered:
            return False  # no solution has an answer: the finisher asks for one
        if len({grading.answer_key(answer) for _, answer in answered}) == 1:
            first, answer = answered[0]
            self.answer, self.answer_worker, self.account = answer, first.worker, first.text
            return True
        self.checker = checker = self.workers[self.history[0].worker]
        checker.done = False
        self._start_step(checker, line=prompts.reconcile([answer for _, answer in answered]))
        return False

    def _close_step(self, w: _Worker) -> None:
        """The worker's step is over: take it into the shared history and open its next step, or, when it
        repeats an earlier step, leave it out and open it again."""
        assert self.shared is not None
        if self._repeats(w):
            return
        w.tries = 0
        self.shared.finish_step(w.index)
        self.history.append(HistoryEntry(w.index, w.step, w.step_text))
        self.bodies.append(w.sampled_text)
        self.emit(StepFinished(w.index, w.step, w.step_text))
        if self._crosschecks and w is not self.checker:  # its solution is in: it waits for the others' (`_settle`)
            self.solutions[w.index] = boxed_answer(w.step_text, self.config.parts)  # None: it ended without one
            w.done, w.feed = True, []
            return
        self._look_for_answer(w, w.step_text)
        if self.answer is not None:
            return
        if w is self.checker:  # a check that ended without an answer: nothing is left to write, the finisher asks
            w.done = True
            return
        self._start_step(w)
        if w.index == 0 and w.step == 2 and self._plans:  # the plan is in the history: the others start
            for other in self.workers:
                if other.waiting:
                    other.waiting = False
                    self._insert(other, prompts.plan_follow(self.names, other.index))

    def _repeating(self, w: _Worker) -> bool:
        """Whether the step being written already repeats earlier steps: checked every REPEAT_CHECK tokens, so a
        repeat is cut short instead of written to its end (it closes now, and is left out)."""
        # a part's solution opens the way the last one did ("To solve this, we need to..."): looked at from later
        least = 4 * REPEAT_CHECK if self._part_steps else 2 * REPEAT_CHECK
        if w.step_tokens < least or w.step_tokens % REPEAT_CHECK or not self._guarded(w):
            return False
        return self._repeated(w) is not None

    def _repeated(self, w: _Worker) -> tuple[int, int | None] | None:
        """What the worker's step repeats: (worker, step) of an earlier step that says the same, (worker, None)
        when its tokens copy that worker's text (its own included: going in circles), or None."""
        threshold = self.config.repeat_threshold
        hit = repeated(w.sampled_text, self.bodies, threshold)
        if hit is not None:
            return self.history[hit].worker, self.history[hit].step
        source = copied(w.sources[w.step_start + N - 1 :], threshold, least=REPEAT_CHECK)
        return None if source is None else (source, None)

    @property
    def _redraws(self) -> int:
        """Times a repeated step is drawn again before it is nudged (sampled runs with the resample guard)."""
        config = self.config
        return config.repeat_retries if config.repeat_guard == "resample" and self.sampling.temperature > 0 else 0

    def _guarded(self, w: _Worker) -> bool:
        """Whether the repeat guard looks at the worker's current step: not once it has been drawn again and
        nudged (that try is taken as it is)."""
        off = self.config.repeat_guard == "off" or self._crosschecks  # cross-check: the same solution is agreement
        if off or self.solo or self.sot or self.groupthink or w.tries > self._redraws:
            return False
        return self.layout != "contiguous" and "\\boxed{" not in w.step_text  # contiguous: steps cannot leave

    def _repeats(self, w: _Worker) -> bool:
        """When the step repeats an earlier one and the guard leaves it out: drop it from the cache and the
        worker's record, mark it in the transcript, and open it again (drawn anew, or with a nudge); True then."""
        if not self._guarded(w):
            return False
        hit = self._repeated(w)
        if hit is None:
            return False
        assert self.shared is not None
        worker, step = hit
        self.shared.current[w.index].clear()
        del w.written[w.step_start :]
        w.discarded += w.step_tokens
        self.ngrams, found = SharedText.of([v.written for v in self.workers])  # without the step left out
        for v, got in zip(self.workers, found, strict=True):
            v.sources = got
        marker = prompts.discarded(self.names, w.index, worker, step)
        w.text += marker
        self.emit(StepDiscarded(w.index, w.step, worker, marker))
        w.tries += 1
        mine = w.parts[w.part :]  # the parts it has still to answer, when the engine gave it parts
        nudge = prompts.repeat_nudge(self.names, w.index, worker, step, mine)
        self._start_step(w, nudge if w.tries > self._redraws else "")
        return True

    def _look_for_answer(self, w: _Worker, text: str) -> None:
        found = boxed_answer(text, self.config.parts)
        if found in self.placeholders:
            return  # a copy of a box the prompt shows is no answer
        if found is not None and self.answer is None:
            self.answer, self.answer_worker = found, w.index
            self.account = text

    def _write(self, w: _Worker, token: int) -> None:
        """The worker sampled `token`: record it, feed it next, and see whether its step ends with it."""
        delta = w.stream.push(token)
        w.feed = [token]
        w.tokens += 1
        w.written.append((self.passes, token))
        w.sources.append(self.ngrams.add(w.index, w.written))
        self.since_check += 1
        w.answering = False
        w.step_tokens += 1
        w.step_text += delta
        w.text += delta
        if self.groupthink:
            self._look_for_answer(w, w.text)
        elif not self.sot and (self._part_answered(w) or self._step_over(w) or self._repeating(w)):
            w.closing = True
        self.emit(Token(w.index, token, delta))
        if (w.part_answered and not self._headerless) or (self._crosschecks and w.closing):
            self._end_paragraph(w)

    def _end_paragraph(self, w: _Worker) -> None:
        """End the step being closed with a paragraph break (a part's step, or a cross-check's solution, ends at its
        answer's brace, and what follows must not run on from it): fed with the step's last token, so it stays in
        the step's block."""
        tail = "\n\n"[len(w.step_text) - len(w.step_text.rstrip("\n")) :]
        if not tail:
            return
        w.feed = w.feed + self._encode(tail)
        w.step_text += tail
        w.text += tail
        w.part_start = len(w.text)
        self.emit(Token(w.index, -1, tail))

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

    def _pass(self, workers: list[_Worker]) -> Generator[list[Feed], list[Sample], list[Sample] | str]:
        """One forward pass of the workers' rows: the samples of those that ask for logits, or why it cannot run
        ("context" or "memory")."""
        feeds = self._feeds(workers)
        stop = self._fits(feeds)
        if stop:
            return stop
        samples = yield feeds
        self.passes += 1
        return samples

    def _feeds(self, workers: list[_Worker]) -> list[Feed]:
        """The workers' rows; a waiting worker's writes its first line without asking for logits."""
        assert self.shared is not None
        return [
            Feed(self.shared.view(w.index), w.feed)
            if w.waiting
            else Feed(self.shared.view(w.index), w.feed, self._params(w), w.generator)
            for w in workers
        ]

    # the run

    def script(self) -> Generator[list[Feed], list[Sample], None]:
        assert self.ledger is not None
        config = self.config
        self.shared = shared = SharedCache(self.ledger, config.workers, self.layout, private=self.groupthink)
        self.ledger.keep = self.reserve + 64  # the finisher's room (and a last header) is never growth slack
        yield [Feed([shared.prompt], self.prompt_ids)]
        setup = self._setup_feeds()
        if setup:
            yield setup
        if self.sot:
            finished_by = yield from self._skeleton()
        else:
            finished_by = yield from self._steps()
        if self.answer is not None:
            finished_by = "answer"
        else:
            self.answer_worker = 0
            self.answer = yield from self._finisher(self.workers[0])
        if self.answer is not None:
            self.emit(AnswerFound(self.answer_worker, self.answer))
        self.emit(Done(self.result(finished_by)))

    def _steps(self) -> Generator[list[Feed], list[Sample], str]:
        """Hogwild! and Group Think: every worker writes until an answer or the budget; returns why it stopped."""
        config, workers = self.config, self.workers
        for w in workers:
            w.waiting = self._plans and w.index > 0
            self._start_step(w)
        while self.passes < config.budget and self.answer is None:
            feeding = [w for w in workers if w.feed]
            if not feeding:
                return "eos"  # every worker has ended its work without an answer
            samples = yield from self._pass(feeding)
            if isinstance(samples, str):
                return samples
            ended = False
            for w in feeding:
                if w.waiting:
                    w.feed = []
            for w, sample in zip([w for w in feeding if w.feed], samples, strict=True):
                w.feed = []
                if w.closing:  # the step's last token is in the cache now: move the step, open the next
                    self._close_step(w)
                    if w.feed or w.done or self.answer is not None:
                        continue  # a header goes in first (the logits of this pass are not used), or it is done
                if sample.token not in self.engine.eos_ids:
                    self._write(w, sample.token)
                elif self.solo:  # a lone worker ending its turn has finished its chain of thought
                    ended = True
                else:  # the model ended its turn (the mask is off): a paragraph break instead, which closes a step
                    w.feed, w.closing = self._encode("\n\n"), not self.groupthink
                    w.step_text += "\n\n"
                    w.text += "\n\n"
                    self.emit(Token(w.index, -1, "\n\n"))  # so a stream of the events spells out w.text
            self.emit(Pass(self.passes, config.budget))
            if ended:
                return "eos"
            if self._settle():
                return "answer"
            composed = self._all_parts()
            if composed is not None:
                self.answer, self.answer_worker = composed, 0
                self.account = "; ".join(
                    f"problem {p}: {self.part_answers[p]} ({w.name})" for w in workers for p in w.parts
                )
                return "answer"
        return "budget"

    def _skeleton(self) -> Generator[list[Feed], list[Sample], str]:
        """Skeleton-of-Thought: the first worker outlines N points; each worker expands one, seeing the outline but
        not the others; the first worker answers from all of them. Returns why it stopped."""
        config, workers = self.config, self.workers
        alice = workers[0]
        alice.feed = self.first_feed[0]
        outline = min(32 * config.workers, config.budget // 4)  # passes the outline may take at most
        stop = yield from self._decode([alice], outline, lambda w: _outlined(w.step_text, config.workers))
        stop = stop or (yield from self._flush([alice]))
        if stop or self.passes >= config.budget:
            return stop or "budget"
        self._keep(alice, 1)
        for w in workers:
            w.done, w.step = False, 2 if w.index == 0 else 1
            self._insert(w, prompts.sot_expand(w.index + 1), fresh=True)
        stop = yield from self._decode(workers, max(config.budget - SOT_ANSWER_ROOM, self.passes + 1), None)
        stop = stop or (yield from self._flush(workers))
        if stop or self.passes >= config.budget:
            return stop or "budget"
        for w in workers:  # the expansions, in point order, into the history the answer reads
            self._keep(w, w.step)
        alice.done, alice.step = False, alice.step + 1
        self._insert(alice, prompts.sot_answer(config.parts), fresh=True)
        stop = yield from self._decode([alice], config.budget, lambda w: boxed_answer(w.step_text, config.parts))
        self._look_for_answer(alice, alice.step_text)
        return stop or ("eos" if alice.done and self.answer is None else "budget")

    def _flush(self, workers: list[_Worker]) -> Generator[list[Feed], list[Sample], str | None]:
        """One pass that writes the workers' last sampled tokens into the cache (no logits asked), so a block
        moved into the history holds all its text; returns "context" or "memory" when it cannot run."""
        pending = [w for w in workers if w.feed]
        if not pending:
            return None
        assert self.shared is not None
        feeds = [Feed(self.shared.view(w.index), w.feed) for w in pending]
        stop = self._fits(feeds)
        if stop:
            return stop
        yield feeds
        self.passes += 1
        for w in pending:
            w.feed = []
        self.emit(Pass(self.passes, self.config.budget))
        return None

    def _insert(self, w: _Worker, text: str, fresh: bool = False) -> None:
        """Write `text` for the worker (fed with its next pass), after its current step or, `fresh`, as the
        start of a new piece of its work."""
        w.feed = w.feed + self._encode(text)
        if fresh:
            w.step_text, w.step_tokens, w.inserted = "", 0, 0
        w.step_text += text
        w.inserted += len(text)
        w.text += text
        self.emit(Token(w.index, -1, text))

    def _keep(self, w: _Worker, step: int) -> None:
        """Move the worker's block into the shared history as step `step`."""
        assert self.shared is not None
        self.shared.finish_step(w.index)
        self.history.append(HistoryEntry(w.index, step, w.step_text))
        self.bodies.append(w.sampled_text)
        self.emit(StepFinished(w.index, step, w.step_text))

    def _decode(self, workers: list[_Worker], until: int, finished) -> Generator[list[Feed], list[Sample], str | None]:
        """Decode `workers` until each has ended its reply or `finished(w)` holds, or `until` passes; returns
        "context" or "memory" when the next pass cannot run, else None."""
        config = self.config
        while self.passes < until:
            feeding = [w for w in workers if not w.done]
            if not feeding:
                return None
            samples = yield from self._pass(feeding)
            if isinstance(samples, str):
                return samples
            for w, sample in zip(feeding, samples, strict=True):
                if sample.token in self.engine.eos_ids:
                    w.done, w.feed = True, []
                    continue
                self._write(w, sample.token)
                if finished is not None and finished(w):
                    w.done = True  # its last token waits in w.feed; the next phase feeds it first
            self.emit(Pass(self.passes, config.budget))
        return None

    def _finisher(self, w: _Worker) -> Generator[list[Feed], list[Sample], str | None]:
        """Ask worker `w` for the answer now and decode it briefly (greedy); returns the answer or None."""
        assert self.shared is not None
        view = self.shared.view(w.index)
        text = self._question(w)
        feed = w.feed + self._encode(text)
        w.text += text
        self.emit(Token(w.index, -1, text))
        stream = TextStream(self.tokenizer)
        last = self.history[-1].text.strip() if self.history else ""
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
            found = boxed_answer(text, self.config.parts)
            if found is not None:
                self.account = _quoted(last) + text.strip()
                return found
        self.account = _quoted(last) + (text + "}").strip()
        return boxed_answer(text + "}", self.config.parts)

    def _question(self, w: _Worker) -> str:
        """The finisher's question to worker `w`. With assigned parts, the box opens with the answers its workers
        already wrote for the first parts in order (up to the first part still open): the model writes the rest."""
        question = prompts.finisher(w.name, self.config.parts)
        if not self._assigns:
            return question
        known = []
        for part in range(1, self.config.parts + 1):
            if part not in self.part_answers:
                break
            known.append(self.part_answers[part][:KNOWN_CHARS])
        return question + "".join(f"{answer}; " for answer in known)

    def probe(self, worker: int = 0, max_tokens: int | None = None) -> Probe:
        """A throwaway finisher forked off the live cache: asks `worker` for the answer now, greedily, in blocks of
        its own; add it to the engine. The run itself goes on exactly as it would have without it."""
        assert self.shared is not None, "the run has not started"
        w = self.workers[worker]
        question = self._question(w)
        parts = self.config.parts

        def answer(text: str, final: bool) -> str | None:
            return boxed_answer(question + text + ("}" if final else ""), parts)

        prefix = w.feed + self._encode(question)
        return Probe(self.engine, self.shared.view(worker), prefix, max_tokens or self.config.finisher_tokens, answer)

    def redundancy(self) -> tuple[float | None, list[float | None]]:
        """The share of the workers' 8-token n-grams that stood in the shared text already, so far: the run's and
        each worker's (see collab/redundancy.py)."""
        return shares([w.sources for w in self.workers])

    def result(self, finished_by: str) -> SolveResult:
        total, each = self.redundancy()
        return SolveResult(
            answer=self.answer,
            finished_by=finished_by,
            workers=[
                WorkerTranscript(w.name, w.text, w.tokens, w.step, w.discarded, share)
                for w, share in zip(self.workers, each, strict=True)
            ],
            history=list(self.history),
            forward_passes=self.passes,
            wall_s=time.perf_counter() - self.started,
            prompt_tokens=len(self.prompt_ids) + len(self.first_feed[0]),
            redundancy=total,
            account=self.account.strip(),
        )


def _outlined(text: str, points: int) -> bool:
    """Whether an outline lists `points` numbered points and has ended the last one's line."""
    numbered = re.findall(r"^\s*(?:\*\*)?\d+[.)]", text, flags=re.M)
    return len(numbered) >= points and text.endswith("\n")


def _quoted(step: str) -> str:
    """The end of a step, for a readable account."""
    if not step:
        return ""
    return ("…" + step[-ACCOUNT_CHARS:] if len(step) > ACCOUNT_CHARS else step) + "\n\n"
