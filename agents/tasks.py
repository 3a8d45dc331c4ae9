"""Task sources: for each env id, the list of tasks (reset options) a split plays.

A task is what makes episodes comparable inside a GRPO group: same env, same initial state.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

from agents.rollout import Task

# A task source maps task ids (seeds) to reset options, preparing what they need (e.g. making
# game files) only for the ids asked for: a run touches only the tasks it samples.
TaskSource = Callable[[list[int], dict], list[dict]]
TASK_SOURCES: dict[str, TaskSource] = {}


def task_source(env_id: str) -> Callable[[TaskSource], TaskSource]:
    def register(fn: TaskSource) -> TaskSource:
        TASK_SOURCES[env_id] = fn
        return fn

    return register


@task_source("textworld")
def textworld_games(seeds: list[int], level: dict) -> list[dict]:
    """One generated game per seed at `level` (world_size, nb_objects, quest_length), cached; or,
    with `level.games` (a folder, or a list of .z8/.ulx files), the user's games: seed i plays
    game i mod N of the sorted list."""
    from environments.textworld_env import ensure_games

    if "games" in level:
        return [{"game_file": path} for path in _user_games(level["games"], seeds)]
    return [{"game_file": path} for path in ensure_games(seeds, **level)]


def _user_games(games: str | list[str], seeds: list[int]) -> list[str]:
    paths = [games] if isinstance(games, str) else list(games)
    found: list[str] = []
    for path in map(Path, paths):
        if path.is_dir():
            found += sorted(str(p) for p in path.rglob("*") if p.suffix in (".z8", ".ulx"))
        elif path.is_file():
            found.append(str(path))
        else:
            raise FileNotFoundError(f"env.level.games: {path} is neither a game file nor a folder of .z8/.ulx games")
    if not found:
        raise FileNotFoundError(f"env.level.games={games!r} holds no .z8/.ulx game files")
    return [found[seed % len(found)] for seed in seeds]


@task_source("alfworld")
def alfworld_games(seeds: list[int], level: dict) -> list[dict]:
    """Game files of a split (official data or generated), indexed by seed."""
    from environments.alfworld_env import task_options

    return task_options(seeds, level)


@task_source("scienceworld")
def scienceworld_tasks(seeds: list[int], level: dict) -> list[dict]:
    """(task, variation) pairs of a split, indexed by seed."""
    from environments.scienceworld_env import task_options

    return task_options(seeds, level)


@task_source("math")
def math_problems(seeds: list[int], level: dict) -> list[dict]:
    """Problems of a dataset (GSM8K, MATH-500, user JSONL, synthetic), indexed by seed."""
    from environments.math_env import task_options

    return task_options(seeds, level)


def materialise(env_id: str, seeds: list[int], level: dict) -> list[dict]:
    """Reset options for the tasks `seeds` of env `env_id`."""
    if env_id not in TASK_SOURCES:
        raise KeyError(f"no task source for env {env_id!r}; known: {', '.join(sorted(TASK_SOURCES))}")
    return TASK_SOURCES[env_id](list(seeds), level)


class TaskSampler:
    """Endless shuffled passes over task ids; `state_dict` makes resume exact."""

    def __init__(self, tasks: list[int], seed: int):
        self.tasks = tasks
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._order = self._shuffled()

    def _shuffled(self) -> list[int]:
        order = list(range(len(self.tasks)))
        random.Random(self.seed * 100_003 + self.epoch).shuffle(order)
        return order

    def next(self, n: int) -> list[int]:
        picked = []
        while len(picked) < n:
            if self.position == len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._shuffled()
            picked.append(self.tasks[self._order[self.position]])
            self.position += 1
        return picked

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._shuffled()


def make_group_tasks(
    env_id: str, env_kwargs: dict, picked: list[dict], group_size: int, first_group: int = 0
) -> list[Task]:
    """Repeat each task `group_size` times with one group id per task."""
    return [
        Task(env_id=env_id, group_id=first_group + g, env_kwargs=dict(env_kwargs), reset_options=dict(options))
        for g, options in enumerate(picked)
        for _ in range(group_size)
    ]


def check_env_kwargs(env_id: str, env_kwargs: dict) -> None:
    """Fail at startup on an env kwarg the env does not take (see environments.base.check_kwargs)."""
    from environments.base import check_kwargs

    check_kwargs(env_id, env_kwargs)
