"""The TextEnv contract (gymnasium's reset/step, text in and text out), the id registry and
`check_env`.

Bad actions and tool errors become observation text, never exceptions: an exception out of
`step` means the simulator itself broke, and the rollout ends only that episode (`env_error`).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

import gymnasium as gym


class TextEnv(gym.Env):
    """A gymnasium env whose observations and actions are strings.

    `reset(seed, options) -> (observation, info)`; `step(action) -> (observation, reward,
    terminated, truncated, info)`. `info` carries at least `won` (bool) after a step, and
    `admissible_commands` (list[str]) only when the env was built to expose them.
    `tools` lists JSON-schema specs of the tools an agent may call (empty for plain text games).
    `task` is a short natural-language goal for the prompt builder.
    """

    metadata = {"render_modes": []}
    tools: list[dict] = []

    def walkthrough(self) -> list[str] | None:
        """A winning action sequence from the state the last `reset` made (stored walkthrough,
        gold path or scripted expert), or None when the env has none. Used by the expert agent
        (`entrorl eval CONFIG agent=expert`) and by tests that must win a task."""
        return None

    def snapshot(self) -> Any:
        """State to `restore` later (for forking). Default: not supported; callers replay actions."""
        raise NotImplementedError(f"{type(self).__name__} has no snapshot; fork it by replaying actions")

    def restore(self, state: Any) -> None:
        raise NotImplementedError(f"{type(self).__name__} has no restore; fork it by replaying actions")


_REGISTRY: dict[str, str | Callable[..., TextEnv]] = {}


def register(env_id: str, entry_point: str | Callable[..., TextEnv]) -> None:
    """Register `env_id` -> "module:factory" (imported lazily) or a callable."""
    if env_id in _REGISTRY and _REGISTRY[env_id] != entry_point:
        raise ValueError(f"env id {env_id!r} is already registered to {_REGISTRY[env_id]!r}")
    _REGISTRY[env_id] = entry_point


def registered_ids() -> list[str]:
    return sorted(_REGISTRY)


def _entry(env_id: str) -> Callable[..., TextEnv]:
    if env_id not in _REGISTRY:
        raise KeyError(f"unknown env id {env_id!r}; registered ids: {', '.join(registered_ids())}")
    entry = _REGISTRY[env_id]
    if isinstance(entry, str):
        module_name, _, attr = entry.partition(":")
        entry = getattr(importlib.import_module(module_name), attr)
    return entry


def make(env_id: str, **kwargs: Any) -> TextEnv:
    return _entry(env_id)(**kwargs)


def check_kwargs(env_id: str, kwargs: dict[str, Any]) -> None:
    """Raise ValueError naming any key `make(env_id, **kwargs)` would reject, with the valid ones.

    Checked once at startup: inside the env workers a bad key only ends every episode with
    `env_error`, which reads like a policy that never wins."""
    params = inspect.signature(_entry(env_id)).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    valid = [name for name, p in params.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL]
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        keys = ", ".join(f"env.kwargs.{k}" for k in unknown)
        raise ValueError(f"{keys}: not an argument of the {env_id!r} env; it takes {', '.join(valid)}")


def check_env(env: TextEnv, seed: int = 0, actions: list[str] | None = None) -> None:
    """Contract checks: types, seeded-reset determinism, bad actions as text, termination flags.

    Raises AssertionError naming the broken rule.
    """
    obs1, info1 = env.reset(seed=seed)
    assert isinstance(obs1, str), f"reset must return str observation, got {type(obs1).__name__}"
    assert isinstance(info1, dict), f"reset must return dict info, got {type(info1).__name__}"
    obs2, _ = env.reset(seed=seed)
    assert obs1 == obs2, "reset(seed) is not deterministic: two resets with the same seed differ"
    for action in actions or ["xyzzy plugh", "", "look"]:
        out = env.step(action)
        assert len(out) == 5, f"step must return 5 values, got {len(out)}"
        obs, reward, terminated, truncated, info = out
        assert isinstance(obs, str), f"step observation must be str, got {type(obs).__name__}"
        assert isinstance(reward, (int, float)), f"reward must be a number, got {type(reward).__name__}"
        assert isinstance(terminated, bool) and isinstance(truncated, bool), "terminated/truncated must be bool"
        assert isinstance(info, dict), "step info must be a dict"
        if terminated or truncated:
            break
    for spec in env.tools:
        assert {"name", "description", "parameters"} <= set(spec), f"tool spec lacks keys: {spec}"


# Built-in envs (string entry points: nothing is imported until `make`).
register("textworld", "environments.textworld_env:TextWorldEnv")
register("alfworld", "environments.alfworld_env:AlfWorldEnv")
register("scienceworld", "environments.scienceworld_env:ScienceWorldEnv")
register("math", "environments.math_env:MathEnv")
