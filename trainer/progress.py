"""A live progress line for long work (evaluation, rollouts): done/total, rate and ETA.

On a terminal the line is redrawn in place (a carriage return, at most every `interval`
seconds); on anything else (a log file, CI) nothing is written until `close`, which writes one
summary line, so logs hold no partial redraws (`keep=False`: no summary line, and the terminal's
line is wiped at the end, for work whose result another line reports). Only the process that
shows it (rank 0) makes one with `enabled=True`.

    with Progress("eval", total=len(tasks), enabled=rank == 0).on(rollout):
        rollout.run(tasks, sampling)    # rollout.progress(done, total, tokens) after each round
    # terminal: "eval: 37/80 episodes, 2.1 ep/s, ETA 20s" while it runs; then the final line
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from typing import TextIO

_RATE_UNITS = {"episodes": "ep", "tokens": "tok", "steps": "step"}


def format_duration(seconds: float) -> str:
    """'45s', '3m05s', '2h07m' (rounded to the second)."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def format_rate(amount: float, elapsed: float, unit: str) -> str | None:
    """'0.05 ep/s', '2.1 ep/s', '850 tok/s'; None before any time has passed."""
    if elapsed <= 0:
        return None
    rate = amount / elapsed
    number = f"{rate:.2g}" if rate < 1 else f"{rate:.1f}" if rate < 10 else f"{rate:.0f}"
    return f"{number} {_RATE_UNITS.get(unit, unit)}/s"


def format_progress(
    done: float, total: float | None, elapsed: float, unit: str = "episodes", tokens: float | None = None
) -> str:
    """'37/80 episodes, 2.1 ep/s, ETA 20s'. Without a total: '37 episodes, 2.1 ep/s'. With
    `tokens` the rate shown is theirs ('12/64 episodes, 850 tok/s, ETA 43s'; the ETA still comes
    from `done`). No rate and no ETA before any time has passed, no ETA before anything is done
    or once everything is."""
    parts = [f"{done:g}/{total:g} {unit}" if total is not None else f"{done:g} {unit}"]
    rate = format_rate(tokens, elapsed, "tokens") if tokens is not None else format_rate(done, elapsed, unit)
    if rate is not None:
        parts.append(rate)
    if total is not None and elapsed > 0 and 0 < done < total:
        parts.append(f"ETA {format_duration((total - done) * elapsed / done)}")
    return ", ".join(parts)


class Progress:
    """`progress(done, total, tokens)` after each unit of work; `close()` (or the `with` block's
    end) writes the final line. `total`/`tokens` given to a call replace the ones known before
    (a branching rollout's episode count can grow); `show_tokens` makes the rate tokens/s."""

    def __init__(
        self,
        label: str,
        total: float | None = None,
        unit: str = "episodes",
        show_tokens: bool = False,
        keep: bool = True,
        enabled: bool = True,
        stream: TextIO | None = None,
        interval: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.label, self.total, self.unit, self.show_tokens = label, total, unit, show_tokens
        self.keep = keep
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval
        self.clock = clock
        self.done: float = 0
        self.tokens: float = 0
        self.started = clock()
        self._drawn_at = self.started
        self._width = 0  # of the line on screen, to blank a shorter redraw's leftovers
        self._closed = False
        isatty = getattr(self.stream, "isatty", None)
        self.live = bool(enabled and isatty is not None and isatty())

    def line(self) -> str:
        elapsed = self.clock() - self.started
        tokens = self.tokens if self.show_tokens else None
        return f"{self.label}: {format_progress(self.done, self.total, elapsed, self.unit, tokens)}"

    def __call__(self, done: float, total: float | None = None, tokens: float | None = None) -> None:
        self.update(done, total, tokens)

    def update(self, done: float, total: float | None = None, tokens: float | None = None) -> None:
        self.done = done
        if total is not None:
            self.total = total
        if tokens is not None:
            self.tokens = tokens
        if not self.live or self._closed:
            return
        now = self.clock()
        if now - self._drawn_at < self.interval:
            return
        self._drawn_at = now
        self._draw(self.line())

    def close(self) -> None:
        """The final line: over the live one on a terminal, else the only line written. With
        `keep=False`: the terminal's line wiped, nothing written elsewhere."""
        if self._closed or not self.enabled:
            self._closed = True
            return
        self._closed = True
        line = f"{self.line()} (took {format_duration(self.clock() - self.started)})"
        if not self.keep:
            if self.live and self._width:
                self.stream.write("\r" + " " * self._width + "\r")
        elif self.live:
            self._draw(line)
            self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    @contextlib.contextmanager
    def on(self, target: object) -> Iterator[Progress]:
        """`target.progress = self` for the block (a `Rollout` calls it after each round); then
        `target.progress = None` and the final line, also when the block raises."""
        target.progress = self
        try:
            yield self
        finally:
            target.progress = None
            self.close()

    def _draw(self, line: str) -> None:
        self.stream.write("\r" + line.ljust(self._width))
        self.stream.flush()
        self._width = len(line)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
