"""The run config: dataclass defaults are the source of truth; YAML files hold only deltas.

`load(path, overrides)` merges defaults <- YAML <- `key=value` overrides with OmegaConf, rejects
unknown keys and wrong types (naming the key), then `finalize` derives sizes and checks they fit
and that every named part (advantage, loss, regularisers, token weighting, aggregation) is
registered with valid params.

A YAML file may start with `defaults: [other.yaml, ...]` (paths relative to that file): those
files are merged first, in order (recursively), then the file itself, so an experiment can be
`defaults: [../algo/dapo.yaml]` plus its own deltas. Lists are replaced, not concatenated: a
file that sets `algo.regularizers` replaces the whole list of the files it builds on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from agents.config import RolloutConfig, SamplingConfig
from agents.engines import ENGINES
from trainer.off_policy import ROLLOUT_IS_MODES
from trainer.schedules import SCHEDULES


@dataclass
class LoraConfig:
    """Train low-rank adapters (peft) instead of every weight: rank 0 = off. The inference engine
    always gets merged weights under the base model's names."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass
class ModelConfig:
    name: str = "smollm2-135m-instruct"  # embedded model, a local HF folder, or a hub id
    dtype: str = "float32"  # learner compute dtype on GPU: bfloat16 (fp32 master weights)
    gradient_checkpointing: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)


# What each env id is built with unless env.kwargs says otherwise: a YAML cannot delete keys of a
# merged default dict, so the defaults are per id instead of one dict for every env.
ENV_DEFAULT_KWARGS: dict[str, dict[str, Any]] = {
    "textworld": {"admissible_commands": True, "max_steps": 50},
    "alfworld": {"admissible_commands": True, "max_steps": 50},
}


@dataclass
class TaskSetConfig:
    """Which tasks to play: task ids `seeds` of the env's task source (`agents/tasks.py`), at
    `env.level` updated by this set's own `level` (e.g. `{split: valid_seen}` for evaluation)."""

    seeds: list[int] = field(default_factory=lambda: [1000, 1200])  # [start, stop) range
    samples_per_task: int = 1  # eval: episodes per task (train uses algo.group_size)
    level: dict[str, Any] = field(default_factory=dict)  # overrides of env.level for this set


@dataclass
class EnvConfig:
    id: str = "textworld"
    # where the env's data lives (ALFWorld: a folder holding json_2.1.1/<split>; ScienceWorld: the
    # L0/L1/L2 lists; math: the GSM8K/MATH-500 files); "" = $ALFWORLD_DATA or ../shared/data.
    # Passed to the task source as the level key `data_dir`.
    data_dir: str = ""
    split: str = ""  # when set, the split of every task set (e.g. `entrorl eval ... env.split=valid_unseen`)
    # constructor arguments of the env, over ENV_DEFAULT_KWARGS[id] (applied by `finalize`)
    kwargs: dict[str, Any] = field(default_factory=dict)
    # what the env's task source needs: textworld game knobs, an alfworld split, a math dataset
    level: dict[str, Any] = field(default_factory=dict)
    train: TaskSetConfig = field(default_factory=TaskSetConfig)
    eval: TaskSetConfig = field(default_factory=lambda: TaskSetConfig(seeds=[1, 21], samples_per_task=1))


@dataclass
class NamedConfig:
    name: str = ""
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class AggregationConfig:
    # "auto": the policy loss's registry flag `aggregation` (gspo: seq-mean-token-mean), else
    # token-mean; resolved by `finalize`. Any mode of trainer/aggregation.py may be named instead.
    mode: str = "auto"
    loss_scale_factor: float | None = None  # seq-mean-token-sum-norm (Dr.GRPO): a constant length


@dataclass
class OverlongConfig:
    """DAPO overlong reward shaping (arXiv 2503.14476 §3.4): an episode whose generated-token count
    L exceeds max_len - buffer gets min(-(L - (max_len - buffer)) / buffer * factor, 0) added to
    its reward (on every step-wise sample of the episode). Paper: 20480 / 4096 / 1.0."""

    enabled: bool = False
    max_len: int = 20480  # L_max, generated tokens per episode
    buffer: int = 4096  # L_c
    factor: float = 1.0  # f: the penalty at L_max


