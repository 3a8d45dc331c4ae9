"""MathEnv (environments/math_env.py): tool calls, answers, the calculator, datasets.

Episodes run the real sandbox and the real math-verify pool. The data tests read small slices of
the shared GSM8K / MATH-500 files (skipped where that folder is missing) and a JSONL made here.
The last test plays an episode through the real rollout loop with a scripted engine.

Run: .venv/bin/python -m pytest tests/environments/test_math_env.py -q
"""

import json
from fractions import Fraction

import pytest

from environments.base import check_env
from environments.math_data import DEFAULT_DATA_DIR, arithmetic_problem, clean_answer, task_options
from environments.math_env import MathEnv, answers_equal, calculate, extract_answer

HAS_SHARED_DATA = (DEFAULT_DATA_DIR / "math" / "gsm8k_train.jsonl").is_file()
needs_shared_data = pytest.mark.skipif(not HAS_SHARED_DATA, reason=f"no shared data at {DEFAULT_DATA_DIR}")
PROBLEM = {"question": "What is 6 times 7?", "answer": "42"}


def call(name: str, **arguments) -> str:
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


@pytest.fixture
def env():
    env = MathEnv(python_timeout=2.0)
    yield env
    env.close()


# -- episodes ---------------------------------------------------------------------------------------


def test_python_then_boxed_answer_wins(env):
    obs, info = env.reset(options=PROBLEM)
    assert obs == PROBLEM["question"] and env.task == obs
    assert info == {
        "won": False,
        "answer_found": False,
        "prediction": None,
        "tool_calls": 0,
        "tool_errors": 0,
        "verify_timeout": False,
    }
    obs, reward, terminated, truncated, info = env.step(
        "Let me compute.\n" + call("python", code="a = 6 * 7\nprint(a)")
    )
    assert (obs, reward, terminated, truncated) == (
        "<tool_response>\n42\n</tool_response>",
        0.0,
        False,
        False,
    )
    obs, reward, terminated, truncated, info = env.step("So the answer is \\boxed{42}.")
    assert (reward, terminated, truncated, obs) == (1.0, True, False, "Correct.")
    assert info == {
        "won": True,
        "answer_found": True,
        "prediction": "42",
        "tool_calls": 1,
        "tool_errors": 0,
        "verify_timeout": False,
    }
    assert env.python is None  # the interpreter is gone with the episode


def test_parallel_and_bad_calls_are_answered_in_order_and_counted(env):
    env.reset(options=PROBLEM)
    reply = (
        call("calculator", expression="6 * 7")
        + call("python", code="1 / 0")
        + "<tool_call>{'name': 'python'}</tool_call>"  # not JSON
        + call("search", query="6*7")
        + call("python", script="print(1)")
        + call("calculator", expression="1" * 30_000)
    )
    obs, reward, terminated, _, info = env.step(reply)
    responses = obs.split("</tool_response>\n<tool_response>")
    assert len(responses) == 6 and not terminated and reward == 0.0
    assert "42" in responses[0]
    assert "ZeroDivisionError: division by zero" in responses[1]
    assert "is not valid JSON" in responses[2]
    assert "unknown tool 'search'; available: python, calculator" in responses[3]
    assert "python needs a string argument 'code'" in responses[4]
    assert "exceed the limit of 20000" in responses[5]
    assert (info["tool_calls"], info["tool_errors"]) == (6, 5)


def test_the_tool_budget_asks_for_the_answer():
    env = MathEnv(tools=("calculator",), max_tool_calls=2)
    env.reset(options=PROBLEM)
    obs, *_, info = env.step(call("calculator", expression="1+1") * 3)
    assert obs.count("limit of 2 tool calls per problem is reached") == 1
    assert (info["tool_calls"], info["tool_errors"]) == (3, 1)


def test_long_tool_output_is_clipped():
    env = MathEnv(tools=("python",), max_tool_output=300)
    env.reset(options=PROBLEM)
    obs, *_ = env.step(call("python", code="print('a' * 1000 + 'END')"))
    assert (
        "characters cut" in obs and obs.rstrip().endswith("END\n</tool_response>".rstrip()) and len(obs) < 400
    )
    env.close()


def test_without_tools_the_first_reply_is_the_answer():
    env = MathEnv(tools=())
    assert env.tools == []
    env.reset(options=PROBLEM)
    obs, reward, terminated, _, info = env.step(call("python", code="print(42)"))
    assert terminated and reward == 0.0 and not info["answer_found"]
    assert obs == "No final answer found: put it in \\boxed{}."
    env.reset(options=PROBLEM)
    assert env.step("#### 42")[1:3] == (1.0, True)


