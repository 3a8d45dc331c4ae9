"""Device discipline, proved on a CPU machine.

Gloo takes CPU tensors whatever the model's device, and every CPU tensor meets a CPU model, so
CPU runs cannot see a tensor on the wrong device; on a GPU that is the first forward's crash.
Here the learner's model lives on PyTorch's `meta` device (a stand-in for the accelerator: no
data, real shapes and dtypes) and `DeviceGuard` fails any op that mixes a meta tensor with a
CPU tensor of one or more dimensions. Meta alone is not enough: some ops (an embedding lookup
with CPU indices on a meta weight) accept the mix silently. Explicit transfers (`.to`, `copy_`)
are allowed; a meta -> CPU transfer and reading a value (`.item()`) return stand-in data,
since meta tensors have none: 0.5 for a scalar and zeros, and a data-dependent selection
(`nonzero`, boolean indexing) keeps every element.

The collectives are checked the same way: with the process group claiming NCCL over 2 ranks,
every all-reduce / all-gather must receive accelerator (meta) tensors, as NCCL demands.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.fx.experimental._config  # noqa: F401  (meta_nonzero_assume_all_nonzero)
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import trainer.device as device_mod
from tests.trainer.learner_worker import fixed_batch
from trainer.config import load

META = torch.device("meta")
aten = torch.ops.aten
_TRANSFERS = {aten._to_copy.default, aten.copy_.default, aten.lift_fresh.default, aten._pin_memory.default}


class DeviceGuard(TorchDispatchMode):
    """Fails an op that mixes meta and non-scalar CPU tensors; fakes the values meta lacks."""

    def __init__(self):
        super().__init__()
        self.ops = 0  # how many ops touched a meta tensor (proves the mode saw the update)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        on_meta = [t for t in tensors if t.device.type == "meta"]
        if on_meta:
            self.ops += 1
        if func in _TRANSFERS:
            target = kwargs.get("device") or (args[0].device if func is aten.copy_.default else None)
            if on_meta and target is not None and torch.device(target).type == "cpu":
                # device -> host: meta has no data, hand back zeros of the right shape
                source = args[1] if func is aten.copy_.default else args[0]
                if func is aten.copy_.default:
                    return args[0].zero_()
                return torch.zeros(source.shape, dtype=kwargs.get("dtype") or source.dtype)
            return func(*args, **kwargs)
        cpu = [t for t in tensors if t.device.type == "cpu" and t.dim() > 0]
        if on_meta and cpu:
            shapes = [tuple(t.shape) for t in cpu]
            raise AssertionError(f"{func} mixes the model's device (meta) with CPU tensors {shapes}")
        if on_meta and func is aten._local_scalar_dense.default:
            value = 0.5 if args[0].dtype.is_floating_point else 1
            return bool(value) if args[0].dtype == torch.bool else value
        return func(*args, **kwargs)

    def __enter__(self):
        # a data-dependent selection (nonzero, boolean indexing) on meta keeps every element
        self._assume = torch.fx.experimental._config.patch(meta_nonzero_assume_all_nonzero=True)
        self._assume.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        self._assume.__exit__(*exc)
        return super().__exit__(*exc)


def _on_meta(learner) -> None:
    """Move the learner's model (and reference) to meta and keep DeepSpeed out of backward/step:
    what is checked is everything that meets the model, not DeepSpeed's own device handling."""
    learner.engine.module.to(META)
    if learner.ref_model is not None:
        learner.ref_model.to(META)
    learner.device = META
    learner.engine.backward = lambda loss: loss.backward()
    learner.engine.step = lambda: None
    learner.engine.set_gradient_accumulation_boundary = lambda flag: None
    learner.engine.get_global_grad_norm = lambda: None
    # transformers' train()/eval() re-select kernels for the model's device, and know no meta
    learner.engine.train = learner.engine.eval = lambda *args: None


