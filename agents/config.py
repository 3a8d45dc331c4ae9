"""Rollout-side config dataclasses (stdlib only; the trainer's root config composes them)."""

from __future__ import annotations

from dataclasses import dataclass, field

from agents.brancher import BranchConfig


@dataclass
class SamplingConfig:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = full vocabulary (the learner's logprobs assume the same distribution)


@dataclass
class RolloutConfig:
    mode: str = "step"  # "step": one sample per turn (verl-agent); "trajectory": one per episode
    format: str = "numbered"  # agent format in agents/prompts.py: numbered | action_tag | boxed | tool_call
    max_turns: int = 4
    max_new_tokens: int = 8  # per reply
    max_episode_tokens: int = 1024  # generated tokens per episode
    max_context: int = 2048  # prompt + reply must fit; else the episode stops (context_overflow)
    history_window: int = 0  # step mode: past (observation, action) pairs shown in the prompt
    parse_error_limit: int = 0  # consecutive unparsable replies that end an episode; 0 = never
    # Env text longer than this (observation, task, each command) is cut: its head and tail are
    # kept around a marker saying how many chars were dropped (counted: rollout/obs_truncated).
    # 0 = no cap. Lone surrogates (undecodable bytes) become U+FFFD either way.
    max_obs_chars: int = 8192
    # reward terms, name -> weight (agents/rewards.py); empty = {success: 1.0}. (An empty default
    # rather than a filled one: YAML dicts merge into defaults, so a default term could not be removed.)
    rewards: dict[str, float] = field(default_factory=dict)
    # math formats (boxed, tool_call): worked examples [{user: ..., assistant: ...}] before the question
    fewshot: list[dict[str, str]] = field(default_factory=list)
    # extra chat-template arguments, e.g. {enable_thinking: false} for Qwen3 (thinking off)
    chat_template_kwargs: dict = field(default_factory=dict)
    agent: str = "model"  # "expert": play each env's walkthrough() instead (no model; eval only)
    # Inference engine: "hf" (CPU/GPU, exact entropy) or "vllm" (agents/engines/vllm.py: top-k
    # entropy estimate, prefix caching; colocated with the learner it sleeps during the update)
    engine: str = "hf"
    vllm: dict = field(default_factory=dict)  # extra VLLMEngine arguments, e.g. {gpu_memory_utilization: 0.4}
    # HF engine: KV of recent sequences kept so the next turn / a fork prefills only its new
    # tokens (agents/engines/prefix_cache.py); 0 = off. vLLM: its own prefix caching (rollout.vllm).
    prefix_cache_mib: int = 1024
    # Env pool (environments/pool.py). 0 = envs in this process: fastest for cheap envs (TextWorld),
    # no timeouts. N > 0 = N worker processes stepping in parallel: for slow or fragile simulators
    # (ALFWorld, ScienceWorld's JVMs); a worker that hangs or dies is replaced, its episodes end.
    env_workers: int = 0
    env_step_timeout: float = 60.0  # seconds per env step (workers > 0); over it: stop reason `timeout`
    env_reset_timeout: float = 300.0  # seconds to build + reset an env (a JVM start, a planner run)
    # Entropy-aware branching (agents/brancher.py): with policy arpo/aepo a group starts
    # `branch.roots` episodes and forks paths whose step entropy rises until algo.group_size
    # episodes exist; "none" samples every episode from the start.
    branch: BranchConfig = field(default_factory=BranchConfig)