@pytest.mark.parametrize(
    "reply, answer, won",
    [
        ("\\boxed{41}", "42", False),
        ("The answer is: 42.", "42", True),
        ("\\boxed{0.5}", "\\frac{1}{2}", True),  # through math-verify
        ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt3}{2}", True),
        ("\\boxed{1,000}", "1000", True),
    ],
)
def test_answers_are_checked(env, reply, answer, won):
    env.reset(options={"question": "q", "answer": answer})
    assert env.step(reply)[4]["won"] is won


def test_a_hung_check_times_out_as_wrong():
    assert answers_equal("9^{9^{9^{9}}}", "1", timeout=1.0) == (False, True)
    assert answers_equal("\\frac{14}{3}", "14/3", timeout=30.0) == (True, False)  # the pool still serves


def test_check_env_and_walkthrough():
    for tools in (("python", "calculator"), ()):
        env = MathEnv(tools=tools)
        check_env(env)
        env.reset(seed=5)
        assert env.step(env.walkthrough()[0])[1] == 1.0
        env.close()


def test_reset_needs_question_and_answer(env):
    with pytest.raises(ValueError, match="both 'question' and 'answer'"):
        env.reset(options={"question": "q"})
    obs, _ = env.reset(seed=2)  # no options: the synthetic problem of the seed
    assert obs == arithmetic_problem(2)["question"]
    with pytest.raises(ValueError, match="unknown math tools"):
        MathEnv(tools=("python", "browser"))


def test_snapshot_and_restore_carry_the_python_state(env):
    env.reset(options=PROBLEM)
    env.step(call("python", code="secret = 41"))
    state = env.snapshot()
    other = MathEnv()
    try:
        other.restore(state)
        obs, *_ = other.step(call("python", code="secret + 1"))
        assert obs == "<tool_response>\n42\n</tool_response>"
        assert other.step("\\boxed{42}")[1] == 1.0 and other.tool_calls == 2
    finally:
        other.close()


def test_step_after_the_end_stays_terminated(env):
    env.reset(options=PROBLEM)
    env.step("\\boxed{42}")
    assert env.step("\\boxed{42}")[1:3] == (0.0, True)


# -- extraction and the calculator --------------------------------------------------------------------


