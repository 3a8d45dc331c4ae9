"""The inference-engine protocol: token ids in, exact sampled ids + per-token statistics out.

Engines never see text the learner will train on: they take prompt token ids and return the
exact ids they sampled (the token-exact rule in DESIGN.md).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from agents.types import GenerationResult


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = full vocabulary
    max_new_tokens: int = 64
    stop: list[str] = field(default_factory=list)  # stop strings (kept in the output, like EOS)
    seed: int | None = None


class InferenceEngine(Protocol):
    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[GenerationResult]:
        """One result per prompt, in order. Must not raise on a single bad prompt if avoidable."""
        ...

    def load_weights(self, named_tensors: Iterable[tuple[str, Any]]) -> None:
        """Copy new policy weights in place (after a learner step)."""
        ...
