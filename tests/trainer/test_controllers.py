"""Controllers for BAPO, SIREN and Arbitrary-Entropy PO: updates, kwargs, checkpoints.
Run: pytest tests/trainer/test_controllers.py (AEnt/EPO/KL controllers are in test_losses.py)"""

import pytest

from trainer.controllers import BAPOController, SIRENController, TemperatureSwitchController, make_controller
from trainer.losses import POLICY_LOSSES
from trainer.regularizers import REGULARIZERS


def _bapo_stats(neg, pos):
    return {
        **{f"bapo/neg_sum/{i}": v for i, v in enumerate(neg)},
        **{f"bapo/pos_sum/{j}": v for j, v in enumerate(pos)},
    }


def test_bapo_controller_searches_on_step_sums():
    params = POLICY_LOSSES.make_params("bapo", {"scope": "step", "high_max": 1.4, "high_step": 0.1})
    assert (
        make_controller("bapo", POLICY_LOSSES.make_params("bapo"), total_steps=1, kind="policy_loss") is None
    )
    ctrl = make_controller("bapo", params, total_steps=1, kind="policy_loss")
    assert isinstance(ctrl, BAPOController)
    assert ctrl.loss_kwargs() == {}  # first step: the loss searches its own batch
    # same sums as test_losses.test_bapo_grid_and_search: P/N reaches 1 at c_low = .75
    ctrl.update(_bapo_stats([2.34, 1.72, 1.72, 1.0, 1.0], [1.0, 2.3, 2.3]))
    assert ctrl.loss_kwargs()["clip_bounds"] == pytest.approx((0.75, 1.2))
    fresh = BAPOController(params)
    fresh.load_state_dict(ctrl.state_dict())
    assert fresh.loss_kwargs() == ctrl.loss_kwargs()
    with pytest.raises(KeyError, match="bapo/neg_sum/0"):
        ctrl.update({})


def test_siren_controller_anchors_on_the_first_step():
    ctrl = make_controller("siren", REGULARIZERS.make_params("siren"), total_steps=10)
    assert isinstance(ctrl, SIRENController)
    assert ctrl.loss_kwargs() == {"entropy_anchor": None}
    ctrl.update({"entropy/siren_selected": 0.7})
    ctrl.update({"entropy/siren_selected": 0.2})  # later steps do not move the anchor
    assert ctrl.loss_kwargs() == {"entropy_anchor": 0.7}
    fresh = SIRENController(ctrl.params)
    fresh.load_state_dict(ctrl.state_dict())
    assert fresh.state_dict() == {"anchor": 0.7, "step": 2}


def test_temperature_switch_controller():
    params = REGULARIZERS.make_params("temperature_reinforce", {"entropy_target": 0.5, "max_samples": 3})
    ctrl = make_controller("temperature_reinforce", params, total_steps=1)
    assert isinstance(ctrl, TemperatureSwitchController)
    assert ctrl.temperature == 1.2  # no entropy yet: treated as below target
    advantages = [0.9, 0.01, 0.5, 0.3, 0.2]  # > .05: indices 0, 2, 3, 4
    assert ctrl.select(advantages) == [0, 2, 3]  # min(3, 4)
    ctrl.update({"entropy/mean": 0.8})  # above target: cool down, keep half
    assert ctrl.temperature == 0.8 and ctrl.select(advantages) == [0]
    fresh = TemperatureSwitchController(params)
    fresh.load_state_dict(ctrl.state_dict())
    assert fresh.temperature == 0.8 and fresh.loss_kwargs() == {}
