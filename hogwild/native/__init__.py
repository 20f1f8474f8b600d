"""hogwild's compiled CPU kernels, built once with the machine's C++ compiler and cached.

Two extension modules, each built on first use by `torch.utils.cpp_extension` into hogwild's cache folder, keyed by
its source, its flags and the torch and Python versions (the first build takes about 30 seconds):

- `fused.cpp` (`load()`): a decode step of a small model is mostly small ops: an RMSNorm, a rotation or a softmax on
  a few hundred numbers costs a torch dispatch and a TensorIterator each, several microseconds, some 1,500 times a
  step. It does a layer's norms, its silu * up and its whole concurrent attention (K/V writes, every block read
  once per kv head for all the rows that see it, the exact merge) in one call each.
- `gguf.cpp` (`load_gguf()`): matrix products straight on a GGUF file's quantized blocks (Q4_0 ... Q8_0, Q4_K,
  Q5_K, Q6_K, F16, BF16, F32), memory-mapped where they lie, each weight byte read once for every activation row
  of a step; AVX-512 VNNI kernels where the CPU has them, AVX2 kernels everywhere else (`HOGWILD_KERNEL_ISA=avx2`
  forces the AVX2 ones).

Each loader returns the compiled module, or None with one line on stderr saying why it cannot run here (nothing
when switched off): no x86-64 CPU with AVX2, FMA and F16C, no compiler, or its switch (`HOGWILD_FUSED=0`,
`HOGWILD_GGUF_KERNELS=0`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import platform
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import ModuleType

import torch

from hogwild.model.kernels import CpuFacts
from hogwild.model.loading import cache_dir

HEAD_DIMS = (16, 32, 64, 128)  # the attention kernel's head sizes (16 and 32: the tests' tiny models)
DTYPES = (torch.float32, torch.bfloat16)  # its cache and activation dtypes
BASE_FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"]  # OpenMP: at::parallel_for, on torch's own runtime


@dataclass(frozen=True)
class Extension:
    """One compiled module: its source, its flags, how stderr names it and what runs instead of it."""

    module: str  # the Python module's name
    source: Path
    flags: tuple[str, ...]
    what: str  # "the fused CPU kernels"
    instead: str  # what runs when it cannot: "torch ops"
    switch: str  # the environment variable that turns it off with "0"
    folder_prefix: str  # its build folders' names start with this


FUSED = Extension(
    "hogwild_fused", Path(__file__).with_name("fused.cpp"), tuple(BASE_FLAGS), "fused CPU kernels", "torch ops",
    "HOGWILD_FUSED", "",
)  # fmt: skip
# -ffp-contract=off: dequantize() rounds exactly as gguf's reference does, and a row's sums never depend on how
# the compiler happened to fuse them. AVX-512 code is compiled per function (target attributes), picked at run time.
GGUF = Extension(
    "hogwild_gguf", Path(__file__).with_name("gguf.cpp"), (*BASE_FLAGS, "-ffp-contract=off"), "GGUF block kernels",
    "the other linear kernels", "HOGWILD_GGUF_KERNELS", "gguf-",
)  # fmt: skip


def unavailable(extension: Extension = FUSED) -> str | None:
    """Why `extension` cannot run here, or None when it can."""
    if os.environ.get(extension.switch, "1") == "0":
        return f"{extension.switch}=0"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"they are x86-64 code and this is {platform.machine()}"
    missing = [flag for flag in ("avx2", "fma", "f16c") if flag not in CpuFacts.detect().flags]
    if missing:
        return f"this CPU lacks {', '.join(missing)}"
    return None


def build_folder(extension: Extension = FUSED) -> Path:
    digest = hashlib.sha256(extension.source.read_bytes() + " ".join(extension.flags).encode()).hexdigest()[:12]
    version = f"torch{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}"
    return cache_dir() / "native" / f"{extension.folder_prefix}{version}-{digest}"


@cache
def load() -> ModuleType | None:
    """The fused kernels, built on the first call of a new version (one line on stderr says so), or None with one
    line saying why (nothing when switched off). Once per process."""
    return build(FUSED)


@cache
def load_gguf() -> ModuleType | None:
    """The GGUF block kernels (`gguf.cpp`), as `load` does for the fused ones. `module.isa()` says which kernels
    run: "avx512-vnni" where the CPU has AVX-512 F/BW/VL/VNNI, else (or with `HOGWILD_KERNEL_ISA=avx2`) "avx2"."""
    return build(GGUF)


@contextlib.contextmanager
def _held(folder: Path) -> Iterator[None]:
    """One hogwild process at a time builds or loads in `folder`. torch's own lock there is a file that a build
    killed midway (Ctrl-C on the first start) leaves behind, and every later process would wait on it for ever; the
    kernel drops this lock with its holder, so whoever holds it knows torch's file is stale and removes it."""
    with open(folder / "hogwild.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            (folder / "lock").unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def build(extension: Extension = FUSED) -> ModuleType | None:
    """`load` (or `load_gguf`) without the per-process cache."""
    reason = unavailable(extension)
    if reason is not None:
        if reason != f"{extension.switch}=0":
            print(f"hogwild: {extension.what} off ({reason}); running {extension.instead}", file=sys.stderr)
        return None
    folder = build_folder(extension)
    built = folder / "built"
    if not built.exists():
        compiler = os.environ.get("CXX", "c++")  # what torch.utils.cpp_extension runs
        if shutil.which(compiler) is None:
            print(
                f"hogwild: {extension.what} off (no C++ compiler: {compiler}); running {extension.instead}",
                file=sys.stderr,
            )
            return None
        print(f"hogwild: compiling the {extension.what} once (about 30 s), into {folder}", file=sys.stderr)
    try:
        from torch.utils.cpp_extension import load as compile_and_load

        folder.mkdir(parents=True, exist_ok=True)
        with _held(folder):
            module = compile_and_load(
                name=extension.module,
                sources=[str(extension.source)],
                extra_cflags=list(extension.flags),
                extra_ldflags=["-fopenmp"],
                build_directory=str(folder),
                verbose=False,
            )
    except (OSError, RuntimeError, ImportError) as error:
        first = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
        print(
            f"hogwild: could not compile the {extension.what} ({first}); running {extension.instead}", file=sys.stderr
        )
        return None
    built.touch()
    stem = folder.name.rpartition("-")[0]
    for old in folder.parent.glob(f"{stem}-*"):
        if old != folder:  # earlier builds of this module, torch and Python, from other versions of the source
            shutil.rmtree(old, ignore_errors=True)
    return module
