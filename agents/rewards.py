"""Reward terms: plain registered callables of an episode summary, composed by weight.

The summary is the episode's `info` dict built by the rollout loop: `won`, `score` (sum of env
rewards), `turns`, `parse_errors`, `generated_tokens`, `stop_reason`.
"""

from __future__ import annotations

from collections.abc import Callable

RewardFn = Callable[[dict], float]
REWARDS: dict[str, RewardFn] = {}


def reward(name: str) -> Callable[[RewardFn], RewardFn]:
    def register(fn: RewardFn) -> RewardFn:
        if name in REWARDS:
            raise ValueError(f"reward {name!r} is already registered")
        REWARDS[name] = fn
        return fn

    return register


@reward("success")
def success(summary: dict) -> float:
    """1 if the episode was won, else 0."""
    return float(bool(summary["won"]))


@reward("score")
def score(summary: dict) -> float:
    """Sum of the env's own rewards (score deltas)."""
    return float(summary["score"])


@reward("invalid_action")
def invalid_action(summary: dict) -> float:
    """Minus the fraction of replies that could not be parsed (weight it, e.g. 0.1)."""
    return -summary["parse_errors"] / max(summary["turns"], 1)


def compose(weights: dict[str, float]) -> RewardFn:
    unknown = sorted(set(weights) - set(REWARDS))
    if unknown:
        raise KeyError(f"unknown reward(s) {unknown} in rollout.rewards; known: {', '.join(sorted(REWARDS))}")
    terms = [(REWARDS[name], w) for name, w in weights.items()]
    return lambda summary: sum(w * fn(summary) for fn, w in terms)
