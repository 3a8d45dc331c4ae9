"""The one multi-turn rollout loop: engine <-> env, for every env and both sample modes.

Each round gathers every active episode into ONE engine call, parses each reply into an action,
steps every episode's env in ONE env-pool batch (`environments/pool.py`: in-process, or worker
processes stepping in parallel), and decides whether each episode goes on. Errors stay inside
their episode: an env that raises or whose worker dies ends only that episode (`env_error`), a
step that overruns `env_step_timeout` ends it with `timeout`, an unparsable reply becomes the
format's fallback action and is counted. Env text is sanitised before it is tokenized
(`sanitize_observation`): undecodable characters become U+FFFD and gigantic text is cut to
`max_obs_chars`.

`agent="expert"` plays each env's `walkthrough()` through the same loop instead of a model
(`entrorl eval CONFIG agent=expert`). Without a tokenizer its turns have no tokens. With one it
is a teacher: each turn's prompt is rendered exactly as for the model, and its "sampled" ids are
the format's reply for the expert action (`reply_for`), so the samples are the ones RL would
train on had the model chosen those actions (supervised fine-tuning, `trainer/sft.py`).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from agents.brancher import (
    BranchConfig,
    GroupState,
    PathView,
    decide_turn_branches,
    initial_roots,
    premonitor_roots,
    step_entropy,
    token_fork_points,
)
from agents.chat import check_template, delta_ids, encode, render_prompt
from agents.config import RolloutConfig, SamplingConfig
from agents.engines.base import InferenceEngine, SamplingParams
from agents.parsing import final_answer, token_roles
from agents.prompts import Observation, build_format
from agents.rewards import compose
from agents.rewards import prefetch as prefetch_rewards
from agents.types import GenerationResult, Trajectory
from environments.pool import EnvError, EnvPool

AGENTS = ("model", "expert", "random")
DEFAULT_REWARDS = {"success": 1.0}
# Reset-info keys copied into each episode's summary["task"]: evaluation splits success by them.
TASK_META_KEYS = ("task_type", "task_name", "subject", "level")
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass
class Task:
    """One episode to play: which env, how to build and reset it, and its group."""

    env_id: str
    group_id: int
    env_kwargs: dict = field(default_factory=dict)
    reset_options: dict = field(default_factory=dict)
    seed: int | None = None


@dataclass
class _Turn:
    prompt_ids: list[int]
    result: GenerationResult
    action: str
    parse_error: str | None
    anchor_key: str | None = None  # hash of the observation the prompt was built from
    reward: float = 0.0  # the env reward this turn's action received
    obs: Observation | None = None  # what the prompt showed (a token-level fork restarts from it)
    messages_len: int = 0  # trajectory mode: len(episode.messages) when the prompt was made


@dataclass
class _Episode:
    task: Task
    traj_id: int
    handle: int | None = None  # the env's handle in the rollout's EnvPool
    plan: list[str] | None = None  # expert agent: the walkthrough it plays
    obs: Observation | None = None
    history: list[tuple[str, str]] = field(default_factory=list)  # (observation, action) pairs
    messages: list[dict] = field(default_factory=list)  # trajectory mode: the rendered roles
    context_ids: list[int] = field(default_factory=list)  # trajectory mode: all ids so far
    prompt_ids: list[int] = field(default_factory=list)  # trajectory mode: the first prompt
    deltas: list[list[int]] = field(default_factory=list)  # trajectory mode: ids after each reply
    turns: list[_Turn] = field(default_factory=list)
    won: bool = False
    score: float = 0.0
    parse_errors: int = 0
    parse_error_streak: int = 0
    stop_reason: str | None = None
    error: str | None = None
    meta: dict = field(default_factory=dict)  # task metadata from the reset info (TASK_META_KEYS)
    parent_id: int | None = None  # branched: the episode this one was forked from
    fork_turn: int | None = None  # branched: turns [0, fork_turn) are the parent's
    obs_truncated: int = 0  # observations of this episode (its own turns) cut to max_obs_chars
    fork_offset: int = 0  # token-level branch: its fork turn's first tokens that are the parent's
    prefix: GenerationResult | None = None  # token-level branch: those tokens, before they are played


@dataclass
class RolloutResult:
    samples: list[Trajectory]
    metrics: dict[str, float]
    episodes: list[dict] = field(default_factory=list)  # every episode's summary, sampled or not


class Rollout:
    def __init__(self, engine: InferenceEngine | None, tokenizer: Any, cfg: RolloutConfig):
        if cfg.mode not in ("step", "trajectory"):
            raise ValueError(f"rollout.mode={cfg.mode!r}; expected 'step' or 'trajectory'")
        if cfg.agent not in AGENTS:
            raise ValueError(f"rollout.agent={cfg.agent!r}; expected one of {AGENTS}")
        if cfg.agent == "model" and engine is None:
            raise ValueError(
                "rollout.agent='model' needs an inference engine (agents 'expert' and 'random' play without one)"
            )
        if cfg.max_obs_chars < 0:
            raise ValueError(f"rollout.max_obs_chars={cfg.max_obs_chars}; expected >= 0 (0 = no cap)")
        self.engine = engine
        self.tokenizer = tokenizer
        self.cfg = cfg
        try:
            self.format = build_format(cfg.format, **({"fewshot": cfg.fewshot} if cfg.fewshot else {}))
        except TypeError:
            raise ValueError(f"rollout.fewshot is set but format {cfg.format!r} takes no examples (boxed, tool_call do)") from None
        self.reward_fn = compose(cfg.rewards or DEFAULT_REWARDS)
        self._special_ids = frozenset(tokenizer.all_special_ids) if tokenizer is not None else frozenset()
        # Lives as long as the rollout: workers (and idle envs) are reused from run to run.
        self.pool = EnvPool(cfg.env_workers, cfg.env_step_timeout, cfg.env_reset_timeout)
        # Called after every round of a run: (finished episodes, episodes in all, reply tokens so
        # far); trainer/progress.py's `Progress` shows it. AEPO's probe episodes are not counted.
        self.progress: Callable[[int, int, int], None] | None = None
        self._progress, self._progress_total, self._progress_tokens = None, 0, 0

    def close(self) -> None:
        """Stop the env workers (also done at interpreter exit)."""
        self.pool.close()

    def run(self, tasks: list[Task], sampling: SamplingConfig, seed: int | None = None) -> RolloutResult:
        timings = Counter()
        params = SamplingParams(
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            max_new_tokens=self.cfg.max_new_tokens,
            stop=list(self.format.stop),
            seed=seed,
        )
        started = time.perf_counter()
        policy = self.cfg.branch.policy
        roots = (
            self._premonitor(tasks, params, seed, timings)
            if policy == "aepo" and self.cfg.branch.premonitor
            else None
        )
        tree = _Tree(self.cfg.branch, tasks, seed, roots) if policy in ("arpo", "aepo") else None
        token_tree = _TokenTree(self.cfg.branch, tasks, seed) if policy == "token" else None
        episodes = self._start(tree.roots if tree else token_tree.roots if token_tree else tasks)
        if tree:
            episodes += self._refill(tree, episodes)  # groups whose every root failed at reset
        timings["env"] += time.perf_counter() - started
        self._progress, self._progress_total, self._progress_tokens = self.progress, len(tasks), 0
        try:
            rounds = self._play(episodes, params, seed, tree, timings)
            if token_tree:  # CURE/ETMR: the finished roots fork at high-entropy tokens
                t0 = time.perf_counter()
                episodes += self._token_forks(token_tree, episodes)
                episodes += self._start(token_tree.refill(skip=set()), first_id=len(episodes))
                timings["env"] += time.perf_counter() - t0
                self._play(episodes, params, seed, None, timings, first_round=rounds)
            self._report(episodes, [])  # also when no round was played (every reset failed)
        finally:
            self._progress = None
            self.pool.close_many([ep.handle for ep in episodes if ep.handle is not None])
        t_reward = time.perf_counter()
        prefetch_rewards([self._summary(ep) for ep in episodes if ep.turns], self.cfg.rewards or DEFAULT_REWARDS)
        samples = [s for ep in episodes for s in self._samples(ep)]
        timings["reward"] += time.perf_counter() - t_reward
        metrics = self._metrics(episodes, timings)
        for branching in (tree, token_tree):
            if branching:
                metrics.update(branching.metrics(episodes))
        if roots is not None:  # pre-monitoring's split and its cost (probe episodes are not trained)
            metrics["branch/premonitor_roots"] = sum(roots.values()) / max(len(roots), 1)
            metrics["branch/probe_tokens"] = float(timings["probe_tokens"])
        take_stats = getattr(self.engine, "take_stats", None)  # the HF engine's prefix-cache hits
        if take_stats is not None:
            metrics.update(take_stats())
        return RolloutResult(samples, metrics, [self._summary(ep) for ep in episodes])

    def _play(
        self,
        episodes: list[_Episode],
        params: SamplingParams,
        seed: int | None,
        tree: _Tree | None,
        timings: Counter,
        first_round: int = 0,
    ) -> int:
        """Rounds until no episode is live: every live episode's turn in one engine call, then
        one batched env step (then turn-level branching). Returns the next round's index."""
        rounds = first_round
        while active := [ep for ep in episodes if ep.stop_reason is None]:
            t0 = time.perf_counter()
            if self.cfg.agent != "model":
                rng = random.Random((seed or 0) * 1_000_003 + rounds)  # the random agent's draws
                turns = [(ep, turn) for ep in active if (turn := self._scripted_turn(ep, rng)) is not None]
            else:
                # One seed per round: the same seed every round would replay the same random
                # draws at every turn.
                round_params = params if seed is None else replace(params, seed=seed * 1_000_003 + rounds)
                turns = self._model_turns(active, round_params)
            rounds += 1
            t1 = time.perf_counter()
            self._step(turns)
            if tree:
                episodes += self._branch(tree, [ep for ep, _ in turns], len(episodes))
                episodes += self._refill(tree, episodes)
            timings["generate"] += t1 - t0
            timings["env"] += time.perf_counter() - t1
            self._report(episodes, turns)
        return rounds

    def _report(self, episodes: list[_Episode], turns: list[tuple[_Episode, _Turn]]) -> None:
        """The run's progress hook after a round: finished episodes, the budget (a branching
        run's leaves), and the reply tokens played so far."""
        if self._progress is None:
            return
        self._progress_tokens += sum(len(turn.result.token_ids) for _, turn in turns)
        done = sum(ep.stop_reason is not None for ep in episodes)
        self._progress(done, max(self._progress_total, len(episodes)), self._progress_tokens)

    # -- branching (agents/brancher.py decides, this executes) --------------------------------------

    def _branch(self, tree: _Tree, stepped: list[_Episode], next_id: int) -> list[_Episode]:
        """Fork the paths the brancher picks among this round's stepped episodes: the env by the
        pool's fork (snapshot or replay), the episode's records by copy. A failed env fork
        ends only the new branch."""
        parents = tree.decide(stepped, self.cfg.branch.entropy_window)
        if not parents:
            return []
        handles = self.pool.fork_many([parent.handle for parent in parents])
        children = []
        for k, (parent, handle) in enumerate(zip(parents, handles, strict=True)):
            child = replace(
                parent,
                traj_id=next_id + k,
                handle=None if isinstance(handle, EnvError) else handle,
                history=list(parent.history),
                messages=list(parent.messages),
                context_ids=list(parent.context_ids),
                deltas=list(parent.deltas),
                turns=list(parent.turns),  # the shared turns themselves are never mutated again
                parent_id=parent.traj_id,
                fork_turn=len(parent.turns),
                obs_truncated=0,  # the parent's cuts are counted once, on the parent
            )
            if isinstance(handle, EnvError):
                child.stop_reason, child.error = handle.reason, f"fork failed: {handle.message}"
            children.append(child)
        return children

    def _refill(self, tree: _Tree, episodes: list[_Episode]) -> list[_Episode]:
        """A group whose paths all ended with budget left starts its remaining episodes as new
        roots (ARPO spends unused budget on extra global samples); returns them."""
        live = {ep.task.group_id for ep in episodes if ep.stop_reason is None}
        tasks = tree.refill(skip=live)
        return self._start(tasks, first_id=len(episodes)) if tasks else []

    def _premonitor(self, tasks: list[Task], params: SamplingParams, seed: int | None, timings: Counter) -> dict[int, int]:
        """AEPO pre-monitoring (arXiv 2510.14545): one probe episode per group, played whole and
        not trained on; H_root = step entropy of its first turn, H_tool = the mean over all its
        turns (the first included); the group starts m = clamp(floor(k sigmoid(beta (H_root -
        H_tool))) + 1, 1, k) roots and keeps k - m for branches. {group_id: m}."""
        groups: dict[int, list[Task]] = {}
        for task in tasks:
            groups.setdefault(task.group_id, []).append(task)
        started = time.perf_counter()
        probes = self._start([replace(group[0]) for group in groups.values()])
        timings["env"] += time.perf_counter() - started
        try:
            self._play(probes, params, None if seed is None else seed + 7919, None, timings)
        finally:
            self.pool.close_many([ep.handle for ep in probes if ep.handle is not None])
        window, roots = self.cfg.branch.entropy_window, {}
        for (g, group), probe in zip(groups.items(), probes, strict=True):
            steps = [step_entropy(t.result.entropies, window) for t in probe.turns]
            if not steps:  # the probe failed at reset: no signal, the configured split
                roots[g] = initial_roots(self.cfg.branch, len(group))
                continue
            roots[g] = premonitor_roots(len(group), steps[0], sum(steps) / len(steps), self.cfg.branch.beta)
        timings["probe_tokens"] += sum(len(t.result.token_ids) for ep in probes for t in ep.turns)
        return roots

    def _token_forks(self, tree: _TokenTree, episodes: list[_Episode]) -> list[_Episode]:
        """CURE/ETMR forks of the finished roots: for each fork point (turn k, token j) the
        brancher picks, `continuations` new episodes start at turn k with the env cloned as it
        was before that turn (by replay) and the turn's first j sampled tokens as a prefix;
        the engine re-samples from token j on. A failed env clone ends only that branch."""
        points = tree.fork_points(episodes, self._eligible)
        if not points:
            return []
        parents = [ep for ep, _, _ in points]
        handles = self.pool.fork_many([ep.handle for ep in parents], at_steps=[k for _, k, _ in points])
        children = []
        for i, ((parent, k, j), handle) in enumerate(zip(points, handles, strict=True)):
            turn = parent.turns[k]
            child = _Episode(
                task=parent.task,
                traj_id=len(episodes) + i,
                handle=None if isinstance(handle, EnvError) else handle,
                obs=turn.obs,
                history=list(parent.history[:k]),
                messages=list(parent.messages[: turn.messages_len]),
                context_ids=list(turn.prompt_ids),
                prompt_ids=list(parent.prompt_ids),
                deltas=[list(d) for d in parent.deltas[:k]],
                turns=list(parent.turns[:k]),
                meta=dict(parent.meta),
                parent_id=parent.traj_id,
                fork_turn=k,
                fork_offset=j,
                prefix=_head(turn.result, j),
            )
            child.score = sum(t.reward for t in child.turns)
            child.parse_errors = sum(t.parse_error is not None for t in child.turns)
            if isinstance(handle, EnvError):
                child.stop_reason, child.error = handle.reason, f"fork failed: {handle.message}"
            children.append(child)
        return children

    def _eligible(self, token_id: int) -> bool:
        """A token worth forking at: not special, more than one visible character (CURE)."""
        if self.tokenizer is None:
            return True
        if token_id in self._special_ids:
            return False
        return len(self.tokenizer.decode([token_id]).strip()) > 1

    # -- one round --------------------------------------------------------------------------------

    def _start(self, tasks: list[Task], first_id: int = 0) -> list[_Episode]:
        """Open and reset every task's env in one pool batch; a broken env ends its own episode."""
        episodes = [_Episode(task=task, traj_id=first_id + i) for i, task in enumerate(tasks)]
        for ep in episodes:
            try:
                ep.handle = self.pool.open(ep.task.env_id, ep.task.env_kwargs)
            except KeyError as exc:  # unknown env id
                ep.stop_reason, ep.error = "env_error", f"{type(exc).__name__}: {exc}"
        opened = [ep for ep in episodes if ep.handle is not None]
        outcomes = self.pool.reset_many(
            [ep.handle for ep in opened],
            [ep.task.seed for ep in opened],
            [ep.task.reset_options or None for ep in opened],
        )
        for ep, outcome in zip(opened, outcomes, strict=True):
            if isinstance(outcome, EnvError):
                ep.stop_reason, ep.error = outcome.reason, outcome.message
            else:
                self._observe(ep, *outcome)
                info = outcome[1]
                ep.meta = {k: info[k] for k in TASK_META_KEYS if isinstance(info.get(k), (str, int))}
        if self.cfg.agent == "expert":
            self._load_plans([ep for ep in opened if ep.stop_reason is None])
        return episodes

    def _model_turns(self, active: list[_Episode], params: SamplingParams) -> list[tuple[_Episode, _Turn]]:
        """One batched engine call over every episode whose next prompt fits; parsed replies."""
        prompts = [(ep, self._next_prompt(ep)) for ep in active]
        ready = [(ep, prompt) for ep, prompt in prompts if ep.stop_reason is None]
        # a token-level branch continues its fork turn after the parent's first j tokens
        asked = [(ep, prompt + ep.prefix.token_ids if ep.prefix else prompt) for ep, prompt in ready]
        results = self._generate(asked, params) if ready else []
        turns = []
        for (ep, prompt), result in zip(ready, results, strict=True):
            if result is None:
                continue
            if ep.prefix is not None:
                result, ep.prefix = _joined(ep.prefix, result), None
            turns.append((ep, self._parse(ep, prompt, result)))
        return turns

    def _generate(self, ready: list[tuple[_Episode, list[int]]], params: SamplingParams) -> list:
        """The batch's results. A failing call is retried once (a transient fault); if it fails
        again, the requests go one at a time and only those that still fail end their episode
        (`engine_error`, result None): one poisoned request never takes the batch down."""
        for _ in range(2):
            try:
                return self.engine.generate([prompt for _, prompt in ready], params)
            except Exception:  # noqa: BLE001 - any engine fault: retry, then isolate
                continue
        results = []
        for ep, prompt in ready:
            try:
                results.append(self.engine.generate([prompt], params)[0])
            except Exception as exc:  # noqa: BLE001
                ep.stop_reason, ep.error = "engine_error", f"{type(exc).__name__}: {exc}"
                results.append(None)
        return results

    def _next_prompt(self, ep: _Episode) -> list[int]:
        if self.cfg.mode == "step":
            window = ep.history[-self.cfg.history_window :] if self.cfg.history_window else []
            prompt = render_prompt(self.tokenizer, self.format.messages(ep.obs, window), self.format.prefill, self.cfg.chat_template_kwargs)
        elif not ep.turns:
            ep.messages = self.format.messages(ep.obs)
            prompt = ep.prompt_ids = ep.context_ids = render_prompt(
                self.tokenizer, ep.messages, self.format.prefill, self.cfg.chat_template_kwargs
            )
        else:
            prompt = ep.context_ids
        prefix = len(ep.prefix.token_ids) if ep.prefix else 0  # a token-level branch's head
        if len(prompt) + prefix + self.cfg.max_new_tokens > self.cfg.max_context:
            ep.stop_reason = "context_overflow"
        return prompt

    def _parse(self, ep: _Episode, prompt: list[int], result: GenerationResult) -> _Turn:
        # no clean-up: transformers 4.x would drop spaces before punctuation for some tokenizers
        reply = self.tokenizer.decode(result.token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        parsed = self.format.parse(reply, ep.obs)
        ep.parse_errors += parsed.error is not None
        ep.parse_error_streak = ep.parse_error_streak + 1 if parsed.error else 0
        return _Turn(
            list(prompt),
            result,
            parsed.action,
            parsed.error,
            anchor_key(ep.obs),
            obs=ep.obs,
            messages_len=len(ep.messages),
        )

    def _load_plans(self, episodes: list[_Episode]) -> None:
        for ep, plan in zip(episodes, self.pool.walkthrough_many([ep.handle for ep in episodes]), strict=True):
            if isinstance(plan, EnvError):
                ep.stop_reason, ep.error = plan.reason, plan.message
            elif not plan:
                ep.stop_reason = "env_error"
                ep.error = f"env {ep.task.env_id!r} gave no walkthrough for this task: the expert agent cannot play it"
            else:
                ep.plan = list(plan)

    def _scripted_turn(self, ep: _Episode, rng: random.Random) -> _Turn | None:
        """A model-free agent's turn: the expert's next action, or a uniformly random valid command."""
        if self.cfg.agent == "expert":
            return self._expert_turn(ep)
        if not (ep.obs.choices or []):
            ep.stop_reason = "env_error"
            ep.error = (
                "agent=random picks from the env's valid commands: set env.kwargs.admissible_commands=true"
            )
            return None
        no_tokens = GenerationResult(token_ids=[], logprobs=[], entropies=[], finish_reason="stop")
        return _Turn([], no_tokens, rng.choice(ep.obs.choices), None, anchor_key(ep.obs))

    def _expert_turn(self, ep: _Episode) -> _Turn | None:
        """The walkthrough's next action: with no tokens, or (with a tokenizer) as the ids of the
        format's reply for it after the prompt the model would see. None when the episode ends
        instead (the prompt does not fit, or the format cannot express the action)."""
        action = ep.plan[len(ep.turns)]
        if self.tokenizer is None:
            no_tokens = GenerationResult(token_ids=[], logprobs=[], entropies=[], finish_reason="stop")
            return _Turn([], no_tokens, action, None, anchor_key(ep.obs))
        prompt = self._next_prompt(ep)
        reply = self.format.reply_for(action, ep.obs)
        if reply is None:
            ep.stop_reason = "env_error"
            ep.error = f"expert action {action!r} cannot be written in format {self.cfg.format!r} (not a listed command)"
        if ep.stop_reason is not None:
            return None
        ids = encode(self.tokenizer, reply)
        if not self.format.stop and self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)  # a format without a stop string ends at EOS
        result = GenerationResult(ids, [0.0] * len(ids), [0.0] * len(ids), finish_reason="stop")
        return _Turn(
            list(prompt), result, action, None, anchor_key(ep.obs), obs=ep.obs, messages_len=len(ep.messages)
        )

    def _step(self, turns: list[tuple[_Episode, _Turn]]) -> None:
        """Step every episode's env with its turn's action, all in one pool batch."""
        outcomes = self.pool.step_many([ep.handle for ep, _ in turns], [turn.action for _, turn in turns])
        for (ep, turn), outcome in zip(turns, outcomes, strict=True):
            ep.turns.append(turn)
            if isinstance(outcome, EnvError):  # the env raised, its worker died, or it hung (timeout)
                ep.stop_reason, ep.error = outcome.reason, outcome.message
                continue
            text, reward, terminated, truncated, info = outcome
            ep.score += float(reward)
            turn.reward = float(reward)
            ep.won = ep.won or bool(info.get("won", False))
            ep.history.append((ep.obs.text, turn.action))
            self._observe(ep, text, info)
            ep.stop_reason = self._stop_reason(ep, terminated, truncated)
            if self.cfg.mode == "trajectory" and ep.stop_reason is None and self.tokenizer is not None:
                self._append_observation(ep, turn.result)

    def _observe(self, ep: _Episode, text: Any, info: dict) -> None:
        """The episode's current observation from the env's text and info, sanitised; counts a cut."""
        cap = self.cfg.max_obs_chars
        ep.obs = _observation(self.pool.task(ep.handle), self.pool.tools(ep.handle), text, info, cap)
        ep.obs_truncated += cap > 0 and len(_as_text(text)) > cap

    def _append_observation(self, ep: _Episode, result: GenerationResult) -> None:
        """Token-exact: sampled ids go in as they are; only the env's message is tokenized."""
        reply_ended = result.finish_reason == "stop" and _ends_turn(self.tokenizer, result.token_ids)
        message = self.format.followup(ep.obs)
        delta = delta_ids(
            self.tokenizer,
            ep.messages,
            message,
            reply_ended,
            self.format.prefill,
            self.cfg.chat_template_kwargs,
        )
        ep.messages = [*ep.messages, {"role": "assistant", "content": ""}, message]
        ep.deltas.append(delta)
        ep.context_ids = ep.context_ids + result.token_ids + delta

    def _stop_reason(self, ep: _Episode, terminated: bool, truncated: bool) -> str | None:
        cfg = self.cfg
        if terminated:
            return "terminated"
        if truncated:
            return "truncated"
        if len(ep.turns) >= cfg.max_turns:
            return "max_turns"
        if sum(len(t.result.token_ids) for t in ep.turns) >= cfg.max_episode_tokens:
            return "max_tokens"
        if cfg.parse_error_limit and ep.parse_error_streak >= cfg.parse_error_limit:
            return "parse_error_limit"
        if ep.plan is not None and len(ep.turns) >= len(ep.plan):
            return "max_turns"  # the expert's walkthrough is played out and the episode goes on
        return None

    # -- records ----------------------------------------------------------------------------------

    def _summary(self, ep: _Episode) -> dict:
        return {
            "won": ep.won,
            "score": ep.score,
            "turns": len(ep.turns),
            "parse_errors": ep.parse_errors,
            "generated_tokens": sum(len(t.result.token_ids) for t in ep.turns),
            "stop_reason": ep.stop_reason,
            "env_id": ep.task.env_id,
            "group_id": ep.task.group_id,
            "traj_id": ep.traj_id,
            "task": {**ep.meta, **ep.task.reset_options},
            "actions": [t.action for t in ep.turns],
            "turn_rewards": [t.reward for t in ep.turns],
            "anchor_keys": [t.anchor_key for t in ep.turns],
            "error": ep.error,
            "parent_id": ep.parent_id,
            "fork_turn": ep.fork_turn,
            "final_answer": _final_answer(ep),
        }

    def _samples(self, ep: _Episode) -> list[Trajectory]:
        if not ep.turns:
            return []  # nothing was sampled (env failed at reset): nothing to train on
        summary = self._summary(ep)
        reward = self.reward_fn(summary)
        common = dict(
            reward=reward,
            group_id=ep.task.group_id,
            traj_id=ep.traj_id,
            stop_reason=ep.stop_reason,
            parent_id=ep.parent_id,
            fork_turn=ep.fork_turn,
        )
        if self.cfg.mode == "step":
            # A branch's turns before its fork are its parent's samples already: emitted once.
            first = ep.fork_turn or 0
            return [
                Trajectory(
                    prompt_ids=t.prompt_ids,
                    response_ids=list(t.result.token_ids),
                    # a token-level branch's fork turn: its first tokens are the parent's sample
                    loss_mask=_own_mask(len(t.result.token_ids), ep.fork_offset if k == first else 0),
                    rollout_logprobs=_own_values(t.result.logprobs, ep.fork_offset if k == first else 0),
                    entropies=_own_values(t.result.entropies, ep.fork_offset if k == first else 0),
                    turn_idx=k,
                    step_reward=t.reward,
                    anchor_key=t.anchor_key,
                    turn_spans=[(0, len(t.result.token_ids))],
                    info={**summary, "parse_error": t.parse_error} if k == first else {"parse_error": t.parse_error},
                    **common,
                )
                for k, t in enumerate(ep.turns)
                if k >= first
            ]
        return [self._trajectory_sample(ep, summary, common)]

    def _trajectory_sample(self, ep: _Episode, summary: dict, common: dict) -> Trajectory:
        ids, mask, logprobs, entropies, spans = [], [], [], [], []
        for k, turn in enumerate(ep.turns):
            n = len(turn.result.token_ids)
            spans.append((len(ids), len(ids) + n))
            ids += turn.result.token_ids
            mask += [1] * n
            logprobs += turn.result.logprobs
            entropies += turn.result.entropies
            if k < len(ep.deltas):
                delta = ep.deltas[k]
                ids += delta
                mask += [0] * len(delta)
                logprobs += [0.0] * len(delta)
                entropies += [0.0] * len(delta)
        return Trajectory(
            prompt_ids=ep.prompt_ids,
            response_ids=ids,
            loss_mask=mask,
            rollout_logprobs=logprobs,
            entropies=entropies,
            turn_spans=spans,
            fork_token=None if ep.fork_turn is None else _fork_token(spans, ep.fork_turn, len(ids)) + ep.fork_offset,
            info=summary,
            **common,
        )

    def _role_entropy(self, turns: list[_Turn]) -> dict[str, float]:
        """Mean entropy of the sampled tokens by role (reasoning, action, tool_call, answer)."""
        if self.tokenizer is None:
            return {}
        by_role = _role_entropy_sums(self.tokenizer, turns, self.format.prefill)
        return {f"entropy/role/{role}": sum(hs) / len(hs) for role, hs in by_role.items()}

    def _metrics(self, episodes: list[_Episode], timings: Counter) -> dict[str, float]:
        n = max(len(episodes), 1)
        turns = [t for ep in episodes for t in ep.turns]
        tokens = sum(len(t.result.token_ids) for t in turns)
        entropy_sum = sum(sum(t.result.entropies) for t in turns)
        metrics = {
            "rollout/episodes": float(len(episodes)),
            "rollout/success": sum(ep.won for ep in episodes) / n,
            "rollout/score": sum(ep.score for ep in episodes) / n,
            "rollout/turns": len(turns) / n,
            "rollout/invalid_rate": sum(t.parse_error is not None for t in turns) / max(len(turns), 1),
            "rollout/gen_tokens": float(tokens),
            "rollout/obs_truncated": float(sum(ep.obs_truncated for ep in episodes)),
            "entropy/rollout_mean": entropy_sum / max(tokens, 1),
            "time/generate": timings["generate"],
            "time/env": timings["env"],
            "time/reward": timings["reward"],
        }
        for reason, count in Counter(ep.stop_reason for ep in episodes).items():
            metrics[f"rollout/stop/{reason}"] = count / n
        metrics.update(self._role_entropy(turns))
        for k in range(max((len(ep.turns) for ep in episodes), default=0)):
            kth = [ep.turns[k].result.entropies for ep in episodes if len(ep.turns) > k]
            flat = [h for hs in kth for h in hs]
            metrics[f"entropy/turn_{k}"] = sum(flat) / max(len(flat), 1)
        return metrics


