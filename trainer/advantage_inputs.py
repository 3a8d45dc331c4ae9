"""A batch of rollout samples -> advantages: the inputs the configured estimator reads, then the estimator.

`compute_advantages` turns this rank's `Trajectory` samples into `AdvantageInputs` and runs the
estimator named by algo.advantage (registered in `trainer/advantages/`); `needs_critic` says
whether that estimator reads critic values (GAE). Beyond one reward per sample, the inputs carry
- the configured episode reward split over its turns, so the estimators that read per-turn or
  per-token rewards (GiGPO's step returns, arXiv 2505.10978; GAE, arXiv 1506.02438; REINFORCE++,
  arXiv 2501.03262) see the same reward, on the same scale, as the episode-level ones
  (`_turn_reward_shift`, `_turn_inputs`);
- the parents and fork points of branched rollouts (grpo_tree: ARPO tree sampling, arXiv
  2507.19849; AEPO, arXiv 2510.14545), `_tree_inputs`;
- the reference's KL folded into the reward (algo.kl_in_reward).

Apart from `trainer/advantages/` because this side reads samples and the config, which the
estimators never see (tensors in, tensors out); apart from the training loop because it is a
pure function of the batch: no engine, learner or ranks.
"""

from __future__ import annotations

import torch

from agents.types import Trajectory
from trainer.advantages import ADVANTAGES, AdvantageInputs
from trainer.batch import response_tensors
from trainer.config import Config
from trainer.regularizers import kl_in_reward


def compute_advantages(
    samples: list[Trajectory],
    cfg: Config,
    values: list[torch.Tensor] | None = None,
    ref_logprobs: list[torch.Tensor] | None = None,
) -> tuple[list[torch.Tensor], dict[str, float], list[torch.Tensor] | None]:
    """Registered estimator over this rank's samples (groups are whole on one rank): per-sample
    advantage rows, metrics, and the critic's targets (returns) when the estimator defines them.
    `values` are the critic's per-sample rows (GAE); `ref_logprobs` the reference's, for
    algo.kl_in_reward.

    Per-turn rewards: the configured reward R of an episode (`s.reward`) is split over its turns
    as r_k = w e_k on every turn k plus R - w sum_k e_k on the last one, with e_k the env's
    reward after turn k and w the weight of the `score` reward term in rollout.rewards (the one
    term that is a sum of env rewards; 0 when absent). So sum_k r_k = R: nothing is counted
    twice, and the estimators that read per-turn or per-token rewards (GiGPO's step returns,
    GAE and REINFORCE++'s token rewards) see the same reward, on the same scale, as the episode-
    level ones. See `_turn_reward_shift` and `_turn_inputs`."""
    if not samples:
        return [], {}, None
    loss_mask, entropies = response_tensors(samples)
    rewards = torch.tensor([s.reward for s in samples], dtype=torch.float32)
    token_rewards, kl_metrics = None, {}
    if ref_logprobs is not None and cfg.algo.kl_in_reward.coef > 0:
        kl = cfg.algo.kl_in_reward
        rollout = _pad_rows([torch.tensor(s.rollout_logprobs) for s in samples], loss_mask.shape)
        reference = _pad_rows(ref_logprobs, loss_mask.shape)
        rewards, token_rewards, kl_metrics = kl_in_reward(
            rewards, rollout, reference, loss_mask, kl.coef, kl.kind, kl.clamp
        )
    score_weight = float((cfg.rollout.rewards or {}).get("score", 0.0))
    shift = _turn_reward_shift(samples, loss_mask, score_weight)
    if shift is not None:
        if token_rewards is None:  # the sequence reward on each row's last sampled token
            token_rewards = _on_last_sampled(rewards, loss_mask)
        token_rewards = token_rewards + shift
    inputs = AdvantageInputs(
        rewards=rewards,
        token_rewards=token_rewards,
        group_ids=torch.tensor([s.group_id for s in samples]),
        traj_ids=torch.tensor([s.traj_id for s in samples]),
        loss_mask=loss_mask,
        entropies=entropies,
        values=None if values is None else _pad_rows(values, loss_mask.shape),
        **_turn_inputs(samples, score_weight),
        **_tree_inputs(samples),
    )
    out = ADVANTAGES.build(cfg.algo.advantage.name, cfg.algo.advantage.params)(inputs)
    rows = [out.advantages[i, : len(s.response_ids)] for i, s in enumerate(samples)]
    if out.loss_mask is not None:  # the estimator narrowed what is trained (tree prefix dedup)
        for i, s in enumerate(samples):
            s.loss_mask = [int(m) for m in out.loss_mask[i, : len(s.response_ids)].tolist()]
    returns = (
        None
        if out.returns is None
        else [out.returns[i, : len(s.response_ids)] for i, s in enumerate(samples)]
    )
    return rows, {**out.metrics, **kl_metrics}, returns


