"""Policy losses as pure tensor functions over one typed input, selected by name from `POLICY_LOSSES`.

Every loss takes `LossInputs` (all [B, T], rows are sequences) and its own params dataclass and
returns `LossOutput(per_token_loss [B, T], metrics)`. The per-token loss is exactly zero where
`loss_mask == 0`, and nothing at those positions (logprobs, ratios, advantages) can leak into
the loss or its gradient. Reducing the matrix to a scalar is a separate named choice
(`trainer/aggregation.py`). Metrics are detached 0-dim tensors with namespaced keys; the caller
reduces and logs them.

Each registered entry declares the optional inputs it reads in `needs` (any of "entropy",
"clamped_entropy", "top_p_entropy", "ref_logprobs", "rollout_logprobs", "traj_ids",
"reinforce_mask", "turn_idx"), so the learner computes entropy whenever any configured term needs it
(not only when an entropy bonus is configured).

Two registries: `POLICY_LOSSES` (called as `fn(inputs)`, or `fn(inputs, **controller.loss_kwargs())`
for a loss with a `controller` flag such as BAPO) and `TOKEN_WEIGHTS` (STEER), which maps
`LossInputs` to `token_weights` that any loss then applies. Regularisers (entropy bonus, KL, AEnt,
EPO, SIREN, ...) take the same `LossInputs` and live in `trainer/regularizers.py`; the objective
(`trainer/objective.py`) aggregates each term and sums the scalars. Flags it reads:
`zero_at_zero_advantage` (samples whose advantages are all 0 can be skipped) and `reduce_metrics`
(metric key prefixes that are sums or maxima, not token means). `forking_token_mask` is the
80/20 token selection.
Each variant's docstring cites its paper by arXiv id and says where it departs from the paper or
the released code.

Batch statistics: Clip-Cov, KL-Cov, AEPO, HAPO and STEER read statistics
of the batch they are given (means, a std, a quantile, a max, a top-k). By default that is the
call's own tokens, one micro-batch, as the reference codes. For scope "global" the learner gathers
the valid tokens of the whole mini-batch on all ranks into a `TokenBatch`, computes the statistics
once with the entry's companion (registry flag `batch_stats`, bound by `batch_stats_fn`) and passes
them to every micro-batch's call as `batch_stats=`; the per-token losses then no longer depend on
how the mini-batch was cut into micro-batches.

Layout, one module per family, each registering its entries when imported (this package imports
them all, so every name below is importable from `trainer.losses`):
- `base`: `POLICY_LOSSES`, `LossInputs`, `LossOutput`, `masked_mean`, the helpers the losses are
  built from, and the batch-statistic plumbing (`TokenBatch`, `token_batch`, `batch_stats_fn`);
- `clipped`: PPO clip, NLL (SFT), GSPO, CE-GPPO and BAPO;
- `covariance`: Clip-Cov and KL-Cov;
- `entropy`: AEPO and HAPO;
- `token_weights`: `TOKEN_WEIGHTS` (STEER), `with_token_weights` and `forking_token_mask`.

This package knows nothing about models, configs, micro-batching or distribution.
"""

# Importing a family module registers its entries in POLICY_LOSSES / TOKEN_WEIGHTS.
from trainer.losses import base, clipped, covariance, entropy, token_weights  # noqa: F401
from trainer.losses.base import (
    POLICY_LOSSES,
    BatchStats,
    LossInputs,
    LossOutput,
    TokenBatch,
    _advantages,
    _finish,
    batch_stats_fn,
    masked_mean,
    token_batch,
)
from trainer.losses.clipped import (
    BAPOParams,
    CEGPPOParams,
    GSPOParams,
    PPOClipParams,
    bapo,
    bapo_contributions,
    bapo_grid,
    bapo_search,
    ce_gppo,
    gspo,
    nll,
    ppo_clip,
)
from trainer.losses.covariance import (
    ClipCovParams,
    KLCovParams,
    clip_cov,
    clip_cov_batch_stats,
    kl_cov,
    kl_cov_batch_stats,
)
from trainer.losses.entropy import (
    AEPOParams,
    HAPOParams,
    aepo,
    aepo_batch_stats,
    hapo,
    hapo_batch_stats,
    hapo_entropy_signal,
)
from trainer.losses.token_weights import (
    TOKEN_WEIGHTS,
    STEERParams,
    TokenWeightOutput,
    forking_token_mask,
    steer,
    steer_batch_stats,
    with_token_weights,
)

__all__ = [
    "AEPOParams",
    "BAPOParams",
    "BatchStats",
    "CEGPPOParams",
    "ClipCovParams",
    "GSPOParams",
    "HAPOParams",
    "KLCovParams",
    "LossInputs",
    "LossOutput",
    "POLICY_LOSSES",
    "PPOClipParams",
    "STEERParams",
    "TOKEN_WEIGHTS",
    "TokenBatch",
    "TokenWeightOutput",
    "aepo",
    "aepo_batch_stats",
    "bapo",
    "bapo_contributions",
    "bapo_grid",
    "bapo_search",
    "batch_stats_fn",
    "ce_gppo",
    "clip_cov",
    "clip_cov_batch_stats",
    "forking_token_mask",
    "gspo",
    "hapo",
    "hapo_batch_stats",
    "hapo_entropy_signal",
    "kl_cov",
    "kl_cov_batch_stats",
    "masked_mean",
    "nll",
    "ppo_clip",
    "steer",
    "steer_batch_stats",
    "token_batch",
    "with_token_weights",
    # private, but the regularisers (trainer/regularizers.py) build on them
    "_advantages",
    "_finish",
]
