"""TextWorldEnv on real generated games (three games made once per session, ~10 s on 2 cores)."""

import filecmp
import os
from pathlib import Path

import pytest

from environments import check_env, make
from environments.textworld_env import TextWorldEnv, clean_observation, ensure_games, first_command


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def games(cache_root):
    return ensure_games([1, 2], cache_dir=cache_root)


def play(env, actions):
    """Steps `actions`; returns the total reward and the last step's (terminated, truncated, info)."""
    total = 0.0
    for action in actions:
        _, reward, terminated, truncated, info = env.step(action)
        total += reward
    return total, terminated, truncated, info


def test_check_env(games):
    check_env(make("textworld", game_file=games[0]))


@pytest.mark.parametrize("index", [0, 1])
def test_walkthrough_wins(games, index):
    env = TextWorldEnv(games[index], expose_walkthrough=True)
    _, info = env.reset()
    total, terminated, truncated, last = play(env, info["walkthrough"])
    assert terminated and not truncated and last["won"] and not last["lost"]
    assert total == last["max_score"] == last["score"] > 0


def test_reset_is_deterministic_and_clean(games):
    env = TextWorldEnv(games[0], expose_walkthrough=True)
    obs, info = env.reset()
    assert (obs, info) == env.reset()
    assert info["objective"] and env.task == info["objective"]
    assert info["objective"] not in obs
    assert "$$" not in obs and "___" not in obs  # the ASCII-art logo
    assert not any(line.startswith(">") for line in obs.splitlines())
    assert obs.startswith("-= ") and obs == obs.strip()  # starts at the room title
    assert info["walkthrough"][0] in info["admissible_commands"]
    assert info["admissible_commands"] == sorted(info["admissible_commands"])
    assert {"won", "lost", "score", "max_score", "moves", "game_file"} <= set(info)


def test_privileged_info_only_when_asked(games):
    _, info = TextWorldEnv(games[0], admissible_commands=False).reset()
    assert "admissible_commands" not in info and "walkthrough" not in info


def test_truncates_at_max_steps(games):
    env = TextWorldEnv(games[0], max_steps=3)
    env.reset()
    for moves in (1, 2, 3):
        obs, reward, terminated, truncated, info = env.step("xyzzy")
        assert obs and reward == 0.0 and not terminated and info["moves"] == moves
        assert truncated == (moves == 3)
    with pytest.raises(RuntimeError, match="reset"):
        env.step("look")


def test_chained_commands_run_only_the_first(games):
    env = TextWorldEnv(games[0], expose_walkthrough=True)
    _, info = env.reset()
    obs, reward, terminated, _, info = env.step(f"look. {info['walkthrough'][0]}")
    assert not terminated and reward == 0.0 and obs.startswith("-= ")


def test_one_env_plays_many_games(games):
    env = TextWorldEnv(games[0])
    objectives = [env.reset(options={"game_file": game})[1]["objective"] for game in games]
    assert objectives[0] != objectives[1]
    _, info = env.reset()  # no options: back to the constructor's game
    assert info["game_file"] == games[0] and info["objective"] == objectives[0]


def test_seed_picks_the_generated_game(games, cache_root, monkeypatch):
    monkeypatch.setenv("ENTRORL_CACHE", str(cache_root))
    env = TextWorldEnv()
    assert env.reset(seed=2)[1]["game_file"] == games[1]
    assert env.reset()[1]["game_file"] == games[1]  # no seed: same game again


def test_ensure_games_is_idempotent(games, cache_root):
    folder = os.path.dirname(games[0])
    before = {name: os.stat(os.path.join(folder, name)).st_mtime_ns for name in os.listdir(folder)}
    assert ensure_games([2, 1], cache_dir=cache_root) == games[::-1]
    after = {name: os.stat(os.path.join(folder, name)).st_mtime_ns for name in os.listdir(folder)}
    assert after == before
    assert sorted(before) == ["g1.json", "g1.z8", "g2.json", "g2.z8"]  # no temp leftovers, no .ni


def test_same_seed_same_game(games, tmp_path):
    (again,) = ensure_games([1], cache_dir=tmp_path)
    assert filecmp.cmp(again, games[0], shallow=False)
    env = TextWorldEnv(again, expose_walkthrough=True)
    _, info = env.reset()
    _, reference = TextWorldEnv(games[0], expose_walkthrough=True).reset()
    assert (info["objective"], info["walkthrough"]) == (reference["objective"], reference["walkthrough"])


def test_clean_observation():
    raw = (
        "\n\n   ________  __\n  |  \\  $$ /  $$\n   \\$$$$$$$$\n\n"
        "Welcome! Open the box.\n\n-= Den =-\nA den.\n\n\n\n"
        ">                                       -= Den =-0/1"
    )
    assert clean_observation(raw, "Welcome! Open the box.") == "-= Den =-\nA den."
    assert clean_observation("\nThat's not a verb I recognise.\n\n>   -= Den =-0/2", "Goal.") == (
        "That's not a verb I recognise."
    )


@pytest.mark.parametrize(
    "action, command",
    [
        ("open box", "open box"),
        ("  open box.", "open box"),
        ("look. open box", "look"),
        ("look, open box", "look"),
        ("look then open box", "look"),
        ("look\nopen box", "look"),
        ("", ""),
        ("\\relro[statlcun_pastedoc", "relro[statlcun_pastedoc"),  # a dumb-frotz meta-command
        ("take \\ key", "take key"),
        ("open\tthe\x00box\x7f", "open the box"),
    ],
)
def test_first_command(action, command):
    assert first_command(action) == command


# Played in a child with a 1 MiB file-size limit on its output: unguarded, the backslash command
# sends dumb-frotz into an endless error loop that wrote 64 GB of log in minutes and never returned.
BACKSLASH_STEP = """
import sys
from environments.textworld_env import TextWorldEnv
env = TextWorldEnv(sys.argv[1])
env.reset()
obs, reward, terminated, truncated, info = env.step("\\\\relro[statlcun_pastedoc_jspjcss_")
assert reward == 0 and not terminated, (reward, terminated)
obs, *_ = env.step("look")
print("STEPPED", len(obs))
"""


def test_a_backslash_command_reaches_the_game_as_text_not_an_interpreter_command(games, tmp_path):
    import resource
    import subprocess
    import sys

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    log = tmp_path / "out.txt"
    with log.open("wb") as out:
        child = subprocess.run(
            [sys.executable, "-c", BACKSLASH_STEP, str(games[0])],
            stdout=out, stderr=subprocess.STDOUT, preexec_fn=small_files, timeout=60,
        )
    text = log.read_text(errors="replace")
    assert child.returncode == 0, text[-2000:]
    assert "STEPPED" in text and "DUMB-FROTZ" not in text


def test_user_game_files_as_tasks(games, tmp_path):
    """`env.level.games`: a folder (or list) of the user's own game files; seed i -> game i mod N."""
    from agents.tasks import materialise

    folder = Path(games[0]).parent
    picked = materialise("textworld", [0, 1, 5], {"games": str(folder)})
    every = sorted(str(p) for p in folder.rglob("*") if p.suffix in (".z8", ".ulx"))
    assert [t["game_file"] for t in picked] == [every[0], every[1 % len(every)], every[5 % len(every)]]
    assert materialise("textworld", [3], {"games": [games[1]]}) == [{"game_file": games[1]}]
    with pytest.raises(FileNotFoundError, match="env.level.games"):
        materialise("textworld", [0], {"games": str(tmp_path / "none")})
