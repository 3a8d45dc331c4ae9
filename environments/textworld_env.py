"""TextWorld games as a TextEnv.

`ensure_games` makes games offline with TextWorld's own generator (what `tw-make custom` does) and
caches them by level and seed. `TextWorldEnv` plays any such game file; one env object can play
many games, picked per episode through `reset(options={"game_file": path})`.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import textworld
from jericho.jericho import UnsupportedGameWarning

from environments.base import TextEnv

# Every line of TextWorld's ASCII-art logo is made of these glyphs only (blank lines match too).
_BANNER_LINE = re.compile(r"[ _|\\$/<>]*")
# The game ends each output with its `>` prompt, padded out to a status bar ("-= Room =-0/1").
_PROMPT_LINE = re.compile(r"(^|\n)>[^\n]*\s*\Z")
# Inform's parser runs "a. b", "a, b" and "a then b" as several commands in one step.
_COMMAND_SEPARATOR = re.compile(r"[\n.,]|\bthen\b", re.IGNORECASE)
# Never sent to the game: a backslash starts a dumb-frotz interpreter command, and an unknown one
# (a sampled "\relro[...") makes frotz print its error in an endless loop (gigabytes of stdout a
# minute, the step never returns); control characters are no text a player types.
_UNSENDABLE = re.compile(r"[\\\x00-\x1f\x7f]")


def games_dir(
    world_size: int, nb_objects: int, quest_length: int, cache_dir: str | os.PathLike | None = None
) -> Path:
    """`{cache_dir}/textworld/w{W}_o{O}_q{Q}/`; cache_dir defaults to $ENTRORL_CACHE or ~/.cache/entrorl."""
    root = cache_dir or os.environ.get("ENTRORL_CACHE") or Path.home() / ".cache" / "entrorl"
    return Path(root) / "textworld" / f"w{world_size}_o{nb_objects}_q{quest_length}"


def ensure_games(
    seeds: Iterable[int],
    world_size: int = 1,
    nb_objects: int = 3,
    quest_length: int = 1,
    cache_dir: str | os.PathLike | None = None,
    workers: int = 2,
) -> list[str]:
    """Paths of the games `g{seed}.z8` for `seeds` at one level, making only the missing ones.

    Each game is made by `tw-make custom --world-size W --nb-objects O --quest-length Q --seed S`,
    a few seconds apiece, `workers` at a time.
    """
    seeds = list(seeds)
    folder = games_dir(world_size, nb_objects, quest_length, cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {seed: folder / f"g{seed}.z8" for seed in seeds}
    missing = sorted(seed for seed, path in paths.items() if not _is_complete(path))
    level = f"--world-size {world_size} --nb-objects {nb_objects} --quest-length {quest_length}".split()
    # Threads that wait on tw-make processes: no pickling, no fork of a caller holding torch
    # threads, and no re-import of the caller's __main__ (multiprocessing's spawn would need one).
    with ThreadPoolExecutor(max(1, workers)) as pool:
        list(pool.map(functools.partial(_make_game, folder=folder, level=level), missing))
    return [str(paths[seed]) for seed in seeds]


def _is_complete(game_file: Path) -> bool:
    return game_file.is_file() and game_file.with_suffix(".json").is_file()


def _make_game(seed: int, folder: Path, level: list[str]) -> None:
    # Build under the final file names in a private folder, then move the files in, so that a
    # concurrent run never sees half a game. The .json (textworld reads it next to the .z8) goes
    # first because the .z8 marks a game as complete; the Inform 7 source (.ni) is only needed to
    # compile, so it goes away with the folder.
    tw_make = Path(sys.executable).parent / "tw-make"
    with tempfile.TemporaryDirectory(dir=folder, prefix=".tmp-") as tmp:
        output = os.path.join(tmp, f"g{seed}.z8")
        command = [str(tw_make), "custom", *level, "--seed", str(seed), "--output", output, "-f", "--silent"]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode:
            raise RuntimeError(f"tw-make failed for seed {seed}: {result.stderr.strip()[-2000:]}")
        for suffix in (".json", ".z8"):
            os.replace(os.path.join(tmp, f"g{seed}{suffix}"), folder / f"g{seed}{suffix}")


def clean_observation(text: str, objective: str) -> str:
    """Game output without the logo, the objective (the prompt shows it apart) and the `>` prompt."""
    if objective:
        text = text.replace(objective, "", 1)
    lines = text.split("\n")
    while lines and _BANNER_LINE.fullmatch(lines[0]):
        lines.pop(0)
    text = _PROMPT_LINE.sub("", "\n".join(lines))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def first_command(action: str) -> str:
    """The first of several chained commands (the rest would be extra moves in one step, and a win
    in mid-chain leaves textworld's score unread (None)), without backslashes and control
    characters, which the interpreter must never see (`_UNSENDABLE`)."""
    first = _COMMAND_SEPARATOR.split(action, maxsplit=1)[0]
    return " ".join(_UNSENDABLE.sub(" ", first).split())


class TextWorldEnv(TextEnv):
    """One TextWorld game per episode; reward is the score gained by the step.

    The game is `options["game_file"]` at reset, else the `game_file` given here, else the
    generated game for the reset seed at level (world_size, nb_objects, quest_length).
    `info` holds won, lost, score, max_score, moves, game_file, objective, plus the privileged
    admissible_commands / walkthrough only when asked for.
    """

    def __init__(
        self,
        game_file: str | None = None,
        admissible_commands: bool = True,
        max_steps: int = 50,
        expose_walkthrough: bool = False,
        world_size: int = 1,
        nb_objects: int = 3,
        quest_length: int = 1,
    ) -> None:
        self.game_file = game_file
        self.admissible_commands = admissible_commands
        self.max_steps = max_steps
        self.expose_walkthrough = expose_walkthrough
        self.level = {"world_size": world_size, "nb_objects": nb_objects, "quest_length": quest_length}
        self.task = ""
        self._requested = textworld.EnvInfos(
            won=True, lost=True, score=True, max_score=True, objective=True,
            admissible_commands=admissible_commands, extras=["walkthrough"],
        )  # fmt: skip
        self._game: textworld.Environment | None = None
        self._loaded: str | None = None
        self._state: textworld.GameState | None = None
        self._moves = 0
        self._episode_over = True

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[str, dict]:
        super().reset(seed=seed)
        game_file = os.path.abspath(self._pick_game(seed, options or {}))
        if game_file != self._loaded:
            self._load(game_file)
        self._state = self._game.reset()
        self._moves = 0
        self._episode_over = False
        self.task = self._state.objective
        return self._observation(), self._info()

    def step(self, action: str) -> tuple[str, float, bool, bool, dict]:
        if self._episode_over:
            raise RuntimeError("call reset() first: the episode has ended or never started")
        previous_score = self._state.score
        self._state, _, _ = self._game.step(first_command(action))
        # Our own count: textworld's `moves` skips commands that change nothing, and truncation
        # must count every step.
        self._moves += 1
        terminated = bool(self._state.won or self._state.lost)
        truncated = self._moves >= self.max_steps and not terminated
        self._episode_over = terminated or truncated
        reward = float(self._state.score - previous_score)
        return self._observation(), reward, terminated, truncated, self._info()

    def walkthrough(self) -> list[str]:
        """The game's winning command sequence from the start (privileged: for experts and tests)."""
        return list(self._state["extra.walkthrough"])

    def close(self) -> None:
        if self._game is not None:
            self._game.close()
        self._game, self._loaded, self._episode_over = None, None, True

    def _pick_game(self, seed: int | None, options: dict[str, Any]) -> str:
        if "game_file" in options:
            return options["game_file"]
        if self.game_file:
            return self.game_file
        if seed is None and self._loaded:
            return self._loaded
        return ensure_games([seed or 0], **self.level)[0]

    def _load(self, game_file: str) -> None:
        # A new game gets a fresh interpreter: `load` on a used one leaks ~0.4 MB of native memory
        # per switch in Jericho (the soak run, scripts/soak.py, grew 0.85 MB a step), while
        # close + start is flat and costs ~3 ms more per switch.
        with warnings.catch_warnings():
            # Jericho's warning that it cannot read score/moves of an unknown game: textworld's
            # wrappers read them from the game's own output instead.
            warnings.filterwarnings("ignore", category=UnsupportedGameWarning)
            if self._game is not None:
                self._game.close()
            self._game = textworld.start(game_file, self._requested)
        self._loaded = game_file

    def _observation(self) -> str:
        return clean_observation(self._state.feedback, self._state.objective)

    def _info(self) -> dict[str, Any]:
        state = self._state
        info = {
            "won": bool(state.won),
            "lost": bool(state.lost),
            "score": state.score,
            "max_score": state.max_score,
            "moves": self._moves,
            "game_file": self._loaded,
            "objective": state.objective,
        }
        if self.admissible_commands:
            info["admissible_commands"] = list(state.admissible_commands)  # textworld sorts and dedups them
        if self.expose_walkthrough:
            info["walkthrough"] = self.walkthrough()
        return info
