"""ScienceWorld (the `scienceworld` package: a Scala simulator behind py4j) as a TextEnv.

One episode plays one (task, variation) pair, picked per episode through
`reset(options={"task_name": ..., "variation": ...})`; `task_options` turns task ids (seeds) into
such options over the package's train/dev/test variation splits or the EPO/RLVMR L0/L1/L2 lists.

The simulator is stepped through its server object directly (`step`, `getScore`,
`getCompleted`): the package's own `ScienceWorldEnv.step` also enumerates every valid
action-object combination, look and inventory on each step (measured on 2 loaded cores: median
~150 ms against ~10 ms), so that list is computed only for an env built with
`admissible_commands=True` (median ~120 ms a step, 380-3,300 strings).

JVMs: by default every env of a process shares one JVM (`shared_jvm=True`), each env with its
own simulator instance in it (instances are independent: interleaved episodes give the same
transcripts as solo ones). A rollout holds one env per episode, so this saves a JVM start
(~2.5 s, then ~3 s of JIT-cold first load) and memory: 33 envs in one JVM took 1.4 GB, one JVM
each ~170-200 MB. The JVM shuts down when the last env using it is closed; `shared_jvm=False`
gives an env its own JVM, shut down by its `close()`.

Determinism: with a stock JVM the simulator lists a room's objects in a new order on every load
(identity-hashed sets) and some outcomes vary with it, so two resets of one (task, variation)
differ in text, which breaks same-start GRPO groups, GiGPO's anchor states and forking by replay.
`deterministic=True` (default) starts the JVM with a constant identity hash (see `_JVM`).
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import threading
import warnings
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import Any

import scienceworld
from py4j.java_gateway import GatewayParameters, JavaGateway, launch_gateway
from scienceworld.constants import BASEPATH, JAR_PATH
from scienceworld.utils import infer_task

from environments.base import TextEnv

SIMPLIFICATIONS = (
    "teleportAction",
    "selfWateringFlowerPots",
    "openContainers",
    "openDoors",
    "noElectricalAction",
)
PACKAGE_SPLITS = ("train", "dev", "test")
LEVEL_KEYS = ("split", "tasks", "data_dir")
RESET_OPTION_KEYS = ("task_name", "task_idx", "variation")
# Templates the prompt does not list: "reset task" restarts the world in mid-episode.
_HIDDEN_TEMPLATES = ("reset task",)
_JVM_EXIT_TIMEOUT_S = 10
_DETERMINISTIC_JAVA_OPTS = ["-XX:+UnlockExperimentalVMOptions", "-XX:hashCode=2"]


# -- JVMs -------------------------------------------------------------------------------------------


class _JVM:
    """One Java process running the ScienceWorld jar behind a py4j gateway.

    deterministic: start the JVM with a constant identity hash code. The simulator keeps objects
    in hash sets keyed by identity, so with the stock JVM every load lists a room's objects in
    another order and even some outcomes change (which pea plant grows tall in the Mendelian
    genetics tasks); with a constant hash the sets keep insertion order and a (task, variation)
    plays the same, text for text, on every reset (30 of 30 tasks' gold paths replayed
    identically, against 21 of 30 without), at ~10 ms more per step. A JVM that refuses the
    flag (it is experimental in Java 17) is started without it, with a warning.
    """

    def __init__(self, deterministic: bool = True) -> None:
        self.deterministic = deterministic
        try:
            port, self.process = self._launch(_DETERMINISTIC_JAVA_OPTS if deterministic else [])
        except ValueError:  # the JVM exited before printing its port: an unknown option
            if not deterministic:
                raise
            warnings.warn(
                "this JVM refuses -XX:hashCode=2: ScienceWorld resets will list objects in varying order",
                stacklevel=2,
            )
            self.deterministic = False
            port, self.process = self._launch([])
        self.gateway = JavaGateway(gateway_parameters=GatewayParameters(auto_field=True, port=port))
        self.owner_pid = os.getpid()
        self.users = 0
        _live.add(self)

    @staticmethod
    def _launch(javaopts: list[str]) -> tuple[int, subprocess.Popen]:
        # die_on_exit: the JVM exits when our end of its stdin closes (also when Python dies).
        return launch_gateway(
            classpath=JAR_PATH, javaopts=javaopts, die_on_exit=True, cwd=BASEPATH, return_proc=True
        )

    def simulator(self) -> Any:
        """A fresh, independent simulator instance (py4j proxy of `PythonInterface`)."""
        return self.gateway.jvm.scienceworld.runtime.pythonapi.PythonInterface()

    def alive(self) -> bool:
        return self.owner_pid == os.getpid() and self.process.poll() is None

    def shutdown(self) -> None:
        _live.discard(self)
        if self.owner_pid != os.getpid():
            return  # a forked child's copy: the JVM belongs to the parent
        try:
            self.gateway.shutdown()
        except Exception:  # noqa: BLE001 - the JVM may already be gone
            pass
        try:
            self.process.stdin.close()
            self.process.wait(timeout=_JVM_EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        except Exception:  # noqa: BLE001
            pass


_shared: dict[bool, _JVM] = {}  # deterministic -> the JVM this process's envs share
# Reentrant: a garbage-collected env releases its JVM from __del__, possibly inside _acquire_jvm.
_shared_lock = threading.RLock()
_live: set[_JVM] = set()  # every JVM this process started and has not shut down


@atexit.register
def _shutdown_all() -> None:
    """Shut the JVMs of envs never closed down while the interpreter still works (a JVM also exits
    by itself when this process dies: its stdin closes)."""
    for jvm in list(_live):
        jvm.shutdown()


def _acquire_jvm(shared: bool, deterministic: bool = True) -> _JVM:
    if not shared:
        jvm = _JVM(deterministic)
        jvm.users = 1
        return jvm
    with _shared_lock:
        jvm = _shared.get(deterministic)
        if jvm is None or not jvm.alive():
            jvm = _shared[deterministic] = _JVM(deterministic)
        jvm.users += 1
        return jvm


def _release_jvm(jvm: _JVM) -> None:
    with _shared_lock:
        jvm.users -= 1
        if jvm.users > 0:
            return
        for key, shared in list(_shared.items()):
            if shared is jvm:
                del _shared[key]
    jvm.shutdown()


# -- the (task, variation) table and the splits -------------------------------------------------------


def cache_dir(root: str | os.PathLike | None = None) -> Path:
    """`{root}/scienceworld/`; root defaults to $ENTRORL_CACHE or ~/.cache/entrorl."""
    root = root or os.environ.get("ENTRORL_CACHE") or Path.home() / ".cache" / "entrorl"
    return Path(root) / "scienceworld"


def default_data_dir() -> Path:
    """Where the L{0,1,2}_idx.json lists live: `<repo>/../shared/data/scienceworld`."""
    return Path(__file__).resolve().parents[1].parent / "shared" / "data" / "scienceworld"


def variation_table(root: str | os.PathLike | None = None) -> list[dict]:
    """Every task in the simulator's order (the order `task_idx` and the L lists index), each
    `{"name", "variations", "train", "dev", "test"}` (the package's variation splits).

    Read from `cache_dir(root)/variations-<version>.json`; the first call on a machine asks a JVM
    (~5-10 s, one load per task) and writes that file.
    """
    path = cache_dir(root) / f"variations-{scienceworld.__version__}.json"
    return _read_table(str(path))


@lru_cache(maxsize=4)
def _read_table(path: str) -> list[dict]:
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    table = _build_table()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(table, f)
    os.replace(tmp, path)  # atomic: a concurrent reader sees the whole file or none
    return table


def _build_table() -> list[dict]:
    jvm = _acquire_jvm(shared=True)
    try:
        sim = jvm.simulator()
        table = []
        for name in sim.getTaskNames():
            error = sim.load(name, 0, "", False)  # the split getters read the loaded task
            if error:
                raise RuntimeError(f"scienceworld could not load task {name!r}: {error}")
            table.append(
                {
                    "name": str(name),
                    "variations": int(sim.getTaskMaxVariations(name)),
                    **{
                        split: [int(v) for v in getattr(sim, f"getVariations{split.title()}")()]
                        for split in PACKAGE_SPLITS
                    },
                }
            )
        return table
    finally:
        _release_jvm(jvm)


def resolve_task(task: str | int, names: list[str], key: str = "task_name") -> str:
    """A task name from a name, a paper name ("Matter Changes of State (Boiling)"), a task id
    ("1-1") or an index into the simulator's task list."""
    if isinstance(task, int) or (isinstance(task, str) and task.strip().isdigit()):
        index = int(task)
        if not 0 <= index < len(names):
            raise ValueError(f"scienceworld {key}={task!r}: a task index must be in 0..{len(names) - 1}")
        return names[index]
    name = infer_task(str(task).strip())
    if name not in names:
        raise ValueError(
            f"scienceworld {key}={task!r}: unknown task; use one of {', '.join(names)} "
            f"(or an index 0..{len(names) - 1}, or a task id like '1-1')"
        )
    return name


@lru_cache(maxsize=8)
def _read_index_file(path: str) -> dict[str, list[list[int]]]:
    with open(path) as f:
        return json.load(f)


def split_pairs(
    split: str = "train",
    tasks: Iterable[str | int] | str | int | None = None,
    data_dir: str | os.PathLike | None = None,
    cache_root: str | os.PathLike | None = None,
) -> list[tuple[str, int]]:
    """The (task name, variation) pairs of a split, in a fixed round-robin order: the first
    variation of every task, then the second of every task, and so on. Any seed range [0, k)
    therefore spreads over the tasks.

    split: "train" | "dev" | "test" (the package's per-task variation splits) or "L{n}_train" /
    "L{n}_test" (the EPO/RLVMR lists `L{n}_idx.json` in `data_dir`; their order within a task is
    kept). tasks: keep only these tasks (names, ids or indices).
    """
    table = variation_table(cache_root)
    names = [task["name"] for task in table]
    per_task: dict[str, list[int]] = {}
    if split in PACKAGE_SPLITS:
        for task in table:
            per_task[task["name"]] = list(task[split])
    elif _is_index_split(split):
        level, part = split.split("_")
        folder = Path(data_dir) if data_dir else default_data_dir()
        path = folder / f"{level}_idx.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"scienceworld split {split!r} needs {path}: set the level key 'data_dir' to the folder "
                f"holding {level}_idx.json (default {default_data_dir()})"
            )
        lists = _read_index_file(str(path))
        if part not in lists:
            raise ValueError(f"scienceworld split {split!r}: {path} has only {', '.join(sorted(lists))}")
        for task_idx, variation in lists[part]:
            name = resolve_task(int(task_idx), names, key=f"{path.name} task index")
            if not 0 <= variation < table[int(task_idx)]["variations"]:
                raise ValueError(f"{path}: variation {variation} of {name} is out of range")
            per_task.setdefault(name, []).append(int(variation))
    else:
        raise ValueError(
            f"scienceworld level key 'split'={split!r}: use one of {', '.join(PACKAGE_SPLITS)} (the package's "
            "variation splits) or L0_train, L0_test, L1_train, L1_test, L2_train, L2_test (the EPO/RLVMR lists)"
        )
    if tasks is not None:
        wanted = [tasks] if isinstance(tasks, (str, int)) else list(tasks)
        keep = {resolve_task(task, names, key="level key 'tasks' entry") for task in wanted}
        covered = [name for name in names if per_task.get(name)]
        per_task = {name: variations for name, variations in per_task.items() if name in keep}
        if not any(per_task.values()):
            raise ValueError(
                f"scienceworld split {split!r} has no variations of the tasks {sorted(keep)} (level key "
                f"'tasks'); it covers {', '.join(covered)}"
            )
    order = [name for name in names if per_task.get(name)]  # simulator order, whatever the file order
    pairs = []
    for rank in range(max((len(per_task[name]) for name in order), default=0)):
        pairs += [(name, per_task[name][rank]) for name in order if rank < len(per_task[name])]
    return pairs


