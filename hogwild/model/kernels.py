"""Which weights, dtype and linear kernel the decoder runs on this machine, and the `Linear` that runs it.

The choice is made once, from what torch and the CPU report, never by trying a matmul and catching the error:

- a GGUF model on a CPU where hogwild's block kernels run (`hogwild.native.load_gguf`: x86-64 with AVX2, a C++
  compiler): the GGUF's own blocks, multiplied where they lie (`hogwild.model.blocks`), float32 activations
  quantized per block inside the kernels. No second rounding of the published weights, and the fewest bytes.

- CPU with AVX2 or better and fbgemm in torch (every x86 build): 8-bit weights (`hogwild.model.quant`), float32
  activations. A decode step reads each weight once, so its speed is weight bytes over memory bandwidth; int8 reads
  half of bf16's bytes and a quarter of float32's, and holds the quality bar the README's table measures.
- the same CPUs, for a model whose weights are 4-bit already (`four_bit`: a Q4_0 / Q4_1 GGUF, such as the default
  model): int4 weights through aten's int4 kernel on bf16 activations, which hold those weights exactly and read
  half of int8's bytes (the vocabulary projection stays int8).
- CUDA: bf16 (fp16 where the GPU has no bf16), aten's `F.linear`.
- float weights (an explicit `--dtype` or `--linear`, or no fbgemm), on a CPU whose oneDNN has a native bf16 path
  (`torch.ops.mkldnn._is_mkldnn_bf16_supported()`, which honours `ONEDNN_MAX_CPU_ISA`, and a bf16 conversion
  instruction in the CPU flags: avx512_bf16, amx_bf16 or avx_ne_convert): bf16 weights prepacked for oneDNN, about
  1.5-2x aten's bf16 at decode batch sizes.
- float weights on any other CPU (AVX2 without native bf16): float32 weights prepacked for oneDNN. On such CPUs
  aten's bf16 matmul is emulated and scales badly with rows, and MKL's small-batch float32 GEMM is 2-3x slower
  than oneDNN's.

An explicit `--dtype` or `--linear` is honoured; a combination this CPU cannot run natively still runs (unpacked
aten) and says in one line why it will be slow, and a combination it cannot run at all is one clear error.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F

from hogwild.errors import HogwildError
from hogwild.model.quant import activation_bits, fbgemm_available, fbgemm_isa_limit

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)
LINEARS = ("auto", "onednn", "aten")  # onednn: weights prepacked once for oneDNN; aten: F.linear on plain weights
WEIGHTS = ("auto", "gguf", "int8", "int4", "bf16", "fp32")  # how the linears' weights are stored
_WEIGHT_DTYPES = {"bf16": "bfloat16", "fp32": "float32"}
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "avx_ne_convert")
NATIVE_FP16_FLAGS = ("avx512_fp16", "amx_fp16")


@dataclass(frozen=True)
class CpuFacts:
    """What torch and the CPU report about the kernels this process can run."""

    capability: str  # torch.backends.cpu.get_cpu_capability(): "AVX512", "AVX2", "DEFAULT", ... (ATEN_CPU_CAPABILITY)
    flags: frozenset[str]  # from /proc/cpuinfo; empty where it cannot be read
    onednn: bool  # torch built with oneDNN (mkldnn)
    onednn_bf16: bool  # oneDNN can run bf16 here (honours ONEDNN_MAX_CPU_ISA)
    onednn_fp16: bool
    onednn_isa_limit: str | None  # ONEDNN_MAX_CPU_ISA, when set
    fbgemm: bool = False  # torch built with fbgemm's quantized kernels (x86 builds)
    fbgemm_isa_limit: str | None = None  # FBGEMM_ENABLE_INSTRUCTIONS, when set

    @classmethod
    def detect(cls) -> CpuFacts:
        return _detect()

    def has(self, names: tuple[str, ...]) -> str | None:
        """The first of `names` among the CPU flags, or None."""
        return next((name for name in names if name in self.flags), None)

    @property
    def native_bf16(self) -> bool:
        return self.onednn_bf16 and self.has(NATIVE_BF16_FLAGS) is not None

    @property
    def native_fp16(self) -> bool:
        return self.onednn_fp16 and self.has(NATIVE_FP16_FLAGS) is not None


@cache
def _detect() -> CpuFacts:
    flags: frozenset[str] = frozenset()
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith("flags")), "")
        flags = frozenset(line.partition(":")[2].split())
    except OSError:
        pass  # not Linux: fall back to what torch says alone
    onednn = torch.backends.mkldnn.is_available()
    return CpuFacts(
        capability=torch.backends.cpu.get_cpu_capability(),
        flags=flags,
        onednn=onednn,
        onednn_bf16=onednn and torch.ops.mkldnn._is_mkldnn_bf16_supported(),
        onednn_fp16=onednn and torch.ops.mkldnn._is_mkldnn_fp16_supported(),
        onednn_isa_limit=os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA"),
        fbgemm=fbgemm_available(),
        fbgemm_isa_limit=fbgemm_isa_limit(),
    )


@dataclass(frozen=True)
class KernelChoice:
    """The weight dtype and linear kernel of one engine, and why."""

    dtype: torch.dtype  # of the activations, and of the weights unless they are int8
    linear: str  # "onednn", "aten", "int8" (fbgemm), "int4" (aten's int4 kernel, see `hogwild.model.quant`) or
    # "gguf" (a GGUF's own blocks, see `hogwild.model.blocks`)
    reason: str
    warning: str | None = None  # one line for the user when an explicit choice runs slowly here
    activation_bits: int = 0  # int8 linears (all, or int4's vocabulary projection): per-row activation bits

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def weights(self) -> str:
        return self.linear if self.linear in ("int8", "int4", "gguf") else self.dtype_name

    def describe(self) -> str:
        if self.linear == "gguf":
            return f"the GGUF's own blocks through hogwild's block kernels, float32 activations ({self.reason})"
        if self.linear == "int4":
            return (
                "4-bit weights in groups of 32 through aten's int4 kernel, bf16 activations; the vocabulary "
                f"projection int8 through fbgemm, activations quantized per row to {self.activation_bits} bits "
                f"({self.reason})"
            )
        if self.linear == "int8":
            return (
                f"int8 weights through fbgemm, activations float32 and quantized per row to {self.activation_bits} "
                f"bits in the linears ({self.reason})"
            )
        kernel = "linears prepacked for oneDNN" if self.linear == "onednn" else "linears through aten's F.linear"
        return f"{self.dtype_name} weights, {kernel} ({self.reason})"


def choose(
    dtype: str = "auto",
    linear: str = "auto",
    device: str = "cpu",
    facts: CpuFacts | None = None,
    weights: str = "auto",
    four_bit: bool = False,
    blocks: str | None = None,
) -> KernelChoice:
    """The weights, dtype and linear kernel for `device`, given what the user asked for ("auto": the machine
    decides). An explicit `dtype` or `linear` asks for float weights: auto picks quantized weights only when all
    three are auto: a GGUF's own blocks where `blocks` says what they are and the block kernels run here (`blocks`
    names the types and the kernels' ISA, None otherwise), else int4 where the model's weights are already 4-bit
    (`four_bit`, see `quant.on_int4_grid`), else int8."""
    if dtype not in DTYPE_CHOICES:
        raise HogwildError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPE_CHOICES)}")
    if linear not in LINEARS:
        raise HogwildError(f"unknown linear kernel {linear!r}: choose one of {', '.join(LINEARS)}")
    if weights not in WEIGHTS:
        raise HogwildError(f"unknown weights {weights!r}: choose one of {', '.join(WEIGHTS)}")
    if weights in _WEIGHT_DTYPES:
        if dtype not in ("auto", _WEIGHT_DTYPES[weights]):
            raise HogwildError(f"--weights {weights} and --dtype {dtype} disagree; give one of them")
        dtype = _WEIGHT_DTYPES[weights]
    cuda = torch.device(device).type == "cuda"
    if weights in ("int8", "int4"):
        if cuda:
            raise HogwildError(f"--weights {weights} is a CPU path; on CUDA use --weights auto or bf16")
        activations, kernel = ("float32", "fbgemm") if weights == "int8" else ("bfloat16", "aten's int4 kernel")
        if dtype not in ("auto", activations) or linear != "auto":
            raise HogwildError(
                f"--weights {weights} runs {activations} activations through {kernel}; leave --dtype and --linear auto"
            )
    if weights == "gguf" and cuda:
        raise HogwildError("--weights gguf is a CPU path; on CUDA use --weights auto or bf16")
    if weights == "gguf" and blocks is None:
        raise HogwildError(
            "--weights gguf needs a GGUF model and hogwild's block kernels (x86-64 with AVX2, a C++ compiler); "
            "use --weights auto"
        )
    if weights == "gguf" or (blocks is not None and not cuda and weights == dtype == linear == "auto"):
        why = "asked for" if weights == "gguf" else "the model's own bytes, the fewest a step can read"
        return KernelChoice(torch.float32, "gguf", f"{blocks}; {why}")
    if cuda:
        return _choose_cuda(dtype, linear)
    facts = facts or CpuFacts.detect()
    quantized = weights == dtype == linear == "auto" and int8_runs(facts)  # auto's quantized weights run here
    if weights == "int4" or (quantized and four_bit):
        return _choose_int4(facts, asked=weights == "int4")
    if weights == "int8" or quantized:
        return _choose_int8(facts, asked=weights == "int8")
    return _choose_cpu(dtype, linear, facts)


def int8_runs(facts: CpuFacts) -> bool:
    """Whether fbgemm's int8 kernels run natively here (AVX2 or better; torch built with fbgemm)."""
    return facts.fbgemm and facts.capability.startswith(("AVX2", "AVX512"))


