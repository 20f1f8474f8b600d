"""The OpenAI protocol, mapped onto engine runs: request bodies -> runs, run events -> responses and stream chunks.

A request without `workers` is a plain generation: `Sampled(engine, prompt, SamplingParams, n=n)`, each sample one
choice. A request with `workers` is a `Collaboration` of that many workers on the problem (the last user message,
or the completion prompt), shaped by the extension fields `layout`, `mode` and `budget`; its content is the answer
(the text of the final `\\boxed{}`, empty when there is none), and everything the workers write rides in the
extension field `hogwild` of the stream chunks (`choices[0].delta.hogwild` for chat, `choices[0].hogwild` for
completions), one event per chunk, so a plain OpenAI client still reads an ordinary reply. `Reply` turns one
run's events into chunks as they come and into the whole response at the end, so a streamed reply and the same
run unstreamed carry the same content.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from hogwild.collab.protocol import (
    AnswerFound,
    CollabConfig,
    Collaboration,
    NudgeInserted,
    Pass,
    SolveResult,
    StepFinished,
    StepStarted,
)
from hogwild.engine import Engine
from hogwild.errors import HogwildError
from hogwild.model import registry
from hogwild.runs import Done, Event, GenerationResult, Run, Sampled, Token
from hogwild.sampling import SamplingParams

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


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields hogwild does not use (user, logprobs...)


class TextPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(_Body):
    include_usage: bool = False


class CompletionFields(_Body):
    model: str
    n: int = Field(1, ge=1)
    temperature: float = Field(OPENAI_TEMPERATURE, ge=0, le=2)
    top_p: float = Field(1.0, ge=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # hogwild's extension: a collaboration of `workers` workers instead of a plain generation
    workers: int | None = None
    layout: str | None = None
    mode: str | None = None
    budget: int | None = None


class ChatRequest(CompletionFields):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens


class CompletionRequest(CompletionFields):
    prompt: str | list[str] | list[int]


def parse(kind: str, body: object) -> ChatRequest | CompletionRequest:
    """Validate a decoded JSON body; a mistake is a 400 naming the field."""
    model = ChatRequest if kind == "chat" else CompletionRequest
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or None
        raise ApiError(400, f"{where}: {first['msg']}" if where else first["msg"], param=where) from None


# requests -> runs


@dataclass
class Job:
    """One accepted request: its run and how to answer it."""

    run: Run
    kind: str  # "chat" or "completion"
    model: str
    stream: bool
    include_usage: bool
    choices: int
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def collaboration(self) -> bool:
        return isinstance(self.run, Collaboration)


def build_job(engine: Engine, kind: str, request: ChatRequest | CompletionRequest, model: str, max_n: int) -> Job:
    """The run a request asks for; a request the engine cannot serve is an `ApiError` (400)."""
    if request.model != model:
        raise ApiError(
            404,
            f"the model {request.model!r} does not exist; this server serves {model!r}",
            code="model_not_found",
            param="model",
        )
    if request.n > max_n:
        raise ApiError(400, f"n must be at most {max_n}, got {request.n}", param="n")
    stops = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if len(stops) > MAX_STOP_STRINGS:
        raise ApiError(400, f"stop takes at most {MAX_STOP_STRINGS} strings", param="stop")
    max_tokens = request.max_completion_tokens if isinstance(request, ChatRequest) else None
    max_tokens = max_tokens or request.max_tokens
    include_usage = bool(request.stream_options and request.stream_options.include_usage)
    try:
        if request.workers is None:
            run = _sampled(engine, kind, request, max_tokens, tuple(stops))
        else:
            run = _collaboration(engine, request, max_tokens, stops)
        engine.check_fits_pool(run)
    except HogwildError as e:
        raise ApiError(400, str(e)) from None
    return Job(run, kind, model, request.stream, include_usage, request.n)


def _sampling(request: CompletionFields, max_tokens: int, stops: tuple[str, ...]) -> SamplingParams:
    # top_p 0 keeps only the most likely token, as greedy decoding does
    greedy = request.top_p == 0
    return SamplingParams(
        temperature=0.0 if greedy else request.temperature,
        top_p=1.0 if greedy else request.top_p,
        seed=request.seed,
        max_tokens=max_tokens,
        stop=stops,
    )


def _sampled(
    engine: Engine, kind: str, request: CompletionFields, max_tokens: int | None, stops: tuple[str, ...]
) -> Sampled:
    for name in ("layout", "mode", "budget"):
        if getattr(request, name) is not None:
            raise ApiError(400, f"{name} shapes a collaboration: give workers too", param=name)
    if isinstance(request, ChatRequest):
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text} for m in request.messages
        ]
        prompt = engine.tokenizer.encode_chat(messages)
    else:
        prompt = _completion_prompt(engine, request)
    window = engine.context_window
    if len(prompt) >= window:
        raise ApiError(
            400,
            f"this model's maximum context length is {window} tokens; your prompt has {len(prompt)} tokens",
            code="context_length_exceeded",
            param="messages" if kind == "chat" else "prompt",
        )
    if max_tokens is None:
        max_tokens = window - len(prompt) if kind == "chat" else min(OPENAI_COMPLETION_MAX_TOKENS, window - len(prompt))
    if len(prompt) + max_tokens > window:
        raise ApiError(
            400,
            f"this model's maximum context length is {window} tokens; you asked for "
            f"{len(prompt) + max_tokens} ({len(prompt)} in the prompt, {max_tokens} in the completion)",
            code="context_length_exceeded",
            param="max_tokens",
        )
    return Sampled(engine, prompt, _sampling(request, max_tokens, stops), n=request.n)


def _completion_prompt(engine: Engine, request: CompletionRequest) -> list[int]:
    prompt = request.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        if len(prompt) != 1:
            raise ApiError(400, "send one prompt per request", param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise ApiError(400, "the prompt is empty", param="prompt")
        return engine.tokenizer.encode(prompt)
    if not prompt:
        raise ApiError(400, "the prompt is empty", param="prompt")
    if not all(0 <= t < engine.tokenizer.vocab_size for t in prompt):
        raise ApiError(400, f"prompt token ids must be in [0, {engine.tokenizer.vocab_size})", param="prompt")
    return list(prompt)


def _collaboration(
    engine: Engine, request: CompletionFields, max_tokens: int | None, stops: list[str]
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
    given = {"workers": request.workers, "layout": request.layout, "mode": request.mode}
    # the budget counts sequential forward passes, about the tokens each worker writes: max_tokens when not given
    given["budget"] = request.budget if request.budget is not None else max_tokens
    config = CollabConfig(**{k: v for k, v in given.items() if v is not None})
    # the collaboration's own sampling: max_tokens does not apply, its budget does
    sampling = _sampling(request, 1, ())
    return Collaboration(engine, problem, config, sampling)


def model_name(engine: Engine) -> str:
    """The model id a server gives its engine's model: the name it was loaded by."""
    name = engine.config.model or registry.DEFAULT
    return Path(name).name if "/" in name or name.endswith(".gguf") else name