def _is_index_split(split: str) -> bool:
    level, _, part = split.partition("_")
    return len(level) >= 2 and level[0] == "L" and level[1:].isdigit() and part in ("train", "test")


def task_options(seeds: Iterable[int], level: dict | None = None) -> list[dict]:
    """Reset options for task ids `seeds`: seed i plays pair i mod N of `split_pairs(**level)`.

    level keys: split (default "train"), tasks (optional filter), data_dir (the folder of the
    L*_idx.json lists; default `<repo>/../shared/data/scienceworld`).
    """
    level = dict(level or {})
    unknown = sorted(set(level) - set(LEVEL_KEYS))
    if unknown:
        raise ValueError(f"scienceworld level key(s) {unknown} unknown; valid keys: {', '.join(LEVEL_KEYS)}")
    pairs = split_pairs(level.get("split", "train"), level.get("tasks"), level.get("data_dir"))
    return [
        {"task_name": name, "variation": variation}
        for name, variation in (pairs[s % len(pairs)] for s in seeds)
    ]


# -- the env ----------------------------------------------------------------------------------------


def _simplification_string(simplifications: str | Iterable[str] | None) -> str:
    items = simplifications.split(",") if isinstance(simplifications, str) else list(simplifications or [])
    items = [item.strip() for item in items if item.strip()]
    bad = [item for item in items if item not in ("easy", *SIMPLIFICATIONS)]
    if bad:
        raise ValueError(
            f"scienceworld simplifications {bad} unknown; use 'easy' (all that apply) or a comma list of "
            f"{', '.join(SIMPLIFICATIONS)}"
        )
    return ",".join(items)


