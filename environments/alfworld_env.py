"""ALFWorld text games (TextWorld's PDDL backend) as a TextEnv, and the splits that list them.

`AlfWorldEnv` plays one `game.tw-pddl` file per episode (`reset(options={"game_file": path})`)
through textworld's `PddlEnv`, with entity names demangled the way ALFWorld does it
("drawer 5", "sinkbasin 1"). It never calls the planner: the walkthrough is the one stored in the
game file. The env applies the memoisation of `environments.pddl_speedup`: measured on 10
valid_seen games (CPU time, median), a step costs 22 ms (79 ms stock), a reset of the
loaded game 41 ms (0.57 s), loading a new game + reset 0.6 s (1.5 s).
One process can hold many envs, but textworld's PDDL backend is not thread-safe: one thread.

`task_options(seeds, level)` lists the games of a split (official data or generated,
`environments.alfworld_gen`) and maps seed i to game i mod N. Official layout:
ROOT/json_2.1.1/{train,valid_seen,valid_unseen}/<task_type>-<Object>-<Mrecep>-<Parent>-<scene>/
<trial>/game.tw-pddl.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import sys
import tarfile
import tempfile
import threading
from collections import Counter
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from environments.base import TextEnv

TASK_TYPES = (
    "pick_and_place_simple",
    "look_at_obj_in_light",
    "pick_clean_then_place_in_recep",
    "pick_heat_then_place_in_recep",
    "pick_cool_then_place_in_recep",
    "pick_two_obj_and_place",
)
OFFICIAL_SPLITS = ("train", "valid_seen", "valid_unseen")
SPLITS = (*OFFICIAL_SPLITS, "generated")
LEVEL_KEYS = ("split", "data_dir", "task_types", "scenes", "cache_dir", "shuffle")
DATA_VERSION = "json_2.1.1"  # the folder name of the official release (its files use the 2.1.2 grammar)
_BANNER = "-= Welcome to TextWorld, ALFRED! =-"
_TASK_LINE = re.compile(r"^Your task is to: (.*)$", re.MULTILINE)


# -- data: where the splits are --------------------------------------------------------------------


def shared_data_dir() -> Path:
    """The project's read-only data folder: $ENTRORL_SHARED_DATA, else `<repo>/../shared/data`."""
    if os.environ.get("ENTRORL_SHARED_DATA"):
        return Path(os.environ["ENTRORL_SHARED_DATA"])
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"


def cache_root() -> Path:
    """$ENTRORL_CACHE or ~/.cache/entrorl (unpacked splits, indexes, generated games)."""
    return Path(os.environ.get("ENTRORL_CACHE") or Path.home() / ".cache" / "entrorl")


def _candidate_roots(data_dir: str | os.PathLike | None) -> list[Path]:
    if data_dir:
        return [Path(data_dir).expanduser()]
    roots = [Path(os.environ["ALFWORLD_DATA"]).expanduser()] if os.environ.get("ALFWORLD_DATA") else []
    return [*roots, shared_data_dir() / "alfworld", cache_root() / "alfworld"]


def _split_in(root: Path, split: str) -> Path | None:
    for folder in (root / DATA_VERSION / split, root / split):
        if folder.is_dir():
            return folder
    return None


def split_dir(split: str, data_dir: str | os.PathLike | None = None) -> Path:
    """The folder of an official split. The train split ships packed: the first call that needs
    it unpacks `json_2.1.1_train.tar.xz` (found beside the data) into the cache, once."""
    if split not in OFFICIAL_SPLITS:
        raise ValueError(f"alfworld split {split!r}: use one of {', '.join(SPLITS)}")
    roots = _candidate_roots(data_dir)
    for root in roots:
        if (folder := _split_in(root, split)) is not None:
            return folder
    for root in roots:
        packed = root / f"{DATA_VERSION}_{split}.tar.xz"
        if packed.is_file():
            return _unpack(packed, split)
    looked = ", ".join(str(r) for r in roots)
    raise FileNotFoundError(
        f"alfworld split {split!r} not found: looked for {DATA_VERSION}/{split}/ (or {DATA_VERSION}_{split}.tar.xz) "
        f"in {looked}. Set the level key data_dir (e.g. env.level.data_dir=/path/to/alfworld) or $ALFWORLD_DATA "
        f"to a folder holding {DATA_VERSION}/{split}/<task>/<trial>/game.tw-pddl, or use split=generated"
    )