def check_format_template(tokenizer: Any, format_name: str, template_kwargs: dict | None = None) -> tuple[bool, str]:
    """`entrorl check-template`: do a 3-turn episode's per-turn appends, as this loop builds them
    with `format_name`'s system prompt and prefill, equal a full render of the conversation?"""
    fmt = build_format(format_name)
    turns = [
        ("Goal: put the apple in the fridge.\nYou are in a kitchen.", "open fridge"),
        ("You open the fridge. It is empty.", "take apple"),
        ('You take the apple. {"json": [1, 2]} and unicode: café ✓', "put apple in fridge"),
    ]
    if _thinks(tokenizer, template_kwargs):
        # a reasoning model's replies open with reasoning, which some templates (Qwen3) drop
        # from past turns when they re-render: the check must exercise exactly that
        turns = [(obs, f"<think>\nThe goal needs: {reply}.\n</think>\n\n{reply}") for obs, reply in turns]
    first = Observation(task="put the apple in the fridge", text=turns[0][0], choices=["open fridge", "look"])
    system = fmt.messages(first)[0]["content"]  # e.g. tool_call's system lists the tool specs
    return check_template(tokenizer, turns, system=system, prefill=fmt.prefill, template_kwargs=template_kwargs)


def _thinks(tokenizer: Any, template_kwargs: dict | None) -> bool:
    """Whether the chat template handles reasoning blocks and thinking is not switched off."""
    template = getattr(tokenizer, "chat_template", None) or ""
    return "<think>" in str(template) and (template_kwargs or {}).get("enable_thinking", True) is not False


