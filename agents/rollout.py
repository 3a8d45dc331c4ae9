"""The one multi-turn rollout loop: engine <-> env, for every env and both sample modes.

Each round gathers every active episode into ONE engine call, parses each reply into an action,
steps every episode's env in ONE env-pool batch (`environments/pool.py`: in-process, or worker
processes stepping in parallel), and decides whether each episode goes on. Errors stay inside
their episode: an env that raises or whose worker dies ends only that episode (`env_error`), a
step that overruns `env_step_timeout` ends it with `timeout`, an unparsable reply becomes the
format's fallback action and is counted. Env text is sanitised before it is tokenized
(`sanitize_observation`, agents/observations.py): undecodable characters become U+FFFD and
gigantic text is cut to `max_obs_chars`.

`agent="expert"` plays each env's `walkthrough()` through the same loop instead of a model
(`entrorl eval CONFIG agent=expert`). Without a tokenizer its turns have no tokens. With one it
is a teacher: each turn's prompt is rendered exactly as for the model, and its "sampled" ids are
the format's reply for the expert action (`reply_for`), so the samples are the ones RL would
train on had the model chosen those actions (supervised fine-tuning, `trainer/sft.py`).

Around the loop, in their own modules (every name other code imports from here still is):
agents/episode_records.py holds `Task` and the episode records, and turns them into summaries,
samples and metrics; agents/branch_tree.py a run's branching state (agents/brancher.py decides
where to fork, this loop forks); agents/observations.py builds and sanitises observations.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from agents.branch_tree import _head, _joined, _TokenTree, _Tree
from agents.brancher import initial_roots, premonitor_roots, step_entropy
from agents.chat import check_template, delta_ids, encode, render_prompt
from agents.config import RolloutConfig, SamplingConfig
from agents.engines.base import InferenceEngine, SamplingParams
from agents.episode_records import Task, _Episode, _Turn, episode_samples, episode_summary, rollout_metrics
from agents.observations import (
    _as_text,
    _observation,
    anchor_key,
    sanitize_observation,  # noqa: F401 - re-exported: `from agents.rollout import sanitize_observation`
)
from agents.prompts import Observation, build_format
from agents.rewards import compose
from agents.rewards import prefetch as prefetch_rewards
from agents.types import GenerationResult, Trajectory
from environments.pool import EnvError, EnvPool

AGENTS = ("model", "expert", "random")
DEFAULT_REWARDS = {"success": 1.0}
# Reset-info keys copied into each episode's summary["task"]: evaluation splits success by them.
TASK_META_KEYS = ("task_type", "task_name", "subject", "level")


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
        prefetch_rewards([episode_summary(ep) for ep in episodes if ep.turns], self.cfg.rewards or DEFAULT_REWARDS)
        samples = [s for ep in episodes for s in episode_samples(ep, self.reward_fn, self.cfg.mode)]
        timings["reward"] += time.perf_counter() - t_reward
        metrics = rollout_metrics(episodes, timings, self.tokenizer, self.format.prefill)
        for branching in (tree, token_tree):
            if branching:
                metrics.update(branching.metrics(episodes))
        if roots is not None:  # pre-monitoring's split and its cost (probe episodes are not trained)
            metrics["branch/premonitor_roots"] = sum(roots.values()) / max(len(roots), 1)
            metrics["branch/probe_tokens"] = float(timings["probe_tokens"])
        take_stats = getattr(self.engine, "take_stats", None)  # the HF engine's prefix-cache hits
        if take_stats is not None:
            metrics.update(take_stats())
        return RolloutResult(samples, metrics, [episode_summary(ep) for ep in episodes])

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


def _ends_turn(tokenizer: Any, token_ids: list[int]) -> bool:
    return bool(token_ids) and token_ids[-1] == tokenizer.eos_token_id
