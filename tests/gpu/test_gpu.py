"""The learner, the log-prob kernel, the HF engine and a short training run on a CUDA device.

Skipped without CUDA (conftest.py). On a GPU machine (scripts/gpu_check runs them on a lent one):

    DS_ACCELERATOR=cuda python -m pytest -m gpu tests/gpu -q -rs

- A learner step in bf16 under ZeRO-2 (`train.device=cuda model.dtype=bfloat16
  learner.zero_stage=2`, padded and packed) gives the gradient of the fp32 CPU step on the tiny
  Llama and fixed batch of tests/trainer/test_learner.py, within bf16's rounding; the same step in
  fp32 on the GPU (ZeRO-0) gives it to fp32 rounding. Gradients and the pre-clip norm are
  compared, not post-Adam weights (Adam's first step is ~lr * sign(grad), which hides errors).
  The learner runs in a subprocess (this file as a script, `learner` mode) so that DeepSpeed's
  accelerator (DS_ACCELERATOR=cuda) and process group are its own.
- The chunked log-prob/entropy kernel on CUDA in fp32 and bf16 against an fp64 CPU reference.
- The HF engine on CUDA: greedy decoding with the KV cache equals a full forward, seeded sampling
  repeats, and `load_weights` from another model's parameters makes it that model.
- `entrorl train configs/debug/cpu_tiny.yaml train.device=cuda model.dtype=bfloat16`, 2 steps, in
  a subprocess: exit 0, every loss finite.

`reference_step` and `token_stats_errors` also run on the CPU (tests/test_gpu_check.py checks the
reference against the CPU learner, and the kernel bounds below on CPU bf16).
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if __name__ == "__main__":  # run as a script (the learner worker): make `tests` importable
    sys.path.insert(0, str(ROOT))

from tests.conftest import build_tiny_llama  # noqa: E402
from tests.trainer.learner_worker import VOCAB, fixed_batch  # noqa: E402

pytestmark = pytest.mark.gpu

# bf16 keeps 8 significant bits (7 stored + the implicit one): rounding a value to bf16 changes it
# by at most U = 2^-8 of itself (round to nearest).
U_BF16 = 2.0**-8

# -- the learner ----------------------------------------------------------------------------------

BASE = ["learner.lr=1e-3", "learner.threads=1", "learner.micro_batch_tokens=4096"]
GPU_VARIANTS = {
    "fp32-zero0": ["train.device=cuda", "model.dtype=float32", "learner.zero_stage=0"],
    "bf16-zero2": ["train.device=cuda", "model.dtype=bfloat16", "learner.zero_stage=2"],
    "bf16-zero2-packed": ["train.device=cuda", "model.dtype=bfloat16", "learner.zero_stage=2", "learner.packing=true"],
}
# Tolerances on the gradient against the fp32 reference: relative L2 error of the whole gradient,
# of the worst single tensor, and of the pre-clip norm.
#
# fp32: the same arithmetic in another order (CUDA kernels vs CPU): ~1e-6 relative; 1e-4 leaves
# room and still catches any real difference (a dropped micro-batch, a term on the wrong tokens).
#
# bf16: the weights the forward sees are the fp32 masters rounded to bf16, and every matmul /
# norm / activation / residual of the forward and backward through the 2 layers rounds its output
# to bf16 again: ~20 roundings in series, each a relative error <= U (U = 2^-8 = 0.0039), the
# gradient is kept in bf16 too. Independent roundings add up like a random walk (sqrt(20) U ~
# 4.5 U), at worst linearly (~20 U). Measured with the same model in bf16 on the CPU: 1.4 U for the
# whole gradient, 3.2 U for the worst tensor (small tensors average fewer roundings), 0.2 U for the
# norm (errors cancel in the sum of squares). Allowed: 8 U, 16 U and 4 U. A device or dtype bug
# (an fp32/bf16 mix-up in the head, a gradient lost between micro-batches, tokens masked wrongly)
# gives O(1) relative errors, two orders of magnitude above these.
TOLERANCE = {
    "float32": {"global": 1e-4, "tensor": 1e-3, "norm": 1e-4},
    "bfloat16": {"global": 8 * U_BF16, "tensor": 16 * U_BF16, "norm": 4 * U_BF16},
}


def reference_step(model_dir: str) -> tuple[float, dict[str, torch.Tensor], float]:
    """The fp32 CPU step's policy loss, gradients and pre-clip norm on `fixed_batch()`, in plain
    torch with the learner's pieces: one padded micro-batch, the chunked kernel, ppo_clip on-policy
    (ratio 1: pi_old = the current policy, detached), token-mean over the batch's sampled tokens.
    (tests/test_gpu_check.py checks that it equals the DeepSpeed learner's step on the CPU.)"""
    from transformers import AutoModelForCausalLM

    from trainer.aggregation import aggregate
    from trainer.batch import make_micro_batch
    from trainer.logprobs import token_stats_from_hidden
    from trainer.losses import POLICY_LOSSES, LossInputs

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = False
    samples, advantages = fixed_batch()
    num_tokens = sum(s.num_sampled_tokens for s in samples)
    num_seqs = sum(s.num_sampled_tokens > 0 for s in samples)
    micro = make_micro_batch(samples, advantages, list(range(len(samples))), pack=False, share_prefix=True)
    stats = token_stats_from_hidden(micro.target_hidden(model.model), model.lm_head.weight, micro.target_ids)
    logprobs = micro.scatter(stats.logprobs)
    inputs = LossInputs(
        logprobs=logprobs,
        old_logprobs=logprobs.detach(),
        advantages=micro.advantages,
        loss_mask=micro.loss_mask,
        rollout_logprobs=micro.rollout_logprobs,
    )
    out = POLICY_LOSSES.build("ppo_clip", {})(inputs)
    loss = aggregate(out.per_token_loss, micro.loss_mask, "token-mean", num_tokens=num_tokens, num_seqs=num_seqs)
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads.values()))
    return float(loss.detach()), grads, norm