def _update_on_meta(model_dir, *overrides: str) -> tuple[dict, int]:
    from trainer.learner.deepspeed import DeepSpeedLearner

    learner = DeepSpeedLearner(load(None, ["learner.threads=1", *overrides]), model_dir)
    _on_meta(learner)
    samples, advantages = fixed_batch()
    with DeviceGuard() as guard:
        metrics = learner.update(samples, advantages)
        if learner.ref_model is not None:
            learner.reference_logprobs(samples)  # KL in the reward reads these
    return metrics, guard.ops


# Every registered policy loss, regulariser and token-weight term, and the paths around them:
# several mini-batches with pi_old recomputed, global batch statistics, forking tokens, TIS.
CASES = {
    "ppo_clip": (),
    "aepo": ("algo.loss.name=aepo",),
    "bapo": ("algo.loss.name=bapo",),
    "ce_gppo": ("algo.loss.name=ce_gppo",),
    "clip_cov": ("algo.loss.name=clip_cov",),
    "gspo": ("algo.loss.name=gspo",),
    "hapo": ("algo.loss.name=hapo",),
    "kl_cov": ("algo.loss.name=kl_cov",),
    "global_stats": ("algo.loss.name=hapo", "algo.stats_scope=global", "algo.token_weights.name=steer"),
    "steer": ("algo.token_weights.name=steer",),
    "regularisers": (
        "algo.regularizers=[{name: entropy_bonus}, {name: aent}, {name: epo}, {name: kl}, {name: siren}]",
    ),
    "temperature_reinforce": ("algo.regularizers=[{name: temperature_reinforce}]",),
    "forking_tokens": ("algo.forking_tokens=0.2", "algo.stats_scope=global"),
    "lora": ("model.lora.rank=4",),
    "kl_reference": ("algo.kl_in_reward.coef=0.01",),
    "recomputed_pi_old": (
        "learner.mini_batches=2",
        "train.tasks_per_step=2",
        "train.max_staleness=1",
        "algo.rollout_is=token",
    ),
}


@pytest.mark.parametrize("overrides", CASES.values(), ids=CASES.keys())
def test_every_tensor_meets_the_model_on_its_device(learner_model_dir, overrides):
    metrics, ops = _update_on_meta(learner_model_dir, *overrides)
    assert ops > 100  # the model ran on meta under the guard
    assert "loss/policy" in metrics


def test_the_guard_catches_a_cpu_tensor_meeting_the_model():
    """The guard is what makes the test above able to fail: plain meta lets this through."""
    weight = torch.randn(8, 4, device=META)
    ids = torch.tensor([[1, 2, 3]])
    torch.nn.functional.embedding(ids, weight)  # silently accepted without the guard
    with DeviceGuard(), pytest.raises(AssertionError, match="mixes the model's device"):
        torch.nn.functional.embedding(ids, weight)
    with DeviceGuard():  # scalars and explicit transfers are fine, as on CUDA
        torch.nn.functional.embedding(ids.to(META), weight) * torch.tensor(2.0)


@pytest.fixture
def nccl_world(monkeypatch):
    """The process group claims NCCL over 2 ranks; collectives record the devices they get.
    The accelerator is meta (no CUDA here); a collective leaves its tensors as they are."""
    seen: list[torch.device] = []

    def record(tensor_or_list, *rest, **kwargs):
        for t in tensor_or_list if isinstance(tensor_or_list, list) else [tensor_or_list]:
            seen.append(t.device)
        for t in rest[0] if rest and isinstance(rest[0], torch.Tensor) else []:
            seen.append(t.device)

    def all_gather(out, tensor, **kwargs):
        seen.append(tensor.device)
        seen.extend(t.device for t in out)
        for t in out:
            t.copy_(tensor)

    def all_gather_object(out, obj, **kwargs):
        out[:] = [obj] * len(out)

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: 2)
    monkeypatch.setattr(dist, "get_backend", lambda *a, **k: "nccl")
    monkeypatch.setattr(dist, "all_reduce", record)
    monkeypatch.setattr(dist, "all_gather", all_gather)
    monkeypatch.setattr(dist, "all_gather_object", all_gather_object)
    monkeypatch.setattr(device_mod, "accelerator_device", lambda: META)
    return seen


