"""Offline ALFWorld-style games, made from what the `alfworld` wheel ships.

No ALFWorld data can be downloaded here, so this module writes new `game.tw-pddl` files in the
official format from the wheel's scene layouts (`alfworld/gen/layouts/FloorPlanN-openable.json`:
receptacle instances and their interaction poses; `FloorPlanN-objects.json`: the object and
receptacle types present), `alfworld/gen/constants.py` (which receptacle type holds which object
types, which objects heat/cool/clean/toggle/slice, the room types each task fits),
`alfworld/gen/goal_library.py` (goal PDDL + sentence templates per task type) and the domain and
grammar `alfworld/data/alfred.{pddl,twl2}`.

One game (`generate_game(task_type, seed, scenes)`):
1. pick a scene whose room type fits the task (constants.GOALS_VALID) and that has what the task
   needs (a microwave, fridge, sink basin or desk lamp); seen scenes are all but ALFWorld's
   valid_unseen floor plans 10, 219, 308, 424, which make up the unseen scenes;
2. receptacles: the layout's instances (pose -> location), plus one made-up instance (several
   for stove burners) of each receptacle type the scene lists but the layout lacks;
3. objects: 1-3 instances of each pickupable type the scene lists, each put in a compatible
   receptacle (a random type, then a random instance of it); a desk lamp on a desk/table/
   dresser/shelf;
4. task: a (object, receptacle) pair that fits the task type; target objects start outside
   receptacles of the goal type, so the goal is not met at the start;
5. write the problem (ids mangled like THOR ids, so ALFWorld's demangling names them
   "drawer 3"), the grammar with the task sentence, and check it: Fast Downward must find a plan
   (once, here) and replaying the plan through `AlfWorldEnv` must win. The plan is stored as
   `walkthrough`, with `solvable: true`.
Draws that do not fit (no compatible pair, planner finds no plan) move on to the next draw.

`ensure_games(specs, scenes)` returns cached game files for (task type, seed) pairs, making the
missing ones in worker processes; games are cached under `$ENTRORL_CACHE/alfworld-gen` (default
~/.cache/entrorl/alfworld-gen), each written to a private folder and renamed into place.

Differences from the official games (ALFWorld, arXiv 2010.03768): placements are random over
compatible receptacles (not THOR physics), no scenery objects (paintings, windows), stove
burners / coffee machines / toasters get made-up positions.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path

from environments.alfworld_env import TASK_TYPES

GEN_VERSION = 2
UNSEEN_SCENES = (10, 219, 308, 424)  # ALFWorld's valid_unseen floor plans
SCENE_SPLITS = ("seen", "unseen")
MAX_DRAWS = 60  # scene/task draws per game before giving up
GARBAGE_WEIGHT = 0.25  # placement prior: bread in the garbage can happens, but rarely
LAMP_HOLDERS = ("Desk", "SideTable", "Dresser", "Shelf", "DiningTable", "CoffeeTable", "TVStand")
DEVICE = {  # task type -> the receptacle type it needs (its goal parent may not be that type)
    "pick_clean_then_place_in_recep": "SinkBasin",
    "pick_heat_then_place_in_recep": "Microwave",
    "pick_cool_then_place_in_recep": "Fridge",
}
PROPERTY = {  # task type -> the VAL_ACTION_OBJECTS set its object must be in
    "pick_clean_then_place_in_recep": "Cleanable",
    "pick_heat_then_place_in_recep": "Heatable",
    "pick_cool_then_place_in_recep": "Coolable",
}


# -- what the wheel ships --------------------------------------------------------------------------


@cache
def _wheel():
    from alfworld.gen import constants, goal_library

    return constants, goal_library


@cache
def _static_receptacles() -> tuple[str, ...]:
    constants, _ = _wheel()
    return tuple(sorted(set(constants.VAL_RECEPTACLE_OBJECTS) - set(constants.MOVABLE_RECEPTACLES)))


@cache
def _pickupable() -> frozenset[str]:
    constants, _ = _wheel()
    held = set().union(*constants.VAL_RECEPTACLE_OBJECTS.values())
    return frozenset(t for t in held if t in constants.OBJECTS and not t.endswith("Sliced"))


@cache
def _domain_and_grammar() -> tuple[str, str]:
    data = resources.files("alfworld") / "data"
    return (data / "alfred.pddl").read_text(), (data / "alfred.twl2").read_text()


@cache
def _layout(scene: int) -> tuple[dict[str, list[float]], frozenset[str]]:
    """(receptacle id -> [x, z, rotation, horizon], types present) of FloorPlan<scene>."""
    folder = resources.files("alfworld") / "gen" / "layouts"
    openable = json.loads((folder / f"FloorPlan{scene}-openable.json").read_text())
    types = frozenset(json.loads((folder / f"FloorPlan{scene}-objects.json").read_text()))
    return openable, types


def room_of(scene: int) -> str:
    constants, _ = _wheel()
    for room, numbers in constants.SCENE_TYPE.items():
        if scene in numbers:
            return room
    raise ValueError(f"scene {scene} is in no room type")


def scenes_for(task_type: str, scenes: str = "seen") -> list[int]:
    """Scenes of a split whose room type fits `task_type` and that hold what it needs."""
    constants, _ = _wheel()
    if task_type not in TASK_TYPES:
        raise ValueError(f"unknown alfworld task type {task_type!r}; known: {', '.join(TASK_TYPES)}")
    if scenes not in SCENE_SPLITS:
        raise ValueError(f"scenes={scenes!r}: use seen or unseen")
    numbers = sorted(n for room in constants.GOALS_VALID[task_type] for n in constants.SCENE_TYPE[room])
    numbers = [n for n in numbers if (n in UNSEEN_SCENES) == (scenes == "unseen")]
    return [n for n in numbers if _scene_fits(task_type, n)]


def _scene_fits(task_type: str, scene: int) -> bool:
    openable, types = _layout(scene)
    if task_type in DEVICE and DEVICE[task_type] not in types | {_recep_type(k) for k in openable}:
        return False
    if task_type == "look_at_obj_in_light":
        return "DeskLamp" in types and bool(set(LAMP_HOLDERS) & (types | {_recep_type(k) for k in openable}))
    return True


def _recep_type(thor_id: str) -> str:
    parts = thor_id.split("|")
    return parts[-1] if len(parts) == 5 else parts[0]  # "Sink|x|y|z|SinkBasin" -> SinkBasin


# -- ids -------------------------------------------------------------------------------------------


def mangle(thor_id: str) -> str:
    """THOR id -> PDDL name, as ALFWorld writes them: "Cabinet|-00.73|+02.02|-02.46" ->
    "Cabinet_bar__minus_00_dot_73_bar__plus_02_dot_02_bar__minus_02_dot_46"."""
    for char, word in (("|", "_bar_"), ("-", "_minus_"), ("+", "_plus_"), (".", "_dot_"), (",", "_comma_")):
        thor_id = thor_id.replace(char, word)
    return thor_id


def _coords(rng: random.Random) -> str:
    return "|".join(f"{rng.uniform(-4.5, 4.5):+06.2f}" for _ in range(3))


def _location(x: float, z: float, rotation: float, horizon: float) -> str:
    return f"loc|{round(x / 0.25)}|{round(z / 0.25)}|{int(rotation) // 90 % 4}|{int(horizon)}"


# -- one scene + task ------------------------------------------------------------------------------


@dataclass
class _World:
    scene: int
    receptacles: dict[str, str] = field(default_factory=dict)  # THOR id -> type
    recep_location: dict[str, str] = field(default_factory=dict)  # THOR id -> location id
    objects: dict[str, str] = field(default_factory=dict)  # THOR id -> type
    placement: dict[str, str] = field(default_factory=dict)  # object id -> receptacle id
    start: str = ""

    def receptacles_of(self, types: Iterable[str]) -> list[str]:
        wanted = set(types)
        return sorted(r for r, t in self.receptacles.items() if t in wanted)

    def instances(self, otype: str) -> list[str]:
        return sorted(o for o, t in self.objects.items() if t == otype)


def _build_world(scene: int, rng: random.Random, with_lamp: bool) -> _World:
    constants, _ = _wheel()
    openable, types = _layout(scene)
    static = set(_static_receptacles())
    world = _World(scene)
    for thor_id in sorted(openable):
        rtype = _recep_type(thor_id)
        if rtype in static:
            world.receptacles[thor_id] = rtype
            world.recep_location[thor_id] = _location(*openable[thor_id])
    for rtype in sorted((types & static) - set(world.receptacles.values())):
        for _ in range(rng.randint(2, 4) if rtype == "StoveBurner" else 1):
            # basins are named like THOR's "Sink|x|y|z|SinkBasin", which demangles to "sinkbasin"
            base = rtype[: -len("Basin")] if rtype.endswith("Basin") else rtype
            thor_id = f"{base}|{_coords(rng)}" + (f"|{rtype}" if base != rtype else "")
            world.receptacles[thor_id] = rtype
            world.recep_location[thor_id] = _location(
                rng.uniform(-4, 4), rng.uniform(-4, 4), rng.choice((0, 90, 180, 270)), 30
            )
    used = set(world.recep_location.values())
    while not world.start or world.start in used:
        world.start = _location(rng.uniform(-4, 4), rng.uniform(-4, 4), rng.choice((0, 90, 180, 270)), 30)
    for otype in sorted(types & _pickupable()):
        holders = world.receptacles_of(r for r in static if otype in constants.VAL_RECEPTACLE_OBJECTS[r])
        if not holders:
            continue
        for _ in range(rng.randint(1, constants.MAX_NUM_OF_OBJ_INSTANCES)):
            _add_object(world, otype, _pick_holder(world, holders, rng), rng)
    if with_lamp:
        holders = world.receptacles_of(LAMP_HOLDERS)
        if holders:
            _add_object(world, "DeskLamp", rng.choice(holders), rng)
    return world


def _pick_holder(world: _World, holders: list[str], rng: random.Random) -> str:
    """A receptacle for an object: a type first (garbage cans a quarter as likely), then one of
    its instances, so that a kitchen's 18 cabinets do not get most of the objects."""
    types = sorted({world.receptacles[r] for r in holders})
    weights = [GARBAGE_WEIGHT if t == "GarbageCan" else 1.0 for t in types]
    rtype = rng.choices(types, weights)[0]
    return rng.choice([r for r in holders if world.receptacles[r] == rtype])


