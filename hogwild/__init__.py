"""hogwild: collaborative parallel LLM inference.

Several workers of one language model think about the same problem at the same time and share one key-value
cache, so each worker sees the others' tokens as they are written (Hogwild! Inference, Group Think).
"""

from hogwild.api import load, solve, solve_stream
from hogwild.collab.protocol import CollabConfig, SolveResult
from hogwild.engine import Engine, EngineConfig
from hogwild.errors import HogwildError
from hogwild.sampling import SamplingParams

__all__ = [
    "CollabConfig",
    "Engine",
    "EngineConfig",
    "HogwildError",
    "SamplingParams",
    "SolveResult",
    "load",
    "solve",
    "solve_stream",
]
