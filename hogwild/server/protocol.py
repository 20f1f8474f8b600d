"""The OpenAI protocol, mapped onto engine runs: request bodies -> runs, run events -> responses and stream chunks.

A request without `workers` is a plain generation: `Sampled(engine, prompt, SamplingParams, n=n)`, each sample one
choice. A request with `workers` is a run of that many workers on the problem (the last user message, or the
completion prompt) by the strategy its extension field `mode` names (a served one of `hogwild.strategies`),
shaped by the fields `layout` and `budget`; its content, sent when the run ends, is the answer followed by the
words it came from (the step that holds it, or the finisher's), and everything the workers write rides in the
extension field `hogwild` of the stream chunks (`choices[0].delta.hogwild` for chat, `choices[0].hogwild` for
completions), one event per chunk, so a plain OpenAI client still reads an ordinary reply. `Reply` turns one run's
events into chunks as they come and into the whole response at the end, so a streamed reply and the same run
unstreamed carry the same content.

Bodies are validated strictly (no coercion: `"2"` is not 2), every text must be valid Unicode, and OpenAI fields
hogwild does not implement are refused by name when they ask for something (`UNSUPPORTED`); each mistake is an
`ApiError` naming the field in `param`. A completions request may hold several prompts (each its own `n` choices,
one `Sampled` run); `logprobs` and `top_logprobs` come from each sample (`server/logprobs.py` shapes them), and
`echo` gives the prompts back, with `logprobs` their own tokens' scores (`Echo`, filled by the service).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from hogwild import strategies
from hogwild.collab.layouts import LAYOUTS
from hogwild.collab.prompts import OPENINGS
from hogwild.collab.protocol import (
    AnswerFound,
    CollabConfig,
    Collaboration,
    NudgeInserted,
    Pass,
    SolveResult,
    StepDiscarded,
    StepFinished,
    StepStarted,
)
from hogwild.engine import Engine
from hogwild.errors import HogwildError
from hogwild.model import registry
from hogwild.model.tokenizer import Tokenizer
from hogwild.runs import Done, Event, GenerationResult, Run, Sampled, Token
from hogwild.sampling import MAX_SEED, MAX_TOP_LOGPROBS, SamplingParams
from hogwild.scoring import Scores
from hogwild.server.config import ServerConfig
from hogwild.server.logprobs import Logprobs

# OpenAI's defaults, not hogwild's (SamplingParams is greedy by default): a client written for OpenAI's API gets
# what it expects there. Completions stop at 16 tokens by default, chat completions at the end of the context.
OPENAI_TEMPERATURE = 1.0
OPENAI_COMPLETION_MAX_TOKENS = 16
MAX_STOP_STRINGS = 4


class ApiError(Exception):
    """An error the client sees as an OpenAI error body with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# request bodies


def _valid_unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"not valid Unicode: a lone surrogate at character {e.start}") from None
    return text


Text = Annotated[str, AfterValidator(_valid_unicode)]
TokenIds = Annotated[list[int], Field(min_length=1)]
Prompts = Annotated[list[Text], Field(min_length=1)] | Annotated[list[TokenIds], Field(min_length=1)]


class _Body(BaseModel):
    # OpenAI clients send fields hogwild does not use (user, metadata...): ignored, but the ones that would change
    # the answer are refused (UNSUPPORTED); values are taken as they are typed, never coerced ("2" is not 2)
    model_config = ConfigDict(extra="ignore", strict=True)


class TextPart(_Body):
    type: Literal["text"]
    text: Text


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(_Body):
    include_usage: bool = False


_COLLAB = CollabConfig()


class CompletionFields(_Body):
    model: Text
    n: int = Field(1, ge=1)
    temperature: float = Field(OPENAI_TEMPERATURE, ge=0, le=2)
    top_p: float = Field(1.0, ge=0, le=1)
    top_k: int = Field(0, ge=0)  # vLLM's extension; 0: no top-k filter
    max_tokens: int | None = Field(None, ge=1)
    stop: Text | list[Text] | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # hogwild's extension: a collaboration of `workers` workers instead of a plain generation
    workers: int | None = Field(None, ge=1, le=_COLLAB.max_workers)
    layout: Text | None = None
    mode: Text | None = None
    budget: int | None = Field(None, ge=1)
    opening: Text | None = None
    # the reply's extension object, sent back in a request: its request fields are the five above, at the top level
    hogwild: object = None

    @field_validator("hogwild")
    @classmethod
    def _top_level(cls, value: object) -> None:
        if value is not None:
            raise ValueError(
                "give workers, layout, mode, budget and opening at the top level of the body, not in an object"
            )
        return None

    @field_validator("layout", "mode", "opening")
    @classmethod
    def _known(cls, value: str | None, info: ValidationInfo) -> str | None:
        choices = {"layout": LAYOUTS, "opening": OPENINGS}.get(info.field_name) or strategies.served_names()
        if value is not None and value not in choices:
            raise ValueError(f"unknown {info.field_name} {value!r}: choose one of {', '.join(choices)}")
        return value