def _unpack(packed: Path, split: str) -> Path:
    """Extract `packed` into the cache: to a private temp folder, then one rename into place, so
    a concurrent reader never sees half a split."""
    dest = cache_root() / "alfworld" / DATA_VERSION / split
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=dest.parent))
    try:
        with tarfile.open(packed, "r:xz") as tar:
            tar.extractall(tmp, filter="data")
        unpacked = _split_in(tmp, split)
        if unpacked is None:
            raise FileNotFoundError(f"{packed} holds no {DATA_VERSION}/{split}/ folder")
        try:
            os.rename(unpacked, dest)
        except OSError:
            if not dest.is_dir():  # not a concurrent unpack that won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


# -- data: which games a split holds ---------------------------------------------------------------

_INDEXES: dict[str, list[tuple[str, bool]]] = {}


def list_games(folder: str | os.PathLike, task_types: Iterable[str] | None = None) -> list[str]:
    """Solvable games under `folder` (`*/*/game.tw-pddl`), sorted by path, optionally only those
    of `task_types`. Which games are solvable is read once and kept in an index in the cache."""
    folder = Path(folder)
    games = [path for path, solvable in _index(folder) if solvable]
    if task_types is not None:
        wanted = set(task_types)
        games = [path for path in games if task_type_of(path) in wanted]
    return games


def _index(folder: Path) -> list[tuple[str, bool]]:
    paths = sorted(str(p) for p in folder.glob("*/*/game.tw-pddl"))
    stats = [os.stat(p) for p in paths]
    signature = [len(paths), sum(s.st_size for s in stats), max((s.st_mtime_ns for s in stats), default=0)]
    key = hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:16]
    memo_key = f"{key}:{signature}"
    if memo_key in _INDEXES:
        return _INDEXES[memo_key]
    index_file = cache_root() / "alfworld" / "index" / f"{key}.json"
    try:
        saved = json.loads(index_file.read_text())
        if saved["signature"] == signature:
            _INDEXES[memo_key] = [(str(folder / rel), ok) for rel, ok in saved["games"]]
            return _INDEXES[memo_key]
    except (OSError, ValueError, KeyError):
        pass
    entries = []
    for path in paths:
        with open(path) as f:
            entries.append((path, bool(json.load(f).get("solvable", False))))
    _INDEXES[memo_key] = entries
    try:
        index_file.parent.mkdir(parents=True, exist_ok=True)
        data = {
            "folder": str(folder),
            "signature": signature,
            "games": [[os.path.relpath(p, folder), ok] for p, ok in entries],
        }
        with tempfile.NamedTemporaryFile("w", dir=index_file.parent, delete=False, suffix=".tmp") as f:
            json.dump(data, f)
        os.replace(f.name, index_file)
    except OSError:
        pass  # a read-only cache only costs the re-read next time
    return entries


def task_type_of(game_file: str | os.PathLike, data: dict | None = None) -> str:
    """The task type: the game's own `task_type` key (generated games), else the first part of
    its task folder name `<task_type>-<Object>-<Mrecep>-<Parent>-<scene>`; "" if neither."""
    if data and data.get("task_type"):
        return str(data["task_type"])
    folder = Path(game_file).parent.parent.name
    kind = folder.split("-", 1)[0]
    return kind if kind in TASK_TYPES else ""


def _check_level(level: dict) -> tuple[str, list[str] | None]:
    unknown = sorted(set(level) - set(LEVEL_KEYS))
    if unknown:
        raise ValueError(f"alfworld level keys {unknown} are unknown; valid keys: {', '.join(LEVEL_KEYS)}")
    if "split" not in level:
        raise ValueError(
            f"alfworld level needs the key split: one of {', '.join(SPLITS)} (e.g. env.level.split=train)"
        )
    split = level["split"]
    if split not in SPLITS:
        raise ValueError(f"alfworld level split={split!r}: use one of {', '.join(SPLITS)}")
    task_types = level.get("task_types")
    if task_types is not None:
        task_types = [task_types] if isinstance(task_types, str) else list(task_types)
        bad = [t for t in task_types if t not in TASK_TYPES]
        if bad or not task_types:
            raise ValueError(
                f"alfworld level task_types={task_types}: use a non-empty list of {', '.join(TASK_TYPES)}"
            )
    return split, task_types