def _add_object(world: _World, otype: str, receptacle: str, rng: random.Random) -> str:
    thor_id = f"{otype}|{_coords(rng)}"
    while thor_id in world.objects:
        thor_id = f"{otype}|{_coords(rng)}"
    world.objects[thor_id], world.placement[thor_id] = otype, receptacle
    return thor_id


@dataclass
class _Task:
    task_type: str
    obj: str
    parent: str  # receptacle type, or the lamp type for look_at
    sentence: str


def _draw_task(task_type: str, world: _World, rng: random.Random) -> _Task | None:
    """A task that fits the world, adjusting the world so its goal is not met at the start."""
    constants, goals = _wheel()
    present_recep = set(world.receptacles.values())
    objects = sorted(set(world.objects.values()) & _pickupable())
    if task_type == "look_at_obj_in_light":
        if not world.instances("DeskLamp") or not objects:
            return None
        obj, parent = rng.choice(objects), "DeskLamp"
        sentence = rng.choice(goals.gdict[task_type]["templates"]).format(obj=obj.lower(), toggle="desklamp")
        return _Task(task_type, obj, parent, sentence)
    if task_type in DEVICE:
        if DEVICE[task_type] not in present_recep:
            return None
        objects = [o for o in objects if o in constants.VAL_ACTION_OBJECTS[PROPERTY[task_type]]]
    pairs = [
        (o, r)
        for o in objects
        for r in sorted(present_recep)
        if o in constants.VAL_RECEPTACLE_OBJECTS[r]
        and r != DEVICE.get(task_type)
        # the target must be able to start somewhere that is not the goal's receptacle type
        and any(o in constants.VAL_RECEPTACLE_OBJECTS[t] for t in present_recep - {r})
    ]
    if not pairs:
        return None
    obj, parent = rng.choice(pairs)
    if task_type == "pick_two_obj_and_place":
        while len(world.instances(obj)) < 2:
            others = [o for o in world.objects if world.objects[o] == obj]
            _add_object(world, obj, world.placement[others[0]], rng)
    holders = world.receptacles_of(
        t for t in present_recep - {parent} if obj in constants.VAL_RECEPTACLE_OBJECTS[t]
    )
    for thor_id in world.instances(obj):
        if world.receptacles[world.placement[thor_id]] == parent:
            world.placement[thor_id] = _pick_holder(world, holders, rng)
    sentence = rng.choice(goals.gdict[task_type]["templates"]).format(obj=obj.lower(), recep=parent.lower())
    return _Task(task_type, obj, parent, sentence)


