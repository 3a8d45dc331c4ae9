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
