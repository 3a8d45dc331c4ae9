"""Parsers of model text (agents/parsing.py): tables of hand-written replies, then hypothesis
fuzzing (no input makes them raise), then agreement with the env's own copy in
environments/math_env.py, which decides what actually runs and what counts as the answer.

Run: .venv/bin/python -m pytest tests/agents/test_parsing.py -q
"""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agents.parsing import (
    ParseError,
    ReActStep,
    ToolCall,
    extract_boxed,
    final_answer,
    parse_action_tag,
    parse_react,
    parse_tool_calls,
)
from environments.math_env import _parse_tool_calls as env_tool_calls
from environments.math_env import extract_answer as env_answer

PY = '<tool_call>\n{"name": "python", "arguments": {"code": "print(1)"}}\n</tool_call>'


# -- tool calls ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, calls",
    [
        ("no call here", []),
        (PY, [ToolCall("python", {"code": "print(1)"})]),
        (f"think first\n{PY}\n{PY.replace('print(1)', 'print(2)')}",  # parallel calls, in order
         [ToolCall("python", {"code": "print(1)"}), ToolCall("python", {"code": "print(2)"})]),
        ('<tool_call>{"name": "python", "arguments": {"code": "for i in range(2):\n    print({i: i})"}}</tool_call>',
         [ToolCall("python", {"code": "for i in range(2):\n    print({i: i})"})]),  # raw newline, braces in code
        ('<tool_call>{"name": "calc", "arguments": "{\\"expression\\": \\"1+1\\"}"}</tool_call>',
         [ToolCall("calc", {"expression": "1+1"})]),  # arguments as a JSON string
        ('<tool_call>{"name": "ls"}</tool_call>', [ToolCall("ls", {})]),
        ('<tool_call>{"name": "python", "arguments": {"code": "1"}}', [ToolCall("python", {"code": "1"})]),  # unclosed
    ],
)  # fmt: skip
def test_tool_calls(text, calls):
    assert parse_tool_calls(text) == calls


@pytest.mark.parametrize(
    "text, reason",
    [
        ("<tool_call>{'name': 'python'}</tool_call>", "tool call 1 is not valid JSON"),
        (
            '<tool_call>{"name": "python", "arguments": {"code": "1"}</tool_call>',
            "tool call 1 is not valid JSON",
        ),
        ("<tool_call></tool_call>", "tool call 1 is not valid JSON"),
        ('<tool_call>["python"]</tool_call>', 'needs a string "name" and an object "arguments"'),
        ('<tool_call>{"name": 3, "arguments": {}}</tool_call>', 'needs a string "name"'),
        ('<tool_call>{"name": "f", "arguments": [1]}</tool_call>', 'an object "arguments"'),
        ("<tool_call>" + "[" * 100_000 + "</tool_call>", "tool call 1 is not valid JSON (RecursionError"),
    ],
)
def test_malformed_tool_calls_become_parse_errors(text, reason):
    (result,) = parse_tool_calls(text)
    assert isinstance(result, ParseError) and reason in result.reason


def test_a_bad_call_keeps_its_place_among_good_ones():
    calls = parse_tool_calls(PY + "<tool_call>{oops}</tool_call>" + PY)
    assert [type(c) for c in calls] == [ToolCall, ParseError, ToolCall]
    assert calls[1].reason.startswith("tool call 2 is not valid JSON")


# -- actions -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, action",
    [
        ("<action>go east</action>", "go east"),
        ("I will <action> open door \n</action> now", "open door"),
        ("<action>take key", "take key"),
        ("<action>a</action><action>b</action>", "a"),
        ("go east", ParseError("no <action></action> tag")),
        ("<action>  </action>", ParseError("empty <action></action> tag")),
    ],
)
def test_action_tag(text, action):
    assert parse_action_tag(text) == action


@pytest.mark.parametrize(
    "text, step",
    [
        ("Thought: look around\nAction: search\nAction Input: {\"q\": \"x\"}\nObservation: ...", ReActStep("search", '{"q": "x"}')),
        ("Action: python\nAction Input: import math\nprint(math.pi)", ReActStep("python", "import math\nprint(math.pi)")),
        ("Thought: t\nAction: search[Colorado orogeny]", ReActStep("search", "Colorado orogeny")),
        ("action: finish", ReActStep("finish", "")),
        ("Thought: hmm\nFinal Answer: 4", ParseError("no 'Action:' line")),
        ("Action:   \nAction Input: x", ParseError("empty 'Action:' line")),
    ],
)  # fmt: skip
def test_react(text, step):
    assert parse_react(text) == step


