"""Trajectories -> tensors: micro-batches sized by tokens, with shared prompts computed once.

Samples of a GRPO group often have the same prompt (every episode of a task starts from the same
state, and step-wise prompts repeat whenever the observation repeats). A micro-batch therefore
holds *segments*: one prompt followed by the responses of every sample with that prompt,

    [ prompt | response 1 | response 2 | ... ]    positions: 0..p-1 | p.. | p.. | ...

with a 4-D attention mask under which each response sees the prompt and itself only. Hidden
states equal those of the separate sequences, and the gradient through the shared prompt is the
exact sum of the per-sample gradients, but the prompt is run once instead of once per sample.

Segments are laid out either packed (all in one row: no padding; with CPU sdpa the mask is
dense, so attention costs L^2 over the row) or padded (one row per segment). Only positions that
predict a sampled token (`loss_mask == 1`) go through the LM head. Per-token values come back in
a `[B, T]` layout over responses (one row per sample), which is what the loss functions take.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch

from agents.types import Trajectory


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # [R, L] rows of segments
    position_ids: torch.Tensor  # [R, L] as in each sample's own sequence
    attention_mask: torch.Tensor  # [R, 1, L, L] bool, True = may attend
    target_positions: torch.Tensor  # [N] flat index into [R * L] whose logits predict a target
    target_ids: torch.Tensor  # [N] the sampled token ids to score
    target_rows: torch.Tensor  # [N] where each target lands in the [B, T] layout (row)
    target_cols: torch.Tensor  # [N] ... (column = position in the response)
    loss_mask: torch.Tensor  # [B, T]
    advantages: torch.Tensor  # [B, T]
    rollout_logprobs: torch.Tensor  # [B, T]
    sample_index: list[int]  # which samples of the step's batch the B rows are
    num_tokens: int = 0  # tokens run through the model (no padding, shared prompts once)
    old_logprobs: torch.Tensor | None = None  # [B, T] pi_old recorded before the update (off-policy)
    turn_idx: torch.Tensor | None = None  # [B] step-wise samples' turns, when a loss term reads them
    reinforce_mask: torch.Tensor | None = None  # [B, T] Arbitrary-Entropy PO's extra samples' tokens

    def to(self, device: torch.device | str) -> MicroBatch:
        """This micro-batch with every tensor on `device` (the model's): one copy per micro-batch,
        from pinned memory and asynchronous on CUDA. A no-op on the device it is already on."""
        device = torch.device(device)
        cuda = device.type == "cuda"

        def move(t):
            if not isinstance(t, torch.Tensor) or t.device == device:
                return t
            if cuda and t.device.type == "cpu":
                t = t.pin_memory()
            return t.to(device, non_blocking=cuda)

        return replace(self, **{f.name: move(getattr(self, f.name)) for f in fields(self)})

    @property
    def device(self) -> torch.device:
        return self.input_ids.device

    def target_hidden(self, decoder: torch.nn.Module) -> torch.Tensor:
        """[N, H] the decoder's last hidden states at the target positions (the inputs of the
        LM head for the policy, of the value head for the critic)."""
        hidden = decoder(
            input_ids=self.input_ids,
            position_ids=self.position_ids,
            attention_mask=self.attention_mask,
            use_cache=False,
        ).last_hidden_state
        return hidden.reshape(-1, hidden.shape[-1])[self.target_positions]

    def scatter(self, values: torch.Tensor) -> torch.Tensor:
        """[N] per-target values -> [B, T] layout (zeros elsewhere); keeps autograd."""
        out = values.new_zeros(self.loss_mask.shape)
        return out.index_put((self.target_rows, self.target_cols), values)


@dataclass
class _Segment:
    tokens: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)  # 0 = shared prompt, k = k-th response
    targets: list[tuple[int, int, int, int]] = field(default_factory=list)  # (pos, id, row, col)


def plan_micro_batches(lengths: list[int], token_budget: int) -> list[list[int]]:
    """Group item indices into micro-batches of at most `token_budget` tokens (first-fit
    decreasing; an item longer than the budget gets a micro-batch of its own)."""
    bins: list[tuple[int, list[int]]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for k, (used, members) in enumerate(bins):
            if used + lengths[i] <= token_budget:
                bins[k] = (used + lengths[i], members + [i])
                break
        else:
            bins.append((lengths[i], [i]))
    return [sorted(members) for _, members in bins]


def group_by_prompt(samples: list[Trajectory], index: list[int], share_prefix: bool) -> list[list[int]]:
    """Sample indices grouped by identical prompt (each index alone when not sharing)."""
    if not share_prefix:
        return [[i] for i in index]
    groups: dict[tuple, list[int]] = {}
    for i in index:
        groups.setdefault(tuple(samples[i].prompt_ids), []).append(i)
    return list(groups.values())


def plan_by_prompt(
    samples: list[Trajectory], index: list[int], token_budget: int, share_prefix: bool
) -> list[list[int]]:
    """Micro-batches (lists of sample indices) that keep each prompt group whole."""
    groups = group_by_prompt(samples, index, share_prefix)
    costs = [len(samples[g[0]].prompt_ids) + sum(len(samples[i].response_ids) for i in g) for g in groups]
    return [[i for k in mb for i in groups[k]] for mb in plan_micro_batches(costs, token_budget)]


def make_micro_batch(
    samples: list[Trajectory],
    advantages: list[torch.Tensor],
    index: list[int],
    pack: bool = True,
    share_prefix: bool = True,
) -> MicroBatch:
    """Micro-batch of `samples[index]`; `advantages[i]` is sample i's per-response-token row."""
    row_of = {i: r for r, i in enumerate(index)}
    segments = [
        _segment(samples, members, row_of) for members in group_by_prompt(samples, index, share_prefix)
    ]
    rows = [segments] if pack else [[seg] for seg in segments]
    width = max(sum(len(seg.tokens) for seg in row) for row in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    pos = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), 1, width, width, dtype=torch.bool)
    targets: list[tuple[int, int, int, int]] = []
    for r, row in enumerate(rows):
        start = 0
        for seg in row:
            end = start + len(seg.tokens)
            ids[r, start:end] = torch.tensor(seg.tokens)
            pos[r, start:end] = torch.tensor(seg.positions)
            mask[r, 0, start:end, start:end] = _segment_mask(torch.tensor(seg.blocks))
            targets += [(r * width + start + p, t, row_, col) for p, t, row_, col in seg.targets]
            start = end
        mask[r, 0, start:, start:] |= torch.eye(width - start, dtype=torch.bool)  # padding: no NaN rows
    b_width = max(len(samples[i].response_ids) for i in index)
    loss_mask, adv, rollout_lp = (torch.zeros(len(index), b_width) for _ in range(3))
    for r, i in enumerate(index):
        n = len(samples[i].response_ids)
        loss_mask[r, :n] = torch.tensor(samples[i].loss_mask, dtype=torch.float)
        adv[r, :n] = advantages[i][:n]
        rollout_lp[r, :n] = torch.tensor(samples[i].rollout_logprobs)
    t_pos, t_ids, t_row, t_col = torch.tensor(targets, dtype=torch.long).reshape(-1, 4).T
    return MicroBatch(
        input_ids=ids,
        position_ids=pos,
        attention_mask=mask,
        target_positions=t_pos,
        target_ids=t_ids,
        target_rows=t_row,
        target_cols=t_col,
        loss_mask=loss_mask,
        advantages=adv,
        rollout_logprobs=rollout_lp,
        sample_index=list(index),
        num_tokens=sum(len(seg.tokens) for seg in segments),
    )


