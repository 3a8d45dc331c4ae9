"""`entrorl show-trajectory FILE [--index N]`: one saved sample, token by token.

Reads a `rollouts/step_*.jsonl` file that `train.save_rollouts=true` writes, and prints the
sample's ids, rewards and tree fields, then its response as text segments: what the model
sampled (loss_mask 1) with the mean entropy and advantage of each turn, and what the
environment or the chat template added (loss_mask 0), so masking bugs are visible at a glance.
"""

from __future__ import annotations

import json
from pathlib import Path


def load_sample(path: str | Path, index: int) -> dict:
    lines = Path(path).read_text().splitlines()
    if not 0 <= index < len(lines):
        raise IndexError(f"{path} has {len(lines)} samples; --index must be in [0, {len(lines)})")
    return json.loads(lines[index])


def segments(sample: dict) -> list[tuple[int, int, int]]:
    """Maximal runs of equal loss_mask: (start, end, mask)."""
    mask = sample["loss_mask"]
    runs, start = [], 0
    for i in range(1, len(mask) + 1):
        if i == len(mask) or mask[i] != mask[start]:
            runs.append((start, i, mask[start]))
            start = i
    return runs


def render(sample: dict, decode) -> str:
    """The text view of one sample; `decode(ids) -> str`."""
    head = (
        f"traj {sample['traj_id']}  group {sample['group_id']}  turn {sample['turn_idx']}  "
        f"reward {sample['reward']:+.3f}  stop {sample['stop_reason']}"
    )
    if sample.get("parent_id") is not None:
        head += f"  branch of {sample['parent_id']} at turn {sample['fork_turn']} (token {sample.get('fork_token')})"
    lines = [head, f"prompt ({len(sample['prompt_ids'])} tokens):", _indent(decode(sample["prompt_ids"]))]
    advantages = sample.get("advantages") or [0.0] * len(sample["loss_mask"])
    for start, end, mask in segments(sample):
        ids = sample["response_ids"][start:end]
        if mask:
            entropy = sum(sample["entropies"][start:end]) / (end - start)
            advantage = sum(advantages[start:end]) / (end - start)
            label = f"SAMPLED [{start}:{end}] mean entropy {entropy:.3f}  mean advantage {advantage:+.3f}"
        else:
            label = f"env/template [{start}:{end}] (loss_mask 0)"
        lines += [label, _indent(decode(ids))]
    return "\n".join(lines)


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines() or [""])
