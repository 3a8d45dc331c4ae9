"""The inference-engine protocol: token ids in, exact sampled ids + per-token statistics out.

Engines never see text the learner will train on: they take prompt token ids and return the
exact ids they sampled (the token-exact rule in DESIGN.md).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
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


def weight_buckets(named_tensors: Iterable[tuple[str, Any]]) -> Iterator[list[tuple[str, Any]]]:
    """Group a name-ordered weight stream into whole modules: everything before the decoder
    layers, then one decoder layer at a time, then the rest. An engine that fuses q/k/v or
    gate/up (vLLM) needs each layer's tensors together, and a layer at a time bounds the memory
    a sync holds (under ZeRO-3 every tensor was gathered just for it)."""
    bucket: list[tuple[str, Any]] = []
    current: str | None = None
    for name, tensor in named_tensors:
        key = _layer_key(name)
        if bucket and key != current:
            yield bucket
            bucket = []
        bucket.append((name, tensor))
        current = key
    if bucket:
        yield bucket


def _layer_key(name: str) -> str:
    """"model.layers.3.mlp.up_proj.weight" -> "model.layers.3"; names outside layers -> "" """
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part == "layers" and parts[i + 1].isdigit():
            return ".".join(parts[: i + 2])
    return ""