def _role_entropy_sums(tokenizer: Any, turns: list[_Turn], prefill: str) -> dict[str, list[float]]:
    by_role: dict[str, list[float]] = {}
    for turn in turns:
        ids = turn.result.token_ids
        if not ids:
            continue
        pieces = [tokenizer.decode([t], skip_special_tokens=True) for t in ids]
        for role, entropy in zip(token_roles(pieces, prefill), turn.result.entropies, strict=True):
            by_role.setdefault(role, []).append(entropy)
    return by_role


def _observation(env_task: str, tools: list[dict], text: Any, info: dict, max_chars: int = 0) -> Observation:
    """The prompt's view of an env's output; all env text sanitised (`sanitize_observation`)."""
    task = sanitize_observation(info.get("objective") or env_task or "", max_chars)
    choices = info.get("admissible_commands")
    if isinstance(choices, (list, tuple)):
        choices = [sanitize_observation(c, max_chars) for c in choices]
    text = sanitize_observation(text, max_chars)
    return Observation(task=task, text=text, choices=choices, tools=tools or None)


def sanitize_observation(text: Any, max_chars: int = 0) -> str:
    """Env text made safe to tokenize, as readable as it can stay.

    Bytes are decoded as UTF-8 (bad bytes -> U+FFFD), None is "", anything else `str()`. Lone
    surrogates, which a str decoded with `surrogateescape` carries and tokenizers refuse (a
    TypeError, or "surrogates not allowed"), become U+FFFD; a well-formed surrogate pair becomes
    its character.
    With `max_chars` > 0, a longer text keeps its first ceil(max_chars / 2) and last
    floor(max_chars / 2) characters around `\\n[... N chars dropped ...]\\n`. Pure; never raises.
    """
    text = _as_text(text)
    if max_chars > 0 and len(text) > max_chars:
        tail = max_chars // 2
        head = max_chars - tail
        text = f"{text[:head]}\n[... {len(text) - max_chars} chars dropped ...]\n{text[len(text) - tail :]}"
    if _SURROGATE.search(text):
        text = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    return text