def grad_errors(grads: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict:
    """Relative L2 errors: the whole gradient, and the worst tensor (with its name)."""
    assert sorted(grads) == sorted(reference), (sorted(grads), sorted(reference))
    diff = sum(float((grads[k].double() - reference[k].double()).pow(2).sum()) for k in reference)
    size = sum(float(reference[k].double().pow(2).sum()) for k in reference)
    per_tensor = {
        k: float((grads[k].double() - reference[k].double()).norm() / reference[k].double().norm().clamp_min(1e-30))
        for k in reference
    }
    worst = max(per_tensor, key=per_tensor.get)
    return {"global": math.sqrt(diff / size), "worst_tensor": worst, "tensor": per_tensor[worst]}


def run_learner_worker(model_dir: str, out_dir: Path, variants: dict[str, list[str]], accelerator: str) -> dict:
    """Run `variants` (name -> config overrides) one after the other in a fresh process whose
    DeepSpeed accelerator is `accelerator`; returns name -> the worker's record (see `_learner`)."""
    out = Path(out_dir) / "learner.pt"
    env = dict(os.environ, DS_ACCELERATOR=accelerator, PYTHONPATH=str(ROOT))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # a 1-rank group of its own, not an enclosing launcher's
    if accelerator == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # gloo and the CPU accelerator, even on a GPU machine
    command = [sys.executable, str(Path(__file__).resolve()), "learner", model_dir, str(out), json.dumps(variants)]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"learner worker failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return torch.load(out, weights_only=True)


@pytest.fixture(scope="module")
def gpu_learner_runs(learner_model_dir, tmp_path_factory) -> dict:
    return run_learner_worker(learner_model_dir, tmp_path_factory.mktemp("gpu-learner"), GPU_VARIANTS, "cuda")


@pytest.fixture(scope="module")
def reference(learner_model_dir):
    return reference_step(learner_model_dir)


@pytest.mark.parametrize("variant", list(GPU_VARIANTS))
def test_learner_step_on_cuda_gives_the_fp32_cpu_gradient(gpu_learner_runs, reference, variant):
    run = gpu_learner_runs[variant]
    dtype = "bfloat16" if "model.dtype=bfloat16" in GPU_VARIANTS[variant] else "float32"
    tol = TOLERANCE[dtype]
    ref_loss, ref_grads, ref_norm = reference
    # it really ran there, in that dtype
    assert run["param_device"].startswith("cuda"), run["param_device"]
    assert run["param_dtype"] == f"torch.{dtype}", run["param_dtype"]
    metrics = run["metrics"]
    assert metrics["learner/optimizer_steps"] == 1.0 and metrics["learner/nonfinite_steps"] == 0.0
    assert metrics["learner/skipped_samples"] == 2.0  # the all-zero group, as on the CPU
    # on-policy the ratio is exactly 1, so the policy loss is -mean(A) in any precision
    assert metrics["loss/policy"] == pytest.approx(ref_loss, abs=1e-6)
    errors = grad_errors(run["grads"], ref_grads)
    assert errors["global"] <= tol["global"], errors
    assert errors["tensor"] <= tol["tensor"], errors
    assert metrics["learner/grad_norm"] == pytest.approx(ref_norm, rel=tol["norm"])


@pytest.mark.parametrize("variant", list(GPU_VARIANTS))
def test_learner_weights_sync_into_a_cuda_engine(gpu_learner_runs, variant):
    """`named_weights()` after the step, loaded into an HF engine on the same GPU (different
    random weights before): identical parameters, and the same logits as the learner's module."""
    sync = gpu_learner_runs[variant]["sync"]
    assert sync["engine_device"].startswith("cuda")
    assert sync["max_param_diff"] == 0.0, sync
    assert sync["max_logit_diff"] <= sync["logit_tolerance"], sync


# -- the log-prob / entropy kernel ----------------------------------------------------------------


def token_stats_errors(device: str, dtype: str, seed: int = 0) -> dict[str, float]:
    """Largest errors of `token_stats_from_hidden` on `device` in `dtype` against fp64 on the CPU,
    each as a fraction of its allowed bound (so <= 1 passes). 2500 tokens (3 chunks of 1024, the
    last partial), H = 128, V = 16384, temperature 0.8, logits ~ N(0, 3.75^2) (peaked rows, |z|
    up to ~20, as a trained model's).

    The reference is computed from the inputs as `dtype` holds them (rounded once), so what is
    measured is the kernel's own arithmetic. fp32: 1e-4 absolute on log-probs and entropies, 1e-4
    relative L2 on the gradients. bf16: the logits come out of a bf16 matmul, each rounded by at
    most U |z_v| (z = logits / T); everything after is fp32. To first order a log-prob
    lp = z_y - logsumexp(z) moves by dz_y - sum_v p_v dz_v, so |d lp| <= U (|z_y| + sum_v p_v |z_v|),
    and the entropy H = logsumexp(z) - sum_v p_v z_v moves by -sum_v p_v (z_v - zbar) dz_v, so
    |dH| <= U sum_v p_v |z_v - zbar| |z_v|. Allowed: twice these row-wise bounds (room for second
    order terms and a bf16 reduction inside the matmul) + 1e-3 (measured on CPU bf16: 0.70 and 0.62
    of the bound itself). The bf16 gradients (the backward's two matmuls round to bf16): 8 U
    relative L2 (measured 2.7 U)."""
    from trainer.logprobs import token_stats_from_hidden

    torch.manual_seed(seed)
    n, h, v, temperature = 2500, 128, 16384, 0.8
    hidden = torch.randn(n, h)
    weight = torch.randn(v, h) * (3.0 / h**0.5)
    labels = torch.randint(0, v, (n,))
    c, d = torch.randn(n), torch.randn(n)  # a loss that weighs every log-prob and entropy
    dt = getattr(torch, dtype)
    hidden_x = hidden.to(device, dt).requires_grad_(True)
    weight_x = weight.to(device, dt).requires_grad_(True)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 here
    try:
        stats = token_stats_from_hidden(
            hidden_x, weight_x, labels.to(device), temperature=temperature, with_entropy=True
        )
        (stats.logprobs @ c.to(device) + stats.entropy @ d.to(device)).backward()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32

    h64 = hidden_x.detach().cpu().double().requires_grad_(True)
    w64 = weight_x.detach().cpu().double().requires_grad_(True)
    threads = torch.get_num_threads()
    torch.set_num_threads(min(os.cpu_count() or 1, 16))  # the suite runs on 1 thread; this is ~30 GFLOP
    try:
        z = h64 @ w64.t() / temperature
        lse = torch.logsumexp(z, dim=-1)
        p = torch.softmax(z, dim=-1)
        logprobs = z.gather(-1, labels[:, None]).squeeze(-1) - lse
        entropy = lse - (p * z).sum(-1)
        (logprobs @ c.double() + entropy @ d.double()).backward()
    finally:
        torch.set_num_threads(threads)

    with torch.no_grad():
        if dtype == "bfloat16":
            zbar = (p * z).sum(-1, keepdim=True)
            z_label = z.gather(-1, labels[:, None]).squeeze(-1)
            lp_bound = 2 * U_BF16 * (z_label.abs() + (p * z.abs()).sum(-1)) + 1e-3
            h_bound = 2 * U_BF16 * (p * (z - zbar).abs() * z.abs()).sum(-1) + 1e-3
            grad_bound = 8 * U_BF16
        else:
            lp_bound = h_bound = torch.full((n,), 1e-4, dtype=torch.float64)
            grad_bound = 1e-4
        lp_err = (stats.logprobs.detach().cpu().double() - logprobs).abs()
        h_err = (stats.entropy.detach().cpu().double() - entropy).abs()

        def rel(a: torch.Tensor, b: torch.Tensor) -> float:
            return float((a.cpu().double() - b).norm() / b.norm())

        return {
            "logprobs": float((lp_err / lp_bound).max()),
            "entropy": float((h_err / h_bound).max()),
            "grad_hidden": rel(hidden_x.grad, h64.grad) / grad_bound,
            "grad_weight": rel(weight_x.grad, w64.grad) / grad_bound,
        }


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_token_stats_on_cuda_match_an_fp64_cpu_reference(dtype):
    errors = token_stats_errors("cuda", dtype)
    assert all(value <= 1.0 for value in errors.values()), errors  # fractions of the allowed bounds


# -- the HF engine --------------------------------------------------------------------------------

ENGINE_VOCAB = 256
PROMPTS = [[5, 9, 17, 33], [5, 9, 17, 33], [40, 41, 42, 43, 44, 45, 46], [7]]  # a shared prompt, a 1-token one


def _engine(model: torch.nn.Module):
    from agents.engines.hf import HFEngine

    # The engine reads the pad / EOS ids only (and decodes for stop strings, which these tests don't use).
    tokenizer = SimpleNamespace(pad_token_id=2, eos_token_id=2)
    return HFEngine(copy.deepcopy(model), tokenizer, device="cuda:0")


def _full_forward_logprobs(model: torch.nn.Module, prompt: list[int], reply: list[int]) -> torch.Tensor:
    """[len(reply), V] log-softmax at each generated position, one forward without a KV cache."""
    model = model.to("cuda:0").eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + reply], device="cuda:0"), use_cache=False).logits[0]
    return logits[len(prompt) - 1 : len(prompt) - 1 + len(reply)].float().log_softmax(-1).cpu()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_hf_engine_on_cuda_decodes_like_a_full_forward_and_load_weights_switches_models(dtype):
    from agents.engines.base import SamplingParams

    dt = getattr(torch, dtype)
    a = build_tiny_llama(ENGINE_VOCAB, seed=0, hidden=64).to(dt)
    b = build_tiny_llama(ENGINE_VOCAB, seed=1, hidden=64).to(dt)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=12)
    engine = _engine(a)
    assert {p.device.type for p in engine.model.parameters()} == {"cuda"}
    first = engine.generate(PROMPTS, greedy)
    # greedy with the KV cache (prompts prefilled once, padded batch) = argmax of a full forward;
    # bf16 rounds differently along the two paths, so there the pick only has to be a near-tie
    tol = 1e-4 if dtype == "float32" else 0.05
    for prompt, result in zip(PROMPTS, first, strict=True):
        assert result.token_ids, result
        logp = _full_forward_logprobs(a, prompt, result.token_ids)
        picked = logp.gather(-1, torch.tensor(result.token_ids)[:, None]).squeeze(-1)
        torch.testing.assert_close(torch.tensor(result.logprobs), picked, atol=tol, rtol=0)
        assert bool((picked >= logp.max(-1).values - tol).all()), (prompt, result.token_ids)
    assert first[0].token_ids == first[1].token_ids  # the shared prompt's two copies

    engine.generate(PROMPTS, greedy)  # fills the prefix cache with a's KV: load_weights must drop it
    engine.load_weights(b.named_parameters())  # CPU tensors into the CUDA engine
    after = engine.generate(PROMPTS, greedy)
    fresh = _engine(b).generate(PROMPTS, greedy)
    assert [r.token_ids for r in after] == [r.token_ids for r in fresh]
    for x, y in zip(after, fresh, strict=True):
        torch.testing.assert_close(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=1e-5, rtol=0)
    assert [r.logprobs for r in after] != [r.logprobs for r in first]  # the weights did change

    # and from CUDA tensors of another dtype (a bf16 learner's `named_weights()`), converted on copy
    source = copy.deepcopy(a).to("cuda:0", torch.bfloat16 if dtype == "float32" else torch.float32)
    engine.load_weights(source.named_parameters())
    for name, param in engine.model.named_parameters():
        assert torch.equal(param, dict(source.named_parameters())[name].to(dt)), name