def _problem(world: _World, task: _Task, name: str, targets_only: bool = False) -> str:
    """The PDDL problem text; `targets_only` keeps only the objects of the task's types (the
    planner's copy, see `_plan`)."""
    constants, goals = _wheel()
    if targets_only:
        keep = {o: t for o, t in world.objects.items() if t in (task.obj, task.parent)}
        world = _World(
            world.scene, world.receptacles, world.recep_location, keep, world.placement, world.start
        )
    static = _static_receptacles()
    otypes = [t for t in constants.OBJECTS if t not in static]
    m = mangle
    objects = ["agent1 - agent"]
    objects += [f"{t}Type - otype" for t in otypes] + [f"{t}Type - rtype" for t in static]
    objects += [f"{m(r)} - receptacle" for r in sorted(world.receptacles)]
    objects += [f"{m(o)} - object" for o in sorted(world.objects)]
    locations = sorted({*world.recep_location.values(), world.start})
    objects += [f"{m(loc)} - location" for loc in locations]

    present_r = sorted(set(world.receptacles.values()))
    present_o = sorted(set(world.objects.values()))
    init = [
        f"(canContain {r}Type {o}Type)"
        for r in present_r
        for o in present_o
        if o in constants.VAL_RECEPTACLE_OBJECTS[r]
    ]
    init += [f"(receptacleType {m(r)} {t}Type)" for r, t in sorted(world.receptacles.items())]
    init += [
        f"(openable {m(r)})"
        for r, t in sorted(world.receptacles.items())
        if t in constants.OPENABLE_CLASS_SET
    ]
    init += [f"(receptacleAtLocation {m(r)} {m(loc)})" for r, loc in sorted(world.recep_location.items())]
    init.append(f"(atLocation agent1 {m(world.start)})")
    properties = [
        ("pickupable", _pickupable()),
        ("isReceptacleObject", set(constants.MOVABLE_RECEPTACLES)),
        ("cleanable", constants.VAL_ACTION_OBJECTS["Cleanable"]),
        ("heatable", constants.VAL_ACTION_OBJECTS["Heatable"]),
        ("coolable", constants.VAL_ACTION_OBJECTS["Coolable"]),
        ("toggleable", constants.VAL_ACTION_OBJECTS["Toggleable"]),
        ("sliceable", constants.VAL_ACTION_OBJECTS["Sliceable"]),
    ]
    for thor_id, otype in sorted(world.objects.items()):
        receptacle = world.placement[thor_id]
        init.append(f"(objectType {m(thor_id)} {otype}Type)")
        init += [f"({predicate} {m(thor_id)})" for predicate, kinds in properties if otype in kinds]
        init.append(f"(inReceptacle {m(thor_id)} {m(receptacle)})")
        init.append(f"(objectAtLocation {m(thor_id)} {m(world.recep_location[receptacle])})")
    goal = goals.gdict[task.task_type]["pddl"].replace("#", "-")
    goal = goal.format(obj=task.obj, recep=task.parent, toggle=task.parent)
    lines = [
        f"(define (problem {name})",
        "(:domain alfred)",
        "(:objects",
        *objects,
        ")",
        "(:init",
        *init,
        ")",
    ]
    return "\n".join(lines) + "\n" + goal.strip() + "\n"