def _segment(samples: list[Trajectory], members: list[int], row_of: dict[int, int]) -> _Segment:
    prompt = samples[members[0]].prompt_ids
    seg = _Segment(list(prompt), list(range(len(prompt))), [0] * len(prompt))
    for block, i in enumerate(members, start=1):
        s = samples[i]
        first = len(seg.tokens)
        seg.tokens += s.response_ids
        seg.positions += range(len(prompt), len(prompt) + len(s.response_ids))
        seg.blocks += [block] * len(s.response_ids)
        for j, m in enumerate(s.loss_mask):
            if m:
                # logits at a position predict the next token: response token j is predicted by
                # response token j-1, or by the last prompt token for j == 0
                predictor = first + j - 1 if j else len(prompt) - 1
                seg.targets.append((predictor, s.response_ids[j], row_of[i], j))
    return seg


def _segment_mask(blocks: torch.Tensor) -> torch.Tensor:
    """[n, n] causal mask where a response block sees the prompt (block 0) and itself only."""
    q, k = blocks.unsqueeze(1), blocks.unsqueeze(0)
    causal = torch.ones(len(blocks), len(blocks), dtype=torch.bool).tril()
    return causal & ((k == 0) | (k == q))


def response_tensors(samples: list[Trajectory]) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss_mask [B, T], entropies [B, T]) over responses, right-padded with zeros."""
    width = max((len(s.response_ids) for s in samples), default=0)
    loss_mask = torch.zeros(len(samples), width)
    entropies = torch.zeros(len(samples), width)
    for row, s in enumerate(samples):
        loss_mask[row, : len(s.loss_mask)] = torch.tensor(s.loss_mask, dtype=torch.float)
        entropies[row, : len(s.entropies)] = torch.tensor(s.entropies)
    return loss_mask, entropies
