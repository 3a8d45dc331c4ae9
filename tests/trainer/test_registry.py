"""Registry: build with validated params, clear errors. Run: pytest tests/trainer/test_registry.py"""

from dataclasses import dataclass
from typing import Literal

import pytest

from trainer.advantages import ADVANTAGES
from trainer.aggregation import AGGREGATIONS
from trainer.losses import POLICY_LOSSES
from trainer.registry import Registry


@dataclass(frozen=True)
class _Params:
    scale: float = 1.0
    steps: int = 2
    on: bool = True
    mode: Literal["a", "b"] = "a"
    cap: float | None = None


def _make():
    reg = Registry("widget")

    @reg.register("double", params=_Params, needs={"entropy"}, note="x")
    def double(x, params):
        return 2 * x * params.scale

    @reg.register("plain")
    def plain(x, params):
        return x

    return reg


def test_build_binds_validated_params():
    reg = _make()
    fn = reg.build("double", {"scale": 3, "cap": None})
    assert fn(1.0) == 6.0
    assert isinstance(fn.params.scale, float)  # int promoted to float
    assert fn.needs == {"entropy"} and fn.needs_entropy and fn.flags == {"note": "x"}
    assert reg.build("plain")(5) == 5 and not reg.build("plain").needs_entropy
    assert reg.build("double", _Params(scale=0.5))(2.0) == 2.0


def test_unknown_name_lists_registered():
    with pytest.raises(KeyError, match="double, plain"):
        _make().build("tripple")


def test_unknown_key_lists_valid_keys():
    with pytest.raises(KeyError, match="scale, steps, on, mode, cap"):
        _make().build("double", {"scael": 1.0})
    with pytest.raises(KeyError, match="takes no params"):
        _make().build("plain", {"x": 1})


@pytest.mark.parametrize(
    "params", [{"scale": "big"}, {"steps": 1.5}, {"on": 1}, {"mode": "c"}, {"cap": "x"}, {"steps": True}]
)
def test_wrong_types_rejected(params):
    with pytest.raises(TypeError, match="should be"):
        _make().build("double", params)


def test_duplicate_registration_raises():
    reg = _make()
    with pytest.raises(ValueError, match="already registered"):

        @reg.register("plain")
        def other(x, params):
            return x


def test_project_registries_have_core_entries():
    assert {"grpo", "rloo"} <= set(ADVANTAGES.names())
    assert "ppo_clip" in POLICY_LOSSES
    assert {"token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"} <= set(
        AGGREGATIONS.names()
    )
    with pytest.raises(KeyError, match="ppo_clip"):
        POLICY_LOSSES.build("ppo")
    with pytest.raises(KeyError, match="clip_low, clip_high, dual_clip, log_ratio_clamp"):
        POLICY_LOSSES.build("ppo_clip", {"clip_ratio": 0.2})
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        POLICY_LOSSES.build("ppo_clip", {"dual_clip": 0.5})