def needs_critic(cfg: Config) -> bool:
    """Whether the configured advantage estimator reads critic values (GAE)."""
    entry = ADVANTAGES.get(cfg.algo.advantage.name)
    return "values" in entry.needs_for(
        ADVANTAGES.make_params(cfg.algo.advantage.name, cfg.algo.advantage.params)
    )


def _pad_rows(rows: list[torch.Tensor], shape: torch.Size) -> torch.Tensor:
    out = torch.zeros(shape)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def _tree_inputs(samples: list[Trajectory]) -> dict:
    """Branched samples: each row's parent and where it leaves it (grpo_tree). Trajectory mode:
    the response position where the row's own tokens start. Step-wise mode (every sample has a
    turn_idx): the episode's fork turn, and on its fork-turn row the leading tokens that are the
    parent's (a token-level fork; the rollout gives them loss_mask 0)."""
    if all(s.parent_id is None for s in samples):
        return {}
    parent_ids = torch.tensor([-1 if s.parent_id is None else s.parent_id for s in samples])
    if all(s.turn_idx is not None for s in samples):
        return {
            "parent_ids": parent_ids,
            "fork_turns": torch.tensor([s.fork_turn or 0 for s in samples]),
            "fork_positions": torch.tensor([_shared_head(s) for s in samples]),
        }
    if any(s.turn_idx is not None for s in samples):
        return {}  # a mix of step-wise and whole-episode samples has no tree
    return {"parent_ids": parent_ids, "fork_positions": torch.tensor([s.fork_token or 0 for s in samples])}


def _shared_head(s: Trajectory) -> int:
    """A step-wise branch's fork-turn sample: its leading tokens that are its parent's (loss_mask 0
    before its first own token); 0 for every other sample."""
    if s.parent_id is None or s.turn_idx != (s.fork_turn or 0):
        return 0
    return next((t for t, m in enumerate(s.loss_mask) if m), len(s.loss_mask))


def _turn_inputs(samples: list[Trajectory], score_weight: float = 0.0) -> dict:
    """Step-wise samples (every one has a turn_idx): the per-turn inputs GiGPO/EMPG read.
    Trajectory-mode samples give none (gigpo then fails naming them).

    `step_rewards` are the turn's share of the configured episode reward R (see
    `compute_advantages`): w e_k on a turn k before the episode's last, R - w sum_{j<last} e_j on
    its last (e_j the env reward after turn j, w = score_weight). GiGPO's step returns are then
    on the scale of its episode advantages (with the raw e_k they were not: ALFWorld pays e = 1
    for a win where the presets' reward is 10)."""
    if any(s.turn_idx is None for s in samples):
        return {}
    last: dict[int, int] = {}
    for s in samples:
        last[s.traj_id] = max(last.get(s.traj_id, s.turn_idx), s.turn_idx)
    earlier = _earlier_env_rewards(samples) if score_weight else [0.0] * len(samples)
    step_rewards = [
        s.reward - score_weight * before if s.turn_idx == last[s.traj_id] else score_weight * s.step_reward
        for s, before in zip(samples, earlier, strict=True)
    ]
    return {
        "turn_idx": torch.tensor([s.turn_idx for s in samples]),
        "step_rewards": torch.tensor(step_rewards, dtype=torch.float32),
        "anchor_keys": [s.anchor_key for s in samples],
    }


