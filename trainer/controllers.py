"""State that spans RL steps: coefficients and reference values the regularisers read.

A controller is updated once per RL step with that step's reduced metrics
(`update(stats)`, after the optimizer step), hands its current values to the regulariser as
plain floats (`loss_kwargs()`, called as `reg(inputs, **ctrl.loss_kwargs())`), and is
checkpointed with the learner (`state_dict()` / `load_state_dict()`). Workers never own one.

`make_controller(name, params, total_steps=..., kind=...)` returns the controller a registered
regulariser (or, with kind="policy_loss", policy loss) names in its `controller` flag, or None
when the params need no state.

This module knows nothing about models or distribution: stats arrive already reduced
over the whole step (all micro-batches, all ranks).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal, Protocol

import torch

from trainer.losses import POLICY_LOSSES, BAPOParams, bapo_grid, bapo_search
from trainer.regularizers import (
    REGULARIZERS,
    AEntParams,
    EPOParams,
    KLParams,
    SIRENParams,
    TemperatureReinforceParams,
)
from trainer.sampling import select_reinforce_samples, switch_temperature


class Controller(Protocol):
    def update(self, stats: Mapping[str, float]) -> None: ...
    def loss_kwargs(self) -> dict[str, Any]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


def _read(stats: Mapping[str, float], key: str, who: str) -> float:
    if key not in stats:
        raise KeyError(f"{who} needs metric {key!r} in update(stats); got keys {sorted(stats)}")
    return float(stats[key])


class AEntController:
    """AEnt coefficient, arXiv 2509.03493. Reads "entropy/clamped_mean" (step mean of H~).

    c_{k+1} = clip(c_k - eta (min(0, H - H_low) + max(0, H - H_high)), c_min, c_max), applied
    only when `adaptive` and after `warmup_steps` updates: c rises below the band, falls above it.
    """

    stat_key = "entropy/clamped_mean"

    def __init__(self, params: AEntParams) -> None:
        self.params = params
        self.coef = params.coef
        self.step = 0

    def update(self, stats: Mapping[str, float]) -> None:
        entropy = _read(stats, self.stat_key, "AEntController")
        self.step += 1
        p = self.params
        if not p.adaptive or self.step <= p.warmup_steps:
            return
        error = min(0.0, entropy - p.entropy_low) + max(0.0, entropy - p.entropy_high)
        self.coef = min(max(self.coef - p.coef_lr * error, p.coef_min), p.coef_max)

    def loss_kwargs(self) -> dict[str, Any]:
        return {"coef": self.coef}

    def state_dict(self) -> dict[str, Any]:
        return {"coef": self.coef, "step": self.step}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.coef, self.step = float(state["coef"]), int(state["step"])


class EPOController:
    """EPO entropy history and phase weight, arXiv 2509.22576.

    history "step" (paper v2): reads "entropy/mean" (the step's mean token entropy) after each
    update; at step k the regulariser gets Href = mean of the k previous steps' entropies (None
    at k = 0). history "turn" (the released code): `observe_rollout` reads the rollout's
    "entropy/turn_{s}" before the update and Href[s] = mean over every step so far, this one
    included, of the turn-s entropies (steps whose episodes never reached turn s do not count,
    where the code's left-padding with zeros shifted indices). Both: beta_k = 1 + exp(-gamma k /
    floor(K/2)), K = total RL steps, k = updates done.
    """

    stat_key = "entropy/mean"

    def __init__(self, params: EPOParams, total_steps: int) -> None:
        if total_steps < 1:
            raise ValueError(f"EPOController needs total_steps >= 1 (trainer steps), got {total_steps}")
        self.params = params
        self.total_steps = total_steps
        self.history: list[float] = []  # "step": each update's mean entropy
        self.turn_history: list[list[float]] = []  # "turn": each step's per-turn rollout entropy
        self.updates = 0

    @property
    def step(self) -> int:
        return self.updates

    @property
    def entropy_ref(self) -> float | list[float] | None:
        if self.params.history == "turn":
            return _column_means(self.turn_history) or None
        return sum(self.history) / len(self.history) if self.history else None

    @property
    def beta(self) -> float:
        k_mid = max(1, self.total_steps // 2)
        return 1.0 + math.exp(-self.params.gamma * self.step / k_mid)

    def observe_rollout(self, metrics: Mapping[str, float]) -> None:
        """history "turn": this step's per-turn mean entropy, before its update."""
        if self.params.history != "turn":
            return
        turns = sorted(int(k.rsplit("_", 1)[1]) for k in metrics if k.startswith("entropy/turn_"))
        self.turn_history.append(
            [float(metrics[f"entropy/turn_{s}"]) for s in range(max(turns, default=-1) + 1)]
        )

    def update(self, stats: Mapping[str, float]) -> None:
        self.updates += 1
        if self.params.history == "step":
            self.history.append(_read(stats, self.stat_key, "EPOController"))

    def loss_kwargs(self) -> dict[str, Any]:
        return {"entropy_ref": self.entropy_ref, "beta": self.beta}

    def state_dict(self) -> dict[str, Any]:
        return {
            "history": list(self.history),
            "turn_history": [list(v) for v in self.turn_history],
            "updates": self.updates,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.history = [float(h) for h in state["history"]]
        self.turn_history = [[float(h) for h in v] for v in state.get("turn_history", [])]
        self.updates = int(state.get("updates", len(self.history)))


def _column_means(rows: list[list[float]]) -> list[float]:
    """Element-wise mean of ragged rows (column s over the rows that have one)."""
    width = max((len(r) for r in rows), default=0)
    return [sum(r[s] for r in rows if len(r) > s) / sum(len(r) > s for r in rows) for s in range(width)]


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, as verl's AdaptiveKLController).

    Reads "loss/kl_ref". err = clip(KL / target - 1, -0.2, 0.2); coef *= 1 + err * n / horizon,
    with n = samples in the step (stats "batch/num_samples", default 1).
    """

    stat_key = "loss/kl_ref"

    def __init__(self, params: KLParams) -> None:
        if params.target is None or params.target <= 0:
            raise ValueError(f"AdaptiveKLController needs KLParams.target > 0, got {params.target}")
        self.params = params
        self.coef = params.coef

    def update(self, stats: Mapping[str, float]) -> None:
        kl = _read(stats, self.stat_key, "AdaptiveKLController")
        error = min(max(kl / self.params.target - 1, -0.2), 0.2)
        n = float(stats.get("batch/num_samples", 1.0))
        self.coef *= 1 + error * n / self.params.horizon

    def loss_kwargs(self) -> dict[str, Any]:
        return {"coef": self.coef}

    def state_dict(self) -> dict[str, Any]:
        return {"coef": self.coef}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.coef = float(state["coef"])


class BAPOController:
    """BAPO clip bounds searched on a whole step's tokens, arXiv 2510.18927 (scope="step").

    Reads the grid sums "bapo/neg_sum/<i>" and "bapo/pos_sum/<j>" that the "bapo" loss reports
    with scope="step" (summed, or averaged with equal weights: only P/N matters) and runs
    `losses.bapo_search` on them; the next step's loss gets `clip_bounds`. Before the first
    update it passes nothing and the loss searches on its own batch.
    """

    def __init__(self, params: BAPOParams) -> None:
        self.params = params
        self.bounds: tuple[float, float] | None = None

    def update(self, stats: Mapping[str, float]) -> None:
        p = self.params
        lows = bapo_grid(p.low_start, p.low_max, p.low_step)
        highs = bapo_grid(p.high_start, p.high_max, p.high_step)
        neg = torch.tensor([_read(stats, f"bapo/neg_sum/{i}", "BAPOController") for i in range(len(lows))])
        pos = torch.tensor([_read(stats, f"bapo/pos_sum/{j}", "BAPOController") for j in range(len(highs))])
        self.bounds = bapo_search(neg, pos, p)

    def loss_kwargs(self) -> dict[str, Any]:
        return {} if self.bounds is None else {"clip_bounds": self.bounds}

    def state_dict(self) -> dict[str, Any]:
        return {"bounds": None if self.bounds is None else list(self.bounds)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        bounds = state["bounds"]
        self.bounds = None if bounds is None else (float(bounds[0]), float(bounds[1]))


class SIRENController:
    """SIREN self-anchor, arXiv 2509.25133: H_anchor = the first step's "entropy/siren_selected".

    Later updates leave the anchor fixed (they only count steps). Until the first update the
    regulariser gets entropy_anchor=None, i.e. contributes nothing.
    """

    stat_key = "entropy/siren_selected"

    def __init__(self, params: SIRENParams) -> None:
        self.params = params
        self.anchor: float | None = None
        self.step = 0

    def update(self, stats: Mapping[str, float]) -> None:
        value = _read(stats, self.stat_key, "SIRENController")
        if self.anchor is None:
            self.anchor = value
        self.step += 1

    def loss_kwargs(self) -> dict[str, Any]:
        return {"entropy_anchor": self.anchor}

    def state_dict(self) -> dict[str, Any]:
        return {"anchor": self.anchor, "step": self.step}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.anchor = None if state["anchor"] is None else float(state["anchor"])
        self.step = int(state["step"])


class TemperatureSwitchController:
    """Arbitrary-Entropy PO's temperature switch, arXiv 2510.08141. Reads "entropy/mean".

    The rollout hook asks `temperature` (T_high if the previous step's entropy H < H_target,
    else T_low) and `select(advantages)` (the positive ones: min(max, kept) if H <= H_target, else half); see
    `sampling.switch_temperature` / `sampling.select_reinforce_samples`. Before any update H is
    unknown and treated as below target. The loss term itself takes no kwargs.
    """

    stat_key = "entropy/mean"

    def __init__(self, params: TemperatureReinforceParams) -> None:
        self.params = params
        self.entropy: float | None = None

    def update(self, stats: Mapping[str, float]) -> None:
        self.entropy = _read(stats, self.stat_key, "TemperatureSwitchController")

    @property
    def temperature(self) -> float:
        p = self.params
        return switch_temperature(self.entropy, p.entropy_target, p.temperature_high, p.temperature_low)

    def select(self, advantages: list[float]) -> list[int]:
        """Indices of the temperature-T samples to keep (their advantage becomes +1)."""
        p = self.params
        return select_reinforce_samples(
            advantages,
            entropy=self.entropy,
            target=p.entropy_target,
            threshold=p.adv_threshold,
            max_samples=p.max_samples,
        )

    def loss_kwargs(self) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"entropy": self.entropy}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.entropy = None if state["entropy"] is None else float(state["entropy"])


def make_controller(
    name: str,
    params: Any,
    *,
    total_steps: int,
    kind: Literal["regularizer", "policy_loss"] = "regularizer",
) -> Controller | None:
    """The controller of registered regulariser (or policy loss) `name` with its params, or None."""
    registry = POLICY_LOSSES if kind == "policy_loss" else REGULARIZERS
    flag = registry.get(name).flags.get("controller")
    if flag == "aent":
        return AEntController(params)
    if flag == "epo":
        return EPOController(params, total_steps)
    if flag == "adaptive_kl" and params.target is not None:
        return AdaptiveKLController(params)
    if flag == "bapo" and params.scope == "step":
        return BAPOController(params)
    if flag == "siren":
        return SIRENController(params)
    if flag == "temperature_switch":
        return TemperatureSwitchController(params)
    return None