@dataclass
class KLRewardConfig:
    """KL to the reference policy as a per-token reward penalty (verl's use_kl_in_reward): the
    rewards become r_t = -coef * KL_t (+ the sequence reward on the last token), estimated on
    the rollout's own log-probs (`trainer/regularizers.kl_in_reward`). coef 0 = off. Builds the
    reference model. (The in-loss alternative is the `kl` regulariser, with adaptive control.)"""

    coef: float = 0.0
    kind: str = "k1"  # k1 | k2 | k3 | abs | k1+ | k3+ (in a reward k1+ = k1, k3+ = k3)
    clamp: float | None = None  # k3 and k3+ only


@dataclass
class AlgoConfig:
    """What the update optimises: advantage estimator, policy loss, regularisers, token hooks.

    regularizers:   loss terms added to the policy loss, each `{name, params}` from
                    `trainer/regularizers.py` (entropy_bonus, kl, aent, epo, siren, ...). Each is
                    aggregated with its registry flag `aggregation` if it has one (siren), else
                    with `aggregation.mode`, over the FULL loss mask; a regulariser with a
                    controller (aent, epo, adaptive kl, siren) gets its coefficient/reference
                    from it, updated once per RL step.
    token_weights:  a `TOKEN_WEIGHTS` hook (name "" = none; "steer") multiplying the policy loss.
    forking_tokens: the 80/20 rule (Wang et al., arXiv 2506.01939): train the policy loss only on
                    this top fraction of tokens by entropy (0.2 in the paper; 0 = off). The
                    policy term's token-mean then divides by the selected count; regularisers
                    keep the full mask.
    stats_scope:    where batch statistics are taken. "micro_batch" (the reference codes'
                    behaviour, the default): over each micro-batch. "global": over the whole
                    mini-batch on every rank (all-gathered); costs one extra no-grad forward pass
                    per mini-batch. Honoured by the forking-token threshold, Clip-Cov/KL-Cov
                    (covariance means, KL-Cov's top-k threshold, Clip-Cov's drop count: each
                    candidate dropped with the global probability, exact in expectation), the
                    AEPO loss's entropy z-score, HAPO's entropy quantile and STEER's |Omega|
                    range (`batch_stats_fn` in trainer/losses/base.py). BAPO has its own `scope`
                    (its "step" reduces over the whole step through its controller).
    skip_zero_advantage: skip the compute of samples whose every advantage is 0. Exact only for
                    losses that are 0 at A = 0 with nothing else in the update, so it turns itself
                    off when any regulariser, token weighting or forking-token mask is set.
    dynamic_sampling: DAPO (arXiv 2503.14476 §3.2): drop groups whose episode rewards are all equal
                    and roll out further tasks (the sampler's next ones) until each rank has its
                    share of train.tasks_per_step groups, or max_gen_batches rollouts were played;
                    then train on exactly that share (or what there is at the cap).
    overlong:       DAPO overlong reward shaping, see `OverlongConfig`.
    """

    group_size: int = 4  # episodes per task, same initial state
    advantage: NamedConfig = field(default_factory=lambda: NamedConfig("grpo"))
    loss: NamedConfig = field(default_factory=lambda: NamedConfig("ppo_clip"))
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    regularizers: list[NamedConfig] = field(default_factory=list)
    token_weights: NamedConfig = field(default_factory=NamedConfig)  # name "" = none
    forking_tokens: float = 0.0  # top entropy ratio kept in the policy loss; 0 = off
    stats_scope: str = "micro_batch"  # micro_batch | global (see above)
    skip_zero_advantage: bool = True  # skip compute for samples whose every advantage is 0 (exact)
    dynamic_sampling: bool = False  # DAPO: refill groups whose rewards are all equal (see above)
    max_gen_batches: int = 3  # dynamic sampling: at most this many rollouts per step
    overlong: OverlongConfig = field(default_factory=OverlongConfig)
    kl_in_reward: KLRewardConfig = field(default_factory=KLRewardConfig)
    # Truncated importance sampling between the engine's (behaviour) and the learner's policy,
    # trainer/off_policy.py: none | token | sequence; weights min(pi_old / mu, rollout_is_cap).
    rollout_is: str = "none"
    rollout_is_cap: float = 2.0