class ChatRequest(CompletionFields):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


class CompletionRequest(CompletionFields):
    prompt: Text | TokenIds | Prompts  # one prompt, or several (each its own choices)
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False


# OpenAI fields hogwild does not implement: refused when they ask for something (a client relying on them would get
# an answer it did not ask for), accepted with the values that ask for nothing
UNSUPPORTED = {
    "tools": ("tool calls", ([],)),
    "tool_choice": ("tool calls", ("none", "auto")),
    "functions": ("function calls", ([],)),
    "function_call": ("function calls", ("none", "auto")),
    "response_format": ("structured output", ({"type": "text"},)),
    "logit_bias": ("logit_bias", ({},)),
    "presence_penalty": ("penalties", (0,)),
    "frequency_penalty": ("penalties", (0,)),
    "suffix": ("suffixes", ("",)),
    "best_of": ("best_of", (1,)),
    "audio": ("audio", ()),
    "prediction": ("predicted outputs", ()),
}
UNION_HINTS = {
    "prompt": "a string, a list of strings, a list of token ids or a list of token id lists",
    "stop": "a string or a list of strings",
    "content": "a string or a list of text parts",
}
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "function-after"}


def parse(kind: str, body: object) -> ChatRequest | CompletionRequest:
    """Validate a decoded JSON body; a mistake is a 400 naming the field."""
    model = ChatRequest if kind == "chat" else CompletionRequest
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    for name, (what, harmless) in UNSUPPORTED.items():
        value = body.get(name)
        if value is not None and not any(_same(value, h) for h in harmless):
            raise ApiError(400, f"{name}: {what} are not supported by this server", param=name, code="unsupported")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        errors = e.errors()
        # a value's own complaint (invalid Unicode) before a union's members each saying it is not of their type
        first = next((err for err in errors if err["type"] == "value_error"), errors[0])
        path = [str(part) for part in first["loc"] if isinstance(part, int) or _field_name(part)]
        where = ".".join(path) or None
        hint = UNION_HINTS.get(path[-1]) if path and len(errors) > 1 and first["type"] != "value_error" else None
        message = f"must be {hint}" if hint else first["msg"].removeprefix("Value error, ")
        raise ApiError(400, f"{where}: {message}" if where else message, param=where) from None


def _same(value: object, harmless: object) -> bool:
    return value == harmless and isinstance(value, bool) == isinstance(harmless, bool)


def _field_name(part: object) -> bool:
    return isinstance(part, str) and part.isidentifier() and part.islower() and part not in _TYPE_TAGS


# requests -> runs


@dataclass
class Echo:
    """A completion's prompts given back (`echo`): their texts, their tokens, and with `logprobs` their tokens'
    scores (filled in by the service, which scores them on the engine's thread before the run starts)."""

    texts: list[str]
    ids: list[list[int]]
    scores: list[Scores] | None = None


@dataclass
class Job:
    """One accepted request: its run and how to answer it."""

    run: Run
    kind: str  # "chat" or "completion"
    model: str
    stream: bool
    include_usage: bool
    choices: int
    logprobs: int | None = None  # alternatives per token when the client asked for log-probabilities
    echo: Echo | None = None
    strategy: strategies.Strategy | None = None  # the strategy a request with workers runs (its `mode`)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def collaboration(self) -> bool:
        return self.strategy is not None


