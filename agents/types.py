"""The records that cross from `agents` to `trainer`: plain lists, no tensors.

A `Trajectory` is one training sample. In trajectory mode it is a whole episode (assistant turns
with `loss_mask = 1`, environment/tool deltas with `loss_mask = 0`); in step-wise mode it is one
turn (its own prompt, its sampled reply), and `turn_idx` says which; `step_reward` and
`anchor_key` carry that turn's env reward and observation hash (GiGPO step advantages). In
trajectory mode the same per-turn data is in `info["turn_rewards"]` / `info["anchor_keys"]`.
`trainer/batch.py` is the only place that turns these into tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

STOP_REASONS = (
    "terminated",  # the env said the episode is over (won or lost)
    "truncated",  # the env's own step cap
    "max_turns",  # the rollout's turn cap
    "max_tokens",  # the episode's generated-token budget
    "context_overflow",  # the next prompt would not fit the context window
    "parse_error_limit",  # too many unparsable replies in a row
    "env_error",  # the env raised or its worker died
    "engine_error",  # the inference engine failed on this episode's request (after a retry)
    "timeout",  # wall-clock budget of the episode
)


@dataclass
class GenerationResult:
    """What an engine returns for one request: exact sampled ids and per-token statistics."""

    token_ids: list[int]
    logprobs: list[float]  # log p(sampled token) under the sampling distribution
    entropies: list[float]  # H of the sampling distribution at each generated position
    finish_reason: str  # "stop" (EOS / stop string) or "length"
    entropy_is_exact: bool = True  # False where an engine only has a top-k estimate


@dataclass
class Trajectory:
    """One training sample. Token lists are aligned: `len(response_ids) == len(loss_mask) == ...`."""

    prompt_ids: list[int]
    response_ids: list[int]
    loss_mask: list[int]  # 1 exactly on tokens the engine sampled; 0 on env/tool/template tokens
    rollout_logprobs: list[float]  # engine logprob at sampled tokens, 0.0 where loss_mask == 0
    entropies: list[float]  # engine entropy at sampled tokens, 0.0 where loss_mask == 0
    reward: float
    group_id: int  # samples of the same task and initial state share it
    traj_id: int  # one episode; all step-wise samples of an episode share it
    turn_idx: int | None = None  # step-wise mode: which turn this sample is; None = whole episode
    step_reward: float = 0.0  # step-wise mode: the env reward this turn's action received (GiGPO)
    anchor_key: str | None = None  # step-wise mode: stable hash of the observation the prompt showed
    turn_spans: list[tuple[int, int]] = field(default_factory=list)  # [start, end) of each reply
    parent_id: int | None = None  # branch tree: the episode this one was forked from
    fork_turn: int | None = None  # the first turn the branch played itself
    fork_token: int | None = None  # trajectory mode: response tokens [0, fork_token) are the parent's
    stop_reason: str = "terminated"
    reinforce: bool = False  # Arbitrary-Entropy PO's extra temperature-T sample: REINFORCE term only
    info: dict = field(default_factory=dict)  # success, task id, env id, per-turn stats, timings

    def __post_init__(self) -> None:
        n = len(self.response_ids)
        for name in ("loss_mask", "rollout_logprobs", "entropies"):
            if len(getattr(self, name)) != n:
                raise ValueError(
                    f"Trajectory.{name} has {len(getattr(self, name))} entries but response_ids "
                    f"has {n}: every per-token list must align with response_ids"
                )
        if self.stop_reason not in STOP_REASONS:
            raise ValueError(f"unknown stop_reason {self.stop_reason!r}; expected one of {STOP_REASONS}")

    @property
    def num_sampled_tokens(self) -> int:
        return sum(self.loss_mask)
