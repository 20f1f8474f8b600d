"""Model folders, weights and the tokenizer: the real default model end to end, and each bad input's one-line error."""

import json
from pathlib import Path

import pytest
import tokenizers
import torch
from safetensors.torch import save_file

from hogwild.errors import HogwildError
from hogwild.model import loading
from hogwild.model.loading import load_state_dict, read_config
from hogwild.model.registry import resolve_model_dir
from hogwild.model.tokenizer import TextStream, Tokenizer

torch.set_num_threads(1)

CHAT = [{"role": "user", "content": "hi"}]
UNICODE_TEXT = "Zürich naïve café — 日本語のテキスト 🦙🚀👩‍👩‍👧 e\u0301 Ωμέγα ✓"


@pytest.fixture(scope="module")
def tokenizer(default_model_dir: Path) -> Tokenizer:
    eos = read_config(default_model_dir).get("generation_eos_token_id", ())
    return Tokenizer.from_folder(default_model_dir, extra_eos_ids=[eos] if isinstance(eos, int) else eos)


def test_default_model_folder_is_complete(default_model_dir: Path) -> None:
    config = read_config(default_model_dir)
    assert config["model_type"] == "llama"
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in config
    state = load_state_dict(default_model_dir)
    assert "lm_head.weight" not in state  # tied to the embedding
    assert state["model.embed_tokens.weight"].shape == (config["vocab_size"], config["hidden_size"])
    assert state["model.embed_tokens.weight"].dtype == torch.float32
    assert len(state) == 2 + 9 * config["num_hidden_layers"]


def test_chat_template_matches_transformers(tokenizer: Tokenizer, default_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(default_model_dir)
    text = reference.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.render_chat(CHAT) == text
    ids = tokenizer.encode_chat(CHAT)
    assert ids == reference(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=False) == text
    assert tokenizer.render_chat(CHAT, add_generation_prompt=False) == text.removesuffix("<|im_start|>assistant\n")


def test_special_tokens(tokenizer: Tokenizer) -> None:
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.bos_token == "<|im_start|>"
    assert tokenizer.eos_token_ids == {2}
    assert tokenizer.vocab_size == 49152
    ids = tokenizer.encode("<|im_start|>hello<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert tokenizer.decode(ids) == "hello"


def test_round_trip_and_stream(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode(UNICODE_TEXT)
    assert tokenizer.decode(ids) == UNICODE_TEXT
    stream = TextStream(tokenizer)
    deltas = [stream.push(i) for i in [2, *ids, 1]]
    deltas.append(stream.flush())
    assert "".join(deltas) == UNICODE_TEXT == stream.text
    assert not any("\ufffd" in d for d in deltas)
    assert "" in deltas[1:-2]  # some emoji span several tokens and were held back until complete


def test_stream_flushes_incomplete_character(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("🦙")
    assert len(ids) > 1
    stream = TextStream(tokenizer)
    assert stream.push(ids[0]) == ""
    assert stream.flush() == tokenizer.decode(ids[:1])
    assert stream.text.endswith("\ufffd")


def test_default_model_is_cached(default_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def prepared_again(*args) -> None:
        raise AssertionError("a prepared model was prepared again")

    monkeypatch.setattr(loading, "write_prepared", prepared_again)
    assert resolve_model_dir(None) == default_model_dir
    assert not any(default_model_dir.glob("*.safetensors")), "a GGUF model's weights stay in the GGUF"
    assert sum(f.stat().st_size for f in default_model_dir.iterdir()) < 0.1 * 98_362_432


def test_cache_dir_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("HOGWILD_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert loading.cache_dir() == tmp_path / "xdg" / "hogwild"
    monkeypatch.setenv("HOGWILD_CACHE", str(tmp_path / "mine"))
    assert loading.cache_dir() == tmp_path / "mine"


def write_model(folder: Path, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "eos_token_id": 2}))
    tensors = tensors or {"w": torch.arange(1000, dtype=torch.float32).reshape(10, 100)}
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(HogwildError, match="does not exist"):
        resolve_model_dir(str(tmp_path / "nowhere"))


def test_folder_without_config(tmp_path: Path) -> None:
    save_file({"w": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(HogwildError, match="no config.json"):
        resolve_model_dir(str(tmp_path))


def test_folder_without_safetensors(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(HogwildError, match=r"no \*\.safetensors.*Hugging Face.*\.gguf"):
        resolve_model_dir(str(tmp_path))


def test_other_file_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "model.bin").write_bytes(b"\0")
    with pytest.raises(HogwildError, match="not a .gguf file"):
        resolve_model_dir(str(tmp_path / "model.bin"))


def test_truncated_safetensors(tmp_path: Path) -> None:
    folder = write_model(tmp_path)
    assert resolve_model_dir(str(folder)) == folder
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(HogwildError, match="model.safetensors is truncated or corrupt"):
        load_state_dict(folder)


def test_invalid_config_json(tmp_path: Path) -> None:
    folder = write_model(tmp_path)
    (folder / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(HogwildError, match="config.json is not valid JSON"):
        read_config(folder)


def test_sharded_weights_keep_dtype_and_generation_eos(tmp_path: Path) -> None:
    folder = write_model(tmp_path, {"a": torch.ones(3, dtype=torch.bfloat16)})
    save_file({"b": torch.arange(4, dtype=torch.int64)}, str(folder / "model-2.safetensors"))
    save_file({"stray": torch.zeros(1)}, str(folder / "unlisted.safetensors"))
    index = {"weight_map": {"a": "model.safetensors", "b": "model-2.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    state = load_state_dict(folder)
    assert set(state) == {"a", "b"}
    assert state["a"].dtype == torch.bfloat16 and state["b"].tolist() == [0, 1, 2, 3]
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    assert read_config(folder)["generation_eos_token_id"] == [2, 7]


def tiny_tokenizer(config: dict, template: str | None) -> Tokenizer:
    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, "hi": 3}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    return Tokenizer(backend, config, template, extra_eos_ids=[7])


def test_template_errors_and_config_forms(tmp_path: Path) -> None:
    with pytest.raises(HogwildError, match="no chat template.*raw mode"):
        tiny_tokenizer({}, None).render_chat(CHAT)
    strict = tiny_tokenizer({}, "{{ raise_exception('only one user turn') }}")
    with pytest.raises(HogwildError, match="only one user turn"):
        strict.render_chat(CHAT)
    config = {"eos_token": {"content": "</s>"}, "bos_token": "<s>"}
    template = "{{ bos_token }}{% for m in messages %}{{ m | tojson(indent=1) }}{% endfor %}{{ eos_token }}"
    tok = tiny_tokenizer(config, template)
    assert tok.eos_token_ids == {2, 7}
    assert tok.render_chat([{"content": "é"}]) == '<s>{\n "content": "é"\n}</s>'

    (tmp_path / "tokenizer.json").write_text(tok.backend.to_str())
    config["chat_template"] = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "plain"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert Tokenizer.from_folder(tmp_path).render_chat(CHAT) == "plain"
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(HogwildError, match="no tokenizer.json"):
        Tokenizer.from_folder(tmp_path)


def test_interrupted_preparation_leaves_no_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def interrupted(path: Path, out: Path, source: dict) -> None:
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setenv("HOGWILD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(loading, "write_prepared", interrupted)
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    with pytest.raises(KeyboardInterrupt):
        loading.prepare_gguf(tmp_path / "model.gguf", [tmp_path / "model.gguf"], "ab" * 32)
    assert list((tmp_path / "cache" / "models").iterdir()) == []
