"""Evaluation metrics over episode summaries (pure; the loop gathers summaries from every rank).

- `eval/success`: mean success over episodes, with a 95 % Wilson interval (`_lo`, `_hi`).
- `eval/pass@k`: unbiased pass@k (Chen et al. 2021: 1 - C(n - c, k) / C(n, k) per task, n
  samples of which c won), for k = 1 and k = n when a task has n > 1 samples.
- `eval/maj@n`: the task counts as solved when its most frequent final answer (ties: the answer
  seen first) is one a winning episode gave. Only for episodes with extractable final answers
  (math); other envs have no answers to vote on.
- `eval/score`: the mean env score (the sum of the env's own rewards: TextWorld points,
  ScienceWorld's 0-100 progress), where episodes report one.
- `eval/by/<key>=<value>/success` (and `/score`): the same split by task metadata that the task
  options carry (`subject`, `level` for MATH; `task_type` for ALFWorld; `task_name` for
  ScienceWorld).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Callable

BREAKDOWN_KEYS = ("task_type", "subject", "level", "task_name", "dataset")


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % (z = 1.96) Wilson score interval of a binomial proportion; (0, 1) for n = 0."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one task with n samples, c of them correct."""
    if k > n:
        raise ValueError(
            f"pass@{k} needs at least {k} samples per task, got {n} (raise env.eval.samples_per_task)"
        )
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_correct(answers: list[str | None], wins: list[bool]) -> bool:
    """Whether the most frequent answer (ties: first seen) is one a winning episode gave."""
    counted = Counter(a for a in answers if a is not None)
    if not counted:
        return False
    top = max(counted.values())
    vote = next(a for a in answers if a is not None and counted[a] == top)
    return any(won and answer == vote for answer, won in zip(answers, wins, strict=True))


def task_key(summary: dict) -> str:
    """Episodes of the same task (same reset options) share this key."""
    return repr(sorted((k, repr(v)) for k, v in summary.get("task", {}).items()))


def eval_metrics(
    summaries: list[dict], answer_of: Callable[[dict], str | None] | None = None
) -> dict[str, float]:
    """Metrics of the episodes in `summaries` (see the module doc)."""
    n = len(summaries)
    wins = sum(bool(s["won"]) for s in summaries)
    lo, hi = wilson_interval(wins, n)
    metrics = {"eval/success": wins / max(n, 1), "eval/success_lo": lo, "eval/success_hi": hi}
    metrics["eval/episodes"] = float(n)
    scored = bool(summaries) and "score" in summaries[0]
    if scored:
        metrics["eval/score"] = sum(float(s["score"]) for s in summaries) / n
    by_task: dict[str, list[dict]] = defaultdict(list)
    for s in summaries:
        by_task[task_key(s)].append(s)
    samples = min((len(group) for group in by_task.values()), default=0)
    if samples > 1:
        for k in sorted({1, samples}):
            scores = [pass_at_k(len(g), sum(bool(s["won"]) for s in g), k) for g in by_task.values()]
            metrics[f"eval/pass@{k}"] = sum(scores) / len(scores)
        if answer_of is not None:
            answers = {key: [answer_of(s) for s in g] for key, g in by_task.items()}
            if any(a is not None for group in answers.values() for a in group):
                solved = [
                    majority_correct(answers[key], [bool(s["won"]) for s in g]) for key, g in by_task.items()
                ]
                metrics[f"eval/maj@{samples}"] = sum(solved) / len(solved)
    for key in BREAKDOWN_KEYS:
        values = [s.get("task", {}).get(key) for s in summaries]
        if all(v is None for v in values) or len(set(values)) < 2:
            continue
        for value in sorted({v for v in values if v is not None}, key=str):
            group = [s for s, v in zip(summaries, values, strict=True) if v == value]
            metrics[f"eval/by/{key}={value}/success"] = sum(bool(s["won"]) for s in group) / len(group)
            if scored:
                metrics[f"eval/by/{key}={value}/score"] = sum(float(s["score"]) for s in group) / len(group)
    return metrics
