"""Math problems as a TextEnv, with a sandboxed Python tool and a calculator (or no tools: RLVR).

The action is the model's whole reply. If it holds Hermes tool calls
(`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, several = parallel calls) and the env
has tools, they run and their outputs come back as `<tool_response>` blocks; otherwise the reply
is the final answer: it is extracted (`\\boxed{}`, then `####`, then `Answer:`), checked against
the reference with math-verify (in a worker process with a hard timeout; plain integers are
compared directly) and the episode ends with reward 1 or 0. Bad calls (invalid JSON, unknown
tool, bad or oversized arguments, over the per-episode budget) become error text and are counted.

`info`: `won`, `answer_found`, `prediction` (the extracted answer), `tool_calls` (every call
attempted), `tool_errors` (calls answered with an error, code that raised included) and
`verify_timeout`.

Parsing here is deliberately small and independent of `agents/parsing.py` (environments import
no project code); tests check that the two agree.
"""

from __future__ import annotations

import ast
import json
import math
import operator
import re
import threading

from environments.answers import extract_answer
from environments.base import TextEnv
from environments.math_data import arithmetic_problem, task_options
from environments.sandbox import Limits, PythonSession, TimeoutPool

__all__ = ["MathEnv", "TOOL_SPECS", "calculate", "extract_answer", "task_options"]

TOOL_SPECS = {
    "python": {
        "name": "python",
        "description": (
            "Run Python 3 code and return what it prints (and the error, if it raises). Variables persist "
            "between calls for this problem; the value of a final bare expression is shown. numpy and sympy "
            "are available; there is no network and no file access outside the working directory."
        ),
        "parameters": {
            "type": "object",
            "properties": {"code": {"type": "string", "description": "The Python code to run."}},
            "required": ["code"],
        },
    },
    "calculator": {
        "name": "calculator",
        "description": (
            "Evaluate an arithmetic expression: numbers, + - * / // % ** (or ^), parentheses, "
            "sqrt exp log log2 log10 sin cos tan asin acos atan abs round floor ceil factorial comb perm gcd lcm "
            "min max, and the constants pi and e. Example: (3 + 4) * sqrt(2) / 7"
        ),
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string", "description": "The expression to evaluate."}},
            "required": ["expression"],
        },
    },
}


