"""What a rollout records per episode, and what those records become when the run ends.

`Task` is one episode to play; the loop (agents/rollout.py) fills an `_Episode` and a `_Turn` per
turn as it plays. Once the run is over, this module turns them into its outputs: each episode's
summary (`episode_summary`, what rewards and evaluation read), its training samples
(`episode_samples`: one `Trajectory` per turn in step mode, one per episode in trajectory mode,
a branch's shared prefix masked out), and the run's metrics (`rollout_metrics`). Pure functions
of the records: the rollout passes what they need of its config (the reward function, the mode,
the tokenizer and the format's prefill). Split out of the loop so that it keeps only the playing.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from agents.parsing import final_answer, token_roles
from agents.prompts import Observation
from agents.rewards import RewardFn
from agents.types import GenerationResult, Trajectory


@dataclass
class Task:
    """One episode to play: which env, how to build and reset it, and its group."""

    env_id: str
    group_id: int
    env_kwargs: dict = field(default_factory=dict)
    reset_options: dict = field(default_factory=dict)
    seed: int | None = None


@dataclass
class _Turn:
    prompt_ids: list[int]
    result: GenerationResult
    action: str
    parse_error: str | None
    anchor_key: str | None = None  # hash of the observation the prompt was built from
    reward: float = 0.0  # the env reward this turn's action received
    obs: Observation | None = None  # what the prompt showed (a token-level fork restarts from it)
    messages_len: int = 0  # trajectory mode: len(episode.messages) when the prompt was made


@dataclass
class _Episode:
    task: Task
    traj_id: int
    handle: int | None = None  # the env's handle in the rollout's EnvPool
    plan: list[str] | None = None  # expert agent: the walkthrough it plays
    obs: Observation | None = None
    history: list[tuple[str, str]] = field(default_factory=list)  # (observation, action) pairs
    messages: list[dict] = field(default_factory=list)  # trajectory mode: the rendered roles
    context_ids: list[int] = field(default_factory=list)  # trajectory mode: all ids so far
    prompt_ids: list[int] = field(default_factory=list)  # trajectory mode: the first prompt
    deltas: list[list[int]] = field(default_factory=list)  # trajectory mode: ids after each reply
    turns: list[_Turn] = field(default_factory=list)
    won: bool = False
    score: float = 0.0
    parse_errors: int = 0
    parse_error_streak: int = 0
    stop_reason: str | None = None
    error: str | None = None
    meta: dict = field(default_factory=dict)  # task metadata from the reset info (rollout's TASK_META_KEYS)
    parent_id: int | None = None  # branched: the episode this one was forked from
    fork_turn: int | None = None  # branched: turns [0, fork_turn) are the parent's
    obs_truncated: int = 0  # observations of this episode (its own turns) cut to max_obs_chars
    fork_offset: int = 0  # token-level branch: its fork turn's first tokens that are the parent's
    prefix: GenerationResult | None = None  # token-level branch: those tokens, before they are played


def episode_summary(ep: _Episode) -> dict:
    """What the episode did, as rewards (agents/rewards.py) and evaluation read it."""
    return {
        "won": ep.won,
        "score": ep.score,
        "turns": len(ep.turns),
        "parse_errors": ep.parse_errors,
        "generated_tokens": sum(len(t.result.token_ids) for t in ep.turns),
        "stop_reason": ep.stop_reason,
        "env_id": ep.task.env_id,
        "group_id": ep.task.group_id,
        "traj_id": ep.traj_id,
        "task": {**ep.meta, **ep.task.reset_options},
        "actions": [t.action for t in ep.turns],
        "turn_rewards": [t.reward for t in ep.turns],
        "anchor_keys": [t.anchor_key for t in ep.turns],
        "error": ep.error,
        "parent_id": ep.parent_id,
        "fork_turn": ep.fork_turn,
        "final_answer": _final_answer(ep),
    }


def episode_samples(ep: _Episode, reward_fn: RewardFn, mode: str) -> list[Trajectory]:
    """The episode's training samples, rewarded by `reward_fn`: one per own turn (`mode` "step"),
    or the whole episode as one ("trajectory")."""
    if not ep.turns:
        return []  # nothing was sampled (env failed at reset): nothing to train on
    summary = episode_summary(ep)
    reward = reward_fn(summary)
    common = dict(
        reward=reward,
        group_id=ep.task.group_id,
        traj_id=ep.traj_id,
        stop_reason=ep.stop_reason,
        parent_id=ep.parent_id,
        fork_turn=ep.fork_turn,
    )
    if mode == "step":
        # A branch's turns before its fork are its parent's samples already: emitted once.
        first = ep.fork_turn or 0
        return [
            Trajectory(
                prompt_ids=t.prompt_ids,
                response_ids=list(t.result.token_ids),
                # a token-level branch's fork turn: its first tokens are the parent's sample
                loss_mask=_own_mask(len(t.result.token_ids), ep.fork_offset if k == first else 0),
                rollout_logprobs=_own_values(t.result.logprobs, ep.fork_offset if k == first else 0),
                entropies=_own_values(t.result.entropies, ep.fork_offset if k == first else 0),
                turn_idx=k,
                step_reward=t.reward,
                anchor_key=t.anchor_key,
                turn_spans=[(0, len(t.result.token_ids))],
                info={**summary, "parse_error": t.parse_error} if k == first else {"parse_error": t.parse_error},
                **common,
            )
            for k, t in enumerate(ep.turns)
            if k >= first
        ]
    return [_trajectory_sample(ep, summary, common)]


def _trajectory_sample(ep: _Episode, summary: dict, common: dict) -> Trajectory:
    ids, mask, logprobs, entropies, spans = [], [], [], [], []
    for k, turn in enumerate(ep.turns):
        n = len(turn.result.token_ids)
        spans.append((len(ids), len(ids) + n))
        ids += turn.result.token_ids
        mask += [1] * n
        logprobs += turn.result.logprobs
        entropies += turn.result.entropies
        if k < len(ep.deltas):
            delta = ep.deltas[k]
            ids += delta
            mask += [0] * len(delta)
            logprobs += [0.0] * len(delta)
            entropies += [0.0] * len(delta)
    return Trajectory(
        prompt_ids=ep.prompt_ids,
        response_ids=ids,
        loss_mask=mask,
        rollout_logprobs=logprobs,
        entropies=entropies,
        turn_spans=spans,
        fork_token=None if ep.fork_turn is None else _fork_token(spans, ep.fork_turn, len(ids)) + ep.fork_offset,
        info=summary,
        **common,
    )


def _role_entropy(tokenizer: Any, turns: list[_Turn], prefill: str) -> dict[str, float]:
    """Mean entropy of the sampled tokens by role (reasoning, action, tool_call, answer)."""
    if tokenizer is None:
        return {}
    by_role = _role_entropy_sums(tokenizer, turns, prefill)
    return {f"entropy/role/{role}": sum(hs) / len(hs) for role, hs in by_role.items()}


def rollout_metrics(episodes: list[_Episode], timings: Counter, tokenizer: Any, prefill: str) -> dict[str, float]:
    """The run's rollout/, entropy/ and time/ metrics; by role only with a tokenizer."""
    n = max(len(episodes), 1)
    turns = [t for ep in episodes for t in ep.turns]
    tokens = sum(len(t.result.token_ids) for t in turns)
    entropy_sum = sum(sum(t.result.entropies) for t in turns)
    metrics = {
        "rollout/episodes": float(len(episodes)),
        "rollout/success": sum(ep.won for ep in episodes) / n,
        "rollout/score": sum(ep.score for ep in episodes) / n,
        "rollout/turns": len(turns) / n,
        "rollout/invalid_rate": sum(t.parse_error is not None for t in turns) / max(len(turns), 1),
        "rollout/gen_tokens": float(tokens),
        "rollout/obs_truncated": float(sum(ep.obs_truncated for ep in episodes)),
        "entropy/rollout_mean": entropy_sum / max(tokens, 1),
        "time/generate": timings["generate"],
        "time/env": timings["env"],
        "time/reward": timings["reward"],
    }
    for reason, count in Counter(ep.stop_reason for ep in episodes).items():
        metrics[f"rollout/stop/{reason}"] = count / n
    metrics.update(_role_entropy(tokenizer, turns, prefill))
    for k in range(max((len(ep.turns) for ep in episodes), default=0)):
        kth = [ep.turns[k].result.entropies for ep in episodes if len(ep.turns) > k]
        flat = [h for hs in kth for h in hs]
        metrics[f"entropy/turn_{k}"] = sum(flat) / max(len(flat), 1)
    return metrics


