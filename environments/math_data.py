"""Math problems for MathEnv, as reset options `{"question", "answer", "dataset", "index", ...}`.

`task_options(seeds, level)` picks problem `seed mod N` of a dataset; `level["dataset"]` selects:

    gsm8k       GSM8K train from the shared data folder. `split`: "train" (default) is the file
                minus a held-out slice, "eval" is that slice (`eval_size` problems, default 500,
                chosen by a hash of the question so it does not depend on file order), "all" is
                everything. The GSM8K test split is not in the shared data.
    math500     MATH-500 (a test set: every split gives all 500 problems).
    jsonl       a user file, one JSON object per line; `path`, `question_field` ("question"),
    parquet     `answer_field` ("answer"); one file per split. Parquet needs pyarrow.
    arithmetic  synthetic expressions such as "Calculate 37 + 12 * 5 - 8."; knobs `digits` (per
                operand, 2), `operands` (3), `ops` ("+-*"; "/" gives exact fractions like 7/3).
                Problem `seed` is generated from the seed itself: no wrap-around.

`data_dir` overrides the shared data folder (default `<repo>/../shared/data`). Nothing is
downloaded. Answers after a GSM8K-style `####` are taken as the answer; thousands separators in
plain numbers are dropped ("1,080" -> "1080").
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
import re
from fractions import Fraction
from pathlib import Path

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"

_KEYS = {
    "gsm8k": {"split", "eval_size", "data_dir"},
    "math500": {"split", "data_dir"},
    "jsonl": {"path", "question_field", "answer_field", "split"},
    "parquet": {"path", "question_field", "answer_field", "split"},
    "arithmetic": {"digits", "operands", "ops", "split"},
}
_THOUSANDS = re.compile(r"-?\d{1,3}(,\d{3})+(\.\d+)?")


def task_options(seeds: list[int], level: dict) -> list[dict]:
    """Reset options for problems `seeds` of the dataset `level` describes (see the module doc)."""
    level = dict(level)
    dataset = level.pop("dataset", "gsm8k")
    if dataset not in _KEYS:
        raise ValueError(f"env.level.dataset={dataset!r}; known: {', '.join(sorted(_KEYS))}")
    unknown = sorted(set(level) - _KEYS[dataset])
    if unknown:
        raise ValueError(
            f"env.level keys {unknown} do not apply to dataset {dataset!r}; its keys: {', '.join(sorted(_KEYS[dataset]))}"
        )
    if dataset == "arithmetic":
        level.pop("split", None)
        return [arithmetic_problem(seed, **level) for seed in seeds]
    problems = load_problems(dataset, **level)
    return [dict(problems[seed % len(problems)]) for seed in seeds]


def load_problems(dataset: str, split: str = "train", data_dir: str | None = None, **kwargs) -> list[dict]:
    root = Path(data_dir) if data_dir else DEFAULT_DATA_DIR
    if dataset == "gsm8k":
        return _gsm8k(str(root / "math" / "gsm8k_train.jsonl"), split, kwargs.get("eval_size", 500))
    if dataset == "math500":
        return _math500(str(root / "math" / "math500.jsonl"))
    if "path" not in kwargs:
        raise ValueError(f"dataset {dataset!r} needs env.level.path (the {dataset} file of this split)")
    return _user_file(
        str(kwargs["path"]),
        dataset,
        kwargs.get("question_field", "question"),
        kwargs.get("answer_field", "answer"),
    )


def clean_answer(answer: object) -> str:
    """The final answer of a reference: the text after the last `####`, stripped, with thousands
    separators removed from a plain number."""
    text = str(answer)
    if "####" in text:
        text = text.rsplit("####", 1)[1]
    text = text.strip()
    return text.replace(",", "") if _THOUSANDS.fullmatch(text) else text


@functools.lru_cache(maxsize=8)
def _gsm8k(path: str, split: str, eval_size: int) -> list[dict]:
    rows = _read_jsonl(
        path, "gsm8k", hint="set env.level.data_dir to the folder that holds math/gsm8k_train.jsonl"
    )
    problems = [_problem(row, i, path, "question", "answer", "gsm8k") for i, row in enumerate(rows)]
    held_out = set(sorted(range(len(problems)), key=lambda i: _digest(problems[i]["question"]))[:eval_size])
    if split == "train":
        return [p for i, p in enumerate(problems) if i not in held_out]
    if split == "eval":
        return [p for i, p in enumerate(problems) if i in held_out]
    if split == "all":
        return problems
    raise ValueError(
        f"gsm8k split {split!r}: use train, eval (a held-out slice of train) or all; GSM8K test is not in "
        "the shared data (point dataset=jsonl at your own copy)"
    )


@functools.lru_cache(maxsize=2)
def _math500(path: str) -> list[dict]:
    rows = _read_jsonl(
        path, "math500", hint="set env.level.data_dir to the folder that holds math/math500.jsonl"
    )
    problems = []
    for i, row in enumerate(rows):
        problem = _problem(row, i, path, "problem", "answer", "math500")
        problem.update(
            subject=row.get("subject"), difficulty=row.get("level"), unique_id=row.get("unique_id")
        )
        problems.append(problem)
    return problems


@functools.lru_cache(maxsize=8)
def _user_file(path: str, dataset: str, question_field: str, answer_field: str) -> list[dict]:
    if dataset == "parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError(
                "dataset 'parquet' needs pyarrow: pip install pyarrow (or convert the file to jsonl)"
            ) from None
        if not Path(path).is_file():
            raise FileNotFoundError(f"env.level.path={path!r} does not exist")
        rows = pq.read_table(path).to_pylist()
    else:
        rows = _read_jsonl(path, "jsonl", hint="set env.level.path to an existing JSONL file")
    if not rows:
        raise ValueError(f"{path} holds no problems")
    return [_problem(row, i, path, question_field, answer_field, dataset) for i, row in enumerate(rows)]


def _read_jsonl(path: str, dataset: str, hint: str) -> list[dict]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"math dataset {dataset!r}: {path} not found; {hint}")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path} line {n} is not JSON: {exc}") from None
    return rows


def _problem(row: dict, index: int, path: str, question_field: str, answer_field: str, dataset: str) -> dict:
    for key, field in (("question_field", question_field), ("answer_field", answer_field)):
        if not isinstance(row, dict) or field not in row:
            fields = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise ValueError(
                f"{path} record {index} has no field {field!r} (fields: {fields}); set env.level.{key}"
            )
    return {
        "question": str(row[question_field]),
        "answer": clean_answer(row[answer_field]),
        "dataset": dataset,
        "index": index,
    }


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def arithmetic_problem(seed: int, digits: int = 2, operands: int = 3, ops: str = "+-*") -> dict:
    """A deterministic expression for `seed`: `operands` numbers of `digits` digits joined by
    operators drawn from `ops`, evaluated with the usual precedence, answered exactly."""
    if digits < 1 or operands < 2 or not ops or set(ops) - set("+-*/"):
        raise ValueError(
            f"arithmetic level: need digits >= 1, operands >= 2 and ops from '+-*/', got {digits}, {operands}, {ops!r}"
        )
    rng = random.Random(f"arithmetic:{seed}:{digits}:{operands}:{ops}")
    low = 10 ** (digits - 1) if digits > 1 else 1
    numbers = [rng.randint(low, 10**digits - 1) for _ in range(operands)]
    operators = [rng.choice(ops) for _ in range(operands - 1)]
    expression = " ".join(
        [str(numbers[0])] + [f"{op} {n}" for op, n in zip(operators, numbers[1:], strict=True)]
    )
    value = _evaluate(numbers, operators)
    answer = str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"
    return {"question": f"Calculate {expression}.", "answer": answer, "dataset": "arithmetic", "index": seed}


def _evaluate(numbers: list[int], operators: list[str]) -> Fraction:
    """* and / before + and -, left to right."""
    total, term = Fraction(0), Fraction(numbers[0])
    sign = 1
    for op, n in zip(operators, numbers[1:], strict=True):
        if op == "*":
            term *= n
        elif op == "/":
            term /= n
        else:
            total += sign * term
            sign, term = (1 if op == "+" else -1), Fraction(n)
    return total + sign * term