# run events -> responses


class Reply:
    """One job's answer as it builds: `push(event)` returns the stream chunks for the event; `response()` the whole
    response once the run is done. `completion_tokens` counts the tokens the model sampled (end-of-sequence
    excluded; for a collaboration every worker's and the finisher's)."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.texts = [""] * job.choices
        self.finish: list[str | None] = [None] * job.choices
        self.completion_tokens = 0
        self.prompt_tokens = 0 if job.collaboration else len(job.run.prompt_ids)
        self.result: GenerationResult | SolveResult | None = None

    @property
    def object(self) -> str:
        return "chat.completion" if self.job.kind == "chat" else "text_completion"

    def start(self) -> list[dict]:
        """The chunks that open a stream: the role, and for a collaboration the workers' names."""
        chunks = []
        if self.job.kind == "chat":
            chunks += [self._chunk(i, role=True) for i in range(self.job.choices)]
        if self.job.collaboration:
            run = self.job.run
            names = {
                "type": "start",
                "workers": run.names,
                "budget": run.config.budget,
                "layout": run.layout,
                "mode": run.config.mode,
            }
            chunks.append(self._chunk(0, hogwild=names))
        return chunks

    def push(self, event: Event) -> list[dict]:
        if isinstance(event, Token):
            self.completion_tokens += event.token >= 0
            if not event.text:
                return []
            if self.job.collaboration:
                return [self._chunk(0, hogwild={"type": "text", "worker": event.worker, "text": event.text})]
            self.texts[event.worker] += event.text
            return [self._chunk(event.worker, text=event.text)]
        if isinstance(event, StepStarted | NudgeInserted):  # the header and the nudge a worker's step opens with
            return [self._chunk(0, hogwild={"type": "text", "worker": event.worker, "text": event.text})]
        if isinstance(event, StepFinished):
            step = {"type": "step", "worker": event.worker, "step": event.step, "text": event.text}
            return [self._chunk(0, hogwild=step)]
        if isinstance(event, Pass):
            passes = {"type": "pass", "forward_passes": event.forward_passes, "budget": event.budget}
            return [self._chunk(0, hogwild=passes)]
        if isinstance(event, AnswerFound):
            self.texts[0] = event.answer
            answer = {"type": "answer", "worker": event.worker, "answer": event.answer}
            return [self._chunk(0, text=event.answer, hogwild=answer)]
        if isinstance(event, Done):
            return self._done(event.result)
        raise AssertionError(f"an event the server does not know: {event!r}")

    def _done(self, result: object) -> list[dict]:
        self.result = result
        chunks = []
        if isinstance(result, SolveResult):
            self.prompt_tokens = result.prompt_tokens
            self.finish[0] = _collab_finish(result)
            summary = {
                "type": "done",
                "answer": result.answer,
                "finished_by": result.finished_by,
                "forward_passes": result.forward_passes,
                "elapsed_s": round(result.wall_s, 3),
            }
            chunks.append(self._chunk(0, hogwild=summary))
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
            if self.job.kind == "chat":
                message = {"role": "assistant", "content": self.texts[i], **extra}
                choices.append({"index": i, "message": message, "logprobs": None, "finish_reason": self.finish[i]})
            else:
                choices.append(
                    {"index": i, "text": self.texts[i], "logprobs": None, "finish_reason": self.finish[i], **extra}
                )
        return {**self._head(stream=False), "choices": choices, "usage": self.usage()}

    def _head(self, stream: bool = True) -> dict:
        prefix = "chatcmpl-" if self.job.kind == "chat" else "cmpl-"
        kind = self.object + (".chunk" if stream and self.job.kind == "chat" else "")
        return {"id": prefix + self.job.id, "object": kind, "created": self.job.created, "model": self.job.model}

    def _chunk(
        self, index: int, text: str | None = None, hogwild: dict | None = None, finish: str | None = None, role=False
    ) -> dict:
        if self.job.kind == "chat":
            delta: dict = {"role": "assistant", "content": ""} if role else {}
            if text is not None:
                delta["content"] = text
            if hogwild is not None:
                delta["hogwild"] = hogwild
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
            if hogwild is not None:
                choice["hogwild"] = hogwild
        return {**self._head(), "choices": [choice]}


def _collab_finish(result: SolveResult) -> str:
    if result.finished_by in ("interrupted", "cancelled"):
        return result.finished_by
    return "stop" if result.answer is not None else "length"