def test_collective_helpers_hand_nccl_the_accelerators_tensors(nccl_world):
    with DeviceGuard():
        assert device_mod.sum_over_ranks(torch.tensor([1.0, 2.0])).device.type == "cpu"
        device_mod.max_over_ranks(3)
        device_mod.any_rank(True)
        device_mod.all_gather_1d(torch.arange(3.0))
    assert nccl_world and set(nccl_world) == {META}


@pytest.mark.parametrize("overrides", [CASES["ppo_clip"], CASES["forking_tokens"], CASES["global_stats"]],
                         ids=["ppo_clip", "forking_tokens", "global_stats"])  # fmt: skip
def test_a_learner_update_hands_nccl_only_accelerator_tensors(learner_model_dir, nccl_world, overrides):
    """Every collective of an update (token counts, micro-batch counts, loss terms, global
    statistics, metrics) goes through trainer.device; a direct dist call with a CPU tensor fails."""
    from trainer.learner.deepspeed import DeepSpeedLearner

    with pytest.MonkeyPatch.context() as mp:  # build with the real 1-rank group
        mp.setattr(dist, "get_world_size", dist.distributed_c10d.get_world_size)
        mp.setattr(dist, "get_backend", dist.distributed_c10d.get_backend)
        mp.setattr(dist, "is_initialized", dist.distributed_c10d.is_initialized)
        learner = DeepSpeedLearner(load(None, ["learner.threads=1", *overrides]), learner_model_dir)
    _on_meta(learner)
    with DeviceGuard():
        learner.update(*fixed_batch())
    assert len(nccl_world) >= 4 and set(nccl_world) == {META}, nccl_world


def test_cuda_without_cuda_fails_before_anything_loads(capsys, monkeypatch):
    from trainer import cli

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    import trainer.loop

    def must_not_build(*args, **kwargs):
        raise AssertionError("the Trainer (model, DeepSpeed) was built before the device check")

    monkeypatch.setattr(trainer.loop, "Trainer", must_not_build)
    assert cli.main(["train", "configs/debug/cpu_tiny.yaml", "train.device=cuda"]) == 2
    err = capsys.readouterr().err
    assert "train.device=cuda" in err and "train.device=cpu" in err


def test_more_ranks_than_gpus_names_the_launch_fix(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert device_mod.resolve_device("cuda") == torch.device("cuda", 1)
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(device_mod.DeviceError, match="only 2 are visible.*NUM_GPUS=2"):
        device_mod.resolve_device("cuda")
    with pytest.raises(device_mod.DeviceError, match="train.device='tpu'"):
        device_mod.resolve_device("tpu")


def test_the_critic_moves_its_micro_batches_to_the_models_device(learner_model_dir):
    """PPO's value model (its own DeepSpeed engine): values and a value-loss update on meta."""
    from trainer.learner.critic import DeepSpeedCritic

    critic = DeepSpeedCritic(load(None, ["learner.threads=1", "algo.advantage.name=gae"]), learner_model_dir)
    critic.engine.module.to(META)
    critic.device = META
    critic.engine.backward = lambda loss: loss.backward()
    critic.engine.step = lambda: None
    critic.engine.set_gradient_accumulation_boundary = lambda flag: None
    critic.engine.train = critic.engine.eval = lambda *args: None
    critic.engine.forward = critic.engine.module.forward  # DeepSpeed's own hooks know no meta
    samples, returns = fixed_batch()
    with DeviceGuard() as guard:
        values = critic.values(samples)
        metrics = critic.update(samples, returns, values)
    assert guard.ops > 20 and all(v.device.type == "cpu" for v in values) and "loss/critic" in metrics
