"""Per-token log-probabilities and entropies from logits or from the last hidden state.

`logprobs_and_entropy_from_hidden` never holds the full [N, V] logits: it walks over N in
chunks, and each chunk runs under `torch.utils.checkpoint`, so the backward pass recomputes one
chunk's logits at a time too. Peak extra memory is O(chunk_size * V) instead of O(N * V).
All math is done in float32 (or float64 if the inputs are float64) whatever the input dtype.

Entropy is the exact full-vocabulary H_t = -sum_v p log p of softmax(z / temperature)
(as verl's `entropy_from_logits`). The "clamped" entropy of AEnt (arXiv 2509.03493) drops the
floor(drop_frac * V) smallest logits of each position and renormalises over the rest.

This module knows nothing about models: it takes tensors (hidden states, the lm_head weight).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint


def _upcast(x: Tensor) -> Tensor:
    return x if x.dtype == torch.float64 else x.float()


def logprobs_from_logits(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(logits / temperature)[label]: logits [..., V], labels [...] -> [...]."""
    z = _upcast(logits) / temperature
    picked = z.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(z, dim=-1)


def entropy_from_logits(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """H = logsumexp(z) - sum_v p_v z_v with z = logits / temperature: [..., V] -> [...]."""
    z = _upcast(logits) / temperature
    p = torch.softmax(z, dim=-1)
    return torch.logsumexp(z, dim=-1) - (p * z).sum(dim=-1)


def clamped_entropy_from_logits(logits: Tensor, drop_frac: float, temperature: float = 1.0) -> Tensor:
    """AEnt clamped entropy (arXiv 2509.03493): [..., V] -> [...].

    The floor(drop_frac * V) smallest logits of each position are removed (chosen without
    gradient, ties broken arbitrarily) and the entropy of the renormalised rest is returned;
    the gradient flows through the kept logits. drop_frac = 0 gives the exact entropy.
    """
    z = _upcast(logits) / temperature
    num_drop = int(drop_frac * z.shape[-1])
    if num_drop <= 0:
        return entropy_from_logits(z)
    if num_drop >= z.shape[-1]:
        raise ValueError(f"drop_frac={drop_frac} removes the whole vocabulary ({z.shape[-1]})")
    drop = torch.topk(z.detach(), num_drop, dim=-1, largest=False).indices
    z = z.scatter(-1, drop, float("-inf"))
    logp = torch.log_softmax(z, dim=-1)
    kept_logp = torch.where(torch.isfinite(logp), logp, torch.zeros_like(logp))
    return -(logp.exp() * kept_logp).sum(dim=-1)


@dataclass
class TokenStats:
    logprobs: Tensor  # [N]
    entropy: Tensor | None = None  # [N], exact full-vocabulary entropy
    clamped_entropy: Tensor | None = None  # [N], AEnt clamped entropy


Head = Tensor | torch.nn.Module  # the [V, H] output weight, or the output layer itself


def project(hidden: Tensor, head: Head) -> Tensor:
    """Logits of `hidden` [N, H]. Passing the layer (not its weight) matters under ZeRO-3: its
    weight is a partitioned stub outside the layer's own forward, which gathers it."""
    return head(hidden) if isinstance(head, torch.nn.Module) else hidden @ head.t()


def head_requires_grad(head: Head) -> bool:
    if isinstance(head, torch.nn.Module):
        return any(p.requires_grad for p in head.parameters())
    return head.requires_grad


def _chunk_stats(
    hidden: Tensor,
    weight: Head,
    labels: Tensor,
    temperature: float,
    with_entropy: bool,
    clamp_drop_frac: float | None,
) -> tuple[Tensor, ...]:
    logits = project(hidden, weight)
    z = _upcast(logits) / temperature
    log_norm = torch.logsumexp(z, dim=-1, keepdim=True)
    outs = [(z.gather(-1, labels.unsqueeze(-1)) - log_norm).squeeze(-1)]
    if with_entropy:  # one softmax shared with the log-probs: H = lse - sum_v p_v z_v
        outs.append(log_norm.squeeze(-1) - (torch.exp(z - log_norm) * z).sum(dim=-1))
    if clamp_drop_frac is not None:
        outs.append(clamped_entropy_from_logits(logits, clamp_drop_frac, temperature))
    return tuple(outs)


def token_stats_from_hidden(
    hidden: Tensor,
    lm_head_weight: Head,
    labels: Tensor,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    clamp_drop_frac: float | None = None,
    chunk_size: int = 1024,
) -> TokenStats:
    """Chunked log-probs (+ entropy, + AEnt clamped entropy) from hidden [N, H], weight [V, H].

    labels [N] are the next-token ids. Differentiable w.r.t. hidden and weight; the [N, V]
    logits exist only one chunk at a time, in forward and in backward.
    """
    if hidden.dim() != 2 or labels.shape != hidden.shape[:1]:
        raise ValueError(
            f"expected hidden [N, H] and labels [N], got {tuple(hidden.shape)} and {tuple(labels.shape)}"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    grad = torch.is_grad_enabled() and (hidden.requires_grad or head_requires_grad(lm_head_weight))
    pieces: list[tuple[Tensor, ...]] = []
    for start in range(0, hidden.shape[0], chunk_size):
        args = (
            hidden[start : start + chunk_size],
            lm_head_weight,
            labels[start : start + chunk_size],
            temperature,
            with_entropy,
            clamp_drop_frac,
        )
        if grad:
            pieces.append(checkpoint(_chunk_stats, *args, use_reentrant=False))
        else:
            pieces.append(_chunk_stats(*args))
    if not pieces:  # N == 0
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return TokenStats(
            empty, empty if with_entropy else None, empty if clamp_drop_frac is not None else None
        )
    columns = [torch.cat(col) for col in zip(*pieces, strict=True)]
    stats = TokenStats(columns.pop(0))
    if with_entropy:
        stats.entropy = columns.pop(0)
    if clamp_drop_frac is not None:
        stats.clamped_entropy = columns.pop(0)
    return stats


def logprobs_and_entropy_from_hidden(
    hidden: Tensor,
    lm_head_weight: Tensor,
    labels: Tensor,
    *,
    temperature: float = 1.0,
    with_entropy: bool,
    chunk_size: int = 1024,
) -> tuple[Tensor, Tensor | None]:
    """(logprobs [N], entropy [N] or None), chunked; see `token_stats_from_hidden`."""
    stats = token_stats_from_hidden(
        hidden,
        lm_head_weight,
        labels,
        temperature=temperature,
        with_entropy=with_entropy,
        chunk_size=chunk_size,
    )
    return stats.logprobs, stats.entropy
