"""A scripted engine for tests: replays given replies. Named as what it is: a stand-in."""

from __future__ import annotations

from collections.abc import Callable

from agents.engines.base import SamplingParams
from agents.types import GenerationResult


class ScriptedEngine:
    """`reply(prompt_ids, call_index) -> list[int]` decides each reply; logprob/entropy are fixed
    functions of position so tests can check they arrive unchanged in the Trajectory."""

    def __init__(self, reply: Callable[[list[int], int], list[int]], eos_id: int | None = None):
        self.reply = reply
        self.eos_id = eos_id
        self.calls: list[list[list[int]]] = []  # prompts of every generate() call
        self.weights_loaded = 0

    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[GenerationResult]:
        self.calls.append([list(p) for p in prompts])
        out = []
        for prompt in prompts:
            ids = list(self.reply(prompt, len(self.calls) - 1))[: sampling.max_new_tokens]
            finish = "stop" if ids and ids[-1] == self.eos_id else "length"
            out.append(
                GenerationResult(
                    token_ids=ids,
                    logprobs=[-0.1 * (j + 1) for j in range(len(ids))],
                    entropies=[0.5 + 0.01 * j for j in range(len(ids))],
                    finish_reason=finish,
                )
            )
        return out

    def load_weights(self, named_tensors) -> None:
        self.weights_loaded += 1