def _earlier_env_rewards(samples: list[Trajectory]) -> list[float]:
    """Step-wise samples: for each, the sum of the env rewards its episode received before its
    turn. A branch's turns before its fork turn are its parent's samples (up the chain)."""
    own = {(s.traj_id, s.turn_idx): s.step_reward for s in samples}
    links = {s.traj_id: (s.parent_id, s.fork_turn or 0) for s in samples}

    def env_reward(traj: int, turn: int) -> float:
        for _ in range(len(links) + 1):
            parent, fork = links[traj]
            if parent is None or turn >= fork:
                if (traj, turn) not in own:
                    raise ValueError(f"trajectory {traj} has no step-wise sample of turn {turn}")
                return own[(traj, turn)]
            if parent not in links:
                raise ValueError(
                    f"trajectory {traj} branches from {parent}, which has no sample in this batch"
                )
            traj = parent
        raise ValueError(f"parent_id links form a cycle through trajectory {traj}")

    totals: dict[int, list[float]] = {}  # traj -> running sums: totals[traj][k] = sum_{j<k} e_j
    for s in samples:
        sums = totals.setdefault(s.traj_id, [0.0])
        while len(sums) <= s.turn_idx:
            sums.append(sums[-1] + env_reward(s.traj_id, len(sums) - 1))
    return [totals[s.traj_id][s.turn_idx] for s in samples]


def _turn_reward_shift(
    samples: list[Trajectory], loss_mask: torch.Tensor, score_weight: float
) -> torch.Tensor | None:
    """[B, T] change that moves the per-turn env rewards of the configured reward to the token
    where each was earned (GAE, REINFORCE++); None when there is nothing to move.

    Added to token rewards that hold R on each row's last sampled token, it gives (with r_k as
    in `compute_advantages`): trajectory mode, r_k on the last sampled token of turn k (turn
    spans: `turn_spans`, env rewards: `info["turn_rewards"]`), i.e. +w e_k there and -w e_k on
    the row's last token, so the row's rewards still sum to R. Step-wise mode: a row is one turn
    and rows do not bootstrap from the next turn's row, so its last token gets the return from
    its turn on, sum_{j>=k} r_j = R - w sum_{j<k} e_j: the rewards received before the turn are
    no credit of its action (the estimators' gamma discounts within a row, not across rows; with
    gamma = 1 this is the trajectory-mode return at that token).
    """
    if not score_weight or not samples:
        return None
    valid = loss_mask > 0
    shift = torch.zeros(loss_mask.shape)

    def last_sampled(row: int, start: int, end: int) -> int | None:
        hits = torch.nonzero(valid[row, start:end]).flatten()
        return start + int(hits[-1]) if hits.numel() else None

    if all(s.turn_idx is not None for s in samples):
        for i, before in enumerate(_earlier_env_rewards(samples)):
            end = last_sampled(i, 0, valid.shape[1])
            if end is not None:
                shift[i, end] -= score_weight * before
        return shift if bool(shift.any()) else None
    for i, s in enumerate(samples):
        env = s.info.get("turn_rewards")
        if env is None or len(env) != len(s.turn_spans):
            raise ValueError(
                f"rollout.rewards weighs the env's per-turn rewards (score) but trajectory {s.traj_id} "
                "lacks info['turn_rewards'] aligned with its turn_spans"
            )
        end = last_sampled(i, 0, valid.shape[1])
        for (start, stop), e in zip(s.turn_spans, env, strict=True):
            at = last_sampled(i, start, stop)
            if at is not None and end is not None:
                shift[i, at] += score_weight * e
                shift[i, end] -= score_weight * e
    return shift if bool(shift.any()) else None


def _on_last_sampled(rewards: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """[B, T]: each row's reward on its last sampled token, 0 elsewhere (rows without one: 0)."""
    valid = loss_mask > 0
    positions = torch.arange(valid.shape[1]).expand_as(valid)
    last = torch.where(valid, positions, -1).amax(dim=1)
    out = torch.zeros(loss_mask.shape)
    rows = torch.nonzero(last >= 0).flatten()
    out[rows, last[rows]] = rewards[rows].float()
    return out