class MathEnv(TextEnv):
    def __init__(
        self,
        tools: tuple[str, ...] | list[str] = ("python", "calculator"),
        max_tool_calls: int = 8,  # per episode; later calls get an error asking for the answer
        max_tool_output: int = 2000,  # characters of one tool response shown to the model
        max_args_chars: int = 20_000,  # a call whose JSON arguments are longer is refused
        python_timeout: float = 10.0,  # seconds (wall clock and CPU) per python call
        python_memory_mb: int = 1024,
        verify_timeout: float = 10.0,  # seconds for one math-verify check; over it counts as wrong
    ):
        unknown = sorted(set(tools) - set(TOOL_SPECS))
        if unknown:
            raise ValueError(f"unknown math tools {unknown}; known: {', '.join(TOOL_SPECS)}")
        self.tool_names = tuple(tools)
        self.tools = [TOOL_SPECS[name] for name in self.tool_names]
        self.max_tool_calls = max_tool_calls
        self.max_tool_output = max_tool_output
        self.max_args_chars = max_args_chars
        self.limits = Limits(timeout=python_timeout, cpu_seconds=python_timeout, memory_mb=python_memory_mb)
        self.verify_timeout = verify_timeout
        self.python: PythonSession | None = None
        self.question = self.answer = self.task = ""
        self._new_episode()

    def _new_episode(self) -> None:
        self.close()
        self.done = self.won = self.verify_timed_out = False
        self.prediction: str | None = None
        self.tool_calls = self.tool_errors = 0

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[str, dict]:
        """`options`: `{"question", "answer", ...metadata}` (see `task_options`); without them, the
        synthetic arithmetic problem of `seed` (0 when None)."""
        super().reset(seed=seed)
        if options and ("question" in options or "answer" in options):
            if "question" not in options or "answer" not in options:
                raise ValueError(
                    f"math reset options need both 'question' and 'answer', got keys {sorted(options)}"
                )
            problem = options
        else:
            problem = arithmetic_problem(seed or 0)
        self.question, self.answer = str(problem["question"]), str(problem["answer"])
        self.task = self.question
        self._new_episode()
        return self.question, self._info()

    def step(self, action: str) -> tuple[str, float, bool, bool, dict]:
        if self.done:
            return "The episode is over.", 0.0, True, False, self._info()
        calls = _parse_tool_calls(action) if self.tools else []
        if calls:
            responses = [self._call(call) for call in calls]
            text = "\n".join(f"<tool_response>\n{r}\n</tool_response>" for r in responses)
            return text, 0.0, False, False, self._info()
        self.done = True
        self.close()
        self.prediction = extract_answer(action)
        if self.prediction is None:
            return "No final answer found: put it in \\boxed{}.", 0.0, True, False, self._info()
        self.won, self.verify_timed_out = answers_equal(self.prediction, self.answer, self.verify_timeout)
        return ("Correct." if self.won else "Incorrect."), float(self.won), True, False, self._info()

    def _call(self, call: tuple[str, dict] | str) -> str:
        self.tool_calls += 1
        text, failed = self._run_call(call)
        self.tool_errors += failed
        return _clip(text, self.max_tool_output)

    def _run_call(self, call: tuple[str, dict] | str) -> tuple[str, bool]:
        if isinstance(call, str):
            return f"error: {call}", True
        name, args = call
        if self.tool_calls > self.max_tool_calls:
            return (
                f"error: the limit of {self.max_tool_calls} tool calls per problem is reached; give the final answer in \\boxed{{}}",
                True,
            )
        if name not in self.tool_names:
            return f"error: unknown tool {name!r}; available: {', '.join(self.tool_names)}", True
        size = len(json.dumps(args))
        if size > self.max_args_chars:
            return f"error: arguments of {size} characters exceed the limit of {self.max_args_chars}", True
        key = "code" if name == "python" else "expression"
        if not isinstance(args.get(key), str):
            return f"error: {name} needs a string argument {key!r}, got arguments {sorted(args)}", True
        if name == "calculator":
            result = calculate(args[key])
            return result, result.startswith("error:")
        if self.python is None:
            self.python = PythonSession(self.limits)
        result = self.python.run(args[key])
        return result.text(), result.error is not None

    def _info(self) -> dict:
        return {
            "won": self.won,
            "answer_found": self.prediction is not None,
            "prediction": self.prediction,
            "tool_calls": self.tool_calls,
            "tool_errors": self.tool_errors,
            "verify_timeout": self.verify_timed_out,
        }

    def walkthrough(self) -> list[str]:
        return [f"\\boxed{{{self.answer}}}"]

    def snapshot(self) -> dict:
        """Everything of the episode, the python state as its clean cells (replayed on restore)."""
        return {
            "question": self.question,
            "answer": self.answer,
            "done": self.done,
            "won": self.won,
            "prediction": self.prediction,
            "tool_calls": self.tool_calls,
            "tool_errors": self.tool_errors,
            "verify_timeout": self.verify_timed_out,
            "cells": list(self.python.cells) if self.python else [],
        }

    def restore(self, state: dict) -> None:
        self.close()
        self.question = self.task = state["question"]
        self.answer, self.done, self.won = state["answer"], state["done"], state["won"]
        self.prediction, self.verify_timed_out = state["prediction"], state["verify_timeout"]
        self.tool_calls, self.tool_errors = state["tool_calls"], state["tool_errors"]
        self.python = PythonSession(self.limits, cells=state["cells"]) if state["cells"] else None

    def close(self) -> None:
        if self.python is not None:
            self.python.close()
            self.python = None