def _choose_int8(facts: CpuFacts, asked: bool) -> KernelChoice:
    cpu = f"CPU capability {facts.capability}"
    if not facts.fbgemm:
        raise HogwildError(f"--weights int8 needs fbgemm, which this torch build lacks ({cpu}); use --weights auto")
    if not int8_runs(facts):
        raise HogwildError(f"--weights int8 needs AVX2 or better ({cpu}); use --weights auto")
    bits = activation_bits(facts.flags, facts.capability, facts.fbgemm_isa_limit)
    why = "with VNNI" if bits == 8 else "no VNNI here, so 7-bit activations"
    reason = f"{cpu}; {'asked for' if asked else 'fewest bytes per step'}, {why}"
    return KernelChoice(torch.float32, "int8", reason, activation_bits=bits)


def _choose_int4(facts: CpuFacts, asked: bool) -> KernelChoice:
    cpu = f"CPU capability {facts.capability}"
    if not int8_runs(facts):  # the vocabulary projection is int8; aten's int4 kernel is vectorized from AVX2 up
        raise HogwildError(f"--weights int4 needs AVX2 or better and fbgemm ({cpu}); use --weights auto")
    bits = activation_bits(facts.flags, facts.capability, facts.fbgemm_isa_limit)
    why = "asked for" if asked else "the model's weights are 4-bit already, so int4 holds them exactly"
    return KernelChoice(torch.bfloat16, "int4", f"{cpu}; {why}", activation_bits=bits)


