"""Supervised fine-tuning: expert demonstrations are the tokens RL trains on, the `nll` loss is
the mean negative log-likelihood of the target tokens, SFT lowers it, and `entrorl train` with an
SFT stage (and `entrorl sft` on a JSONL file) runs end to end on a tiny model.

Run: DS_ACCELERATOR=cpu .venv/bin/python -m pytest tests/trainer/test_sft.py -q
"""

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from agents.config import RolloutConfig, SamplingConfig
from agents.engines.scripted import ScriptedEngine
from agents.prompts import Observation, build_format
from agents.rollout import Rollout
from agents.tasks import make_group_tasks, materialise
from trainer.config import load
from trainer.losses import POLICY_LOSSES, LossInputs

ROOT = Path(__file__).resolve().parents[2]
LEVEL = {"world_size": 1, "nb_objects": 3, "quest_length": 2}  # two actions: a turn after the first


# -- the format writes an action as the reply that parses back to it ---------------------------------


def test_reply_for_parses_back_to_the_action():
    obs = Observation(task="t", text="x", choices=["open box", "take key", "go north"])
    numbered = build_format("numbered")
    assert numbered.reply_for("take key", obs) == "2</action>"  # the command's number, 1-based
    assert numbered.parse(numbered.reply_for("go north", obs), obs).action == "go north"
    assert numbered.reply_for("eat key", obs) is None  # not listed: no number to pick
    tag = build_format("action_tag")
    assert tag.parse(tag.reply_for("take key", obs), obs).action == "take key"
    boxed = build_format("boxed")
    assert boxed.reply_for("\\boxed{7}", obs) == "\\boxed{7}"


# -- expert samples == the RL rollout of the same actions ------------------------------------------


def _tasks(game_cache, monkeypatch, n=2):
    monkeypatch.setenv("ENTRORL_CACHE", str(game_cache))
    picked = materialise("textworld", [1, 1 + n], LEVEL)
    return make_group_tasks("textworld", {"admissible_commands": True}, picked, 1)


@pytest.mark.parametrize("mode", ["step", "trajectory"])
def test_expert_samples_are_the_rl_samples_of_the_same_actions(mode, smol_tokenizer, game_cache, monkeypatch):
    cfg = RolloutConfig(mode=mode, format="numbered", max_turns=6, max_new_tokens=8)
    tasks = _tasks(game_cache, monkeypatch)
    expert = Rollout(None, smol_tokenizer, replace(cfg, agent="expert"))
    demos = expert.run(tasks, SamplingConfig())
    expert.close()
    assert all(e["won"] for e in demos.episodes) and max(e["turns"] for e in demos.episodes) >= 2
    # A model that samples exactly the expert's reply after each prompt the expert saw: the
    # engine looks the prompt up (an expert prompt that differs from the model's fails here).
    replies = {}
    for s in demos.samples:
        for start, end in s.turn_spans:
            context = s.prompt_ids + s.response_ids[:start]
            replies[tuple(context)] = s.response_ids[start:end]
    engine = ScriptedEngine(lambda prompt, _: replies[tuple(prompt)])
    model = Rollout(engine, smol_tokenizer, cfg)
    played = model.run(tasks, SamplingConfig())
    model.close()
    assert [e["actions"] for e in played.episodes] == [e["actions"] for e in demos.episodes]
    assert len(played.samples) == len(demos.samples)
    for a, b in zip(demos.samples, played.samples, strict=True):
        assert (a.prompt_ids, a.response_ids, a.loss_mask, a.turn_spans) == (
            b.prompt_ids,
            b.response_ids,
            b.loss_mask,
            b.turn_spans,
        )
    # the loss is on exactly the action replies: "<number></action>" of each walkthrough command
    for sample, episode in _by_episode(demos):
        targets = [smol_tokenizer.decode(sample.response_ids[i:j]) for i, j in sample.turn_spans]
        masked = [t for t, m in zip(sample.response_ids, sample.loss_mask, strict=True) if m]
        assert masked == [t for i, j in sample.turn_spans for t in sample.response_ids[i:j]]
        assert all(t.endswith("</action>") and t[: -len("</action>")].isdigit() for t in targets)
        assert len(targets) == (1 if mode == "step" else episode["turns"])