# -- verification ----------------------------------------------------------------------------------


def _plan(data: dict) -> list[str]:
    """Fast Downward's plan from the start (textworld's `policy_commands` at reset), in
    demangled commands ([] if it finds none)."""
    import textworld

    from environments import pddl_speedup
    from environments.alfworld_env import _keep_argv, acquire_simulator, load_game, release_simulator

    pddl_speedup.apply()
    env, _, _ = acquire_simulator(textworld.EnvInfos(policy_commands=True))
    try:
        load_game(env, data)
        with _keep_argv():
            return list(env.reset()["policy_commands"] or [])
    finally:
        release_simulator(env)


def _replay_wins(game_file: str, commands: list[str]) -> bool:
    from environments.alfworld_env import AlfWorldEnv

    env = AlfWorldEnv(game_file, admissible_commands=True, max_steps=len(commands) + 1)
    try:
        _, info = env.reset()
        for k, command in enumerate(commands):
            if command not in info["admissible_commands"]:
                return False
            _, _, terminated, _, info = env.step(command)
            if terminated != (k == len(commands) - 1):
                return False
        return bool(info["won"])
    finally:
        env.close()


# -- games -----------------------------------------------------------------------------------------


def generate_game(task_type: str, seed: int, scenes: str, out_dir: str | os.PathLike) -> str:
    """Make one verified game under `out_dir`/<task folder>/<trial>/game.tw-pddl; its path.

    Deterministic in (task_type, seed, scenes) up to the planner's choice among plans."""
    candidates = scenes_for(task_type, scenes)
    if not candidates:
        raise ValueError(f"no {scenes} scene fits {task_type}")
    rng = random.Random(f"entrorl-alfworld-gen/v{GEN_VERSION}/{task_type}/{scenes}/{seed}")
    domain, grammar = _domain_and_grammar()
    tried = []
    for draw in range(MAX_DRAWS):
        scene = rng.choice(candidates)
        world = _build_world(scene, rng, with_lamp=task_type == "look_at_obj_in_light")
        task = _draw_task(task_type, world, rng)
        if task is None:
            tried.append(f"FloorPlan{scene}: no fitting task")
            continue
        trial = f"trial_gen{GEN_VERSION}_{scenes}_s{seed}_d{draw}"
        data = {
            "pddl_domain": domain,
            "grammar": grammar.replace("UNKNOWN GOAL", task.sentence),
            "pddl_problem": _problem(world, task, f"plan_{trial}"),
            "solvable": False,
            "task_type": task_type,
            "pddl_params": {
                "object_target": task.obj,
                "parent_target": "" if task.parent == "DeskLamp" else task.parent,
                "toggle_target": "DeskLamp" if task.parent == "DeskLamp" else "",
                "mrecep_target": "",
                "object_sliced": False,
            },
            "scene": scene,
            "generator": f"entrorl.alfworld_gen v{GEN_VERSION}",
        }
        # The planner gets the problem with only the task's objects (and the lamp): the others
        # never constrain an action (receptacles have no capacity), so its plan is a plan of the
        # full game, which the replay below checks; planning the full kitchen takes up to a
        # minute (a plan for 40+ objects), this copy about a second.
        plan = _plan({**data, "pddl_problem": _problem(world, task, f"plan_{trial}", targets_only=True)})
        if not plan:
            tried.append(f"FloorPlan{scene}: planner found no plan for {task.sentence!r}")
            continue
        folder = Path(out_dir) / f"{task_type}-{task.obj}-None-{task.parent}-{scene}" / trial
        folder.mkdir(parents=True)
        data["walkthrough"], data["solvable"] = plan, True
        game_file = folder / "game.tw-pddl"
        game_file.write_text(json.dumps(data))
        if not _replay_wins(str(game_file), plan):
            shutil.rmtree(folder.parent)
            tried.append(f"FloorPlan{scene}: the plan's replay did not win")
            continue
        # alfworld's own loader (AlfredTWEnv) also wants this file beside the game
        stub = {
            "task_type": task_type,
            "pddl_params": data["pddl_params"],
            "scene": {"floor_plan": f"FloorPlan{scene}"},
        }
        (folder / "traj_data.json").write_text(json.dumps(stub))
        return str(game_file)
    raise RuntimeError(
        f"no {task_type} game for seed {seed} after {MAX_DRAWS} draws: {'; '.join(tried[-5:])}"
    )


