"""The critic of PPO with GAE: a scalar value head on its own copy of the backbone, in its own
DeepSpeed engine (same ZeRO stage as the policy), trained on the GAE returns with the clipped
value loss (`trainer/value.py`; GAE: arXiv:1506.02438, PPO: arXiv:1707.06347). Its optimizer
steps run through the policy learner's gradient accumulation (`common.accumulate_gradients`).

It reuses the policy learner's micro-batches (`trainer/batch.py`): V_t is read at the position
whose logits predict sampled token t (the state the token was chosen in), for sampled tokens
only, so env/tool tokens of a multi-turn episode get no value and GAE skips them.
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch
from torch import Tensor

from agents.types import Trajectory
from trainer.batch import MicroBatch, make_micro_batch, plan_by_prompt
from trainer.config import Config
from trainer.device import max_over_ranks, resolve_device, sum_over_ranks
from trainer.learner.common import (
    accumulate_gradients,
    ds_config,
    dummy_micro_batch,
    global_counts,
    init_distributed,
    sample_rows,
    split,
)
from trainer.value import clipped_value_loss, explained_variance


class ValueModel(torch.nn.Module):
    """Backbone (the causal LM without its LM head) + a linear head to one scalar per position."""

    def __init__(self, backbone: torch.nn.Module, hidden_size: int):
        super().__init__()
        self.backbone = backbone
        self.value_head = torch.nn.Linear(hidden_size, 1)
        # V = 0 everywhere at the start: the first GAE advantages are the plain returns-to-go
        # instead of noise from a random head.
        torch.nn.init.zeros_(self.value_head.weight)
        torch.nn.init.zeros_(self.value_head.bias)

    def forward(self, micro: MicroBatch) -> Tensor:
        """[N] values at the micro-batch's target positions."""
        return self.value_head(micro.target_hidden(self.backbone)).squeeze(-1).float()


def build_value_model(model_path: str, gradient_checkpointing: bool = False) -> ValueModel:
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    if gradient_checkpointing:
        lm.gradient_checkpointing_enable()
    lm.config.use_cache = False
    return ValueModel(lm.get_decoder(), lm.config.hidden_size)


class DeepSpeedCritic:
    def __init__(self, cfg: Config, model_path: str):
        import deepspeed

        self.device = resolve_device(cfg.train.device)
        init_distributed(self.device)
        self.cfg = cfg
        model = build_value_model(cfg.critic.model or model_path, cfg.model.gradient_checkpointing)
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=cfg.critic.lr, betas=tuple(cfg.learner.betas), foreach=True
        )
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=ds_config(cfg)
        )

    @torch.no_grad()
    def values(self, samples: list[Trajectory]) -> list[Tensor]:
        """Each sample's [T_i] values over its response (0 where loss_mask == 0)."""
        self.engine.eval()
        out = [torch.zeros(len(s.response_ids)) for s in samples]
        micros = self._micro_batches(samples, [torch.zeros(len(s.response_ids)) for s in samples])
        for k in range(max_over_ranks(len(micros))):  # same forwards everywhere (ZeRO-3 gathers)
            if k >= len(micros):
                self.engine(dummy_micro_batch().to(self.device))
                continue
            micro = micros[k]
            rows = micro.scatter(self.engine(micro))
            for r, i in enumerate(micro.sample_index):
                out[i] = rows[r, : len(samples[i].response_ids)].cpu()
        return out

    def update(
        self, samples: list[Trajectory], returns: list[Tensor], old_values: list[Tensor]
    ) -> dict[str, float]:
        """Fit V to the returns: learner.epochs passes of learner.mini_batches optimizer steps."""
        self.engine.train()
        started = time.perf_counter()
        totals: dict[str, float] = defaultdict(float)
        for _ in range(self.cfg.learner.epochs):
            for index in split(len(samples), self.cfg.learner.mini_batches):
                self._mini_batch_step(
                    [samples[i] for i in index],
                    [returns[i] for i in index],
                    [old_values[i] for i in index],
                    totals,
                )
        steps = max(totals.pop("steps"), 1.0)
        metrics = {k: v / steps for k, v in totals.items()}
        values = torch.cat(
            [v[torch.tensor(s.loss_mask) > 0] for s, v in zip(samples, old_values, strict=True)]
        )
        targets = torch.cat([r[torch.tensor(s.loss_mask) > 0] for s, r in zip(samples, returns, strict=True)])
        metrics["critic/explained_variance"] = explained_variance(values, targets, torch.ones_like(values))
        metrics["time/critic_update"] = time.perf_counter() - started
        return metrics

    def _mini_batch_step(
        self,
        samples: list[Trajectory],
        returns: list[Tensor],
        old_values: list[Tensor],
        totals: dict[str, float],
    ) -> None:
        num_tokens, _ = global_counts(samples)
        micros = self._micro_batches(samples, returns)
        n_micro = max_over_ranks(len(micros))
        if n_micro == 0:
            return
        sums = torch.zeros(4, dtype=torch.float64)  # loss, clip_frac * n, values * n, n

        def loss_of(k: int) -> Tensor:
            micro = micros[k]
            values = micro.scatter(self.engine(micro))
            old = sample_rows(old_values, micro)
            per_token, stats = clipped_value_loss(
                values, old, micro.advantages, micro.loss_mask, self.cfg.critic.value_clip
            )
            loss = per_token.sum() / max(num_tokens, 1)
            n = float(micro.loss_mask.sum())
            sums.add_(
                torch.tensor(
                    [
                        float(loss.detach()),
                        float(stats["critic/clip_frac"]) * n,
                        float(stats["critic/values_mean"]) * n,
                        n,
                    ],
                    dtype=torch.float64,
                )
            )
            return loss

        def dummy_loss() -> Tensor:  # fewer micro-batches here: a zero loss keeps the collectives aligned
            return self.engine(dummy_micro_batch().to(self.device)).sum() * 0.0

        step = accumulate_gradients(
            self.engine,
            len(micros),
            n_micro,
            loss_of,
            dummy_loss,
            world_size=torch.distributed.get_world_size(),
            zero_stage=self.cfg.learner.zero_stage,
        )
        if step.dropped:
            totals["critic/nonfinite_steps"] += 1
        sums = sum_over_ranks(sums)
        totals["loss/critic"] += float(sums[0])
        totals["critic/clip_frac"] += float(sums[1] / max(sums[3], 1.0))
        totals["critic/values_mean"] += float(sums[2] / max(sums[3], 1.0))
        totals["steps"] += 1

    def _micro_batches(self, samples: list[Trajectory], targets: list[Tensor]) -> list[MicroBatch]:
        """Micro-batches as the policy learner builds them; `targets` ride in `advantages`."""
        learner = self.cfg.learner
        plan = plan_by_prompt(
            samples, list(range(len(samples))), learner.micro_batch_tokens, learner.share_prefix
        )
        return [
            make_micro_batch(samples, targets, idx, learner.packing, learner.share_prefix).to(self.device)
            for idx in plan
        ]