@dataclass
class LearnerConfig:
    zero_stage: int = 0
    lr: float = 1e-5
    lr_scheduler: str = "constant"  # constant | cosine | linear (trainer/schedules.py), per optimizer step
    warmup_steps: int = 0  # optimizer steps of linear warmup
    min_lr_ratio: float = 0.0  # cosine/linear decay floor, as a fraction of lr
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    max_grad_norm: float = 1.0
    micro_batch_tokens: int = 2048  # tokens per micro-batch (packed or padded)
    packing: bool = False  # True: one row per micro-batch; False: one padded row per prompt group.
    # On CPU (dense sdpa masks) padded rows are faster; packing pays off with varlen kernels.
    share_prefix: bool = True  # run a prompt shared by several samples once (exact; batch.py)
    mini_batches: int = 1  # optimizer steps per RL step (PPO mini-batches)
    epochs: int = 1  # passes over the batch per RL step
    temperature: float = 1.0  # logits / T in the learner; must match rollout sampling
    threads: int = 0  # torch threads on CPU; 0 = all cores


@dataclass
class CriticConfig:
    """The value model of PPO with GAE (arXiv 1707.06347, 1506.02438), built only when algo.advantage needs
    critic values (`gae`). A separate copy of the backbone with a scalar head (zero-initialised,
    so the first advantages are plain returns-to-go), its own AdamW and DeepSpeed engine; it shares
    learner.zero_stage, micro_batch_tokens, packing, mini_batches, epochs and max_grad_norm."""

    model: str = ""  # "" = model.name (the policy's initial weights); or another HF folder / model
    lr: float = 1e-5  # constant (no schedule)
    value_clip: float = 0.2  # PPO value clipping around the rollout-time values; 0 = off
    warmup_steps: int = 0  # first RL steps train the critic only (the policy waits for sane values)


@dataclass
class WandbConfig:
    """Weights & Biases logging beside the JSONL file (rank 0 only; needs `pip install wandb`).
    The run id is kept in <output_dir>/wandb_id, so a resumed run continues the same W&B run."""

    project: str = ""  # "" = off
    entity: str = ""
    name: str = ""  # "" = the output folder's name
    mode: str = "online"  # online | offline (sync later with `wandb sync`) | disabled
    tags: list[str] = field(default_factory=list)


@dataclass
class TrainConfig:
    seed: int = 0
    steps: int = 8
    tasks_per_step: int = 4  # prompts (tasks) per RL step; samples = tasks_per_step * group_size
    eval_before: bool = True
    eval_after: bool = True
    # also play uniformly random valid commands on the eval tasks at the end (the env must list
    # them): the floor the policy must clear, in the summary as eval/success_random
    eval_random: bool = False
    eval_every: int = 0  # 0 = only before/after
    # leave episodes ended by env_error / engine_error / timeout (and their branches) out of the
    # update: their reward is a fault's, not the policy's. Counted as rollout/excluded_episodes.
    exclude_infra_failures: bool = True
    eval_sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=0.0))
    output_dir: str = ""  # "" = runs/<config name>-<timestamp>
    save_model: bool = True  # write the trained policy as a plain HF folder: <output_dir>/model
    save_every: int = 0  # checkpoint every N steps (and after the last one); 0 = no checkpoints
    keep_checkpoints: int = 2  # complete checkpoints kept (older ones are deleted)
    # auto: continue from the newest complete checkpoint in output_dir if there is one (set
    # output_dir: the default name is new each run); never: start fresh; or a checkpoint path.
    resume: str = "auto"
    tensorboard: bool = False  # also write TensorBoard event files to <output_dir>/tensorboard
    wandb: WandbConfig = field(default_factory=WandbConfig)
    save_rollouts: bool = (
        False  # write each step's samples to <output_dir>/rollouts/ (entrorl show-trajectory)
    )
    max_nonfinite_steps: int = 3  # consecutive RL steps with a NaN/inf loss before the run stops
    # Off-policy mode: the engine gets the learner's weights every max_staleness + 1 steps, so
    # rollouts come from weights up to max_staleness updates old (0 = on-policy, every step).
    # pi_old is then recomputed by the learner when it takes several passes; pair it with
    # algo.rollout_is to correct for the lag (the mismatch is logged as off_policy/* either way).
    max_staleness: int = 0
    device: str = "cpu"


