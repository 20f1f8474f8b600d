"""Text <-> token ids, chat templates and streaming detokenization.

`Tokenizer` wraps a Hugging Face `tokenizer.json` with the `tokenizers` library and renders the model's own chat
template with a sandboxed jinja2 environment set up the way transformers sets it up, so prompts match what the model
was trained on without importing transformers. `TextStream` turns a stream of generated token ids into printable text
deltas, decoding only a short window of recent tokens per token and holding back incomplete UTF-8 sequences.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.sandbox
import tokenizers

from hogwild.errors import HogwildError
from hogwild.model.loading import read_json

REPLACEMENT_CHAR = "\ufffd"


class Tokenizer:
    """A model's tokenizer: encode/decode, special tokens, end-of-sequence ids and the chat template."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        config: dict,
        chat_template: str | None = None,
        extra_eos_ids: Iterable[int] = (),
    ) -> None:
        self.backend = backend
        self.config = config
        self.chat_template = chat_template
        self.special_tokens = special_tokens(config)
        self.eos_token_ids: set[int] = set(extra_eos_ids)
        eos_id = backend.token_to_id(self.eos_token) if self.eos_token is not None else None
        if eos_id is not None:
            self.eos_token_ids.add(eos_id)
        self._template: jinja2.Template | None = None

    @classmethod
    def from_folder(cls, folder: Path, extra_eos_ids: Iterable[int] = ()) -> Tokenizer:
        """Read tokenizer.json, tokenizer_config.json and chat_template.jinja from a model folder."""
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise HogwildError(f"model folder {folder} has no tokenizer.json (hogwild needs a fast tokenizer file)")
        try:
            backend = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises a plain Exception for unreadable files
            raise HogwildError(f"{path} is not a valid tokenizer file ({e})") from e
        config = read_tokenizer_config(folder / "tokenizer_config.json")
        template_path = folder / "chat_template.jinja"
        template = template_path.read_text(encoding="utf-8") if template_path.is_file() else None
        if template is None:
            template = template_from_config(config.get("chat_template"))
        return cls(backend, config, template, extra_eos_ids)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The chat rendered by the model's own template, as transformers' apply_chat_template renders it."""
        template = self.compiled_template()
        try:
            return template.render(
                messages=messages,
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **self.special_tokens,
            )
        except jinja2.TemplateError as e:
            raise HogwildError(f"the model's chat template failed on these messages ({e})") from e

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        # the template writes the special tokens itself, so none are added on top (as transformers does)
        return self.encode(self.render_chat(messages, add_generation_prompt), add_special_tokens=False)

    def compiled_template(self) -> jinja2.Template:
        if self._template is None:
            if self.chat_template is None:
                raise HogwildError("this model has no chat template; use raw mode to give it plain text prompts")
            try:
                self._template = chat_environment().from_string(self.chat_template)
            except jinja2.TemplateSyntaxError as e:
                raise HogwildError(f"the model's chat template is not valid jinja2 ({e})") from e
        return self._template


class TextStream:
    """Incremental detokenizer: push generated token ids one at a time, get back the newly printable text.

    Each push decodes two short windows, ids[prefix_offset:read_offset] (text already emitted) and ids[prefix_offset:]
    (with the new tokens), and emits the difference. Decoding from `prefix_offset` rather than from the new token
    keeps tokenizers that drop a leading space at the start of a decode consistent; text ending in the replacement
    character is an incomplete UTF-8 sequence and waits for the next token. Special tokens are skipped.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self._chunks: list[str] = []

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        return self._emit(final=False)

    def flush(self) -> str:
        """Whatever text is still held back, even an incomplete character."""
        return self._emit(final=True)

    @property
    def text(self) -> str:
        if len(self._chunks) > 1:
            self._chunks = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""

    def _emit(self, final: bool) -> str:
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset])
        full = self.tokenizer.decode(self.ids[self.prefix_offset :])
        if len(full) <= len(prefix) or (full.endswith(REPLACEMENT_CHAR) and not final):
            return ""
        delta = full[len(prefix) :]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        self._chunks.append(delta)
        return delta


def chat_environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    """A jinja2 environment with the globals and filters Hugging Face chat templates expect."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


def raise_exception(message: str) -> None:
    raise HogwildError(f"the model's chat template rejected these messages: {message}")


def strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def tojson(
    value: object,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # unlike jinja2's own tojson, no HTML escaping: the output is a prompt, not a web page
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def read_tokenizer_config(path: Path) -> dict:
    """tokenizer_config.json, or {} when the folder has none."""
    return read_json(path) if path.is_file() else {}


def special_tokens(config: dict) -> dict[str, object]:
    """The special tokens a chat template may refer to: `bos_token`, `eos_token`, ... as strings."""
    tokens: dict[str, object] = {}
    for key, value in config.items():
        if key.endswith("_token"):
            text = token_text(value)
            if text is not None:
                tokens[key] = text
    extra = config.get("additional_special_tokens")
    if isinstance(extra, list):
        tokens["additional_special_tokens"] = [t for t in map(token_text, extra) if t is not None]
    return tokens


def token_text(value: object) -> str | None:
    # tokens are plain strings, or serialized AddedToken objects ({"content": ...}) in older configs
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def template_from_config(template: object) -> str | None:
    """tokenizer_config.json's `chat_template`: a string, or a list of {name, template} of which "default" is used."""
    if isinstance(template, str):
        return template
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        default = named.get("default")
        return default if isinstance(default, str) else None
    return None