def _choose_cuda(dtype: str, linear: str) -> KernelChoice:
    if linear == "onednn":
        raise HogwildError("--linear onednn is a CPU kernel; on CUDA use --linear auto or aten")
    if dtype != "auto":
        return KernelChoice(DTYPES[dtype], "aten", f"{dtype} asked for")
    if torch.cuda.is_bf16_supported():
        return KernelChoice(torch.bfloat16, "aten", "the GPU runs bf16")
    return KernelChoice(torch.float16, "aten", "the GPU has no bf16")


def _choose_cpu(dtype: str, linear: str, facts: CpuFacts) -> KernelChoice:
    if linear == "onednn" and not facts.onednn:
        raise HogwildError("--linear onednn asked for, but this torch build has no oneDNN; use --linear aten")
    cpu = f"CPU capability {facts.capability}"
    if facts.onednn_isa_limit:
        cpu += f", oneDNN limited to {facts.onednn_isa_limit}"
    bf16_flag = facts.has(NATIVE_BF16_FLAGS)
    if dtype == "auto":
        if facts.native_bf16 and linear != "aten":
            return KernelChoice(torch.bfloat16, "onednn", f"{cpu}; oneDNN bf16 with native {bf16_flag}")
        if not facts.onednn or linear == "aten":
            why = "asked for" if linear == "aten" else "torch has no oneDNN"
            return KernelChoice(torch.float32, "aten", f"{cpu}; aten linears {why}")
        missing = "oneDNN has no bf16 path here" if not facts.onednn_bf16 else "the CPU has no native bf16"
        return KernelChoice(torch.float32, "onednn", f"{cpu}; {missing}, so float32 through oneDNN")

    wanted = DTYPES[dtype]
    supported = {torch.float32: facts.onednn, torch.bfloat16: facts.onednn_bf16, torch.float16: facts.onednn_fp16}
    native = {torch.float32: facts.onednn, torch.bfloat16: facts.native_bf16, torch.float16: facts.native_fp16}
    if linear == "onednn" and not supported[wanted]:
        raise HogwildError(
            f"--linear onednn cannot run {dtype} on this CPU ({cpu}; oneDNN's {dtype} path needs "
            f"{' or '.join(NATIVE_BF16_FLAGS if wanted == torch.bfloat16 else NATIVE_FP16_FLAGS)} or AVX-512); "
            "use --linear aten or --dtype auto"
        )
    if linear == "aten" or (linear == "auto" and not native[wanted]):
        warning = None
        if wanted != torch.float32 and not native[wanted]:
            warning = (
                f"{dtype} asked for, but this CPU has no native {dtype} kernels ({cpu}): it runs through aten's "
                "emulated path and will be slow; --dtype auto picks the fastest dtype for this machine"
            )
        return KernelChoice(wanted, "aten", f"{cpu}; {dtype} with aten linears", warning)
    return KernelChoice(wanted, "onednn", f"{cpu}; {dtype} through oneDNN")


class Linear:
    """The float weights format of `hogwild.model.parts.Linear` (fp32 or bf16): y = x @ W.T (+ b), with the
    weight prepacked for oneDNN once at load (`kernel="onednn"`) or plain."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, kernel: str = "aten") -> None:
        assert kernel in ("onednn", "aten"), f"unknown linear kernel {kernel!r}"
        self.shape = weight.shape
        self.nbytes = weight.numel() * weight.element_size()  # what a decode step reads
        self.bias = bias
        # the packed copy replaces the plain weight, which is not kept: holding both would double the memory
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight) if kernel == "onednn" else weight
        self.packed = kernel == "onednn"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)
