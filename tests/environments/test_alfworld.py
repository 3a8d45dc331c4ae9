"""AlfWorldEnv on real ALFWorld games (the shared valid_seen split) and on generated ones.

The six generated games (one per task type) are made once per machine and cached under
~/.cache/entrorl-test/alfworld-gen/v<N> (first run: 10-25 s on 2 cores; then ~0). Tests that
need the shared data (../shared/data/alfworld) skip when it is absent. The file takes 35-60 s
on a loaded 2-core machine.
Step timings with and without the parse memoisation are printed (pytest -s), not asserted.
"""

import json
import os
import random
import re
import shutil
import tarfile
import time
from pathlib import Path

import pytest

from environments import check_env, make, pddl_speedup
from environments.alfworld_env import (
    TASK_TYPES,
    AlfWorldEnv,
    clean_intro,
    demangled_names,
    list_games,
    normalize_command,
    split_dir,
    task_options,
)
from environments.alfworld_gen import ensure_games, games_root, make_cached
from tests.conftest import TEST_CACHE

GEN_CACHE = TEST_CACHE  # games in TEST_CACHE/alfworld-gen/v{GEN_VERSION}
# (task type, seed): what seeds 0..5 of `split: generated` make
GENERATED_SPECS = [(task_type, seed) for seed, task_type in enumerate(TASK_TYPES)]


@pytest.fixture(scope="session")
def valid_seen() -> list[str]:
    try:
        folder = split_dir("valid_seen")
    except FileNotFoundError as exc:
        pytest.skip(f"no shared ALFWorld data: {exc}")
    return list_games(folder)


