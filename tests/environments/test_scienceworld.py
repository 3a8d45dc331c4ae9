"""ScienceWorldEnv on the real simulator, no mocks: one shared JVM serves the module's envs (~3 s to
start, ~3 s for its JIT-cold first load), plus one private JVM in the last test; the (task,
variation) table is built once per machine into the suite's cache (~5-10 s), then read from there.
About 25-40 s on 2 loaded cores."""

import psutil
import pytest

from environments import check_env, make
from environments.scienceworld_env import (
    ScienceWorldEnv,
    first_line,
    split_pairs,
    task_options,
    variation_table,
)

TASK = {"task_name": "find-animal", "variation": 0}  # gold path ~10 steps; starts in the hallway
NO_MATCH = "No known action matches that input."


def java_children() -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True) if "java" in p.name().lower()]


@pytest.fixture(scope="module", autouse=True)
def cache(game_cache):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ENTRORL_CACHE", str(game_cache))
        yield game_cache


@pytest.fixture(scope="module")
def env():
    """The module's env (shared JVM). Closing the last env of the JVM shuts it down."""
    env = ScienceWorldEnv("find-animal")
    yield env
    jvm = env._jvm
    env.close()
    assert jvm is None or jvm.process.poll() is not None, "the shared JVM outlived its last env"
    assert java_children() == [], "a java process outlived every env"


def play(env, actions, start_score=0):
    """Steps `actions` until the episode ends; returns (rewards, last step's outputs)."""
    rewards = []
    for action in actions:
        out = env.step(action)
        rewards.append(out[1])
        gained = out[4]["score"] - start_score
        assert sum(rewards) * 100 == pytest.approx(gained), "rewards must add up to the score gained / 100"
        if out[2] or out[3]:
            break
    return rewards, out


def test_check_env(env):
    check_env(env)


def test_gold_path_wins_and_rewards_sum_to_the_score(env):
    env.reset(options=TASK)
    gold = env.walkthrough()
    rewards, (_, _, terminated, truncated, info) = play(env, gold)
    assert terminated and not truncated and info["won"] and not info["lost"]
    assert info["score"] == 100 and sum(rewards) == pytest.approx(1.0)
    assert info["moves"] == len(rewards) <= len(gold)  # gold paths may go on after the win
    with pytest.raises(RuntimeError, match="reset"):
        env.step("look around")


def test_walkthrough_mid_episode_keeps_the_state(env):
    fresh = ScienceWorldEnv("find-animal")  # no gold path cached yet; shares the module's JVM
    try:
        fresh.reset()
        _, reward, *_ = fresh.step("open door to greenhouse")
        assert reward > 0
        assert fresh.walkthrough()  # reloads the task with gold-path generation, replays the episode
        obs, reward, _, _, info = fresh.step("look around")  # reward 0: the simulator kept its score
        assert "door to the greenhouse (that is open)" in obs and reward == 0.0 and info["moves"] == 2
    finally:
        fresh.close()


def test_failure_terminates_with_score_minus_100(env):
    env.reset(options=TASK)
    obs, reward, terminated, truncated, info = env.step("focus on picture")  # not an animal
    assert terminated and not truncated and info["lost"] and not info["won"]
    assert info["score"] == -100 and reward == -1.0 and obs == "You focus on the picture."


def test_unknown_text_is_an_observation(env):
    env.reset(options=TASK)
    for action in ["xyzzy plugh", "", "focus on", "日本語"]:
        assert env.step(action)[:4] == (NO_MATCH, 0.0, False, False)
    obs = env.step("\n look around \n open door to kitchen")[0]  # the first line only
    assert obs.startswith("This room is called the hallway.")
    assert first_line("  \n a b \n c") == "a b" and first_line("") == ""


def test_truncates_at_max_steps(env):
    short = ScienceWorldEnv("find-animal", max_steps=2)
    try:
        short.reset()
        assert short.step("xyzzy")[2:4] == (False, False)
        assert short.step("xyzzy")[2:4] == (False, True)
        with pytest.raises(RuntimeError, match="reset"):
            short.step("look around")
    finally:
        short.close()


def test_privileged_info_only_when_asked(env):
    obs, info = env.reset(options=TASK)
    assert not {"admissible_commands", "objects", "walkthrough"} & set(info)
    assert not {"admissible_commands", "objects"} & set(env.step("look around")[4])
    assert info["objective"] == env.task and env.task.startswith(info["task_description"])
    assert "focus on OBJ" in info["action_templates"] and "reset task" not in info["action_templates"]
    assert "focus on OBJ" in env.task  # the templates reach prompts built from the objective

    rich = make(
        "scienceworld", admissible_commands=True, objects=True, gold_path=True, simplifications="easy"
    )
    try:
        assert rich._jvm is None  # started at the first reset, on the module's JVM
        obs, info = rich.reset(options=TASK)
        assert rich._jvm is env._jvm
        commands = info["admissible_commands"]
        assert commands == sorted(set(commands)) and "teleport to kitchen" in commands  # "easy": teleports
        assert "picture" in info["objects"] and "go to greenhouse" in info["walkthrough"]
        assert "teleport OBJ" in info["action_templates"] and info["simplifications"] == "easy"
        assert info["score"] == 8  # "easy" opens the doors: "be in a room with an open door" holds at once
        _, (*_, last) = play(rich, info["walkthrough"], start_score=info["score"])
        assert last["won"] and "admissible_commands" in last and "objects" in last
    finally:
        rich.close()
    assert env._jvm.process.poll() is None  # the module's env still holds the shared JVM
    assert "(that is closed)" in env.reset(options=TASK)[0]  # and plays without simplifications