def _role_entropy_sums(tokenizer: Any, turns: list[_Turn], prefill: str) -> dict[str, list[float]]:
    by_role: dict[str, list[float]] = {}
    for turn in turns:
        ids = turn.result.token_ids
        if not ids:
            continue
        pieces = [tokenizer.decode([t], skip_special_tokens=True) for t in ids]
        for role, entropy in zip(token_roles(pieces, prefill), turn.result.entropies, strict=True):
            by_role.setdefault(role, []).append(entropy)
    return by_role


def _final_answer(ep: _Episode) -> str | None:
    """The final answer (\\boxed{}, ####, Answer:) of the last reply, for maj@k; None if none."""
    answer = final_answer(ep.turns[-1].action) if ep.turns else None
    return answer if isinstance(answer, str) else None


def _own_mask(n: int, shared: int) -> list[int]:
    return [0] * min(shared, n) + [1] * max(n - shared, 0)


def _own_values(values: list[float], shared: int) -> list[float]:
    """Per-token values with the shared prefix zeroed (0.0 where loss_mask == 0)."""
    return [0.0] * min(shared, len(values)) + list(values[shared:])


def _fork_token(spans: list[tuple[int, int]], fork_turn: int, length: int) -> int:
    """Response position where a branch's own tokens start: its first own turn's reply."""
    return spans[fork_turn][0] if fork_turn < len(spans) else length