def test_hf_engine_seeded_sampling_on_cuda_repeats_and_reports_the_sampling_distribution():
    from agents.engines.base import SamplingParams

    model = build_tiny_llama(ENGINE_VOCAB, seed=0, hidden=64)
    sampling = SamplingParams(temperature=1.0, max_new_tokens=16, seed=123)
    one = _engine(model).generate(PROMPTS, sampling)
    two = _engine(model).generate(PROMPTS, sampling)
    assert [r.token_ids for r in one] == [r.token_ids for r in two]
    for prompt, result in zip(PROMPTS, one, strict=True):
        logp = _full_forward_logprobs(model, prompt, result.token_ids)
        picked = logp.gather(-1, torch.tensor(result.token_ids)[:, None]).squeeze(-1)
        entropy = -(logp.exp() * logp).sum(-1)
        torch.testing.assert_close(torch.tensor(result.logprobs), picked, atol=1e-4, rtol=0)
        torch.testing.assert_close(torch.tensor(result.entropies), entropy, atol=1e-4, rtol=0)


# -- end to end -----------------------------------------------------------------------------------


def entrorl_command() -> list[str]:
    """The `entrorl` console script beside this Python, else the same CLI as a module."""
    script = Path(sys.executable).parent / "entrorl"
    return [str(script)] if script.exists() else [sys.executable, "-m", "trainer.cli"]