def games_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """`{cache_dir}/alfworld-gen/v{GEN_VERSION}`; cache_dir defaults to $ENTRORL_CACHE or ~/.cache/entrorl."""
    root = cache_dir or os.environ.get("ENTRORL_CACHE") or Path.home() / ".cache" / "entrorl"
    return Path(root) / "alfworld-gen" / f"v{GEN_VERSION}"


def _slot(task_type: str, seed: int, scenes: str, cache_dir) -> Path:
    return games_root(cache_dir) / scenes / task_type / f"seed{seed}"


def _cached(slot: Path) -> str | None:
    found = sorted(slot.glob("*/*/game.tw-pddl"))
    return str(found[0]) if found else None


def make_cached(
    task_type: str, seed: int, scenes: str = "seen", cache_dir: str | os.PathLike | None = None
) -> str:
    """The cached game for (task_type, seed, scenes), made here if missing (atomically: built
    in a private folder, then renamed into place)."""
    slot = _slot(task_type, seed, scenes, cache_dir)
    if (path := _cached(slot)) is not None:
        return path
    slot.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-seed{seed}-", dir=slot.parent))
    try:
        generate_game(task_type, seed, scenes, tmp)
        try:
            os.rename(tmp, slot)
        except OSError:
            if _cached(slot) is None:  # not a concurrent maker that got there first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _cached(slot)