# -- answers ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, answer",
    [
        ("so \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{\\frac{\\sqrt{3}}{2}} done", "\\frac{\\sqrt{3}}{2}"),  # nested braces
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces are text
        ("\\boxed {x^{2}}", "x^{2}"),
        ("\\fbox{7}", "7"),
        ("\\boxed{1} and finally \\boxed{2}", "2"),
        ("\\boxed{5} \\boxed{6", "5"),  # the unclosed last box is skipped
        ("\\boxed{\\boxed{8}}", "8"),
        ("\\boxed{", ParseError("no complete \\boxed{...}")),
    ],
)
def test_extract_boxed(text, answer):
    assert extract_boxed(text) == answer


@pytest.mark.parametrize(
    "text, answer",
    [
        ("Answer: 3\n\\boxed{4}", "4"),  # a box wins over the line forms
        ("She pays 5*3 = 15.\n#### 18", "18"),
        ("#### 1,080\n", "1,080"),
        ("#### \n#### 7", "7"),
        ("The answer is: $42$.", "42"),
        ("Final Answer: 70 students", "70 students"),
        ("answer: 1\nAnswer: 2", "2"),
        ("I think it is 12", ParseError("no final answer (\\boxed{...}, '#### ...' or 'Answer: ...')")),
    ],
)
def test_final_answer(text, answer):
    assert final_answer(text) == answer


# -- never raises; agrees with the env --------------------------------------------------------------------

PIECES = ["<tool_call>", "</tool_call>", "<action>", "</action>", "\\boxed{", "\\fbox{", "{", "}", "\\{", "\\}", "####",
          "Answer:", "Action:", "Action Input:", "Observation:", '{"name": "python", "arguments": {"code": "1"}}',
          '"arguments"', "[", "]", "\n", " ", "$", ".", "42", "\\frac{1}{2}"]  # fmt: skip
model_text = st.lists(st.one_of(st.sampled_from(PIECES), st.text(max_size=8)), max_size=30).map("".join)


@settings(max_examples=150, deadline=None, database=None)
@given(st.one_of(model_text, st.text()))
def test_parsers_never_raise(text):
    for call in parse_tool_calls(text):
        assert isinstance(call, ParseError | ToolCall)
        if isinstance(call, ToolCall):
            assert isinstance(call.name, str) and isinstance(call.arguments, dict)
    assert isinstance(parse_action_tag(text), str | ParseError)
    assert isinstance(parse_react(text), ReActStep | ParseError)
    for answer in (extract_boxed(text), final_answer(text)):
        assert isinstance(answer, ParseError) or (isinstance(answer, str) and answer == answer.strip())


@settings(max_examples=300, deadline=None, database=None)
@given(model_text)
def test_the_env_reads_replies_as_the_agent_does(text):
    ours = final_answer(text)
    assert env_answer(text) == (None if isinstance(ours, ParseError) else ours)
    theirs = env_tool_calls(text)
    assert len(theirs) == len(parse_tool_calls(text))
    for mine, env_call in zip(parse_tool_calls(text), theirs, strict=True):
        if isinstance(mine, ToolCall):
            assert env_call == (mine.name, mine.arguments)
        else:
            assert env_call == mine.reason


def test_pathological_inputs_stay_fast():
    import time

    started = time.perf_counter()
    for text in ("\\boxed{" * 20_000, "{" * 50_000 + "}" * 50_000, "<tool_call>" * 20_000, "Action: " + " a" * 50_000,
                 "answer" + " " * 50_000, json.dumps({"name": "x", "arguments": {"a": "b" * 200_000}})):  # fmt: skip
        parse_tool_calls(text), parse_action_tag(text), parse_react(text), final_answer(text)
    assert time.perf_counter() - started < 5.0


def test_token_roles():
    from agents.parsing import token_roles

    pieces = ["Let", " me", " add", ".", " \\boxed{", "1", "2", "}", " done"]
    assert token_roles(pieces) == ["reasoning"] * 4 + ["answer"] * 4 + ["reasoning"]
    # a prefilled <action>: the reply up to </action> is the action
    assert token_roles(["open", " door", "</action>", " ok"], prefill="<action>") == ["action"] * 3 + ["reasoning"]
    tool = ["Hmm", "<tool_call>", '{"name"', ': "python"}', "</tool_call>"]
    assert token_roles(tool) == ["reasoning"] + ["tool_call"] * 4
    assert token_roles(["", "x"]) == ["reasoning", "reasoning"]
