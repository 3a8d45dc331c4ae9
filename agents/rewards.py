"""Reward terms: plain registered callables of an episode summary, composed by weight.

The summary is the episode's `info` dict built by the rollout loop: `won`, `score` (sum of env
rewards), `turns`, `parse_errors`, `generated_tokens`, `stop_reason`, `task` (the reset options;
math tasks carry the reference `answer`) and `actions` (with the `boxed` and `tool_call` formats,
the raw replies).
"""

from __future__ import annotations

from collections.abc import Callable

from agents.parsing import ParseError, ToolCall, extract_boxed, parse_tool_calls

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


@reward("math_verify")
def math_verify(summary: dict) -> float:
    """1 if the final reply's answer equals the task's reference `answer`, checked here with
    math-verify (agents/verify.py) independently of the env; a final reply that still calls a tool
    answers nothing. Without a reference answer in the task: the env's `won`."""
    from agents.verify import math_equal

    reference = (summary.get("task") or {}).get("answer")
    if reference is None:
        return float(bool(summary["won"]))
    reply = _final_reply(summary)
    return float(reply is not None and bool(math_equal(reply, str(reference))))


@reward("format")
def boxed_format(summary: dict) -> float:
    """1 if the final reply puts an answer in a complete \\boxed{} (and calls no tool), else 0."""
    reply = _final_reply(summary)
    return float(reply is not None and not isinstance(extract_boxed(reply), ParseError))


@reward("tool_use")
def tool_use(summary: dict) -> float:
    """1 if the episode was won and made at least one well-formed tool call, else 0. Gated on
    success so that calling a tool never pays by itself (Tool-Star's multi-tool bonus is gated
    the same way)."""
    used = any(isinstance(c, ToolCall) for a in summary.get("actions", []) for c in parse_tool_calls(a))
    return float(bool(summary["won"]) and used)


def _final_reply(summary: dict) -> str | None:
    """The last reply of the episode when it is an answer (makes no tool call), else None."""
    actions = summary.get("actions") or []
    if not actions or parse_tool_calls(actions[-1]):
        return None
    return actions[-1]


def prefetch(summaries: list[dict], weights: dict[str, float]) -> None:
    """Work a batch of episodes' rewards can share before they are computed one by one: the
    math-verify checks of all final replies in one parallel batch (one pool round trip per
    episode, in series, cost ~50 ms each)."""
    if "math_verify" not in weights:
        return
    from agents.verify import prefetch as verify_many

    pairs = []
    for summary in summaries:
        reference = (summary.get("task") or {}).get("answer")
        reply = _final_reply(summary)
        if reference is not None and reply is not None:
            pairs.append((reply, str(reference)))
    verify_many(pairs)


def compose(weights: dict[str, float]) -> RewardFn:
    unknown = sorted(set(weights) - set(REWARDS))
    if unknown:
        raise KeyError(f"unknown reward(s) {unknown} in rollout.rewards; known: {', '.join(sorted(REWARDS))}")
    terms = [(REWARDS[name], w) for name, w in weights.items()]
    return lambda summary: sum(w * fn(summary) for fn, w in terms)
