"""Loop hooks of entropy methods that read the rollout, through the real loop on cpu_tiny (tiny
Llama, real TextWorld games, real DeepSpeed): EPO's per-turn entropy history (the released
code's mode) and Arbitrary-Entropy PO's temperature-switched extra samples.

Run: DS_ACCELERATOR=cpu .venv/bin/python -m pytest tests/trainer/test_loop_hooks.py -q
"""

from pathlib import Path

import pytest
import torch

from trainer.config import load

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def make_trainer(number_model_dir, game_cache, monkeypatch, tmp_path):
    from trainer.loop import Trainer

    monkeypatch.setenv("ENTRORL_CACHE", str(game_cache))
    threads = torch.get_num_threads()

    def make(*overrides: str) -> Trainer:
        base = [
            f"model.name={number_model_dir}", f"train.output_dir={tmp_path}", "train.steps=2",
            "train.eval_before=false", "train.eval_after=false", "train.save_model=false", "learner.threads=1",
        ]  # fmt: skip
        return Trainer(load(ROOT / "configs/debug/cpu_tiny.yaml", [*base, *overrides]))

    yield make
    torch.set_num_threads(threads)


EPO_TURN = "algo.regularizers=[{name: epo, params: {history: turn}}]"


def test_epo_turn_history_needs_step_samples(make_trainer):
    with pytest.raises(ValueError, match="rollout.mode=step"):
        make_trainer(EPO_TURN)


def test_epo_turn_history_follows_the_rollout(make_trainer):
    run = make_trainer(EPO_TURN, "rollout.mode=step")
    epo = run.learner.controllers["epo"]
    seen = []
    for step in (1, 2):
        run.current_step = step
        metrics = run.step()
        seen.append([metrics[f"entropy/turn_{s}"] for s in range(len(epo.turn_history[-1]))])
    assert epo.turn_history == [pytest.approx(v) for v in seen]
    assert epo.updates == 2
    first_turn = [v[0] for v in seen]
    assert epo.entropy_ref[0] == pytest.approx(sum(first_turn) / 2)


# entropy target 100: always below it, so T_high (1.2) and every sample kept (threshold -1)
AE_PO = (
    "algo.regularizers=[{name: temperature_reinforce, params: "
    "{entropy_target: 100.0, adv_threshold: -1.0, temperature_high: 1.2}}]"
)


def test_arbitrary_entropy_po_adds_temperature_samples(make_trainer):
    run = make_trainer(AE_PO)
    run.current_step = 1
    metrics = run.step()
    assert metrics["reinforce/temperature"] == 1.2
    assert metrics["reinforce/played"] == 2.0 and metrics["reinforce/kept"] == 2.0  # 1 task x group 2
    extras = [s for s in run.last_samples if s.reinforce]
    assert len(extras) == 2 and len(run.last_samples) == 4 + 2
    for sample, row in zip(run.last_samples, run.last_advantages, strict=True):
        if sample.reinforce:  # advantage +1 on every sampled token
            assert torch.equal(row, torch.tensor(sample.loss_mask, dtype=torch.float32))
    assert metrics["loss/reinforce_token_frac"] > 0
    switch = run.learner.controllers["temperature_reinforce"]
    assert switch.entropy == pytest.approx(metrics["entropy/mean"])  # read back for the next switch


def test_reinforce_term_gives_the_gradient_of_ordinary_samples(learner_model_dir):
    """With coef 1 on an on-policy pass, flagged samples trained by -A log pi give the same
    update as the same samples in the PPO loss (ratio 1): the reference's "ordinary samples
    with advantage +1"."""
    from tests.trainer.learner_worker import fixed_batch
    from trainer.learner.deepspeed import DeepSpeedLearner

    base = ["learner.lr=1e-3", "learner.threads=1", "learner.micro_batch_tokens=4096"]
    reg = "algo.regularizers=[{name: temperature_reinforce, params: {coef: 1.0}}]"
    samples, advantages = fixed_batch()
    plain = DeepSpeedLearner(load(None, base), learner_model_dir)
    want = plain.update(samples, advantages)
    for s in samples[:2]:
        s.reinforce = True
    flagged = DeepSpeedLearner(load(None, [*base, reg]), learner_model_dir)
    got = flagged.update(samples, advantages)
    assert got["learner/grad_norm"] == pytest.approx(want["learner/grad_norm"], rel=1e-5)
    reference = dict(plain.named_weights())
    for name, weight in flagged.named_weights():
        torch.testing.assert_close(weight, reference[name], atol=1e-6, rtol=0, msg=name)