def build_job(
    engine: Engine, kind: str, request: ChatRequest | CompletionRequest, model: str, config: ServerConfig
) -> Job:
    """The run a request asks for; a request the engine cannot serve is an `ApiError` (400)."""
    if request.model != model:
        shown = request.model if len(request.model) <= 64 else request.model[:64] + "..."
        raise ApiError(
            404,
            f"the model {shown!r} does not exist; this server serves {model!r}",
            code="model_not_found",
            param="model",
        )
    if request.n > config.max_n:
        raise ApiError(400, f"n must be at most {config.max_n}, got {request.n}", param="n")
    stops = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if len(stops) > MAX_STOP_STRINGS:
        raise ApiError(400, f"stop takes at most {MAX_STOP_STRINGS} strings", param="stop")
    if any(not stop for stop in stops):
        raise ApiError(400, "stop strings must not be empty", param="stop")
    max_tokens = request.max_completion_tokens if isinstance(request, ChatRequest) else None
    max_tokens = max_tokens or request.max_tokens
    include_usage = bool(request.stream_options and request.stream_options.include_usage)
    if isinstance(request, ChatRequest):
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        if request.top_logprobs and not request.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    else:
        logprobs = request.logprobs
    asks = {"logprobs": logprobs is not None, "echo": getattr(request, "echo", False)}
    strategy = None
    try:
        if request.workers is None:
            run, echo = _sampled(engine, kind, request, max_tokens, tuple(stops), logprobs or 0, config)
        else:
            for name, asked in asks.items():
                if asked:
                    raise ApiError(400, f"{name} is not supported with workers", param=name)
            strategy = strategies.served(request.mode or _COLLAB.mode)
            run, echo = _collaboration(engine, strategy, request, max_tokens, stops), None
        engine.check_fits_pool(run)
    except HogwildError as e:
        raise ApiError(400, str(e)) from None
    choices = len(run.streams) if isinstance(run, Sampled) else 1
    return Job(run, kind, model, request.stream, include_usage, choices, logprobs, echo, strategy)


def _sampling(request: CompletionFields, max_tokens: int, stops: tuple[str, ...], top_logprobs: int) -> SamplingParams:
    # top_p 0 keeps only the most likely token, as greedy decoding does
    greedy = request.top_p == 0
    return SamplingParams(
        temperature=0.0 if greedy else request.temperature,
        top_p=1.0 if greedy else request.top_p,
        top_k=request.top_k,
        seed=request.seed,
        max_tokens=max_tokens,
        stop=stops,
        top_logprobs=top_logprobs,
    )


def _sampled(
    engine: Engine,
    kind: str,
    request: CompletionFields,
    max_tokens: int | None,
    stops: tuple[str, ...],
    top_logprobs: int,
    config: ServerConfig,
) -> tuple[Sampled, Echo | None]:
    for name in ("layout", "mode", "budget", "opening"):
        if getattr(request, name) is not None:
            raise ApiError(400, f"{name} shapes a collaboration: give workers too", param=name)
    if isinstance(request, ChatRequest):
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text} for m in request.messages
        ]
        prompts = [engine.tokenizer.encode_chat(messages)]
        texts = []
    else:
        texts, prompts = _completion_prompts(engine, request, config)
    window = engine.context_window
    longest = max(len(prompt) for prompt in prompts)
    if longest >= window:
        raise ApiError(
            400,
            f"this model's maximum context length is {window} tokens; your prompt has {longest} tokens",
            code="context_length_exceeded",
            param="messages" if kind == "chat" else "prompt",
        )
    if max_tokens is None:
        max_tokens = window - longest if kind == "chat" else min(OPENAI_COMPLETION_MAX_TOKENS, window - longest)
    if longest + max_tokens > window:
        raise ApiError(
            400,
            f"this model's maximum context length is {window} tokens; you asked for "
            f"{longest + max_tokens} ({longest} in the prompt, {max_tokens} in the completion)",
            code="context_length_exceeded",
            param="max_tokens",
        )
    params = _sampling(request, max_tokens, stops, top_logprobs)
    run = Sampled(engine, prompts if len(prompts) > 1 else prompts[0], params, n=request.n)
    echo = Echo(texts, prompts) if getattr(request, "echo", False) else None
    return run, echo


def _completion_prompts(
    engine: Engine, request: CompletionRequest, config: ServerConfig
) -> tuple[list[str], list[list[int]]]:
    """Each prompt's text and tokens (a prompt given as tokens: its decoded text)."""
    prompt = request.prompt
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if len(prompt) > config.max_prompts:
        raise ApiError(400, f"prompt takes at most {config.max_prompts} prompts, got {len(prompt)}", param="prompt")
    texts, prompts = [], []
    vocab = engine.tokenizer.vocab_size
    for p, one in enumerate(prompt):
        if isinstance(one, str):
            if not one:
                raise ApiError(400, "the prompt is empty", param="prompt")
            texts.append(one)
            prompts.append(engine.tokenizer.encode(one))
            continue
        if not all(0 <= t < vocab for t in one):
            where = f"prompt.{p}" if len(prompt) > 1 else "prompt"
            raise ApiError(400, f"prompt token ids must be in [0, {vocab})", param=where)
        texts.append(engine.tokenizer.decode(one, skip_special_tokens=False))
        prompts.append(list(one))
    return texts, prompts


