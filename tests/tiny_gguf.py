"""Tiny GGUF files written with gguf's own writer, the way llama.cpp's converter lays them out: a seeded random
transformers model of a family, its tensors under llama.cpp's names (q/k rows permuted for llama), a byte-level BPE
tokenizer and a chat template in the metadata; or raw tensors of any block type."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

import gguf
import numpy as np
import torch
import transformers
from gguf import GGMLQuantizationType
from tiny import hf_config
from tokenizers.pre_tokenizers import ByteLevel

GGUF_ARCH = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he"]
TOKENS = sorted(ByteLevel.alphabet()) + ["Ġt", "he", "Ġthe"] + SPECIALS
BOS, EOS = TOKENS.index("<|im_start|>"), TOKENS.index("<|im_end|>")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def tiny_source_model(family: str, seed: int = 0) -> transformers.PreTrainedModel:
    """A random transformers model of `family` whose vocabulary is TOKENS."""
    config = hf_config(family)
    config.vocab_size = len(TOKENS)
    config.bos_token_id, config.eos_token_id = BOS, EOS
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    return model.eval()


def gguf_name(hf_name: str) -> str:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    _, _, layer, rest = hf_name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{LAYER_NAMES[module]}.{kind}"


def permute_qk(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter: each head's rows from rotate-half order [2, head_dim / 2] to pairs [head_dim / 2, 2]."""
    return w.reshape(heads, 2, -1, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def add_tensor(writer: gguf.GGUFWriter, name: str, values: np.ndarray, type_name: str) -> None:
    qtype = GGMLQuantizationType[type_name]
    if type_name == "F32":
        writer.add_tensor(name, values.astype(np.float32))
    elif type_name == "F16":
        writer.add_tensor(name, values.astype(np.float16))
    else:
        writer.add_tensor(name, gguf.quants.quantize(values.astype(np.float32), qtype), raw_dtype=qtype)


def write_model_gguf(
    path: Path,
    model: transformers.PreTrainedModel,
    weight_types: Sequence[str] = ("F32",),
    architecture: str | None = None,
    extra: dict[str, np.ndarray] | None = None,
) -> Path:
    """`model` as a GGUF file: the weight matrices in `weight_types` (cycled through in order), norms and biases in
    F32 as llama.cpp keeps them, then the `extra` tensors as they are."""
    c = model.config
    arch = architecture or GGUF_ARCH[c.model_type]
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    writer = gguf.GGUFWriter(path, arch)
    writer.add_string("general.name", f"tiny {c.model_type}")
    for key, value in [
        ("context_length", c.max_position_embeddings),
        ("embedding_length", c.hidden_size),
        ("feed_forward_length", c.intermediate_size),
        ("block_count", c.num_hidden_layers),
        ("attention.head_count", c.num_attention_heads),
        ("attention.head_count_kv", c.num_key_value_heads),
        ("attention.key_length", head_dim),
        ("attention.value_length", head_dim),
        ("rope.dimension_count", head_dim),
    ]:
        writer.add_uint32(f"{arch}.{key}", value)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", c.rms_norm_eps)
    writer.add_float32(f"{arch}.rope.freq_base", c.rope_parameters["rope_theta"])
    writer.add_string("tokenizer.ggml.model", "gpt2")
    writer.add_string("tokenizer.ggml.pre", "qwen2")
    writer.add_token_list(TOKENS)
    writer.add_token_types([3 if t in SPECIALS else 1 for t in TOKENS])
    writer.add_token_merges(MERGES)
    writer.add_uint32("tokenizer.ggml.bos_token_id", BOS)
    writer.add_uint32("tokenizer.ggml.eos_token_id", EOS)
    writer.add_uint32("tokenizer.ggml.padding_token_id", TOKENS.index("<|endoftext|>"))
    writer.add_bool("tokenizer.ggml.add_bos_token", False)
    writer.add_chat_template(CHAT_TEMPLATE)
    heads = {"q_proj": c.num_attention_heads, "k_proj": c.num_key_value_heads}
    types = itertools.cycle(weight_types)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        values = tensor.detach().float().numpy()
        module = name.split(".")[-2]
        if arch == "llama" and module in heads:
            values = permute_qk(values, heads[module])
        add_tensor(writer, gguf_name(name), values, next(types) if values.ndim == 2 else "F32")
    for name, values in (extra or {}).items():
        writer.add_tensor(name, values)
    finish(writer)
    return path


def finish(writer: gguf.GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