def _by_episode(result):
    episodes = {e["traj_id"]: e for e in result.episodes}
    return [(s, episodes[s.traj_id]) for s in result.samples]


def test_random_agent_plays_valid_commands_reproducibly(game_cache, monkeypatch):
    cfg = RolloutConfig(format="numbered", max_turns=3, agent="random")
    tasks = _tasks(game_cache, monkeypatch)
    runs = []
    for _ in range(2):
        rollout = Rollout(None, None, cfg)
        runs.append(rollout.run(tasks, SamplingConfig(), seed=5))
        rollout.close()
    assert [e["actions"] for e in runs[0].episodes] == [e["actions"] for e in runs[1].episodes]
    assert all(e["turns"] >= 1 and e["error"] is None for e in runs[0].episodes)


# -- the loss ---------------------------------------------------------------------------------------


def test_nll_is_the_token_mean_negative_log_likelihood():
    logprobs = torch.tensor([[-0.5, -2.0, -9.0], [-1.0, -0.1, -3.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    inputs = LossInputs(
        logprobs=logprobs, old_logprobs=logprobs.detach() + 5, advantages=torch.zeros(2, 3), loss_mask=mask
    )
    out = POLICY_LOSSES.build("nll", {})(inputs)
    # advantages (all 0 here) and pi_old are not read: -log p on the 4 target tokens, 0 elsewhere
    assert torch.allclose(out.per_token_loss, torch.tensor([[0.5, 2.0, 0.0], [0.0, 0.1, 3.0]]))
    assert float(out.metrics["loss/nll"]) == pytest.approx((0.5 + 2.0 + 0.1 + 3.0) / 4)


def test_sft_lowers_the_loss_on_a_fixed_batch(learner_model_dir):
    from tests.trainer.learner_worker import fixed_batch
    from trainer.learner.deepspeed import DeepSpeedLearner
    from trainer.sft import sft_config

    base = load(None, ["learner.threads=1", "sft.lr=3e-3"])
    learner = DeepSpeedLearner(sft_config(base, "", False, False), learner_model_dir)
    samples, advantages = fixed_batch()  # advantages +1/-1/0: the nll must not read them
    losses = [learner.update(samples, advantages)["loss/policy"] for _ in range(4)]
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses
    # the first step's loss is the token mean of -log p under the initial model, by hand
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(learner_model_dir)
    total, count = 0.0, 0
    with torch.no_grad():
        for s in samples:
            logits = model(input_ids=torch.tensor([s.prompt_ids + s.response_ids])).logits[0]
            p = len(s.prompt_ids)
            logp = logits[p - 1 : -1].log_softmax(-1).gather(1, torch.tensor(s.response_ids)[:, None])[:, 0]
            total += float(-(logp * torch.tensor(s.loss_mask)).sum())
            count += sum(s.loss_mask)
    assert math.isclose(losses[0], total / count, rel_tol=1e-4)


# -- end to end -------------------------------------------------------------------------------------


def _main(args, capsys):
    from trainer.cli import main

    threads = torch.get_num_threads()
    try:
        code = main(args)
    finally:
        torch.set_num_threads(threads)
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    return code, json.loads(lines[-1]) if lines else None, captured.err


def test_train_with_an_sft_stage_end_to_end(number_model_dir, game_cache, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ENTRORL_CACHE", str(game_cache))
    monkeypatch.chdir(ROOT)
    args = [
        "train", "configs/debug/cpu_tiny.yaml", f"model.name={number_model_dir}", f"train.output_dir={tmp_path}",
        "sft.source=expert", "sft.steps=2", "sft.batch_size=2", "train.eval_random=true",
    ]  # fmt: skip
    code, summary, _ = _main(args, capsys)
    assert code == 0
    stages = ["eval/success_before", "eval/success_after_sft", "eval/success_after", "eval/success_random"]
    assert list(summary)[:4] == stages  # the last line says each stage, in order, and the floor
    assert all(0.0 <= summary[key] <= 1.0 for key in stages), summary
    assert summary["sft/steps"] == 2.0 and summary["train/steps"] == 2.0
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    sft = [json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in sft if "loss/nll" in r]
    assert [r["step"] for r in steps] == [1, 2] and all(r["learner/optimizer_steps"] == 1 for r in steps)
    assert (tmp_path / "sft" / "model" / "model.safetensors").exists()  # RL started from it
    rl = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    floor = [r for r in rl if "eval/random/success" in r]
    assert len(floor) == 1 and floor[0]["eval/random/episodes"] == 2.0  # the 2 eval games, no model
    assert floor[0]["eval/random/success"] == summary["eval/success_random"]
    rl_config = load(tmp_path / "config.yaml")
    assert rl_config.model.name == str(tmp_path / "sft" / "model")
    assert (tmp_path / "model" / "model.safetensors").exists()
    # a second run of the same command finds the finished run and trains nothing
    code, again, _ = _main(args, capsys)
    assert code == 0 and again == summary


def test_sft_alone_on_a_jsonl_file(number_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    chats = tmp_path / "chats.jsonl"
    conversation = {
        "messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "\\boxed{4}"}]
    }
    chats.write_text("\n".join(json.dumps(conversation) for _ in range(3)) + "\n")
    out = tmp_path / "run"
    code, summary, _ = _main(
        ["sft", "configs/math/arith_cpu.yaml", f"model.name={number_model_dir}", f"sft.source={chats}",
         "sft.steps=2", "sft.batch_size=2", "train.eval_before=false", "train.eval_after=false",
         f"train.output_dir={out}", "learner.threads=1"],
        capsys,
    )  # fmt: skip
    assert code == 0 and summary["train/steps"] == 2.0
    assert (out / "model" / "model.safetensors").exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(conversation) + "\n{not json\n")
    code, _, err = _main(["sft", "configs/math/arith_cpu.yaml", f"model.name={number_model_dir}", f"sft.source={bad}",
                     f"train.output_dir={tmp_path / 'bad'}"], capsys)  # fmt: skip
    assert code == 2 and f"{bad}:2:" in err  # the file and line of the bad conversation


def test_sft_resumes_mid_pass_exactly(number_model_dir, tmp_path, monkeypatch, capsys):
    """5 conversations, 3 a step: step 2 ends one sample into the second pass over the data, so a
    resume from its checkpoint must restore the sampler's position, not restart the pass."""
    monkeypatch.chdir(ROOT)
    chats = tmp_path / "chats.jsonl"
    lines = [
        {"messages": [{"role": "user", "content": f"{a}+{b}?"}, {"role": "assistant", "content": f"\\boxed{{{a + b}}}"}]}
        for a, b in ((2, 2), (13, 5), (7, 30), (41, 8), (6, 6))
    ]
    chats.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    common = [
        "configs/math/arith_cpu.yaml", f"model.name={number_model_dir}", f"sft.source={chats}", "sft.batch_size=3",
        "sft.lr=1e-3", "train.eval_before=false", "train.eval_after=false", "train.save_model=false", "learner.threads=1",
    ]  # fmt: skip

    def losses(folder: Path) -> dict[int, float]:
        records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss/nll"] for r in records if "loss/nll" in r}

    straight, first, resumed = tmp_path / "straight", tmp_path / "first", tmp_path / "resumed"
    assert _main(["sft", *common, "sft.steps=4", f"train.output_dir={straight}"], capsys)[0] == 0
    assert _main(["sft", *common, "sft.steps=2", "train.save_every=2", f"train.output_dir={first}"], capsys)[0] == 0
    checkpoint = first / "checkpoints" / "step_00000002"
    args = ["sft", *common, "sft.steps=4", f"train.resume={checkpoint}", f"train.output_dir={resumed}"]
    assert _main(args, capsys)[0] == 0
    assert losses(first) == {k: v for k, v in losses(straight).items() if k <= 2}
    assert losses(resumed) == {k: v for k, v in losses(straight).items() if k > 2}  # bit for bit
    assert len(set(losses(straight).values())) == 4  # the batches differ: the test can tell them apart
