"""hogwild's fused CPU kernels (`fused.cpp`), compiled once with the machine's C++ compiler and cached.

A decode step of a small model is mostly small ops: an RMSNorm, a rotation or a softmax on a few hundred numbers
costs a torch dispatch and a TensorIterator each, several microseconds, some 1,500 times a step. `fused.cpp` does
a layer's norms, its silu * up and its whole concurrent attention (K/V writes, every block read once per kv head
for all the rows that see it, the exact merge) in one call each. `load()` returns the compiled module, or None
where it cannot run here (then the same maths runs as torch ops): no x86-64 CPU with AVX2 and FMA, no compiler,
or `HOGWILD_FUSED=0`. The build takes about 30 seconds the first time and is cached under hogwild's cache folder,
keyed by the source, torch and Python versions.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
from functools import cache
from pathlib import Path
from types import ModuleType

import torch

from hogwild.model.kernels import CpuFacts
from hogwild.model.loading import cache_dir

SOURCE = Path(__file__).with_name("fused.cpp")
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"]  # OpenMP: at::parallel_for, on torch's own runtime
HEAD_DIMS = (16, 32, 64, 128)  # the attention kernel's head sizes (16 and 32: the tests' tiny models)
DTYPES = (torch.float32, torch.bfloat16)  # its cache and activation dtypes


def unavailable() -> str | None:
    """Why the fused kernels cannot run here, or None when they can."""
    if os.environ.get("HOGWILD_FUSED", "1") == "0":
        return "HOGWILD_FUSED=0"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"they are x86-64 code and this is {platform.machine()}"
    missing = [flag for flag in ("avx2", "fma", "f16c") if flag not in CpuFacts.detect().flags]
    if missing:
        return f"this CPU lacks {', '.join(missing)}"
    return None


def build_folder() -> Path:
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode()).hexdigest()[:12]
    version = f"torch{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}"
    return cache_dir() / "native" / f"{version}-{digest}"


@cache
def load() -> ModuleType | None:
    """The compiled kernels, built on the first call of a new version (one line on stderr says so), or None with
    one line saying why (nothing when switched off). Once per process."""
    return build()


def build() -> ModuleType | None:
    """`load` without the per-process cache."""
    reason = unavailable()
    if reason is not None:
        if reason != "HOGWILD_FUSED=0":
            print(f"hogwild: fused CPU kernels off ({reason}); running torch ops", file=sys.stderr)
        return None
    folder = build_folder()
    built = folder / "built"
    if not built.exists():
        print(f"hogwild: compiling the fused CPU kernels once (about 30 s), into {folder}", file=sys.stderr)
    try:
        from torch.utils.cpp_extension import load as compile_and_load

        folder.mkdir(parents=True, exist_ok=True)
        module = compile_and_load(
            name="hogwild_fused",
            sources=[str(SOURCE)],
            extra_cflags=FLAGS,
            extra_ldflags=["-fopenmp"],
            build_directory=str(folder),
            verbose=False,
        )
    except (OSError, RuntimeError, ImportError) as error:
        first = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
        print(f"hogwild: could not compile the fused CPU kernels ({first}); running torch ops", file=sys.stderr)
        return None
    built.touch()
    for old in folder.parent.glob(f"{folder.name.rpartition('-')[0]}-*"):
        if old != folder:  # earlier builds of this torch and Python, from other versions of the source
            shutil.rmtree(old, ignore_errors=True)
    return module