def first_line(action: str) -> str:
    """The command the simulator gets: the first non-empty line, stripped (a newline inside a
    command makes the simulator's parser match nothing)."""
    for line in action.splitlines():
        if line.strip():
            return line.strip()
    return ""


class ScienceWorldEnv(TextEnv):
    """One ScienceWorld (task, variation) per episode.

    Picked at reset by `options` {"task_name" (or "task_idx"), "variation"}, else the
    constructor's `task_name`/`variation`, else the package train split's pair number `seed`
    (round-robin order, see `split_pairs`). The JVM starts at the first reset and serves every
    later one (a reset reloads the task: ~50-100 ms).

    Reward and score: `info["score"]` is the simulator's own 0-100 score (-100 once the task is
    failed, e.g. by focusing on a wrong object). The step reward is the score delta / 100, so a
    task solved from score 0 earns 1.0 in all, the scale of the `success` reward, and the rewards
    of an episode sum to (final score - score at reset) / 100. The score at reset is 0 except
    where a simplification already meets an optional subgoal ("easy" opens the doors: 8 in
    find-animal); as in the package, that part is nobody's reward.
    `info["won"]`: the task's ordered goal sequence is complete (the score is then 100). EPO's
    "completed and score > 0" is the same in practice (its "completed" also counts the package's
    step limit, which its 30-step cap never reaches). Terminated on completion or failure
    (`info["lost"]`); truncated after `max_steps` steps (every step counts, unknown text too).

    Unknown text gives the simulator's "No known action matches that input." (no reward, not
    done). Only the first non-empty line of an action is played. `info` holds won, lost, score,
    moves, task_name, variation, simplifications, task_description (the task sentence),
    objective (= `task`: the sentence, then with `templates_in_task` the command templates, so
    prompts built from it show them) and action_templates (the simulator's templates, "OBJ"
    standing for an object name; "reset task" left out); privileged lists only when asked:
    admissible_commands (every valid action-object string, sorted; ~120 ms a step), objects (the
    names the parser knows here), and, at reset, walkthrough (the gold path; ~0.6-1 s a reset).
    """

    def __init__(
        self,
        task_name: str | int | None = None,
        variation: int = 0,
        simplifications: str | list[str] = "",
        admissible_commands: bool = False,
        objects: bool = False,
        max_steps: int = 30,
        gold_path: bool = False,
        templates_in_task: bool = True,
        shared_jvm: bool = True,
        deterministic: bool = True,
    ) -> None:
        self.task_name = task_name
        self.variation = variation
        self.simplifications = _simplification_string(simplifications)
        self.admissible_commands = admissible_commands
        self.objects = objects
        self.max_steps = max_steps
        self.gold_path = gold_path
        self.templates_in_task = templates_in_task
        self.shared_jvm = shared_jvm
        self.deterministic = deterministic
        self.task = ""
        self._jvm: _JVM | None = None
        self._sim: Any = None
        self._names: list[str] = []
        self._templates: dict[str, list[str]] = {}  # simplification string -> templates
        self._gold: dict[tuple[str, int, str], list[str]] = {}
        self._loaded: tuple[str, int, str] | None = None
        self._objective = ""
        self._actions: list[str] = []  # commands sent since the reset (to replay after a reload)
        self._score = 0
        self._steps = 0
        self._won = self._lost = False
        self._episode_over = True

    # -- gymnasium API --

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[str, dict]:
        super().reset(seed=seed)
        sim = self._simulator()
        name, variation = self._pick_task(seed, dict(options or {}))
        key = (name, variation, self.simplifications)
        if self.simplifications and "noElectricalAction" in self.simplifications.split(","):
            if "power-component" in name or "conductivity" in name:
                raise ValueError(
                    f"scienceworld task {name!r} needs electrical actions: drop noElectricalAction"
                )
        error = sim.load(name, variation, self.simplifications, self.gold_path)
        if error:
            raise ValueError(f"scienceworld could not load {name!r} variation {variation}: {error}")
        if self.gold_path:
            self._gold[key] = [str(a) for a in sim.getGoldActionSequence()]
        self._loaded = key
        observation = str(sim.step("look around"))  # the package's reset makes this first move too
        self._actions = []
        self._score = self._read_score()
        self._steps = 0
        self._won = self._lost = False
        self._episode_over = False
        self._objective = str(sim.getTaskDescription()).strip()
        templates = self.action_templates()
        self.task = self._objective
        if self.templates_in_task:
            self.task += "\nCommands (OBJ is the name of an object): " + ", ".join(templates)
        info = self._info()
        if self.gold_path:
            info["walkthrough"] = list(self._gold[key])
        return observation.strip(), info

    def step(self, action: str) -> tuple[str, float, bool, bool, dict]:
        if self._episode_over:
            raise RuntimeError("call reset() first: the episode has ended or never started")
        command = first_line(action)
        observation = str(self._sim.step(command))
        self._actions.append(command)
        self._steps += 1
        previous = self._score
        self._score = self._read_score()
        self._lost = self._score < 0
        self._won = bool(self._sim.getCompleted()) and not self._lost
        terminated = self._won or self._lost
        truncated = bool(self.max_steps) and self._steps >= self.max_steps and not terminated
        self._episode_over = terminated or truncated
        return observation.strip(), (self._score - previous) / 100.0, terminated, truncated, self._info()

    def walkthrough(self) -> list[str]:
        """The gold action path of the current (task, variation) from its start (privileged: for
        experts and tests). Without `gold_path=True` the first call per task reloads the task with
        gold-path generation (~1 s) and replays this episode's commands, so the episode goes on
        where it was."""
        if self._loaded is None:
            raise RuntimeError("call reset() first")
        if self._loaded not in self._gold:
            name, variation, simplifications = self._loaded
            error = self._sim.load(name, variation, simplifications, True)
            if error:
                raise RuntimeError(f"scienceworld could not reload {name!r} variation {variation}: {error}")
            self._gold[self._loaded] = [str(a) for a in self._sim.getGoldActionSequence()]
            for command in ["look around", *self._actions]:
                self._sim.step(command)
        return list(self._gold[self._loaded])

    def action_templates(self) -> list[str]:
        """The simulator's action templates under this env's simplifications ("OBJ" = an object)."""
        if self.simplifications not in self._templates:
            templates = [str(t) for t in self._simulator().getPossibleActions()]
            self._templates[self.simplifications] = [t for t in templates if t not in _HIDDEN_TEMPLATES]
        return list(self._templates[self.simplifications])

    def close(self) -> None:
        jvm, self._jvm, self._sim = self._jvm, None, None
        self._loaded, self._episode_over = None, True
        if jvm is not None:
            _release_jvm(jvm)

    def __del__(self) -> None:
        if sys.is_finalizing():
            return  # the atexit hook has shut the JVMs down
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown: the JVM dies with its stdin anyway
            pass

    # -- internals --

    def _simulator(self) -> Any:
        if self._sim is None:
            self._jvm = _acquire_jvm(self.shared_jvm, self.deterministic)
            try:
                self._sim = self._jvm.simulator()
                self._names = [str(name) for name in self._sim.getTaskNames()]
            except BaseException:
                self.close()
                raise
        return self._sim

    def _pick_task(self, seed: int | None, options: dict[str, Any]) -> tuple[str, int]:
        unknown = sorted(set(options) - set(RESET_OPTION_KEYS))
        if unknown:
            raise ValueError(
                f"scienceworld reset option(s) {unknown} unknown; valid: {', '.join(RESET_OPTION_KEYS)}"
            )
        if "task_name" in options or "task_idx" in options:
            key = "task_name" if "task_name" in options else "task_idx"
            name, variation = resolve_task(options[key], self._names, key), int(options.get("variation", 0))
        elif self.task_name is not None:
            name, variation = (
                resolve_task(self.task_name, self._names),
                int(options.get("variation", self.variation)),
            )
        else:
            (picked,) = task_options([seed or 0], {"split": "train"})
            name, variation = picked["task_name"], picked["variation"]
        count = int(self._sim.getTaskMaxVariations(name))
        if not 0 <= variation < count:
            raise ValueError(
                f"scienceworld variation={variation}: task {name!r} has variations 0..{count - 1}"
            )
        return name, variation

    def _read_score(self) -> int:
        return int(round(100 * float(self._sim.getScore())))

    def _info(self) -> dict[str, Any]:
        name, variation, simplifications = self._loaded
        info = {
            "won": self._won,
            "lost": self._lost,
            "score": self._score,
            "moves": self._steps,
            "task_name": name,
            "variation": variation,
            "simplifications": simplifications,
            "objective": self.task,
            "task_description": self._objective,
            "action_templates": self.action_templates(),
        }
        if self.admissible_commands:
            info["admissible_commands"] = sorted(
                {str(c) for c in self._sim.getValidActionObjectCombinations()}
            )
        if self.objects:
            info["objects"] = sorted({str(o) for o in self._sim.getPossibleObjects()})
        return info
