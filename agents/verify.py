"""Math answer checking with math-verify, each check in a worker process under a hard timeout.

math-verify's own timeouts use `signal.alarm`, which fails outside the main thread, so they are
off and a `TimeoutPool` (environments/sandbox.py) kills any check that overruns: it returns a
`Verdict` that is false with `timed_out=True`, and the pool starts a fresh worker. The pool is
made once per process and reused; its workers start at the first check (~1-2 s: sympy).

`pred` and `ref` are answers or whole replies: a text with `\\boxed{}`, `####` or `Answer:` is
reduced to its final answer first (agents/parsing.py); anything else is taken as the answer.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass

from agents.parsing import ParseError, final_answer
from environments.sandbox import TimeoutPool

_INTEGER = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+|[-+]?\d+")
_pool: TimeoutPool | None = None
_pool_lock = threading.Lock()
# Verdicts of `prefetch`: a rollout checks all its episodes in one parallel batch, then each
# reward call finds its pair here instead of a round trip to the pool (bounded: cleared when full).
_verdicts: dict[tuple[str, str], Verdict] = {}
_MAX_CACHED = 65536


@dataclass(frozen=True)
class Verdict:
    """Truthy exactly when the answers are equal."""

    equal: bool
    timed_out: bool = False
    error: str | None = None  # math-verify raised or the worker could not start

    def __bool__(self) -> bool:
        return self.equal


def answer_of(text: str) -> str:
    """The final answer of a reply, or the stripped text itself when it marks none."""
    answer = final_answer(text)
    return text.strip() if isinstance(answer, ParseError) else answer


def math_equal(pred: str, ref: str, timeout: float = 5.0) -> Verdict:
    """Whether `pred` is mathematically equal to `ref` (fractions vs decimals, LaTeX, sets,
    intervals, ...), as math-verify decides (or as a `prefetch` of the pair already did)."""
    cached = _verdicts.get((str(pred), str(ref)))
    return cached if cached is not None else math_equal_batch([(pred, ref)], timeout)[0]


def prefetch(pairs: Iterable[tuple[str, str]], timeout: float = 5.0) -> None:
    """Check many (pred, ref) pairs in one parallel batch and keep the verdicts for `math_equal`."""
    todo = list(dict.fromkeys((str(p), str(r)) for p, r in pairs if (str(p), str(r)) not in _verdicts))
    if not todo:
        return
    if len(_verdicts) + len(todo) > _MAX_CACHED:
        _verdicts.clear()
    _verdicts.update(zip(todo, math_equal_batch(todo, timeout), strict=True))


def math_equal_batch(pairs: Iterable[tuple[str, str]], timeout: float = 5.0) -> list[Verdict]:
    """`math_equal` over many pairs, spread over the pool's workers; each pair has its own timeout."""
    pairs = [(answer_of(str(p)), answer_of(str(r))) for p, r in pairs]
    verdicts: list[Verdict | None] = [_quick(p, r) for p, r in pairs]
    slow = [i for i, v in enumerate(verdicts) if v is None]
    if slow:
        for i, result in zip(slow, _get_pool().map([pairs[i] for i in slow], timeout), strict=True):
            verdicts[i] = Verdict(bool(result.value) and result.error is None, result.timed_out, result.error)
    return verdicts


def _quick(pred: str, ref: str) -> Verdict | None:
    """Decides without math-verify where that is safe: empty answers, two plain integers."""
    if not pred or not ref:
        return Verdict(False)
    a, b = _INTEGER.fullmatch(pred), _INTEGER.fullmatch(ref)
    if a and b:
        return Verdict(int(a.group().replace(",", "")) == int(b.group().replace(",", "")))
    return None


def _get_pool() -> TimeoutPool:
    global _pool
    with _pool_lock:
        if _pool is None:
            workers = max(1, min(4, os.cpu_count() or 1))
            _pool = TimeoutPool("agents.verify:check", workers=workers, preload=["math_verify"])
        return _pool


def check(pred: str, ref: str) -> bool:
    """math-verify on two answers, each wrapped in \\boxed{} (runs inside a pool worker)."""
    import logging

    from math_verify import parse, verify

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    gold = parse(f"\\boxed{{{ref}}}", parsing_timeout=None)
    guess = parse(f"\\boxed{{{pred}}}", parsing_timeout=None)
    return bool(gold) and bool(guess) and bool(verify(gold, guess, timeout_seconds=None))