@pytest.mark.parametrize(
    "reply, answer",
    [
        ("so \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
        ("\\boxed{1} then \\boxed{2}", "2"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
        ("\\boxed{2} \\boxed{3", "2"),  # the unclosed last box is skipped
        ("steps\n#### 1,080", "1,080"),
        ("Final Answer: $7$.", "7"),
        ("no answer here", None),
    ],
)
def test_extract_answer(reply, answer):
    assert extract_answer(reply) == answer


@pytest.mark.parametrize(
    "expression, value",
    [
        ("1 + 2 * 3", "7"),
        ("2^10", "1024"),
        ("7 / 2", "3.5"),
        ("8 / 2", "4"),
        ("(3 + 4) * sqrt(2) / 7", "1.41421356237"),
        ("factorial(20)", "2432902008176640000"),
        ("log(8, 2) + pi - pi", "3"),
        ("1 / 0", "error: division by zero"),
        ("2 ** 10 ** 6", "error: result too large"),
        ("factorial(10**6)", "error: factorial arguments above 10000 are refused"),
        ("__import__('os')", "error: unknown function '__import__'"),
        ("__import__('os').system('ls')", "error: not allowed in an arithmetic expression"),
        ("(1).__class__", "error: not allowed in an arithmetic expression"),
        ("x + 1", "error: unknown name 'x'"),
        ("1 +", "error: cannot parse"),
        ("", "error: empty expression"),
    ],
)
def test_calculator(expression, value):
    assert calculate(expression).startswith(value)


# -- datasets ----------------------------------------------------------------------------------------


@needs_shared_data
def test_gsm8k_splits_are_disjoint_and_seeded():
    train = task_options([0, 1], {"dataset": "gsm8k"})
    assert train[0]["question"].startswith("Natalia sold clips") and train[0]["answer"] == "72"
    held_out = task_options(list(range(500)), {"dataset": "gsm8k", "split": "eval"})
    assert len({p["index"] for p in held_out}) == 500
    assert not {p["question"] for p in held_out} & {
        p["question"] for p in task_options(list(range(300)), {"dataset": "gsm8k"})
    }
    assert task_options([6973], {"dataset": "gsm8k"}) == task_options(
        [0], {"dataset": "gsm8k"}
    )  # 7473 - 500 wraps
    assert all(
        "," not in p["answer"] for p in task_options(list(range(200)), {"dataset": "gsm8k", "split": "all"})
    )
    with pytest.raises(ValueError, match="GSM8K test is not in the shared data"):
        task_options([0], {"dataset": "gsm8k", "split": "test"})


@needs_shared_data
def test_math500_carries_its_metadata():
    (first,) = task_options([500], {"dataset": "math500"})
    assert first["answer"] == "\\left( 3, \\frac{\\pi}{2} \\right)" and first["subject"] == "Precalculus"
    assert first["difficulty"] == 2 and first["dataset"] == "math500" and first["index"] == 0


def test_user_jsonl_with_its_own_fields(tmp_path):
    path = tmp_path / "mine.jsonl"
    rows = [{"q": "1+1?", "a": "so #### 2"}, {"q": "Big?", "a": "1,234,567"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    level = {"dataset": "jsonl", "path": str(path), "question_field": "q", "answer_field": "a"}
    assert [(p["question"], p["answer"]) for p in task_options([0, 1, 2], level)] == [
        ("1+1?", "2"),
        ("Big?", "1234567"),
        ("1+1?", "2"),
    ]
    with pytest.raises(ValueError, match="no field 'question'.*set env.level.question_field"):
        task_options([0], {"dataset": "jsonl", "path": str(path)})


def test_missing_files_and_bad_keys_say_what_to_set(tmp_path):
    with pytest.raises(FileNotFoundError, match="set env.level.data_dir"):
        task_options([0], {"dataset": "gsm8k", "data_dir": str(tmp_path)})
    with pytest.raises(FileNotFoundError, match="set env.level.path"):
        task_options([0], {"dataset": "jsonl", "path": str(tmp_path / "none.jsonl")})
    with pytest.raises(ValueError, match="needs env.level.path"):
        task_options([0], {"dataset": "jsonl"})
    with pytest.raises(ValueError, match="known: arithmetic, gsm8k, jsonl, math500, parquet"):
        task_options([0], {"dataset": "aime"})
    with pytest.raises(ValueError, match=r"\['digits'\] do not apply to dataset 'gsm8k'"):
        task_options([0], {"dataset": "gsm8k", "digits": 3})


def test_arithmetic_is_deterministic_and_right():
    level = {"dataset": "arithmetic", "digits": 3, "operands": 4, "ops": "+-*/"}
    problems = task_options(list(range(50)), level)
    assert problems == task_options(list(range(50)), level)
    assert len({p["question"] for p in problems}) == 50
    for p in problems:
        expression = p["question"].removeprefix("Calculate ").removesuffix(".")
        assert len(expression.split()) == 7 and all(len(n) == 3 for n in expression.split()[::2])
        assert float(Fraction(p["answer"])) == pytest.approx(
            eval(expression), rel=1e-9
        )  # Python's precedence
    assert (
        task_options([0], {"dataset": "arithmetic"})[0]
        != task_options([0], {"dataset": "arithmetic", "digits": 3})[0]
    )


def test_clean_answer():
    assert [clean_answer(a) for a in ("x\n#### 1,080", " 72 ", "1,2", "-12,000.5", 7)] == [
        "1080",
        "72",
        "1,2",
        "-12000.5",
        "7",
    ]


# -- through the rollout loop ------------------------------------------------------------------------


def test_a_tool_episode_through_the_rollout_loop(smol_tokenizer):
    from agents.chat import encode
    from agents.config import RolloutConfig, SamplingConfig
    from agents.engines.scripted import ScriptedEngine
    from agents.rollout import Rollout, Task

    replies = [call("python", code="print(6 * 7)"), "It prints 42, so \\boxed{42}."]
    eos = smol_tokenizer.eos_token_id
    engine = ScriptedEngine(lambda prompt, k: encode(smol_tokenizer, replies[k]) + [eos], eos_id=eos)
    cfg = RolloutConfig(mode="trajectory", format="tool_call", max_turns=4, max_new_tokens=64, max_context=4096,
                        rewards={"success": 1.0, "math_verify": 1.0, "tool_use": 0.5})  # fmt: skip
    rollout = Rollout(engine, smol_tokenizer, cfg)
    (sample,) = rollout.run(
        [Task(env_id="math", group_id=0, reset_options=PROBLEM)], SamplingConfig()
    ).samples
    assert sample.reward == 2.5 and sample.stop_reason == "terminated"
    assert sample.info["actions"] == replies and sample.info["parse_errors"] == 0
    first_prompt = smol_tokenizer.decode(engine.calls[0][0])
    assert (
        "<tools>" in first_prompt
        and '"name": "python"' in first_prompt
        and PROBLEM["question"] in first_prompt
    )
    assert "<tool_response>\n42\n</tool_response>" in smol_tokenizer.decode(engine.calls[1][0])
