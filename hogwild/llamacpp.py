"""llama.cpp as a decode-speed reference (`hogwild bench decode --against llama.cpp`), through llama-cpp-python.

It runs the model's own GGUF file (the named model's, or the `.gguf` given as --model) with the same threads, the
same prompt token ids and the same number of greedy steps as hogwild. Each timed step is one `eval` of the last
token and an argmax over its logits, as hogwild's step feeds a token and picks the next.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from hogwild.errors import HogwildError

INSTALL = "pip install 'hogwild[llama-cpp]' (llama-cpp-python, which builds llama.cpp from source: minutes)"


def import_llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise HogwildError(f"the llama.cpp reference needs llama-cpp-python: {INSTALL}") from None
    return llama_cpp


def gguf_for(model: str | None, work: Path) -> Path:
    """The GGUF file behind `model` (a named model, assembled into `work` when split, or a .gguf path)."""
    from hogwild.model import registry

    named = registry.find(registry.DEFAULT if model is None else model)
    if named is not None:
        if registry.installed_parts(named) < len(named.parts):
            raise HogwildError(f"{named.name} is not installed: {named.install}")
        return registry.gguf_file(named, work)
    path = Path(model).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path
    raise HogwildError(f"llama.cpp runs GGUF files: give a named model or a .gguf file as --model, not {model}")


def decode_bytes(path: Path) -> int:
    """Weight bytes a decode step reads from the GGUF at `path`: every matrix but the embedding, of which only rows
    are read (unless the output projection is the embedding itself)."""
    from gguf import GGUFReader

    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(path).tensors if len(t.shape) == 2}
    if "output.weight" in tensors:
        tensors.pop("token_embd.weight", None)
    return sum(tensors.values())


class LlamaCpp:
    def __init__(self, model: str | None, threads: int, context: int) -> None:
        self.llama_cpp = llama_cpp = import_llama_cpp()
        self.work = Path(tempfile.mkdtemp(prefix="hogwild-llamacpp-"))
        try:
            path = gguf_for(model, self.work)
            self.llm = llama_cpp.Llama(
                model_path=str(path), n_threads=threads, n_threads_batch=threads, n_ctx=context, verbose=False
            )
        except Exception:
            self.close()
            raise
        self.version = llama_cpp.__version__
        self.vocab = self.llm.n_vocab()
        self.step_bytes = decode_bytes(path)

    def close(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)  # an assembled GGUF is only needed while loading

    def kv_bytes(self, layers: int, kv_heads: int, head_dim: int) -> int:
        """llama.cpp allocates its f16 K/V for the whole context at load."""
        return self.llm.n_ctx() * layers * 2 * kv_heads * head_dim * 2

    def _next(self) -> int:
        import numpy as np

        logits = self.llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return int(np.ctypeslib.as_array(logits, shape=(self.vocab,)).argmax())

    def prompt_seconds(self, prompt: list[int]) -> float:
        """Prompt processing: seconds to evaluate `prompt` into an empty cache and pick the next token."""
        self.llm.reset()
        start = time.perf_counter()
        self.llm.eval(prompt)
        self._next()
        return time.perf_counter() - start

    def decode(self, prompt: list[int], steps: int) -> float:
        """Prefill `prompt` (not timed), then `steps` greedy decode steps -> seconds."""
        self.llm.reset()
        self.llm.eval(prompt)
        token = self._next()
        start = time.perf_counter()
        for _ in range(steps):
            self.llm.eval([token])
            token = self._next()
        return time.perf_counter() - start