def _collaboration(
    engine: Engine, strategy: strategies.Strategy, request: CompletionFields, max_tokens: int | None, stops: list[str]
) -> Collaboration:
    if request.n != 1:
        raise ApiError(
            400,
            "n > 1 with workers is not supported: the workers of one request already write "
            "in parallel; send separate requests for independent collaborations",
            param="n",
        )
    if stops:
        raise ApiError(400, "stop is not supported with workers: a collaboration ends at its answer", param="stop")
    if isinstance(request, ChatRequest):
        users = [m.text for m in request.messages if m.role == "user"]
        if not users:
            raise ApiError(400, "a collaboration needs a user message: the problem", param="messages")
        problem = users[-1]
    else:
        if not isinstance(request.prompt, str) and not (
            len(request.prompt) == 1 and isinstance(request.prompt[0], str)
        ):
            raise ApiError(400, "with workers the prompt is the problem, as one string", param="prompt")
        problem = request.prompt if isinstance(request.prompt, str) else request.prompt[0]
    if max_tokens is not None and max_tokens > engine.context_window:
        raise ApiError(
            400,
            f"max_tokens must be at most the context window, {engine.context_window} tokens",
            code="context_length_exceeded",
            param="max_tokens",
        )
    given = {"workers": request.workers, "layout": request.layout, "opening": request.opening}
    # the budget counts sequential forward passes, about the tokens each worker writes: max_tokens when not given
    given["budget"] = request.budget if request.budget is not None else max_tokens
    config = CollabConfig(**{k: v for k, v in given.items() if v is not None})
    # the collaboration's own sampling: max_tokens does not apply, its budget does
    sampling = _sampling(request, 1, (), 0)
    return strategy.live(engine, problem, config, sampling)


def model_name(engine: Engine) -> str:
    """The model id a server gives its engine's model: the name it was loaded by."""
    name = engine.config.model or registry.DEFAULT
    return Path(name).name if "/" in name or name.endswith(".gguf") else name


# run events -> responses