def task_options(seeds: Iterable[int], level: dict) -> list[dict]:
    """Reset options `{"game_file": path}` for `seeds` at `level`.

    level keys: `split` (train | valid_seen | valid_unseen | generated), `data_dir` (a folder
    holding json_2.1.1/<split>; default $ALFWORLD_DATA, else the shared data, else the cache),
    `task_types` (keep only these), and for `split: generated` also `scenes` (seen | unseen)
    and `cache_dir`; keys of the other kind of split are ignored (a train level and an eval
    level are merged). Official splits: seed i plays game i mod N of the solvable games sorted
    by path, or with `shuffle: true` of a fixed shuffle of them (seed 0), so that a range of
    seeds is a seeded subset of every task type rather than the first type's games.
    Generated: seed i makes (once, cached) a game of type task_types[i mod T] from seed i.
    """
    seeds = [int(s) for s in seeds]
    split, task_types = _check_level(level)
    if split == "generated":
        from environments.alfworld_gen import ensure_games

        kinds = task_types or list(TASK_TYPES)
        specs = [(kinds[s % len(kinds)], s) for s in seeds]
        paths = ensure_games(specs, scenes=level.get("scenes", "seen"), cache_dir=level.get("cache_dir"))
        return [{"game_file": path} for path in paths]
    folder = split_dir(split, level.get("data_dir"))
    games = list_games(folder, task_types)
    if not games:
        raise FileNotFoundError(
            f"alfworld split {split!r} at {folder} has no solvable games"
            + (f" of task_types {task_types}" if task_types else "")
            + "; check the level keys data_dir and task_types"
        )
    if level.get("shuffle"):
        random.Random(0).shuffle(games)
    return [{"game_file": games[s % len(games)]} for s in seeds]


# -- names -----------------------------------------------------------------------------------------


def demangled_names(ids: Iterable[str]) -> dict[str, str]:
    """ALFWorld's display names for PDDL ids, as its `Demangler` makes them (without shuffling):
    the name is the part before the first `_bar_` ("+basin" for sink/bathtub basins); instances
    of a name are numbered from 1 in reverse order of their sorted ids. Ids without `_bar_`
    (types, the agent) keep their text, with ALFWorld's trailing space."""
    ids = sorted(ids)
    counts: Counter[str] = Counter()
    for id_ in ids:
        if "_bar_" in id_:
            counts[_base_name(id_)] += 1
    names = {}
    for id_ in ids:
        if "_bar_" in id_:
            base = _base_name(id_)
            names[id_] = f"{base} {counts[base]}"
            counts[base] -= 1
        else:
            names[id_] = f"{id_} "
    return names


def _base_name(id_: str) -> str:
    name = id_.split("_bar_", 1)[0]
    return name + "basin" if "basin" in id_ else name


# -- text ------------------------------------------------------------------------------------------


@contextmanager
def _keep_argv():
    # fast_downward's translator overwrites sys.argv on every call; the trainer's process keeps its own.
    saved = list(sys.argv)
    try:
        yield
    finally:
        sys.argv[:] = saved


def clean_intro(text: str) -> tuple[str, str]:
    """(observation, objective) from a game's opening text: the banner and the "Your task is to:"
    line leave the observation (the prompt shows the objective apart)."""
    matches = list(_TASK_LINE.finditer(text))
    match = matches[-1] if matches else None
    objective = match.group(1).strip() if match else ""
    if match:
        text = text[: match.start()] + text[match.end() :]
    text = text.replace(_BANNER, "", 1)
    return re.sub(r"\n{3,}", "\n\n", text).strip(), objective


def normalize_command(action: str) -> str:
    """Lower case, single spaces, no trailing period: "Go to  Drawer 1." -> "go to drawer 1"."""
    return " ".join(action.strip().rstrip(".").lower().split())


# -- simulators ------------------------------------------------------------------------------------

# Each textworld PddlEnv dlopens a private copy of Fast Downward's library. Closing a copy
# (dlclose) makes the process crash at exit once a second copy has been opened, and never
# closing them leaks one (a few MB) per env. So simulators are never closed: a closed env hands
# its PddlEnv back here, with the game it has loaded, and the next env takes it.
_FREE: list[tuple[Any, str | None, dict | None]] = []  # (PddlEnv, loaded game file, its data)
_FREE_LOCK = threading.Lock()


def acquire_simulator(infos: Any, game_file: str | None = None) -> tuple[Any, str | None, dict | None]:
    """A PddlEnv requesting `infos`, preferably one that has `game_file` loaded already:
    (env, its loaded game file or None, that game's data)."""
    with _FREE_LOCK:
        match = next((k for k, (_, loaded, _) in enumerate(_FREE) if loaded == game_file), None)
        entry = _FREE.pop(match if match is not None else -1) if _FREE else None
    if entry is None:
        from textworld.envs.pddl import PddlEnv

        entry = (PddlEnv(infos), None, None)
    entry[0].request_infos = infos
    return entry


