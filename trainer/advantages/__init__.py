"""Advantage estimators: one typed input, one typed output, selected by name from `ADVANTAGES`.

Every estimator takes `AdvantageInputs` (a batch of samples, one row per sample) and its own
params dataclass, and returns `AdvantageOutput` with `advantages[B, T]` that are exactly zero
wherever `loss_mask == 0` (env/tool/padding tokens never carry an advantage).

Samples, groups and trajectories: `group_ids` ties samples of the same task and initial state;
`traj_ids` ties the samples of one episode (several of them in step-wise mode, one per turn).
Each estimator's docstring cites its paper by arXiv id and says where it departs from the paper
or the reference code (verl, verl-agent).

This package knows nothing about models, configs or distribution: statistics are over the batch
it is given, so the caller passes whole groups (DESIGN: groups stay whole on one rank).

Layout, by estimator family (every module registers its estimators in `ADVANTAGES` when it is
imported, so this package imports them all):
- `base.py`: the registry, `AdvantageInputs`/`AdvantageOutput` and the shared group statistics.
- `group.py`: group-relative outcome estimators: grpo (Dr.GRPO), rloo, reinforce_plus_plus(_baseline),
  the entropy-aware aepo, empg, ettrl, and hapo.
- `credit.py`: multi-turn and tree credit: gigpo (anchor-state step advantages), grpo_tree.
- `gae.py`: the value-based estimator, gae.
"""

from trainer.advantages.base import ADVANTAGES, AdvantageInputs, AdvantageOutput
from trainer.advantages.credit import GiGPOParams, TreeParams, gigpo, grpo_tree
from trainer.advantages.gae import GAEParams, gae
from trainer.advantages.group import (
    AEPOAdvParams,
    EMPGParams,
    ETTRLParams,
    GRPOParams,
    HAPOAdvParams,
    ReinforcePPParams,
    RLOOParams,
    aepo_advantage,
    empg,
    ettrl,
    grpo,
    hapo_advantage,
    reinforce_plus_plus,
    reinforce_plus_plus_baseline,
    rloo,
)

__all__ = [
    "ADVANTAGES",
    "AEPOAdvParams",
    "AdvantageInputs",
    "AdvantageOutput",
    "EMPGParams",
    "ETTRLParams",
    "GAEParams",
    "GRPOParams",
    "GiGPOParams",
    "HAPOAdvParams",
    "RLOOParams",
    "ReinforcePPParams",
    "TreeParams",
    "aepo_advantage",
    "empg",
    "ettrl",
    "gae",
    "gigpo",
    "grpo",
    "grpo_tree",
    "hapo_advantage",
    "reinforce_plus_plus",
    "reinforce_plus_plus_baseline",
    "rloo",
]