def _as_text(text: Any) -> str:
    if isinstance(text, str):
        return text
    if isinstance(text, (bytes, bytearray)):
        return bytes(text).decode("utf-8", errors="replace")
    return "" if text is None else str(text)


def anchor_key(obs: Observation | None) -> str | None:
    """GiGPO anchor state: a stable hash (same across processes and runs, unlike `hash`) of the
    raw observation a turn's prompt was built from (objective, text, offered commands), without
    the history."""
    if obs is None:
        return None
    raw = json.dumps([obs.task, obs.text, obs.choices], ensure_ascii=False)
    return hashlib.sha1(raw.encode("utf-8")).hexdigest()[:16]


def _ends_turn(tokenizer: Any, token_ids: list[int]) -> bool:
    return bool(token_ids) and token_ids[-1] == tokenizer.eos_token_id


def _final_answer(ep: _Episode) -> str | None:
    """The final answer (\\boxed{}, ####, Answer:) of the last reply, for maj@k; None if none."""
    answer = final_answer(ep.turns[-1].action) if ep.turns else None
    return answer if isinstance(answer, str) else None


def _head(result: GenerationResult, j: int) -> GenerationResult:
    """The first j sampled tokens of a reply, with their log-probs and entropies."""
    return GenerationResult(result.token_ids[:j], result.logprobs[:j], result.entropies[:j], "length", result.entropy_is_exact)


