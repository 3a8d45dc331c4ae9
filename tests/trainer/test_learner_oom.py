"""Out-of-memory in the learner (issue #9): the mini-batch is retried with half the micro-batch
token budget and gives the same update as a run configured with that budget from the start; an
OOM that smaller micro-batches cannot fix is raised (the loop then names the knobs).

The OOM is injected (a stand-in for a GPU allocator failure, which a CPU cannot produce on
demand): `_token_stats` raises torch.OutOfMemoryError once, on its first call or on its second
(after the first micro-batch's backward has accumulated gradients the retry must discard).
"""

import pytest
import torch

from tests.trainer.learner_worker import fixed_batch
from trainer.config import load

BASE = ["learner.lr=1e-3", "learner.threads=1", "learner.share_prefix=false"]


def make_learner(model_dir, *overrides):
    from trainer.learner.deepspeed import DeepSpeedLearner

    return DeepSpeedLearner(load(None, BASE + list(overrides)), model_dir)


def fail_once(learner, on_call: int):
    original, calls = learner._token_stats, [0]

    def stats(*args, **kwargs):
        calls[0] += 1
        if calls[0] == on_call:
            raise torch.OutOfMemoryError("stand-in: CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(*args, **kwargs)

    learner._token_stats = stats


# ZeRO-0 retries after a backward (its gradients are plain .grad); ZeRO-2 only before one.
@pytest.mark.parametrize(("zero_stage", "on_call"), [(0, 2), (0, 1), (2, 1)])
def test_oom_retry_gives_the_update_of_the_smaller_budget(learner_model_dir, zero_stage, on_call):
    retried = make_learner(
        learner_model_dir, "learner.micro_batch_tokens=32", f"learner.zero_stage={zero_stage}"
    )
    fail_once(retried, on_call)
    metrics = retried.update(*fixed_batch())
    assert metrics["learner/oom_retries"] == 1.0
    assert retried.micro_batch_tokens == 16 and metrics["learner/micro_batch_tokens"] == 16.0
    assert metrics["learner/optimizer_steps"] == 1.0

    clean = make_learner(
        learner_model_dir, "learner.micro_batch_tokens=16", f"learner.zero_stage={zero_stage}"
    )
    expected = clean.update(*fixed_batch())
    assert metrics["loss/policy"] == pytest.approx(expected["loss/policy"], rel=1e-6)
    assert metrics["learner/grad_norm"] == pytest.approx(expected["learner/grad_norm"], rel=1e-5)
    want = dict(clean.named_weights())
    for name, weight in retried.named_weights():
        torch.testing.assert_close(weight, want[name], atol=1e-7, rtol=0, msg=name)


def test_oom_after_a_zero2_backward_is_raised(learner_model_dir):
    learner = make_learner(learner_model_dir, "learner.micro_batch_tokens=32", "learner.zero_stage=2")
    fail_once(learner, on_call=2)  # the first micro-batch's gradients are in ZeRO's buffers
    with pytest.raises(torch.OutOfMemoryError):
        learner.update(*fixed_batch())


def test_oom_that_smaller_micro_batches_cannot_fix_is_raised(learner_model_dir):
    learner = make_learner(learner_model_dir, "learner.micro_batch_tokens=1")  # one sample each already

    def always(*args, **kwargs):
        raise torch.OutOfMemoryError("stand-in: out of memory")

    learner._token_stats = always
    with pytest.raises(torch.OutOfMemoryError):
        learner.update(*fixed_batch())
    assert learner.micro_batch_tokens == 1