def release_simulator(env: Any, game_file: str | None = None, data: dict | None = None) -> None:
    with _FREE_LOCK:
        _FREE.append((env, game_file, data))


def load_game(env: Any, data: dict) -> None:
    """Load a game's data into a PddlEnv and give its entities ALFWorld's names."""
    with _keep_argv():
        env.load(data)
    infos = env._entity_infos
    names = demangled_names(info.id for info in infos.values())
    for info in infos.values():
        info.name = names[info.id]


# -- the env ---------------------------------------------------------------------------------------


class AlfWorldEnv(TextEnv):
    """One ALFWorld game per episode; reward 1.0 on the step that completes the task.

    The game is `options["game_file"]` at reset, else the `game_file` given here, else game
    `seed` of `split` (task_options). `info` holds won, lost, moves, game_file, objective,
    task_type, plus the privileged admissible_commands ("help" left out) / walkthrough only when
    asked for. Unknown or inadmissible commands get the game's own "Nothing happens." and cost a
    step; after `max_steps` steps the episode is truncated.
    """

    def __init__(
        self,
        game_file: str | None = None,
        admissible_commands: bool = False,
        max_steps: int = 50,
        expose_walkthrough: bool = False,
        split: str = "valid_seen",
        data_dir: str | None = None,
        speedup: bool = True,
    ) -> None:
        self.game_file = game_file
        self.admissible_commands = admissible_commands
        self.max_steps = max_steps
        self.expose_walkthrough = expose_walkthrough
        self.level = {"split": split, **({"data_dir": data_dir} if data_dir else {})}
        self.speedup = speedup
        self.task = ""
        self.task_type = ""
        self._env = None
        self._data: dict | None = None
        self._loaded: str | None = None
        self._state = None
        self._moves = 0
        self._episode_over = True

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[str, dict]:
        super().reset(seed=seed)
        game_file = os.path.abspath(self._pick_game(seed, options or {}))
        with _keep_argv():
            if game_file != self._loaded:
                self._load(game_file)
            self._state = self._env.reset()
        self._moves = 0
        self._episode_over = False
        obs, self.task = clean_intro(self._state.feedback)
        return obs, self._info()

    def step(self, action: str) -> tuple[str, float, bool, bool, dict]:
        if self._episode_over:
            raise RuntimeError("call reset() first: the episode has ended or never started")
        self._state, _, _ = self._env.step(normalize_command(action))
        self._moves += 1
        terminated = bool(self._state["won"])
        truncated = self._moves >= self.max_steps and not terminated
        self._episode_over = terminated or truncated
        return self._state.feedback.strip(), float(terminated), terminated, truncated, self._info()

    def walkthrough(self) -> list[str] | None:
        """The walkthrough stored in the game file (privileged: for experts and tests)."""
        stored = (self._data or {}).get("walkthrough")
        return list(stored) if stored else None

    def close(self) -> None:
        """Hand the simulator back for reuse (see `acquire_simulator`); reset() works again after."""
        if self._env is not None:
            release_simulator(self._env, self._loaded, self._data)
        self._env, self._data, self._loaded, self._episode_over = None, None, None, True

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def _pick_game(self, seed: int | None, options: dict[str, Any]) -> str:
        if options.get("game_file"):
            return options["game_file"]
        if self.game_file:
            return self.game_file
        if seed is None and self._loaded:
            return self._loaded
        return task_options([seed or 0], self.level)[0]["game_file"]

    def _load(self, game_file: str) -> None:
        import textworld

        if self.speedup:
            from environments import pddl_speedup

            pddl_speedup.apply()
        infos = textworld.EnvInfos(won=True, admissible_commands=True)
        if self._env is None:
            self._env, self._loaded, self._data = acquire_simulator(infos, game_file)
        if self._loaded != game_file:
            with open(game_file) as f:
                data = json.load(f)
            self._loaded = None  # a failed load leaves no game behind
            load_game(self._env, data)
            self._data, self._loaded = data, game_file
        self.task_type = task_type_of(game_file, self._data)

    def _info(self) -> dict[str, Any]:
        state = self._state
        info = {
            "won": bool(state["won"]),
            "lost": False,
            "moves": self._moves,
            "game_file": self._loaded,
            "objective": self.task,
            "task_type": self.task_type,
        }
        if self.admissible_commands:
            info["admissible_commands"] = [c for c in state["admissible_commands"] if c != "help"]
        if self.expose_walkthrough:
            info["walkthrough"] = self.walkthrough()
        return info
