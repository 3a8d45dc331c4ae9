"""The common ground of the advantage estimators: the `ADVANTAGES` registry, the typed input
and output, and the group statistics the estimator families share.

`AdvantageInputs` is the batch view every estimator reads (one row per sample);
`AdvantageOutput` carries `advantages[B, T]`, zero wherever `loss_mask == 0`. The helpers are
per-group count/mean/unbiased std (`_segment_stats`, `_group_baseline`, the GRPO baseline of
arXiv 2402.03300), the broadcast of a per-sample advantage onto the sampled tokens, masked
whitening (REINFORCE++, arXiv 2501.03262; GAE, arXiv 1506.02438), the `adv/*` metrics and the
sequence reward placed on the last sampled token. They live here, apart from any one family,
because the group-relative (`group.py`), multi-turn/tree (`credit.py`) and value-based
(`gae.py`) estimators all build on them. No estimator is registered in this module.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from trainer.registry import Registry

ADVANTAGES = Registry("advantage estimator")


@dataclass
class AdvantageInputs:
    """The batch view every estimator reads. Shapes: B samples, T tokens per sample.

    rewards:       [B] float, the sequence reward of each sample (in step-wise mode: the
                   episode return, repeated on every turn-sample of the episode).
    group_ids:     [B] long, samples of the same task/initial state share a group.
    traj_ids:      [B] long, samples of the same episode share a trajectory.
    loss_mask:     [B, T] {0,1}, 1 exactly on tokens the policy sampled.
    values:        [B, T] critic values (GAE).
    token_rewards: [B, T] per-token rewards (REINFORCE++, GAE); default: `rewards` placed on
                   the last sampled token of each row.
    entropies:     [B, T] per-token entropies (for entropy-aware estimators and metrics).
    turn_idx:      [B] long, which turn of its episode a step-wise sample is (GiGPO).
    step_rewards:  [B] float, this turn's share of the episode reward (GiGPO step returns): per-
                   turn rewards on the scale of `rewards`, whose sum over an episode's turns is
                   its reward (`trainer/advantage_inputs.py` derives them from the configured reward).
    anchor_keys:   B hashables, the anchor state of each turn-sample, e.g. a hash of the raw
                   observation without history (GiGPO groups equal keys within a group).
    parent_ids:    [B] long, branched (tree) rollouts: the traj_id of the episode this row's
                   episode was branched from, -1 for a root (ARPO, arXiv 2507.19849; AEPO,
                   arXiv 2510.14545). Trajectory mode: one row per leaf trajectory. Step-wise
                   mode (`turn_idx` set): one row per turn the episode played itself.
    fork_positions:[B] long, tokens [0, fork) of the row are a verbatim copy of its parent's
                   tokens [0, fork) (the shared prefix, same column positions); ignored for roots.
                   Step-wise mode: read on a branch's fork-turn row only (a token-level fork's
                   first tokens, which are the parent's same-turn row's and have loss_mask 0).
    fork_turns:    [B] long, step-wise branches: the first turn the row's episode played itself
                   (its turns before it are its parent's samples); ignored for roots.
    """

    rewards: Tensor
    group_ids: Tensor
    traj_ids: Tensor
    loss_mask: Tensor
    values: Tensor | None = None
    token_rewards: Tensor | None = None
    entropies: Tensor | None = None
    turn_idx: Tensor | None = None
    step_rewards: Tensor | None = None
    anchor_keys: Sequence[Hashable] | None = None
    parent_ids: Tensor | None = None
    fork_positions: Tensor | None = None
    fork_turns: Tensor | None = None

    def __post_init__(self) -> None:
        batch = self.loss_mask.shape[0]
        if self.loss_mask.dim() != 2:
            raise ValueError(f"loss_mask must be [B, T], got shape {tuple(self.loss_mask.shape)}")
        for name in (
            "rewards",
            "group_ids",
            "traj_ids",
            "turn_idx",
            "step_rewards",
            "parent_ids",
            "fork_positions",
            "fork_turns",
        ):
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != (batch,):
                raise ValueError(f"{name} must be [B]=[{batch}], got shape {tuple(value.shape)}")
        for name in ("values", "token_rewards", "entropies"):
            value = getattr(self, name)
            if value is not None and value.shape != self.loss_mask.shape:
                raise ValueError(
                    f"{name} must match loss_mask [B, T]={tuple(self.loss_mask.shape)}, "
                    f"got {tuple(value.shape)}"
                )
        if self.anchor_keys is not None and len(self.anchor_keys) != batch:
            raise ValueError(f"anchor_keys must have B={batch} entries, got {len(self.anchor_keys)}")


@dataclass
class AdvantageOutput:
    advantages: Tensor  # [B, T], zero where loss_mask == 0
    returns: Tensor | None = None  # [B, T] critic targets where an estimator defines them
    metrics: dict[str, float] = field(default_factory=dict)
    # [B, T] replacement loss mask (prefix de-duplication of tree rollouts): the learner must use
    # it instead of the input loss_mask when set. Advantages are already 0 where it drops tokens.
    loss_mask: Tensor | None = None


# --------------------------------------------------------------------------------------------
# Group statistics


def _segment_stats(values: Tensor, segment: Tensor, num_segments: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-segment (count, mean, unbiased std) of 1-D `values`; std is nan for count < 2."""
    values = values.double()
    count = torch.zeros(num_segments, dtype=torch.float64, device=values.device)
    count.index_add_(0, segment, torch.ones_like(values))
    total = torch.zeros_like(count).index_add_(0, segment, values)
    mean = total / count.clamp_min(1)
    sq = torch.zeros_like(count).index_add_(0, segment, (values - mean[segment]) ** 2)
    std = (sq / (count - 1)).sqrt()  # inf/nan for count < 2; callers handle singletons
    return count, mean, std


def _group_baseline(
    rewards: Tensor, group_ids: Tensor, traj_ids: Tensor, count: str
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample (n, mean, unbiased std) of the sample's group, as GRPO/RLOO need them.

    count="sample": every sample is one unit (verl-agent default: a long episode's many
    turn-samples weigh more). count="trajectory": each episode counts once, with the mean
    reward of its samples (equal to the episode return when its samples share it).
    """
    _, group_of_sample = torch.unique(group_ids, return_inverse=True)
    num_groups = int(group_of_sample.max()) + 1 if group_ids.numel() else 0
    if count == "sample":
        n, mean, std = _segment_stats(rewards, group_of_sample, num_groups)
    elif count == "trajectory":
        _, traj_of_sample = torch.unique(traj_ids, return_inverse=True)
        num_trajs = int(traj_of_sample.max()) + 1
        _, traj_reward, _ = _segment_stats(rewards, traj_of_sample, num_trajs)
        group_of_traj = torch.zeros(num_trajs, dtype=torch.long, device=rewards.device)
        group_of_traj.scatter_(0, traj_of_sample, group_of_sample)
        if not torch.equal(group_of_traj[traj_of_sample], group_of_sample):
            raise ValueError("count='trajectory' needs every trajectory inside a single group")
        n, mean, std = _segment_stats(traj_reward, group_of_traj, num_groups)
    else:
        raise ValueError(f"count must be 'sample' or 'trajectory', got {count!r}")
    return n[group_of_sample], mean[group_of_sample], std[group_of_sample]


def _broadcast(per_sample: Tensor, loss_mask: Tensor) -> Tensor:
    """[B] -> [B, T] float32, zero where loss_mask == 0."""
    return per_sample.float()[:, None] * (loss_mask > 0).float()


def _masked_whiten(values: Tensor, loss_mask: Tensor, eps: float = 1e-8) -> Tensor:
    """(x - mean) / sqrt(var + eps) over valid tokens, unbiased var (verl masked_whiten)."""
    mask = loss_mask.to(values.dtype)
    n = mask.sum()
    mean = (values * mask).sum() / n.clamp_min(1)
    var = (((values - mean) ** 2) * mask).sum() / (n - 1).clamp_min(1)
    return (values - mean) * torch.rsqrt(var + eps) * mask


def _adv_metrics(advantages: Tensor, loss_mask: Tensor) -> dict[str, float]:
    valid = advantages[loss_mask > 0]
    if valid.numel() == 0:
        return {"adv/mean": 0.0, "adv/std": 0.0, "adv/max": 0.0, "adv/min": 0.0}
    return {
        "adv/mean": valid.mean().item(),
        "adv/std": valid.std().item() if valid.numel() > 1 else 0.0,
        "adv/max": valid.max().item(),
        "adv/min": valid.min().item(),
    }


def _output(advantages: Tensor, loss_mask: Tensor, extra: dict[str, float] | None = None) -> AdvantageOutput:
    """Wrap [B, T] advantages with the standard `adv/*` metrics plus an estimator's own."""
    metrics = _adv_metrics(advantages, loss_mask)
    metrics.update(extra or {})
    return AdvantageOutput(advantages, None, metrics)


def _rewards_on_sampled_tokens(inputs: AdvantageInputs) -> Tensor:
    """[B, T] float32 token rewards, zero wherever loss_mask == 0.

    Without `token_rewards`, the sequence reward goes on the last sampled token of each row.
    Rewards given at masked positions are ignored (masking invariance): put an env reward on
    the last sampled token of the turn that earned it.
    """
    valid = inputs.loss_mask > 0
    if inputs.token_rewards is not None:
        return torch.where(
            valid, inputs.token_rewards.float(), torch.zeros_like(inputs.token_rewards.float())
        )
    B, T = valid.shape
    positions = torch.arange(T, device=valid.device).expand(B, T)
    last = torch.where(valid, positions, -1).amax(dim=1)
    out = torch.zeros(B, T, dtype=torch.float32, device=valid.device)
    rows = torch.nonzero(last >= 0).squeeze(1)
    out[rows, last[rows]] = inputs.rewards[rows].float()
    return out