def _clip(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    head, tail = text[: limit * 2 // 3], text[len(text) - limit // 3 :]
    return f"{head}\n... [{len(text) - len(head) - len(tail)} characters cut] ...\n{tail}"


# -- reading replies -------------------------------------------------------------------------------

_TOOL_CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.DOTALL)
_CALL_HINT = 'write <tool_call>{"name": "<tool>", "arguments": {...}}</tool_call>'


def _parse_tool_calls(reply: str) -> list[tuple[str, dict] | str]:
    """(name, arguments) for each `<tool_call>` block in order, or the reason it is malformed."""
    calls: list[tuple[str, dict] | str] = []
    for k, match in enumerate(_TOOL_CALL.finditer(reply), 1):
        try:
            call = json.loads(match.group(1).strip(), strict=False)  # strict=False: raw newlines in code
        except Exception as exc:  # noqa: BLE001 - JSONDecodeError, RecursionError, huge ints
            calls.append(
                f"tool call {k} is not valid JSON ({type(exc).__name__}: {str(exc)[:100]}); {_CALL_HINT}"
            )
            continue
        args = call.get("arguments", {}) if isinstance(call, dict) else None
        if isinstance(args, str):  # OpenAI style: arguments as a JSON string
            try:
                args = json.loads(args, strict=False)
            except Exception:  # noqa: BLE001
                args = None
        if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not isinstance(args, dict):
            calls.append(f'tool call {k} needs a string "name" and an object "arguments"; {_CALL_HINT}')
        else:
            calls.append((call["name"], args))
    return calls


# -- checking answers --------------------------------------------------------------------------------

_INTEGER = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+|[-+]?\d+")
_verify_pool: TimeoutPool | None = None
_verify_lock = threading.Lock()


def answers_equal(prediction: str, reference: str, timeout: float = 10.0) -> tuple[bool, bool]:
    """(equal, timed_out). Two plain integers compare exactly here; anything else goes to
    math-verify in a worker process that is killed after `timeout` seconds."""
    a, b = _INTEGER.fullmatch(prediction.strip()), _INTEGER.fullmatch(reference.strip())
    if a and b:
        return int(a.group().replace(",", "")) == int(b.group().replace(",", "")), False
    global _verify_pool
    with _verify_lock:
        if _verify_pool is None:
            _verify_pool = TimeoutPool(
                "environments.math_env:math_verify_equal", workers=2, preload=["math_verify"]
            )
    result = _verify_pool.call(prediction, reference, timeout=timeout)
    return bool(result.value) and result.error is None, result.timed_out


def math_verify_equal(prediction: str, reference: str) -> bool:
    """math-verify on two answers (each wrapped in \\boxed{}); runs inside a TimeoutPool worker,
    with math-verify's own signal-based timeouts off."""
    import logging

    from math_verify import parse, verify

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    gold = parse(f"\\boxed{{{reference}}}", parsing_timeout=None)
    guess = parse(f"\\boxed{{{prediction}}}", parsing_timeout=None)
    return bool(gold) and bool(guess) and bool(verify(gold, guess, timeout_seconds=None))


# -- the calculator ------------------------------------------------------------------------------------

_FUNCTIONS = {
    **{name: getattr(math, name) for name in ("sqrt", "exp", "log", "log2", "log10", "sin", "cos", "tan", "asin", "acos", "atan", "floor", "ceil", "gcd", "lcm")},
    "abs": abs, "round": round, "min": min, "max": max,
    "factorial": math.factorial, "comb": math.comb, "perm": math.perm,
}  # fmt: skip
_CONSTANTS = {"pi": math.pi, "e": math.e}
_OPERATORS = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
    ast.UAdd: operator.pos, ast.USub: operator.neg,
}  # fmt: skip
_MAX_BITS = 100_000  # integers beyond ~30,000 digits are refused
_MAX_INTEGER_ARGUMENT = 10_000  # factorial / comb / perm arguments, round's digits


class _CalcError(Exception):
    pass


def calculate(expression: str) -> str:
    """Evaluate an arithmetic expression without running any other code: the tree is walked node by
    node and only numbers, the operators, the listed functions and pi/e are allowed. Returns the
    value as text, or "error: ..."."""
    if not isinstance(expression, str) or not expression.strip():
        return "error: empty expression"
    if len(expression) > 1000:
        return f"error: expression of {len(expression)} characters exceeds 1000"
    text = expression.replace("^", "**").replace("×", "*").replace("÷", "/")
    try:
        value = _evaluate(ast.parse(text.strip(), mode="eval").body)
    except _CalcError as exc:
        return f"error: {exc}"
    except SyntaxError:
        return f"error: cannot parse {expression!r} as an arithmetic expression"
    except ZeroDivisionError:
        return "error: division by zero"
    except (ArithmeticError, ValueError, TypeError, RecursionError, MemoryError) as exc:
        return f"error: {type(exc).__name__}: {exc}"
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return format(value, ".12g")
    return str(value)


def _evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.Name):
        if node.id in _CONSTANTS:
            return _CONSTANTS[node.id]
        raise _CalcError(f"unknown name {node.id!r}; constants: pi, e; functions: {', '.join(_FUNCTIONS)}")
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
        return _OPERATORS[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and isinstance(left, int) and isinstance(right, int):
            if right > 0 and abs(left) > 1 and right * math.log2(abs(left)) > _MAX_BITS:
                raise _CalcError("result too large")
        if (
            isinstance(node.op, ast.Div)
            and isinstance(left, int)
            and isinstance(right, int)
            and right
            and left % right == 0
        ):
            return left // right  # keep exact integers exact
        return _checked(_OPERATORS[type(node.op)](left, right))
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.keywords:
        if node.func.id not in _FUNCTIONS:
            raise _CalcError(f"unknown function {node.func.id!r}; functions: {', '.join(_FUNCTIONS)}")
        args = [_evaluate(arg) for arg in node.args]
        guarded = (
            args
            if node.func.id in ("factorial", "comb", "perm")
            else args[1:]
            if node.func.id == "round"
            else []
        )
        if any(abs(a) > _MAX_INTEGER_ARGUMENT for a in guarded):  # these would run for minutes
            raise _CalcError(f"{node.func.id} arguments above {_MAX_INTEGER_ARGUMENT} are refused")
        return _checked(_FUNCTIONS[node.func.id](*args))
    raise _CalcError(f"not allowed in an arithmetic expression: {ast.unparse(node)[:80]!r}")


def _checked(value):
    if isinstance(value, int) and value.bit_length() > _MAX_BITS:
        raise _CalcError("result too large")
    if isinstance(value, complex):
        raise _CalcError("complex result")
    return value
