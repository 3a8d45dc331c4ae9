"""A fixed learner batch, and one rank of a learner update when run as a script.

`fixed_batch()` is shared by tests/trainer/test_learner.py (1 rank, in process) and
tests/trainer/test_distributed.py, which starts this file once per rank:

    RANK=r WORLD_SIZE=2 LOCAL_RANK=r MASTER_ADDR=127.0.0.1 MASTER_PORT=p DS_ACCELERATOR=cpu \
        python tests/trainer/learner_worker.py MODEL_DIR OUT_DIR SPLIT [key=value ...]

SPLIT names, for each update in turn, which samples every rank takes ("even": halves;
"uneven": 1 sample on rank 0, 3 on rank 1). After each update rank 0 saves the parameters to
OUT_DIR/params_<k>.pt; every rank writes OUT_DIR/done_<rank> at the end.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from agents.types import Trajectory

VOCAB = 64
# Per-rank shares of the 4-sample batch used by the distributed test.
SPLITS = {"even": [[0, 1], [2, 3]], "uneven": [[0], [1, 2, 3]]}


def fixed_batch(n_groups: int = 3, group_size: int = 2, seed: int = 0, zero_groups: tuple[int, ...] = (2,)):
    """GRPO-like samples: each group shares a prompt; advantages +1 / -1 within a group (0 for
    `zero_groups`); responses mix sampled tokens (loss_mask 1) and env tokens (0).
    Returns (samples, advantages) with advantages[i] a [T_i] float tensor."""
    rng = random.Random(seed)
    samples, advantages = [], []
    for g in range(n_groups):
        prompt = [rng.randrange(3, VOCAB) for _ in range(rng.randint(4, 8))]
        for k in range(group_size):
            n = rng.randint(5, 9)
            response = [rng.randrange(3, VOCAB) for _ in range(n)]
            loss_mask = [1, 1] + [rng.choice([0, 1, 1]) for _ in range(n - 2)]
            sign = 0.0 if g in zero_groups else (1.0 if k % 2 == 0 else -1.0)
            samples.append(
                Trajectory(
                    prompt_ids=prompt,
                    response_ids=response,
                    loss_mask=loss_mask,
                    rollout_logprobs=[-4.0 * m for m in loss_mask],
                    entropies=[4.0 * m for m in loss_mask],
                    reward=max(sign, 0.0),
                    group_id=g,
                    traj_id=len(samples),
                )
            )
            advantages.append(torch.tensor(loss_mask, dtype=torch.float) * sign)
    return samples, advantages


class GradientRecorder:
    """The gradients each optimizer step applies, captured just before the step.

    Tests of "these two layouts give the same update" compare these, not the parameters after
    AdamW: Adam's first step is lr * g / (|g| + eps), so a gradient entry near 0 whose sign flips
    with the float summation order (another micro-batch split, another BLAS) moves a parameter by
    up to 2 lr either way. Two layouts sum the same per-token terms in another order, so their
    gradients agree to a few float32 ulps of the largest term: see `assert_same_gradients`.
    Works under any ZeRO stage (it reads what the inner torch optimizer steps on).
    """

    def __init__(self):
        self.steps: list[list[torch.Tensor]] = []
        self._handle = None

    def __enter__(self) -> GradientRecorder:
        def hook(optimizer, args, kwargs):
            grads = [p.grad.detach().clone() for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            self.steps.append(grads)

        self._handle = register_optimizer_step_pre_hook(hook)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()


def assert_same_gradients(a: GradientRecorder, b: GradientRecorder, rel: float = 1e-4) -> None:
    """Same gradients at every optimizer step, within `rel` of each tensor's largest entry.

    Both sides sum the same float32 terms (at most a few thousand per entry here) in different
    orders; the error of such a sum is below n * 2^-24 ~ 1e-4 of the largest partial sum, so an
    absolute tolerance of rel * max|g| (rtol the same) passes reorderings and fails a wrong term,
    which changes entries by a sizeable fraction of the gradient.
    """
    assert len(a.steps) == len(b.steps) > 0, (len(a.steps), len(b.steps))
    for k, (ga, gb) in enumerate(zip(a.steps, b.steps, strict=True)):
        assert len(ga) == len(gb), f"step {k}: {len(ga)} vs {len(gb)} gradient tensors"
        for i, (x, y) in enumerate(zip(ga, gb, strict=True)):
            scale = float(x.abs().max()) or 1.0
            torch.testing.assert_close(y, x, atol=rel * scale, rtol=rel, msg=f"step {k}, tensor {i}")


def record_full_gradients(learner) -> list[dict[str, torch.Tensor]]:
    """Each optimizer step's whole gradient by parameter name, read just before the step with
    DeepSpeed's `safe_get_full_grad` (which gathers a ZeRO-2/3 partitioned gradient: every rank
    must call it, as the wrapped step does). The list grows with each optimizer step."""
    from deepspeed.utils import safe_get_full_grad

    steps: list[dict[str, torch.Tensor]] = []
    engine, real_step = learner.engine, learner.engine.step

    def step(*args, **kwargs):
        if engine.is_gradient_accumulation_boundary():
            grads = {name: safe_get_full_grad(p) for name, p in engine.module.named_parameters()}
            steps.append({name: g.detach().clone().cpu() for name, g in grads.items() if g is not None})
        return real_step(*args, **kwargs)

    engine.step = step
    return steps


def assert_same_named_gradients(got: dict, want: dict, rel: float = 1e-4) -> None:
    """As `assert_same_gradients`, by parameter name."""
    assert got.keys() == want.keys() and want
    for name, x in want.items():
        scale = float(x.abs().max()) or 1.0
        torch.testing.assert_close(got[name], x, atol=rel * scale, rtol=rel, msg=name)


def distributed_batch():
    """4 samples, each with its own prompt, and non-zero advantages (no skipping)."""
    return fixed_batch(n_groups=4, group_size=1, seed=1, zero_groups=())


def main(model_dir: str, out_dir: str, splits: str, overrides: list[str]) -> None:
    import torch.distributed as dist

    from trainer.config import load
    from trainer.learner.deepspeed import DeepSpeedLearner

    learner = DeepSpeedLearner(load(None, overrides), model_dir)
    grads = record_full_gradients(learner)
    rank, world = dist.get_rank(), dist.get_world_size()
    samples, advantages = distributed_batch()
    for k, split in enumerate(splits.split(",")):
        mine = SPLITS[split][rank] if world > 1 else range(len(samples))
        learner.update([samples[i] for i in mine], [advantages[i] for i in mine])
        params = {name: w.clone() for name, w in learner.named_weights()}
        if rank == 0:
            torch.save(params, Path(out_dir) / f"params_{k}.pt")
            torch.save(grads[-1], Path(out_dir) / f"grads_{k}.pt")
    (Path(out_dir) / f"done_{rank}").write_text("ok")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:])