def _joined(prefix: GenerationResult, rest: GenerationResult) -> GenerationResult:
    """A fork turn's reply: the parent's prefix, then what the engine sampled after it."""
    return GenerationResult(
        prefix.token_ids + rest.token_ids,
        prefix.logprobs + rest.logprobs,
        prefix.entropies + rest.entropies,
        rest.finish_reason,
        prefix.entropy_is_exact and rest.entropy_is_exact,
    )


def _own_mask(n: int, shared: int) -> list[int]:
    return [0] * min(shared, n) + [1] * max(n - shared, 0)


def _own_values(values: list[float], shared: int) -> list[float]:
    """Per-token values with the shared prefix zeroed (0.0 where loss_mask == 0)."""
    return [0.0] * min(shared, len(values)) + list(values[shared:])


def _fork_token(spans: list[tuple[int, int]], fork_turn: int, length: int) -> int:
    """Response position where a branch's own tokens start: its first own turn's reply."""
    return spans[fork_turn][0] if fork_turn < len(spans) else length


class _Tree:
    """Branching state of one `run`: per group, the budget (the group's task count = leaves),
    the brancher's `GroupState`, and the task template new roots are made from. Made fresh
    every run, so nothing leaks across training steps."""

    def __init__(self, cfg: BranchConfig, tasks: list[Task], seed: int | None, roots: dict[int, int] | None = None):
        self.cfg = cfg
        # With no seed (training), draw from the global RNG that checkpoints restore.
        self.rng = random.Random(seed if seed is not None else random.getrandbits(64))
        by_group: dict[int, list[Task]] = {}
        for task in tasks:
            by_group.setdefault(task.group_id, []).append(task)
        self.template = {g: group[0] for g, group in by_group.items()}
        self.states: dict[int, GroupState] = {}
        self.roots: list[Task] = []
        for g, group in by_group.items():
            m = roots[g] if roots is not None else initial_roots(cfg, len(group))  # pre-monitored
            self.states[g] = GroupState(budget=len(group), used=m)
            self.roots += group[:m]
        self.premonitored = roots
        self.fork_entropies: list[float] = []  # step entropy of the turns that were forked after
        self.other_entropies: list[float] = []

    def decide(self, stepped: list[_Episode], window: int) -> list[_Episode]:
        """The episodes to fork now (one entry per copy), group by group."""
        by_group: dict[int, list[_Episode]] = {}
        for ep in stepped:
            by_group.setdefault(ep.task.group_id, []).append(ep)
        parents: list[_Episode] = []
        for g, group in sorted(by_group.items()):
            views = [
                PathView(
                    i,
                    step_entropy(ep.turns[0].result.entropies, window),
                    step_entropy(ep.turns[-1].result.entropies, window),
                    can_branch=ep.stop_reason is None,
                )
                for i, ep in enumerate(group)
            ]
            copies = decide_turn_branches(views, self.states[g], self.cfg, self.rng)
            for i, view in enumerate(views):
                (self.fork_entropies if i in copies else self.other_entropies).append(view.last_entropy)
                parents += [group[i]] * copies.get(i, 0)
        return parents

    def refill(self, skip: set[int]) -> list[Task]:
        """Tasks for the unused budget of every group not in `skip` (groups with live paths)."""
        fresh = []
        for g, state in self.states.items():
            if g not in skip and state.left > 0:
                fresh += [replace(self.template[g]) for _ in range(state.left)]
                state.used = state.budget
        return fresh

    def metrics(self, episodes: list[_Episode]) -> dict[str, float]:
        groups = max(len(self.states), 1)
        branches = [ep for ep in episodes if ep.parent_id is not None]
        roots = [ep for ep in episodes if ep.parent_id is None]
        depth = {ep.traj_id: 0 for ep in roots}
        for ep in sorted(branches, key=lambda e: e.traj_id):  # a parent has a smaller traj_id
            depth[ep.traj_id] = depth.get(ep.parent_id, 0) + 1
        # turns before the fork, plus a token-level branch's inherited head of its fork turn
        shared = sum(sum(len(t.result.token_ids) for t in ep.turns[: ep.fork_turn]) + ep.fork_offset for ep in branches)
        mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
        return {
            "branch/per_group": len(branches) / groups,
            "branch/max_depth": float(max(depth.values(), default=0)),
            "branch/fork_entropy": mean(self.fork_entropies),
            "branch/other_entropy": mean(self.other_entropies),
            "branch/budget_used": sum(s.used for s in self.states.values()) / max(sum(s.budget for s in self.states.values()), 1),
            # generated tokens a branch did not have to sample again (flat sampling would have)
            "branch/tokens_saved": float(shared),
            "branch/success_root": mean([float(ep.won) for ep in roots]),
            "branch/success_branch": mean([float(ep.won) for ep in branches]),
        }