def ensure_games(
    specs: Iterable[tuple[str, int]],
    scenes: str = "seen",
    cache_dir: str | os.PathLike | None = None,
    workers: int = 2,
) -> list[str]:
    """Game files for (task_type, seed) pairs, making only the missing ones, `workers` at a
    time in child processes (the PDDL backend is not thread-safe)."""
    specs = [(str(t), int(s)) for t, s in specs]
    for task_type, _ in specs:
        if task_type not in TASK_TYPES:
            raise ValueError(f"unknown alfworld task type {task_type!r}; known: {', '.join(TASK_TYPES)}")
    if scenes not in SCENE_SPLITS:
        raise ValueError(f"alfworld level scenes={scenes!r}: use seen or unseen")
    missing = sorted({spec for spec in specs if _cached(_slot(*spec, scenes, cache_dir)) is None})
    if len(missing) == 1 or workers <= 1:
        for task_type, seed in missing:
            make_cached(task_type, seed, scenes, cache_dir)
    elif missing:
        with ThreadPoolExecutor(max(1, workers)) as pool:
            list(pool.map(lambda spec: _make_in_child(*spec, scenes, cache_dir), missing))
    return [make_cached(t, s, scenes, cache_dir) for t, s in specs]


def _make_in_child(task_type: str, seed: int, scenes: str, cache_dir) -> None:
    command = [sys.executable, "-m", "environments.alfworld_gen", task_type, str(seed), "--scenes", scenes]
    if cache_dir:
        command += ["--cache-dir", str(cache_dir)]
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=repo)
    if result.returncode:
        raise RuntimeError(
            f"alfworld game generation failed for {task_type} seed {seed}: {result.stderr.strip()[-2000:]}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="make (and cache) one ALFWorld-style game; prints its path")
    parser.add_argument("task_type")
    parser.add_argument("seed", type=int)
    parser.add_argument("--scenes", default="seen", choices=SCENE_SPLITS)
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    path = make_cached(args.task_type, args.seed, args.scenes, args.cache_dir)
    print(f"{path}\t{time.perf_counter() - started:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
