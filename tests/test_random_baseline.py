"""The random-action floor (scripts/random_baseline.py `play`) on a real generated TextWorld game:
its reward bookkeeping, its turn cap, and a clear error when the env lists no valid actions.

Run: .venv/bin/python -m pytest tests/test_random_baseline.py -q
"""

import random

import pytest

from environments import make
from environments.textworld_env import ensure_games
from tests.conftest import load_script


@pytest.fixture(scope="module")
def baseline():
    return load_script("random_baseline")


class Walkthrough(random.Random):
    """An rng whose choice plays the game's walkthrough: the policy whose outcome we know."""

    def __init__(self, commands: list[str]):
        super().__init__(0)
        self.commands = list(commands)

    def choice(self, seq):
        command = self.commands.pop(0)
        assert command in seq, f"{command!r} is not among the valid actions"
        return command


def test_play_sums_rewards_and_stops_at_the_win(baseline, game_cache):
    game = ensure_games([1], quest_length=3, cache_dir=game_cache)[0]
    env = make("textworld", admissible_commands=True)
    env.reset(options={"game_file": game})
    walkthrough = env.walkthrough()
    assert len(walkthrough) >= 2
    assert baseline.play(env, {"game_file": game}, 10, Walkthrough(walkthrough)) == (True, 1.0)
    # one turn short of the walkthrough: no win
    won, _ = baseline.play(env, {"game_file": game}, len(walkthrough) - 1, Walkthrough(walkthrough))
    assert not won
    # the same seed replays the same random episode
    runs = [baseline.play(env, {"game_file": game}, 4, random.Random(7)) for _ in range(2)]
    assert runs[0] == runs[1]


def test_play_needs_the_valid_actions(baseline, game_cache):
    game = ensure_games([1], cache_dir=game_cache)[0]
    env = make("textworld", admissible_commands=False)
    with pytest.raises(SystemExit, match="admissible_commands=true"):
        baseline.play(env, {"game_file": game}, 4, random.Random(0))