class Reply:
    """One job's answer as it builds: `push(event)` returns the stream chunks for the event; `response()` the whole
    response once the run is done. `completion_tokens` counts the tokens the model sampled (end-of-sequence
    excluded; for a collaboration every worker's and the finisher's)."""

    def __init__(self, job: Job, tokenizer: Tokenizer) -> None:
        self.job = job
        self.texts = [""] * job.choices
        self.finish: list[str | None] = [None] * job.choices
        self.completion_tokens = 0
        self.prompt_tokens = 0 if job.collaboration else job.run.prompt_tokens
        self.result: GenerationResult | SolveResult | None = None
        self.logprobs = None
        if job.logprobs is not None:
            self.logprobs = [Logprobs(tokenizer, job.kind == "chat") for _ in range(job.choices)]

    @property
    def object(self) -> str:
        return "chat.completion" if self.job.kind == "chat" else "text_completion"

    def start(self) -> list[dict]:
        """The chunks that open a stream: the role, a completion's echoed prompts, and for a collaboration the
        workers' names."""
        chunks = []
        if self.job.kind == "chat":
            chunks += [self._chunk(i, role=True) for i in range(self.job.choices)]
        if self.job.echo is not None:
            chunks += [self._echo(i) for i in range(self.job.choices)]
        if self.job.collaboration:
            run = self.job.run
            names = {
                "type": "start",
                "workers": run.names,
                "budget": run.config.budget,
                "layout": run.layout,
                "mode": self.job.strategy.name,
            }
            chunks.append(self._chunk(0, hogwild=names))
        return chunks

    def _echo(self, i: int) -> dict:
        echo = self.job.echo
        p = i // self.job.run.n  # choice i is a sample of prompt p
        self.texts[i] = echo.texts[p]
        logprobs = None
        if echo.scores is not None and self.logprobs is not None:
            ids, scores, top = echo.ids[p], echo.scores[p], self.job.logprobs
            logprobs = self.logprobs[i].add(ids[0], None, None)
            for t, token in enumerate(ids[1:]):
                alternatives = zip(scores.top_ids[t, :top].tolist(), scores.top[t, :top].tolist(), strict=True)
                step = self.logprobs[i].add(token, float(scores.token[t]), tuple(alternatives))
                for key, values in step.items():
                    logprobs[key] += values
        return self._chunk(i, text=echo.texts[p], logprobs=logprobs)

    def push(self, event: Event) -> list[dict]:
        if isinstance(event, Token):
            self.completion_tokens += event.token >= 0
            logprobs = None
            if self.logprobs is not None and event.sample is not None:
                sample = event.sample
                logprobs = self.logprobs[event.worker].add(sample.token, sample.logprob, sample.top)
            if not event.text and logprobs is None:
                return []
            if self.job.collaboration:
                return [self._chunk(0, hogwild={"type": "text", "worker": event.worker, "text": event.text})]
            self.texts[event.worker] += event.text
            return [self._chunk(event.worker, text=event.text, logprobs=logprobs)]
        if isinstance(event, StepStarted | NudgeInserted | StepDiscarded):  # text the run writes in a transcript
            return [self._chunk(0, hogwild={"type": "text", "worker": event.worker, "text": event.text})]
        if isinstance(event, StepFinished):
            step = {"type": "step", "worker": event.worker, "step": event.step, "text": event.text}
            return [self._chunk(0, hogwild=step)]
        if isinstance(event, Pass):
            passes = {"type": "pass", "forward_passes": event.forward_passes, "budget": event.budget}
            return [self._chunk(0, hogwild=passes)]
        if isinstance(event, AnswerFound):
            answer = {"type": "answer", "worker": event.worker, "answer": event.answer}
            return [self._chunk(0, hogwild=answer)]
        if isinstance(event, Done):
            return self._done(event.result)
        raise AssertionError(f"an event the server does not know: {event!r}")

    def _done(self, result: object) -> list[dict]:
        self.result = result
        chunks = []
        if isinstance(result, SolveResult):
            self.prompt_tokens = result.prompt_tokens
            self.finish[0] = _collab_finish(result)
            self.texts[0] = result.content  # what a plain client shows: the answer and the words it came from
            summary = {
                "type": "done",
                "answer": result.answer,
                "finished_by": result.finished_by,
                "forward_passes": result.forward_passes,
                "elapsed_s": round(result.wall_s, 3),
                "redundancy": result.to_dict()["redundancy"],
            }
            chunks.append(self._chunk(0, text=result.content, hogwild=summary))
        else:
            assert isinstance(result, GenerationResult)
            self.finish = [sample.finish_reason for sample in result.samples]
        chunks += [self._chunk(i, finish=self.finish[i]) for i in range(self.job.choices)]
        if self.job.include_usage:
            chunks.append({**self._head(), "choices": [], "usage": self.usage()})
        return chunks

    def usage(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }

    def response(self) -> dict:
        assert self.result is not None, "the run is not done"
        choices = []
        for i in range(self.job.choices):
            extra = {"hogwild": self.result.to_dict()} if isinstance(self.result, SolveResult) else {}
            logprobs = self.logprobs[i].whole() if self.logprobs is not None else None
            if self.job.kind == "chat":
                message = {"role": "assistant", "content": self.texts[i], **extra}
                choices.append({"index": i, "message": message, "logprobs": logprobs, "finish_reason": self.finish[i]})
            else:
                choices.append(
                    {"index": i, "text": self.texts[i], "logprobs": logprobs, "finish_reason": self.finish[i], **extra}
                )
        return {**self._head(stream=False), "choices": choices, "usage": self.usage()}

    def _head(self, stream: bool = True) -> dict:
        prefix = "chatcmpl-" if self.job.kind == "chat" else "cmpl-"
        kind = self.object + (".chunk" if stream and self.job.kind == "chat" else "")
        return {"id": prefix + self.job.id, "object": kind, "created": self.job.created, "model": self.job.model}

    def _chunk(
        self,
        index: int,
        text: str | None = None,
        hogwild: dict | None = None,
        finish: str | None = None,
        role: bool = False,
        logprobs: dict | None = None,
    ) -> dict:
        if self.job.kind == "chat":
            delta: dict = {"role": "assistant", "content": ""} if role else {}
            if text is not None:
                delta["content"] = text
            if hogwild is not None:
                delta["hogwild"] = hogwild
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        else:
            choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
            if hogwild is not None:
                choice["hogwild"] = hogwild
        return {**self._head(), "choices": [choice]}


def _collab_finish(result: SolveResult) -> str:
    if result.finished_by in ("interrupted", "cancelled"):
        return result.finished_by
    return "stop" if result.answer is not None else "length"