def test_entrorl_train_two_steps_on_cuda(gpu_number_model_dir, game_cache, tmp_path):
    pytest.importorskip("textworld")
    if not (Path(sys.executable).parent / "tw-make").exists():
        pytest.skip(f"TextWorld's tw-make is not beside {sys.executable}: the games cannot be made")
    out = tmp_path / "run"
    command = entrorl_command() + [
        "train",
        "configs/debug/cpu_tiny.yaml",
        "train.device=cuda",
        "model.dtype=bfloat16",
        f"model.name={gpu_number_model_dir}",
        f"train.output_dir={out}",
        # every sample reaches the learner (skipping zero advantages turns itself off), so both
        # steps take an optimizer step whatever the rewards
        "algo.regularizers=[{name: entropy_bonus, params: {coef: 0.01}}]",
    ]
    env = dict(os.environ, DS_ACCELERATOR="cuda", ENTRORL_CACHE=str(game_cache), PYTHONPATH=str(ROOT))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["train/steps"] == 2.0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "learner/optimizer_steps" in r]
    assert [r["step"] for r in train] == [1, 2]
    for record in train:
        assert record["learner/optimizer_steps"] == 1.0, record
        assert record.get("learner/nonfinite_steps", 0.0) == 0.0, record
        losses = {k: v for k, v in record.items() if k.startswith("loss/")}
        assert "loss/policy" in losses and "loss/entropy_bonus" in losses, sorted(record)
        assert all(math.isfinite(v) for v in losses.values()), losses
        assert math.isfinite(record["learner/grad_norm"]) and record["learner/grad_norm"] > 0, record


