"""Trajectories -> tensors: micro-batches sized by tokens, packed or padded.

Packed: ONE row of concatenated samples (prompt + response) whose `position_ids` restart at
every sample; transformers then builds a block-diagonal causal mask, so samples never see each
other and no token is padding. With a varlen attention kernel (flash-attention on GPU) that is
the fastest layout; with CPU sdpa the mask is dense, so attention costs L^2 over the whole row and
padded rows of similar-length samples can be faster (see scripts/bench_learner.py).
Padded: one right-padded row per sample with an attention mask.

Only positions that predict a sampled token (`loss_mask == 1`) go through the LM head. Per-token
values come back in a padded `[B, T]` layout over the responses, which is what the pure loss
functions take.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from agents.types import Trajectory


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # [R, L] prompt+response tokens (R = 1 when packed)
    position_ids: torch.Tensor  # [R, L] restarting at 0 for each sample
    attention_mask: torch.Tensor | None  # [R, L] when padded; None when packed
    target_positions: torch.Tensor  # [N] flat index into [R * L] whose logits predict a target
    target_ids: torch.Tensor  # [N] the sampled token ids to score
    target_rows: torch.Tensor  # [N] where each target lands in the [B, T] layout (row)
    target_cols: torch.Tensor  # [N] ... (column = position in the response)
    loss_mask: torch.Tensor  # [B, T]
    advantages: torch.Tensor  # [B, T]
    rollout_logprobs: torch.Tensor  # [B, T]
    sample_index: list[int]  # which samples of the step's batch these rows are

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens."""
        if self.attention_mask is None:
            return int(self.input_ids.numel())
        return int(self.attention_mask.sum())

    def scatter(self, values: torch.Tensor) -> torch.Tensor:
        """[N] per-target values -> [B, T] padded layout (zeros elsewhere); keeps autograd."""
        out = values.new_zeros(self.loss_mask.shape)
        return out.index_put((self.target_rows, self.target_cols), values)


def plan_micro_batches(lengths: list[int], token_budget: int) -> list[list[int]]:
    """Group sample indices into micro-batches of at most `token_budget` tokens (first-fit
    decreasing; a sample longer than the budget gets a micro-batch of its own)."""
    bins: list[tuple[int, list[int]]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for k, (used, members) in enumerate(bins):
            if used + lengths[i] <= token_budget:
                bins[k] = (used + lengths[i], members + [i])
                break
        else:
            bins.append((lengths[i], [i]))
    return [sorted(members) for _, members in bins]


def make_micro_batch(
    samples: list[Trajectory], advantages: list[torch.Tensor], index: list[int], pack: bool = True
) -> MicroBatch:
    """Micro-batch of `samples[index]`; `advantages[i]` is sample i's per-response-token row."""
    width = max(len(samples[i].response_ids) for i in index)
    rows = len(index)
    loss_mask = torch.zeros(rows, width)
    adv = torch.zeros(rows, width)
    rollout_lp = torch.zeros(rows, width)
    seq_len = max(len(samples[i].prompt_ids) + len(samples[i].response_ids) for i in index)
    ids, pos, t_pos, t_ids, t_row, t_col = [], [], [], [], [], []
    for row, i in enumerate(index):
        s = samples[i]
        seq = s.prompt_ids + s.response_ids
        n_resp = len(s.response_ids)
        offset = len(ids) if pack else row * seq_len
        ids += seq if pack else seq + [0] * (seq_len - len(seq))
        pos += range(len(seq)) if pack else range(seq_len)
        loss_mask[row, :n_resp] = torch.tensor(s.loss_mask, dtype=torch.float)
        adv[row, :n_resp] = advantages[i][:n_resp]
        rollout_lp[row, :n_resp] = torch.tensor(s.rollout_logprobs)
        for j in (j for j, m in enumerate(s.loss_mask) if m):
            t_pos.append(offset + len(s.prompt_ids) + j - 1)  # logits at t predict token t+1
            t_ids.append(s.response_ids[j])
            t_row.append(row)
            t_col.append(j)
    long = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    shape = (1, -1) if pack else (rows, seq_len)
    attention_mask = None
    if not pack:
        lengths = torch.tensor([len(samples[i].prompt_ids) + len(samples[i].response_ids) for i in index])
        attention_mask = (torch.arange(seq_len).unsqueeze(0) < lengths.unsqueeze(1)).long()
    return MicroBatch(
        input_ids=long(ids).view(shape),
        position_ids=long(pos).view(shape),
        attention_mask=attention_mask,
        target_positions=long(t_pos),
        target_ids=long(t_ids),
        target_rows=long(t_row),
        target_cols=long(t_col),
        loss_mask=loss_mask,
        advantages=adv,
        rollout_logprobs=rollout_lp,
        sample_index=list(index),
    )


def response_tensors(samples: list[Trajectory]) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss_mask [B, T], entropies [B, T]) over responses, right-padded with zeros."""
    width = max((len(s.response_ids) for s in samples), default=0)
    loss_mask = torch.zeros(len(samples), width)
    entropies = torch.zeros(len(samples), width)
    for row, s in enumerate(samples):
        loss_mask[row, : len(s.loss_mask)] = torch.tensor(s.loss_mask, dtype=torch.float)
        entropies[row, : len(s.entropies)] = torch.tensor(s.entropies)
    return loss_mask, entropies
