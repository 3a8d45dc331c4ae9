"""Value-based advantage: GAE (arXiv 1506.02438 §3) for PPO with a critic.

The one estimator that reads critic values (`AdvantageInputs.values`) instead of comparing
samples within a group; its `returns` are the critic's targets (the value loss is in
`trainer/value.py`). It shares only the token-reward placement, whitening and metrics of
`base.py` with the other families, so it stands alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.advantages.base import (
    ADVANTAGES,
    AdvantageInputs,
    AdvantageOutput,
    _adv_metrics,
    _masked_whiten,
    _rewards_on_sampled_tokens,
)

# --------------------------------------------------------------------------------------------
# GAE (PPO with a critic)


@dataclass(frozen=True)
class GAEParams:
    gamma: float = 1.0
    lam: float = 1.0
    whiten: bool = True


@ADVANTAGES.register("gae", params=GAEParams, needs={"values"})
def gae(inputs: AdvantageInputs, params: GAEParams) -> AdvantageOutput:
    """GAE, arXiv 1506.02438 §3, over the sampled tokens of each row (env/tool tokens skipped).

    delta_t = r_t + gamma V_{t'} - V_t with t' the next sampled token (V = 0 after the last);
    A_t = delta_t + gamma lam A_{t'}. returns = A + V (critic targets, before whitening);
    then A is whitened over the batch's valid tokens if `whiten`.
    """
    if inputs.values is None:
        raise ValueError("gae needs AdvantageInputs.values (critic values [B, T])")
    rewards = _rewards_on_sampled_tokens(inputs)
    values = inputs.values.float()
    valid = inputs.loss_mask > 0
    raw = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_adv = torch.zeros_like(next_value)
    for t in range(rewards.shape[1] - 1, -1, -1):
        delta = rewards[:, t] + params.gamma * next_value - values[:, t]
        adv_t = delta + params.gamma * params.lam * next_adv
        next_value = torch.where(valid[:, t], values[:, t], next_value)
        next_adv = torch.where(valid[:, t], adv_t, next_adv)
        raw[:, t] = torch.where(valid[:, t], adv_t, torch.zeros_like(adv_t))
    returns = torch.where(valid, raw + values, torch.zeros_like(raw))
    advantages = _masked_whiten(raw, inputs.loss_mask) if params.whiten else raw
    return AdvantageOutput(advantages, returns, _adv_metrics(advantages, inputs.loss_mask))