class _TokenTree(_Tree):
    """Token-level branching (CURE/ETMR) for one rollout: per group, `initial_roots` roots play
    whole episodes; then each finished root forks at `forks` token positions the brancher picks
    among its sampled tokens (`token_fork_points`), `continuations` branches each; budget left
    (a root with too few eligible tokens, a reset failure) becomes fresh roots (`refill`).
    Budget, templates, refill and metrics are `_Tree`'s. Made fresh every run."""

    def fork_points(self, episodes: list[_Episode], eligible: Callable[[int], bool]) -> list[tuple[_Episode, int, int]]:
        """(root, turn k, token j) once per branch to make, within each group's budget."""
        points = []
        for ep in episodes:
            state = self.states[ep.task.group_id]
            flat = [(k, j) for k, t in enumerate(ep.turns) for j in range(len(t.result.token_ids))]
            if not flat or ep.handle is None:
                continue
            entropies = [ep.turns[k].result.entropies[j] for k, j in flat]
            ok = [eligible(ep.turns[k].result.token_ids[j]) for k, j in flat]
            chosen = token_fork_points(entropies, ok, self.cfg, self.rng)
            self.fork_entropies += [entropies[i] for i in chosen]
            self.other_entropies += [h for i, h in enumerate(entropies) if ok[i] and i not in chosen]
            for i in chosen:
                made = min(self.cfg.continuations, state.left)
                state.used += made
                points += [(ep, *flat[i])] * made
        return points