def test_reset_picks_the_task(env):
    names = [task["name"] for task in variation_table()]
    assert env.reset(options={"task_idx": 9, "variation": 2})[1]["task_name"] == names[9] == "freeze"
    assert env.reset(options={"task_name": "1-1"})[1]["task_name"] == "boil"  # a paper task id
    assert env.reset()[1]["task_name"] == "find-animal"  # the constructor's task
    by_seed = ScienceWorldEnv()
    try:
        info = by_seed.reset(seed=1)[1]
        assert (info["task_name"], info["variation"]) == split_pairs("train")[1]
    finally:
        by_seed.close()
    with pytest.raises(ValueError, match="task_idx, variation"):
        env.reset(options={"task": "boil"})
    with pytest.raises(ValueError, match=r"variations 0\.\.299"):
        env.reset(options={"task_name": "find-animal", "variation": 300})
    with pytest.raises(ValueError, match="unknown task; use one of boil"):
        env.reset(options={"task_name": "no-such-task"})
    with pytest.raises(ValueError, match=r"\['fastTravel'\] unknown; use 'easy'"):
        ScienceWorldEnv(simplifications="openDoors,fastTravel")


def test_package_splits():
    table = variation_table()
    assert len(table) == 30 and sum(task["variations"] for task in table) == 7207
    sizes = {split: len(split_pairs(split)) for split in ("train", "dev", "test")}
    assert sizes == {"train": 3592, "dev": 1796, "test": 1819}
    for task in table:
        assert sorted(task["train"] + task["dev"] + task["test"]) == list(range(task["variations"]))
    first = task_options(range(30), {"split": "train"})
    assert first == task_options(range(30), {"split": "train"})  # deterministic
    assert [o["task_name"] for o in first] == [task["name"] for task in table]  # round robin over tasks
    assert all(o["variation"] == task["train"][0] for o, task in zip(first, table, strict=True))
    assert task_options([3592 + 4], {})[0] == first[4]  # seed i -> pair i mod N; split defaults to train
    test = task_options(range(100), {"split": "test", "tasks": ["boil", 22, "1-3"]})  # melt, freeze
    assert {o["task_name"] for o in test} == {"boil", "melt", "freeze"}
    boil_test = next(task["test"] for task in table if task["name"] == "boil")
    assert all(o["variation"] in boil_test for o in test if o["task_name"] == "boil")


def test_epo_index_splits(env):
    train, test = split_pairs("L0_train"), split_pairs("L0_test")
    assert (len(train), len(test), len(split_pairs("L2_test"))) == (3322, 1661, 549)
    assert train[0] == ("boil", 8)  # the first entry of L0_idx.json's train list
    assert len({name for name, _ in train[:29]}) == 29  # the first 29 seeds: one pair per task
    assert len({name for name, _ in split_pairs("L2_test")}) == 10  # unseen task categories
    options = task_options([7], {"split": "L0_test"})[0]
    assert env.reset(options=options)[1]["task_name"] == options["task_name"] == test[7][0]


def test_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="'split'='validation'"):
        task_options([0], {"split": "validation"})
    with pytest.raises(ValueError, match="'tasks' entry"):
        task_options([0], {"tasks": ["boiling-water"]})
    with pytest.raises(ValueError, match="valid keys: split, tasks, data_dir"):
        task_options([0], {"spilt": "train"})
    with pytest.raises(FileNotFoundError, match="'data_dir'"):
        task_options([0], {"split": "L0_train", "data_dir": str(tmp_path)})
    with pytest.raises(ValueError, match="no variations of the tasks"):
        task_options([0], {"split": "L2_test", "tasks": ["boil"]})  # boil is an L2 train task


def test_resets_are_deterministic_across_jvms_and_close_shuts_a_private_jvm_down(env):
    # Three paint cups on a table: a stock JVM lists them in a new order on most loads.
    cups = {"task_name": "test-conductivity", "variation": 1}
    own = ScienceWorldEnv(shared_jvm=False)
    first = own.reset(options=cups)[0]
    assert first.count("cup (containing") == 3
    assert env.reset(options=cups)[0] == first == env.reset(options=cups)[0]
    process = own._jvm.process
    assert process is not env._jvm.process and process.pid in [p.pid for p in java_children()]
    own.close()
    assert process.poll() is not None and process.pid not in [p.pid for p in java_children()]
    own.close()  # idempotent