@dataclass
class SFTConfig:
    """Supervised fine-tuning (behaviour cloning), alone (`entrorl sft CONFIG`) or as a stage
    before the RL steps of `entrorl train` (when `source` is set). Same learner (ZeRO, packing,
    LoRA), checkpoints and export as RL; the loss is the `nll` of the target tokens.

    source:  "" = no SFT stage; "expert" = the env's walkthroughs played through the rollout
             loop with this config's prompt format (the samples are the tokens RL trains on,
             loss on the action tokens); a path = a JSONL or .parquet file of OpenAI-format
             chats (loss on assistant turns).
    seeds:   expert: the [start, stop) task ids to play (default env.train.seeds), one episode
             each; only won episodes are kept.
    steps:   optimizer steps; each takes `batch_size` samples (shuffled passes over the data,
             resumed mid-pass exactly).
    """

    source: str = ""
    seeds: list[int] = field(default_factory=list)
    steps: int = 16
    batch_size: int = 16
    lr: float = 5e-5
    lr_scheduler: str = "constant"
    warmup_steps: int = 0
    max_tokens: int = 0  # chat files: a longer conversation fails naming its line/row (0 = no cap)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)


def optimizer_steps(cfg: Config) -> int:
    """Optimizer steps of the whole run (what the LR schedule spans)."""
    return cfg.train.steps * cfg.learner.mini_batches * cfg.learner.epochs


class ConfigError(ValueError):
    pass


STATS_SCOPES = ("micro_batch", "global")


