"""How a training run stops: the errors that end it with a message saying what to do next, and
the SIGTERM handling that turns a scheduler's preemption into a clean stop with a checkpoint.

Apart from the training loop because the CLI needs them before a Trainer exists: it installs the
SIGTERM handler before the model loads (`catch_sigterm`) and turns these errors into exit codes.
"""

from __future__ import annotations

import contextlib
import signal
import threading


class NonFiniteLoss(RuntimeError):
    """Too many consecutive updates were skipped for NaN/inf; raised after a checkpoint."""


class Preempted(RuntimeError):
    """SIGTERM (a scheduler's preemption): the run stopped after a step, with a checkpoint."""


class ExportFailed(RuntimeError):
    """The final model could not be written (full disk); the message says what a restart does."""


class _SigtermFlag:
    """The SIGTERM handler: it only records the signal (the phase in progress finishes, then
    the run checkpoints and stops). Installed by the CLI before the model loads, so a SIGTERM
    while the Trainer is built is kept too, and by `train()` where the CLI did not."""

    def __init__(self, previous) -> None:
        self.event = threading.Event()
        self.previous = previous  # the handler to put back when the run ends

    def __call__(self, signum, frame) -> None:
        self.event.set()


def catch_sigterm() -> _SigtermFlag | None:
    """Record SIGTERM from now on (main thread only: None elsewhere)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    current = signal.getsignal(signal.SIGTERM)
    if isinstance(current, _SigtermFlag):
        return current
    handler = _SigtermFlag(current)
    signal.signal(signal.SIGTERM, handler)
    return handler


@contextlib.contextmanager
def _sigterm_flag():
    """The SIGTERM Event of one run; the handler is removed when the run ends."""
    handler = catch_sigterm()
    if handler is None:
        yield threading.Event()
        return
    try:
        yield handler.event
    finally:
        signal.signal(signal.SIGTERM, handler.previous)


class LearnerOutOfMemory(RuntimeError):
    """The update did not fit; the message names the knobs that make it fit."""