@pytest.fixture(scope="session")
def generated() -> dict[str, str]:
    paths = ensure_games(GENERATED_SPECS, scenes="seen", cache_dir=GEN_CACHE)
    return {task_type: path for (task_type, _), path in zip(GENERATED_SPECS, paths, strict=True)}


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    """A private $ENTRORL_CACHE, no $ALFWORLD_DATA."""
    monkeypatch.setenv("ENTRORL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("ALFWORLD_DATA", raising=False)
    return tmp_path / "cache"


def play(env, actions):
    """Steps `actions`; returns the rewards and the last step's (terminated, truncated, info)."""
    rewards = []
    for action in actions:
        _, reward, terminated, truncated, info = env.step(action)
        rewards.append(reward)
    return rewards, terminated, truncated, info


# -- the env on official games ---------------------------------------------------------------------


def test_check_env(valid_seen):
    check_env(make("alfworld", game_file=valid_seen[0], admissible_commands=True))
    check_env(make("alfworld"))  # no game given: seed 0 of the default split (valid_seen)


def test_walkthrough_wins_a_valid_seen_game(valid_seen):
    env = AlfWorldEnv(valid_seen[60], admissible_commands=True, expose_walkthrough=True)
    obs, info = env.reset()
    assert info["walkthrough"] == env.walkthrough() and info["walkthrough"]
    rewards, terminated, truncated, last = play(env, info["walkthrough"])
    assert rewards == [0.0] * (len(rewards) - 1) + [1.0]
    assert terminated and not truncated and last["won"] and not last["lost"]
    with pytest.raises(RuntimeError, match="reset"):
        env.step("look")
    env.close()


def test_intro_objective_and_info(valid_seen):
    env = AlfWorldEnv(valid_seen[0], admissible_commands=True)
    obs, info = env.reset()
    assert obs.startswith("You are in the middle of a room.") and obs == obs.strip()
    assert "Welcome to TextWorld" not in obs and "Your task is to" not in obs
    assert info["objective"] == env.task and info["objective"].endswith(".")
    assert info["task_type"] == Path(valid_seen[0]).parent.parent.name.split("-")[0] == "look_at_obj_in_light"
    assert info["game_file"] == valid_seen[0] and info["moves"] == 0 and not info["won"]
    assert "help" not in info["admissible_commands"] and "look" in info["admissible_commands"]
    assert info["admissible_commands"] == sorted(info["admissible_commands"])
    # demangled names: "drawer 1", never a PDDL id
    names = re.findall(r"\b([a-z]+) (\d+)\b", obs)
    assert ("drawer", "1") in names and len(names) > 10
    assert not any("_bar_" in text or "_dot_" in text for text in [obs, *info["admissible_commands"]])


def test_privileged_info_only_when_asked(valid_seen):
    _, info = AlfWorldEnv(valid_seen[0]).reset()
    assert "admissible_commands" not in info and "walkthrough" not in info


def test_invalid_actions_and_truncation(valid_seen):
    env = AlfWorldEnv(valid_seen[0], max_steps=3)
    env.reset()
    for moves in (1, 2, 3):
        obs, reward, terminated, truncated, info = env.step("xyzzy plugh")
        assert obs == "Nothing happens." and reward == 0.0 and not terminated and info["moves"] == moves
        assert truncated == (moves == 3)
    with pytest.raises(RuntimeError, match="reset"):
        env.step("look")
    _, info = env.reset()  # a new episode on the same game
    assert info["moves"] == 0
    assert env.step("  Go to   Desk 1. ")[0].startswith("You arrive at desk 1.")  # normalised command


def test_demangled_names_match_alfworld(valid_seen):
    from alfworld.agents.utils.misc import Demangler
    from textworld.generator.game import EntityInfo

    ids = ["cabinet_bar_1", "cabinet_bar_2", "sink_bar_x_bar_sinkbasin", "appletype", "loc_bar_1_bar_2"]
    assert demangled_names(ids) == {
        "cabinet_bar_1": "cabinet 2",  # ALFWorld numbers in reverse order of the sorted ids
        "cabinet_bar_2": "cabinet 1",
        "sink_bar_x_bar_sinkbasin": "sinkbasin 1",
        "appletype": "appletype ",
        "loc_bar_1_bar_2": "loc 1",
    }
    env = AlfWorldEnv(valid_seen[0])
    env.reset()
    infos = {k: EntityInfo(v.id, v.type) for k, v in env._env._entity_infos.items()}
    reference = Demangler(game_infos=infos)
    assert {k: v.name for k, v in env._env._entity_infos.items()} == {
        k: reference.demangle_alfred_name(k) for k in infos
    }


def test_clean_intro_and_normalize_command():
    raw = "-= Welcome to TextWorld, ALFRED! =-\n\nYou are in a room.\n\nYour task is to: put a mug in desk."
    assert clean_intro(raw) == ("You are in a room.", "put a mug in desk.")
    assert normalize_command(" Take  Mug 1 from Desk 2.\n") == "take mug 1 from desk 2"


# -- the parse memoisation -------------------------------------------------------------------------


def transcript(game_file, speedup):
    """(feedback, admissible commands, reward, done) over a fixed mix of walkthrough, random
    admissible and invalid commands; and the mean step time."""
    env = AlfWorldEnv(
        game_file, admissible_commands=True, max_steps=100, speedup=speedup, expose_walkthrough=True
    )
    env.reset()  # loads the game
    started = time.perf_counter()
    obs, info = env.reset()
    reset_time = time.perf_counter() - started
    rng = random.Random(0)
    # a random first move and an invalid one (the walkthrough starts with a "go to"), then the
    # walkthrough with state-neutral commands after its second step
    actions = [rng.choice(info["admissible_commands"]), "xyzzy"]
    for k, good in enumerate(info["walkthrough"]):
        actions += [good] + (["inventory", "look"] if k == 1 else [])
    record = [(obs, info["objective"], info["admissible_commands"])]
    times = []
    for action in actions:
        started = time.perf_counter()
        obs, reward, terminated, truncated, info = env.step(action)
        times.append(time.perf_counter() - started)
        record.append((obs, info["admissible_commands"], reward, terminated, truncated))
        if terminated:
            break
    env.close()
    return record, reset_time, sum(times) / len(times)


def test_speedup_keeps_transcripts_identical(valid_seen, generated):
    was_applied = pddl_speedup.is_applied()
    try:
        pddl_speedup.remove()
        from textworld.envs.pddl import textgen

        stock_parse = textgen._parse_and_convert
        timings = {}
        for name, game in (
            ("valid_seen", valid_seen[0]),
            ("generated", generated["pick_two_obj_and_place"]),
        ):
            pddl_speedup.remove()
            plain, plain_reset, plain_step = transcript(game, speedup=False)
            assert pddl_speedup.apply() is True and pddl_speedup.apply() is False  # idempotent
            fast, fast_reset, fast_step = transcript(game, speedup=True)
            assert fast == plain, f"{name}: transcripts differ with the memoisation"
            assert plain[-1][3], f"{name}: the replay did not win"
            timings[name] = (plain_reset, plain_step, fast_reset, fast_step)
        assert pddl_speedup.remove() is True and pddl_speedup.remove() is False
        assert textgen._parse_and_convert is stock_parse
        for name, (a, b, c, d) in timings.items():
            print(
                f"\n{name}: reset {a:.2f}s -> {c:.2f}s, step {1000 * b:.0f}ms -> {1000 * d:.0f}ms (stock -> memoised)"
            )
    finally:
        (pddl_speedup.apply if was_applied else pddl_speedup.remove)()


# -- splits ----------------------------------------------------------------------------------------


def _official_copy(root: Path, split: str, games: list[str], unsolvable: int | None = None) -> Path:
    """A small data dir in the official layout from real game files; game `unsolvable` gets
    solvable=false."""
    folder = root / "json_2.1.1" / split
    for k, game in enumerate(games):
        dest = folder / Path(game).parent.parent.name / Path(game).parent.name / "game.tw-pddl"
        dest.parent.mkdir(parents=True)
        if k == unsolvable:
            data = json.loads(Path(game).read_text())
            dest.write_text(json.dumps({**data, "solvable": False}))
        else:
            shutil.copyfile(game, dest)
    return folder


def test_task_options_official_split(valid_seen, tmp_path, isolated_cache):
    first = task_options(range(5), {"split": "valid_seen"})
    assert first == task_options(range(5), {"split": "valid_seen"})
    assert [o["game_file"] for o in first] == valid_seen[:5] and len(valid_seen) == 140
    assert task_options([140, 281], {"split": "valid_seen"}) == [
        {"game_file": valid_seen[0]},
        {"game_file": valid_seen[1]},
    ]
    heat = task_options(range(3), {"split": "valid_seen", "task_types": ["pick_heat_then_place_in_recep"]})
    assert all("/pick_heat_then_place_in_recep-" in o["game_file"] for o in heat)
    # seed i -> solvable game i mod N, sorted by path; data_dir overrides the shared data
    picked = sorted(valid_seen[k] for k in (0, 40, 80))
    _official_copy(tmp_path / "data", "valid_unseen", picked, unsolvable=1)
    options = task_options(range(4), {"split": "valid_unseen", "data_dir": str(tmp_path / "data")})
    names = [Path(o["game_file"]).parent.parent.name for o in options]
    expected = [Path(picked[k]).parent.parent.name for k in (0, 2, 0, 2)]
    assert names == expected


def test_shuffled_official_split_is_a_fixed_subset_of_every_type(valid_seen, isolated_cache):
    level = {"split": "valid_seen", "shuffle": True}
    picked = [o["game_file"] for o in task_options(range(60), level)]
    assert picked == [o["game_file"] for o in task_options(range(60), level)]  # the same subset every time
    assert len(set(picked)) == 60 and set(picked) <= set(valid_seen)
    # sorted by path the first 60 games hold only the first types; shuffled, all six appear
    from environments.alfworld_env import TASK_TYPES, task_type_of

    assert {task_type_of(p) for p in picked} == set(TASK_TYPES)
    assert {task_type_of(p) for p in valid_seen[:60]} != set(TASK_TYPES)


def test_missing_splits_and_bad_levels(tmp_path, isolated_cache):
    with pytest.raises(FileNotFoundError, match="valid_unseen.*data_dir"):
        task_options([0], {"split": "valid_unseen", "data_dir": str(tmp_path)})
    with pytest.raises(FileNotFoundError, match="train.*data_dir"):
        task_options([0], {"split": "train", "data_dir": str(tmp_path)})
    with pytest.raises(ValueError, match="split.*train, valid_seen, valid_unseen, generated"):
        task_options([0], {"split": "test"})
    with pytest.raises(ValueError, match="needs the key split"):
        task_options([0], {})
    with pytest.raises(ValueError, match="unknown; valid keys"):
        task_options([0], {"split": "valid_seen", "splt": "x"})
    with pytest.raises(ValueError, match="task_types"):
        task_options([0], {"split": "valid_seen", "task_types": ["pick_and_place"]})


def test_train_split_is_unpacked_once(valid_seen, tmp_path, isolated_cache):
    staging = tmp_path / "staging"
    _official_copy(staging, "train", valid_seen[:2])
    data = tmp_path / "data"
    data.mkdir()
    with tarfile.open(data / "json_2.1.1_train.tar.xz", "w:xz") as tar:
        tar.add(staging / "json_2.1.1", arcname="json_2.1.1")
    options = task_options([0, 1], {"split": "train", "data_dir": str(data)})
    unpacked = isolated_cache / "alfworld" / "json_2.1.1" / "train"
    assert [o["game_file"] for o in options] == list_games(unpacked) and len(options) == 2
    assert sorted(p.name for p in unpacked.parent.iterdir()) == ["train"]  # no temp folders left
    stamp = unpacked.stat().st_mtime_ns
    assert task_options([0, 1], {"split": "train", "data_dir": str(data)}) == options
    assert unpacked.stat().st_mtime_ns == stamp
    _, info = AlfWorldEnv(options[1]["game_file"]).reset()
    assert info["objective"]


# -- generated games -------------------------------------------------------------------------------


@pytest.mark.parametrize("task_type", TASK_TYPES)
def test_generated_game_is_won_by_its_walkthrough(generated, task_type):
    game = generated[task_type]
    data = json.loads(Path(game).read_text())
    assert data["solvable"] is True and data["walkthrough"] and data["task_type"] == task_type
    assert data["scene"] not in (10, 219, 308, 424)  # seen scenes only
    env = AlfWorldEnv(game, admissible_commands=True)
    obs, info = env.reset()
    assert info["task_type"] == task_type and info["objective"] and "_bar_" not in obs
    assert re.search(r"\b[a-z]+ 1\b", obs)
    rewards, terminated, truncated, last = play(env, env.walkthrough())
    assert rewards[-1] == 1.0 and sum(rewards) == 1.0 and terminated and not truncated and last["won"]
    env.close()


def test_generated_split_routes_to_the_cache(generated):
    options = task_options(range(6), {"split": "generated", "cache_dir": str(GEN_CACHE)})
    assert [o["game_file"] for o in options] == [generated[t] for t in TASK_TYPES]
    two = task_options(
        [5], {"split": "generated", "cache_dir": str(GEN_CACHE), "task_types": "pick_two_obj_and_place"}
    )
    assert two == [{"game_file": generated["pick_two_obj_and_place"]}]
    root = games_root(GEN_CACHE)
    assert not [p for p in root.rglob(".tmp-*")]  # every game was renamed into place whole
    stamp = os.stat(generated["pick_and_place_simple"]).st_mtime_ns
    assert make_cached("pick_and_place_simple", 0, "seen", GEN_CACHE) == generated["pick_and_place_simple"]
    assert os.stat(generated["pick_and_place_simple"]).st_mtime_ns == stamp


def test_generation_is_deterministic(generated, tmp_path):
    again = make_cached("pick_and_place_simple", 0, "seen", tmp_path)
    mine, reference = (
        json.loads(Path(again).read_text()),
        json.loads(Path(generated["pick_and_place_simple"]).read_text()),
    )
    assert Path(again).relative_to(games_root(tmp_path)) == Path(
        generated["pick_and_place_simple"]
    ).relative_to(games_root(GEN_CACHE))
    for key in ("pddl_problem", "grammar", "task_type", "pddl_params", "scene"):
        assert mine[key] == reference[key], key
