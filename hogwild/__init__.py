"""hogwild: collaborative parallel LLM inference.

Several workers of one language model think about the same problem at the same time and share one key-value
cache, so each worker sees the others' tokens as they are written (Hogwild! Inference, Group Think).
"""

from hogwild.api import load, solve, solve_stream
from hogwild.collab.protocol import CollabConfig, Collaboration, SolveResult
from hogwild.engine import Engine, EngineConfig
from hogwild.errors import HogwildError
from hogwild.runs import Done, Probe, Sampled, Token
from hogwild.sampling import SamplingParams

__all__ = [
    "CollabConfig",
    "Collaboration",
    "Done",
    "Engine",
    "EngineConfig",
    "HogwildError",
    "Probe",
    "Sampled",
    "SamplingParams",
    "SolveResult",
    "Token",
    "load",
    "solve",
    "solve_stream",
]