# -- the learner worker (this file run as a script) -----------------------------------------------


def _capture_grads(learner) -> dict[str, torch.Tensor]:
    """Fill the returned dict with every parameter's full fp32 gradient at each optimizer step,
    read between the last backward and the step (DeepSpeed's `safe_get_full_grad`: `param.grad`
    under ZeRO-0, the partitioned buffers under ZeRO-1/2)."""
    from deepspeed.utils import safe_get_full_grad

    grads: dict[str, torch.Tensor] = {}
    engine = learner.engine
    real_step = engine.step

    def step(*args, **kwargs):
        if engine.is_gradient_accumulation_boundary():
            for name, param in engine.module.named_parameters():
                grad = safe_get_full_grad(param)
                if grad is not None:
                    grads[name] = grad.detach().float().cpu().clone()
        return real_step(*args, **kwargs)

    engine.step = step
    return grads


def _sync_check(learner) -> dict:
    """Load the learner's weights into an HF engine on its device (other random weights before)."""
    from agents.engines.hf import HFEngine

    param = next(learner.engine.module.parameters())
    tokenizer = SimpleNamespace(pad_token_id=2, eos_token_id=2)
    engine = HFEngine(build_tiny_llama(VOCAB, seed=1).to(param.dtype), tokenizer, device=str(param.device))
    engine.load_weights(learner.named_weights())
    theirs = dict(learner.engine.module.named_parameters())
    with torch.no_grad():
        diff = max(float((p.float() - theirs[n].float()).abs().max()) for n, p in engine.model.named_parameters())
    ids = torch.tensor([[5, 9, 17, 33, 2]], device=param.device)
    with torch.no_grad():
        ours = engine.model(input_ids=ids).logits.float()
        learners = learner.engine.module(input_ids=ids).logits.float()
    return {
        "engine_device": str(next(engine.model.parameters()).device),
        "max_param_diff": diff,
        "max_logit_diff": float((ours - learners).abs().max()),
        # same weights, same dtype, same device: only kernel choices may differ
        "logit_tolerance": 1e-5 if param.dtype == torch.float32 else 1e-2,
    }


def _learner(model_dir: str, out: str, variants: dict[str, list[str]]) -> None:
    from trainer.config import load
    from trainer.learner.deepspeed import DeepSpeedLearner

    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 variants: full fp32 matmuls
    torch.backends.cudnn.allow_tf32 = False
    records = {}
    for name, overrides in variants.items():
        learner = DeepSpeedLearner(load(None, BASE + list(overrides)), model_dir)
        grads = _capture_grads(learner)
        metrics = learner.update(*fixed_batch())
        param = next(learner.engine.module.parameters())
        records[name] = {
            "metrics": metrics,
            "grads": grads,
            "param_device": str(param.device),
            "param_dtype": str(param.dtype),
            "sync": _sync_check(learner),
        }
        print(f"{name}: loss/policy {metrics['loss/policy']:.6g} grad_norm {metrics['learner/grad_norm']:.6g}", flush=True)
    torch.save(records, out)


if __name__ == "__main__":
    if sys.argv[1:2] != ["learner"] or len(sys.argv) != 5:
        sys.exit("usage: test_gpu.py learner MODEL_DIR OUT_FILE VARIANTS_JSON")
    _learner(sys.argv[2], sys.argv[3], json.loads(sys.argv[4]))