def load(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults <- YAML file (after its `defaults:` files) <- `key=value` overrides; errors name
    the key and the fix."""
    schema = OmegaConf.structured(Config)
    layers = [schema]
    try:
        if path is not None:
            layers += _file_layers(Path(path), ())
        layers.append(OmegaConf.from_dotlist(list(overrides)))
        merged = _merge_layers(layers)
        cfg: Config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        message = f"config key {key}: {getattr(exc, 'msg', exc)}"
        if f"{key}=" in overrides and "'None'" in message:  # OmegaConf reads a bare `key=` as null
            message += f"""; `{key}=` is null on the command line: write '{key}=""' for an empty string"""
        raise ConfigError(message) from None
    except ValueError as exc:  # a section's own check (__post_init__) names its key
        raise ConfigError(str(exc)) from None
    finalize(cfg)
    return cfg


NAMED_PARTS = ("advantage", "loss", "token_weights")  # algo.<part> = {name, params}


def _merge_layers(layers: list[DictConfig]) -> DictConfig:
    """Merge left to right, except that a layer naming a different algo part (say gigpo over a
    base's grpo) replaces that part's params instead of adding to them: the old estimator's
    params mean nothing to the new one, and a merge cannot delete keys."""
    merged = layers[0]
    for layer in layers[1:]:
        algo = layer.get("algo")
        for part in NAMED_PARTS if isinstance(algo, DictConfig) else ():
            named = algo.get(part)
            if isinstance(named, DictConfig) and "name" in named and named.name != merged.algo[part].name:
                merged.algo[part].params = {}
        merged = OmegaConf.merge(merged, layer)
    return merged


def _file_layers(path: Path, seen: tuple[Path, ...]) -> list[DictConfig]:
    """The YAML at `path` as merge layers: its `defaults:` files first (recursively), then itself."""
    path = path.resolve()
    if path in seen:
        chain = " -> ".join(str(p) for p in (*seen, path))
        raise ConfigError(f"`defaults:` cycle: {chain}")
    try:
        node = OmegaConf.load(path)
    except yaml.YAMLError as exc:  # the message carries the line and column
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{path}: a config file must be a mapping of sections, got a list")
    layers: list[DictConfig] = []
    if "defaults" in node:
        bases = node.pop("defaults")
        if isinstance(bases, str):
            bases = [bases]
        if not OmegaConf.is_list(bases) and not isinstance(bases, list):
            raise ConfigError(f"{path}: `defaults` must be a list of YAML paths relative to this file")
        for base in bases:
            base_path = path.parent / str(base)
            if not base_path.is_file():
                raise ConfigError(f"{path}: `defaults` entry {str(base)!r} not found (looked at {base_path})")
            layers += _file_layers(base_path, (*seen, path))
    return [*layers, node]


def _check_named_parts(cfg: Config) -> None:
    """Every named part exists in its registry and its params are valid (messages list the valid
    names/keys); resolves aggregation.mode "auto"."""
    from trainer.advantages import ADVANTAGES
    from trainer.aggregation import AGGREGATIONS
    from trainer.losses import POLICY_LOSSES, TOKEN_WEIGHTS
    from trainer.regularizers import REGULARIZERS

    algo = cfg.algo
    parts = [("algo.advantage", ADVANTAGES, algo.advantage), ("algo.loss", POLICY_LOSSES, algo.loss)]
    parts += [(f"algo.regularizers[{i}]", REGULARIZERS, reg) for i, reg in enumerate(algo.regularizers)]
    if algo.token_weights.name:
        parts.append(("algo.token_weights", TOKEN_WEIGHTS, algo.token_weights))
    elif algo.token_weights.params:
        raise ConfigError("algo.token_weights.params is set but algo.token_weights.name is empty")
    for key, registry, named in parts:
        try:
            registry.make_params(named.name, named.params)
        except (KeyError, TypeError, ValueError) as exc:
            message = exc.args[0] if exc.args else exc
            raise ConfigError(f"{key}: {message}") from None
    if algo.aggregation.mode == "auto":
        algo.aggregation.mode = POLICY_LOSSES.get(algo.loss.name).flags.get("aggregation", "token-mean")
    if algo.aggregation.mode not in AGGREGATIONS:
        raise ConfigError(
            f"algo.aggregation.mode={algo.aggregation.mode!r}: use auto or one of {', '.join(AGGREGATIONS.names())}"
        )
    if algo.aggregation.mode == "seq-mean-token-sum-norm" and algo.aggregation.loss_scale_factor is None:
        raise ConfigError(
            "algo.aggregation.mode=seq-mean-token-sum-norm needs algo.aggregation.loss_scale_factor "
            "(a constant length, e.g. ${rollout.max_new_tokens})"
        )


def finalize(cfg: Config) -> None:
    """Check values that must agree with each other; say which keys to change."""
    checks = [
        (cfg.algo.group_size >= 1, "algo.group_size must be >= 1"),
        (cfg.train.tasks_per_step >= 1, "train.tasks_per_step must be >= 1"),
        (cfg.learner.mini_batches >= 1, "learner.mini_batches must be >= 1"),
        (
            cfg.learner.zero_stage in (0, 1, 2, 3),
            f"learner.zero_stage={cfg.learner.zero_stage}: use 0, 1, 2 or 3",
        ),
        (
            cfg.learner.lr_scheduler in SCHEDULES,
            f"learner.lr_scheduler={cfg.learner.lr_scheduler!r}: use one of {', '.join(SCHEDULES)}",
        ),
        (
            0.0 <= cfg.learner.min_lr_ratio <= 1.0,
            f"learner.min_lr_ratio={cfg.learner.min_lr_ratio}: a fraction of learner.lr in [0, 1]",
        ),
        (
            not (cfg.model.lora.rank and cfg.learner.zero_stage == 3),
            "model.lora.rank > 0 with learner.zero_stage=3 is not supported: use zero_stage 0-2 (adapters are small)",
        ),
        (
            cfg.train.save_every >= 0,
            f"train.save_every={cfg.train.save_every}: steps between checkpoints, 0 = off",
        ),
        (
            cfg.train.keep_checkpoints >= 1,
            f"train.keep_checkpoints={cfg.train.keep_checkpoints}: keep at least 1",
        ),
        (
            cfg.learner.temperature == (cfg.sampling.temperature or 1.0),
            f"learner.temperature={cfg.learner.temperature} differs from sampling.temperature="
            f"{cfg.sampling.temperature}: the learner's logprobs must use the sampling distribution",
        ),
        (
            cfg.rollout.max_new_tokens < cfg.rollout.max_context,
            "rollout.max_new_tokens must be smaller than rollout.max_context",
        ),
        (cfg.train.steps >= 1, f"train.steps={cfg.train.steps}: RL steps to run, >= 1"),
        (cfg.sft.steps >= 1, f"sft.steps={cfg.sft.steps}: SFT optimizer steps, >= 1"),
        (cfg.sft.batch_size >= 1, f"sft.batch_size={cfg.sft.batch_size}: samples per SFT step, >= 1"),
        (
            not cfg.sft.seeds or (len(cfg.sft.seeds) == 2 and cfg.sft.seeds[0] < cfg.sft.seeds[1]),
            f"sft.seeds={list(cfg.sft.seeds)}: a non-empty [start, stop) range of task ids, or [] for env.train.seeds",
        ),
        (
            cfg.sft.lr_scheduler in SCHEDULES,
            f"sft.lr_scheduler={cfg.sft.lr_scheduler!r}: use one of {', '.join(SCHEDULES)}",
        ),
        (
            cfg.rollout.max_turns >= 1,
            f"rollout.max_turns={cfg.rollout.max_turns}: model turns per episode, >= 1",
        ),
        (
            cfg.rollout.max_new_tokens >= 1,
            f"rollout.max_new_tokens={cfg.rollout.max_new_tokens}: tokens per reply, >= 1",
        ),
        *(
            (
                len(seeds) == 2 and seeds[0] < seeds[1],
                f"env.{name}.seeds={list(seeds)}: a non-empty [start, stop) range of task seeds, e.g. [0, 100]",
            )
            for name, seeds in (("train", cfg.env.train.seeds), ("eval", cfg.env.eval.seeds))
        ),
        (
            0.0 <= cfg.algo.forking_tokens <= 1.0,
            f"algo.forking_tokens={cfg.algo.forking_tokens}: a fraction in [0, 1] (0.2 = the 80/20 rule, 0 = off)",
        ),
        (
            cfg.algo.rollout_is in ROLLOUT_IS_MODES,
            f"algo.rollout_is={cfg.algo.rollout_is!r}: use one of {', '.join(ROLLOUT_IS_MODES)}",
        ),
        (
            cfg.algo.rollout_is_cap >= 1.0,
            f"algo.rollout_is_cap={cfg.algo.rollout_is_cap}: a cap >= 1 on pi_old / mu",
        ),
        (
            # trainer/regularizers.KL_KINDS (tests/trainer/test_kl_estimators.py keeps them equal)
            cfg.algo.kl_in_reward.kind in ("k1", "k2", "k3", "abs", "k1+", "k3+"),
            f"algo.kl_in_reward.kind={cfg.algo.kl_in_reward.kind!r}: use one of k1, k2, k3, abs, k1+, k3+",
        ),
        (
            cfg.algo.kl_in_reward.coef >= 0,
            f"algo.kl_in_reward.coef={cfg.algo.kl_in_reward.coef}: >= 0 (0 = off)",
        ),
        (
            cfg.train.max_staleness >= 0,
            f"train.max_staleness={cfg.train.max_staleness}: updates of lag, >= 0",
        ),
        (
            cfg.rollout.engine in ENGINES,
            f"rollout.engine={cfg.rollout.engine!r}: use one of {', '.join(ENGINES)}",
        ),
        (
            cfg.train.wandb.mode in ("online", "offline", "disabled"),
            f"train.wandb.mode={cfg.train.wandb.mode!r}: use online, offline or disabled",
        ),
        (cfg.critic.value_clip >= 0, f"critic.value_clip={cfg.critic.value_clip}: >= 0 (0 = off)"),
        (cfg.critic.warmup_steps >= 0, f"critic.warmup_steps={cfg.critic.warmup_steps}: >= 0"),
        (
            cfg.algo.stats_scope in STATS_SCOPES,
            f"algo.stats_scope={cfg.algo.stats_scope!r}: use one of {', '.join(STATS_SCOPES)}",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    if cfg.train.tasks_per_step % cfg.learner.mini_batches:
        raise ConfigError(
            f"train.tasks_per_step={cfg.train.tasks_per_step} is not divisible by learner.mini_batches="
            f"{cfg.learner.mini_batches}: groups must stay whole in a mini-batch"
        )
    _check_named_parts(cfg)
    from trainer.advantages import ADVANTAGES

    groups = ADVANTAGES.get(cfg.algo.advantage.name).flags.get("min_group_size", 1)
    if cfg.algo.group_size < groups:
        raise ConfigError(
            f"algo.group_size={cfg.algo.group_size} with algo.advantage.name={cfg.algo.advantage.name}: "
            f"it compares each episode with the others of its task group, so a group under {groups} "
            f"gets advantage 0 and trains on nothing. Set algo.group_size >= {groups}, or an "
            "estimator that needs no group (gae, reinforce_plus_plus, or grpo, which gives a lone "
            "episode its reward)"
        )
    branched = cfg.rollout.branch.policy != "none"
    if branched and cfg.rollout.mode == "step" and cfg.algo.advantage.name != "grpo_tree":
        raise ConfigError(
            f"rollout.branch.policy={cfg.rollout.branch.policy} with rollout.mode=step and "
            f"algo.advantage.name={cfg.algo.advantage.name}: a branch's step-wise samples hold only "
            "its own turns, so the turns it shares with its parent would get the parent's return "
            "alone. Set algo.advantage.name=grpo_tree (every episode that played a turn credits it), "
            "or rollout.mode=trajectory"
        )
    cfg.env.kwargs = {**ENV_DEFAULT_KWARGS.get(cfg.env.id, {}), **cfg.env.kwargs}


def task_level(env: EnvConfig, tasks: TaskSetConfig) -> dict[str, Any]:
    """The task source's level for a task set: env.level, then the set's own level, then
    env.data_dir (when set) as `data_dir` and env.split (when set) as `split`."""
    level = {**env.level, **tasks.level}
    if env.data_dir:
        level.setdefault("data_dir", env.data_dir)
    if env.split:
        level["split"] = env.split
    return level


def check_world(cfg: Config, world: int) -> None:
    """Sizes that depend on the number of ranks: every rank must get whole task groups."""
    tasks = cfg.train.tasks_per_step
    if tasks % world:
        raise ConfigError(
            f"train.tasks_per_step={tasks} is not a multiple of the {world} ranks: groups stay whole on "
            f"one rank, so set train.tasks_per_step to a multiple of {world} (e.g. {world * max(tasks // world, 1)})"
        )
    if (tasks // world) % cfg.learner.mini_batches:
        raise ConfigError(
            f"{tasks // world} task groups per rank (train.tasks_per_step={tasks} / {world} ranks) are not "
            f"divisible by learner.mini_batches={cfg.learner.mini_batches}: change either key"
        )


def describe_sizes(cfg: Config, world: int) -> str:
    """The derived sizes, printed at startup so a launch can be checked before it spends hours."""
    tasks = cfg.train.tasks_per_step
    episodes = tasks * cfg.algo.group_size
    per_sample = "one sample per turn" if cfg.rollout.mode == "step" else "one sample per episode"
    return (
        f"ranks {world} | tasks/step {tasks} ({tasks // world} per rank) x group {cfg.algo.group_size} = "
        f"{episodes} episodes/step ({episodes // world} per rank, {per_sample}) | "
        f"mini-batches {cfg.learner.mini_batches} x epochs {cfg.learner.epochs} = "
        f"{optimizer_steps(cfg)} optimizer steps over {cfg.train.steps} RL steps | "
        f"micro-batch {cfg.learner.micro_batch_tokens} tokens | ZeRO-{cfg.learner.zero_stage}"
    )


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
