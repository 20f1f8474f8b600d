"""The decoder: one lean PyTorch implementation for Llama, Mistral, Qwen2 and Qwen3.

Weights are plain tensors (no nn.Module), with q/k/v and gate/up fused into one matmul each at load time. One layer
loop runs every model, over parts chosen once (`hogwild.model.parts`): each projection is a `Linear` of the weights
format loaded (float, int8, int4, a GGUF's blocks), the norms and silu * up a `LayerOps` (torch ops, or hogwild's
fused CPU kernels, `hogwild.native`, one call each), and the attention the step's `Attention`, which gets q, k, v
un-rotated (`attend(layer, q, k, v)`) and owns RoPE and the cache: the decoder does not care whether the cache is
one sequence or a set of shared blocks. `plain=True` keeps torch ops throughout (the reference's).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Protocol

import torch
import torch.nn.functional as F

from hogwild.errors import HogwildError
from hogwild.model.config import ModelConfig
from hogwild.model.parts import TORCH_OPS, Attention, LayerOps, Linear, WeightsFormat
from hogwild.native import DTYPES as FUSED_DTYPES

# logits this close to the best are recomputed in float32: bf16's error is ~0.1 at 25; int8's (weights and
# activations) was at most 0.59 over the vocabulary and 0.2 near the top on the default model's text (tested < 1.0)
REFINE_MARGIN = {torch.bfloat16: 1.0, torch.float16: 1.0, "int8": 2.0}


@dataclass
class Layer:
    input_norm: torch.Tensor
    qkv: Linear  # [(heads + 2 * kv_heads) * head_dim, hidden], bias for Qwen2
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    o: Linear
    post_norm: torch.Tensor
    gate_up: Linear  # [2 * intermediate, hidden]
    down: Linear

    def __post_init__(self) -> None:
        self.input_norm_f32 = self.input_norm.float()
        self.post_norm_f32 = self.post_norm.float()
        self.q_norm_f32 = None if self.q_norm is None else self.q_norm.float()
        self.k_norm_f32 = None if self.k_norm is None else self.k_norm.float()


class Weights(Protocol):
    """A model's tensors, read one at a time (`hogwild.model.loading.open_weights`): `get` gives a tensor in a float
    dtype (None when the checkpoint has none of that name); a GGUF's also gives a weight matrix's own blocks."""

    def __contains__(self, name: str) -> bool: ...

    def get(self, name: str) -> torch.Tensor | None: ...


class Decoder:
    def __init__(
        self,
        config: ModelConfig,
        weights: Weights | dict[str, torch.Tensor],
        dtype: torch.dtype,
        device: str = "cpu",
        linear: str = "aten",
        activation_bits: int = 7,
        quantized: dict[str, torch.Tensor] | None = None,
        fused: ModuleType | None = None,
        blocks: ModuleType | None = None,
    ) -> None:
        """`linear` is the kernel every projection runs ("onednn", "aten", "int8", "int4" or "gguf"), chosen by
        `hogwild.model.kernels`. With "int8" or "int4", `quantized` holds the weights of an earlier start (see
        `quantized`); "int4" keeps the vocabulary projection int8. "gguf" multiplies the GGUF's own blocks
        (`weights.blocks`) with `blocks` (`hogwild.native.load_gguf()`), the embedding and the vocabulary
        projection too. `fused` (`hogwild.native.load()`) runs the norms and silu * up in one call each (CPU,
        float32 or bf16)."""
        self.config = config
        self.dtype = dtype
        self.device = torch.device(device)
        self.format = WeightsFormat(linear, dtype, activation_bits, quantized or {}, blocks)
        assert not self.gguf or (blocks is not None and hasattr(weights, "blocks")), "gguf runs a GGUF's blocks"
        self.fused = fused if self.device.type == "cpu" and dtype in FUSED_DTYPES else None
        # the norms and silu * up: the fused kernels' module meets `LayerOps` itself
        self.ops: LayerOps = TORCH_OPS if self.fused is None else self.fused
        # name -> quantized weights, for the cache (see `WeightsFormat`)
        self.quantized: dict[str, torch.Tensor] = self.format.quantized
        stored_dtype = self.format.stored_dtype

        def take(name: str, required: bool = True) -> torch.Tensor | None:
            tensor = weights.get(name)
            if tensor is None:
                if required:
                    raise HogwildError(f"weights are missing tensor {name!r}; is the folder a complete checkpoint?")
                return None
            return tensor.to(device=self.device, dtype=stored_dtype)

        def project(
            name: str, parts: list[str], bias: list[str] | None = None, weight: torch.Tensor | None = None
        ) -> Linear:
            """The linear of the matrices `parts` stacked by rows (q, k, v; gate, up), and their biases; `weight`:
            the float matrix itself, already taken."""
            b = None if bias is None else torch.cat([take(n) for n in bias])
            if self.gguf:
                return self.format.gguf_linear([weights.blocks(n) for n in parts], b)
            if weight is None:
                weight = torch.cat([take(n) for n in parts]) if len(parts) > 1 else take(parts[0])
            return self.format.linear(name, weight, b)

        c = config
        embed_name = "model.embed_tokens.weight"
        head_name = "lm_head.weight" if "lm_head.weight" in weights and not c.tie_embeddings else embed_name
        if self.gguf:
            self.lm_head_linear = project("lm_head", [head_name])
            self.embed = self.lm_head = None  # rows are read from the blocks (`embed_rows`, `head_rows`)
            self.embed_blocks = weights.blocks(embed_name)
            embed_shape = self.embed_blocks.shape
        else:
            self.embed = take(embed_name)
            embed_shape = self.embed.shape
            self.lm_head = self.embed if head_name == embed_name else take(head_name)
            self.lm_head_linear = project("lm_head", [head_name], weight=self.lm_head)
        if tuple(embed_shape) != (c.vocab_size, c.hidden_size):
            raise HogwildError(
                f"embedding shape {tuple(embed_shape)} does not match config ({c.vocab_size}, {c.hidden_size})"
            )
        self.norm_f32 = take("model.norm.weight").float()
        self.layers = []
        for i in range(c.num_layers):
            p = f"model.layers.{i}."
            self.layers.append(
                Layer(
                    input_norm=take(p + "input_layernorm.weight"),
                    qkv=project(
                        p + "qkv",
                        [p + f"self_attn.{n}_proj.weight" for n in "qkv"],
                        [p + f"self_attn.{n}_proj.bias" for n in "qkv"] if c.qkv_bias else None,
                    ),
                    q_norm=take(p + "self_attn.q_norm.weight") if c.qk_norm else None,
                    k_norm=take(p + "self_attn.k_norm.weight") if c.qk_norm else None,
                    o=project(p + "o", [p + "self_attn.o_proj.weight"]),
                    post_norm=take(p + "post_attention_layernorm.weight"),
                    gate_up=project(p + "gate_up", [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"]),
                    down=project(p + "down", [p + "mlp.down_proj.weight"]),
                )
            )
            expected = (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
            if self.layers[-1].qkv.shape != (expected, c.hidden_size):
                raise HogwildError(f"layer {i} attention weights do not match the config's head counts")
        self.format.cached = {}  # an earlier start's tensors: the linears hold what they need of them

    @property
    def gguf(self) -> bool:
        """The projections, the embedding and the vocabulary projection multiply a GGUF's own blocks."""
        return self.format.kind == "gguf"

    @property
    def head_int8(self) -> bool:
        """The vocabulary projection takes float32 rows and int8 weights."""
        return self.format.head_int8

    @property
    def step_bytes(self) -> int:
        """Weight bytes a decode step reads: every layer's linears and the vocabulary projection (the embedding
        reads only its rows)."""
        linears = [p for layer in self.layers for p in (layer.qkv, layer.o, layer.gate_up, layer.down)]
        return sum(p.nbytes for p in [*linears, self.lm_head_linear])

    @torch.inference_mode()
    def forward(
        self, tokens: torch.Tensor, attention: Attention, logits_at: torch.Tensor | None, plain: bool = False
    ) -> torch.Tensor:
        """tokens: [N] (the rows of a step, concatenated) -> logits [M, vocab] at the flat indices `logits_at`, or
        [N, vocab] at every token if None. `plain`: torch ops only, even with fused kernels (the reference path)."""
        c = self.config
        # the residual stream stays in float32: in bf16 its rounding alone flips greedy tokens of small models
        x = self.embed_rows(tokens.to(self.device))  # [N, hidden], updated in place by every layer
        h = self._layers(x, attention, TORCH_OPS if plain else self.ops)
        if logits_at is not None:
            if logits_at.numel() == 0:  # a step that only writes text into the cache
                return x.new_empty((0, c.vocab_size))
            h = h.index_select(0, logits_at.to(h.device))  # [M, hidden]
        return self._logits(h)

    def _layers(self, x: torch.Tensor, attention: Attention, ops: LayerOps) -> torch.Tensor:
        """Every layer on x [N, hidden] (float32, updated in place) -> its final RMSNorm, float32. Each residual
        add is fused with the RMSNorm after it (one `ops.rms_norm` call)."""
        eps, dtype = self.config.rms_norm_eps, self.dtype
        h = ops.rms_norm(x, None, self.layers[0].input_norm_f32, eps, dtype)
        for i, layer in enumerate(self.layers):
            y = layer.o(self._attend(i, layer, layer.qkv(h), attention).to(dtype))
            h = ops.rms_norm(x, y, layer.post_norm_f32, eps, dtype)
            y = layer.down(ops.silu_mul(layer.gate_up(h)))
            last = i + 1 == len(self.layers)
            norm = self.norm_f32 if last else self.layers[i + 1].input_norm_f32
            h = ops.rms_norm(x, y, norm, eps, torch.float32 if last else dtype)
        return h

    def _attend(self, i: int, layer: Layer, qkv: torch.Tensor, attention: Attention) -> torch.Tensor:
        """Layer i's attention on its fused projection's output qkv [N, (heads + 2 * kv_heads) * D]."""
        if layer.q_norm is None:
            return attention.attend_qkv(i, qkv)
        # per-head q/k norm (Qwen3) in float32, like the residual stream's norms
        q, k, v = self.config.split_qkv(qkv.to(attention.dtype))
        D, eps = self.config.head_dim, self.config.rms_norm_eps
        q = F.rms_norm(q.float(), (D,), layer.q_norm_f32, eps).to(attention.dtype)
        k = F.rms_norm(k.float(), (D,), layer.k_norm_f32, eps).to(attention.dtype)
        return attention.attend(i, q, k, v)

    def embed_rows(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [N] -> their embeddings, float32 [N, hidden] (a new tensor: the residual stream)."""
        if self.gguf:
            return self.lm_head_linear.kernels.get_rows(
                self.embed_blocks.data, self.embed_blocks.type_id, self.embed_blocks.columns, tokens
            )
        return F.embedding(tokens, self.embed).float()

    def head_rows(self, index: torch.Tensor) -> torch.Tensor:
        """The vocabulary projection's rows at `index`, float32 [len(index), hidden], exactly as stored."""
        if self.gguf:
            return self.lm_head_linear.rows(index)
        return self.lm_head[index].float()

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., hidden] float32 -> float32 logits [..., vocab].

        In bf16 the logits near 25 are 0.125 apart, so rounding would settle near-ties; int8 and GGUF blocks
        multiply activations quantized to 8 bits. The candidates within REFINE_MARGIN of the best are recomputed in
        float32 from the same weights: the top of the distribution, which greedy decoding and nucleus sampling
        read, is exact, and the full-vocabulary matmul stays cheap."""
        if self.dtype == torch.float32 and not (self.head_int8 or self.gguf):
            return self.lm_head_linear(x)
        flat = x.reshape(-1, x.shape[-1])
        quantized = self.head_int8 or self.gguf
        logits = self.lm_head_linear(flat if quantized else flat.to(self.dtype)).float()  # [N, vocab]
        margin = REFINE_MARGIN["int8" if quantized else self.dtype]
        if self.fused is not None:  # one vectorized pass: torch's compare and nonzero take ~120 us on 152k
            rows, cols = self.fused.near_best(logits, margin)
        else:
            rows, cols = (logits >= logits.amax(dim=-1, keepdim=True) - margin).nonzero(as_tuple=True)
        logits[rows, cols] = (self.head_rows(cols) * flat[rows]).sum(-1)
        return logits.view(*x.shape[:-1], -1)
