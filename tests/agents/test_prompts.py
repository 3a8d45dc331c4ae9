"""Agent formats (agents/prompts.py): prompt layout and reply parsing that never raises.

Run: .venv/bin/python -m pytest tests/agents/test_prompts.py -q
"""

import random
import string

import pytest

from agents.prompts import (
    ActionTag,
    Boxed,
    NumberedChoice,
    Observation,
    ParsedAction,
    ToolCalling,
    build_format,
)

CHOICES = ["close chest", "go east", "look", "take key from chest"]
OBS = Observation(task="Close the chest.", text="-= Kitchen =-\nA chest is here.", choices=CHOICES)


# -- NumberedChoice -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "reply, action",
    [
        ("3</action>", "look"),  # the usual reply after the "<action>" prefill
        ("3", "look"),  # cut before the closing tag
        ("<action>3", "look"),  # the model repeats the prefill
        (" <action>\n2</action>", "go east"),
        (" 2 </action> trailing text", "go east"),
        ("\n4</action>", "take key from chest"),
        ("I choose 1 because", "close chest"),
        ("1</action><action>4</action>", "close chest"),  # the first tag wins
    ],
)
def test_numbered_parses_the_number(reply, action):
    assert NumberedChoice().parse(reply, OBS) == ParsedAction(action, None)


@pytest.mark.parametrize(
    "reply, error",
    [
        ("0</action>", "command number 0 is not in 1..4"),
        ("5</action>", "command number 5 is not in 1..4"),
        ("look</action>", "no command number in <action></action>"),
        ("</action>", "no command number in <action></action>"),
        ("", "no command number in <action></action>"),
        ("look\n3</action>", "no command number in <action></action>"),  # only the first line counts
    ],
)
def test_numbered_falls_back_with_a_reason(reply, error):
    assert NumberedChoice(fallback="inventory").parse(reply, OBS) == ParsedAction("inventory", error)


def test_numbered_without_choices_falls_back():
    no_choices = Observation(task="t", text="x", choices=None)
    parsed = NumberedChoice().parse("1</action>", no_choices)
    assert parsed.action == "look" and parsed.error == "command number 1 is not in 1..0"


def test_numbered_prompt_lists_choices_by_number():
    fmt = NumberedChoice()
    system, user = fmt.messages(OBS, history=[("You wake up.", "look")])
    assert system == {"role": "system", "content": fmt.system}
    assert user["role"] == "user"
    assert user["content"] == (
        "Goal: Close the chest.\n\nYou wake up.\n> look\n\n-= Kitchen =-\nA chest is here.\n\nValid commands:\n"
        "1. close chest\n2. go east\n3. look\n4. take key from chest\n\nWhich command number?"
    )
    # the followup (trajectory mode) is the same rendering of the observation, without goal or history
    assert user["content"].endswith(fmt.followup(OBS)["content"])
    with pytest.raises(ValueError, match="admissible_commands"):
        fmt.followup(Observation(task="t", text="x"))


# -- ActionTag ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "reply, action",
    [
        ("go east</action>", "go east"),
        ("  go east  ", "go east"),  # cut, surrounding spaces stripped
        ("open chest\nthen look</action>", "open chest"),  # first line only
        ("take key</action> and more", "take key"),
        ("<action>go east</action>", "go east"),  # the model repeats the prefill
        ("\n<action> open door", "open door"),
    ],
)
def test_action_tag_reads_the_tag(reply, action):
    assert ActionTag().parse(reply, OBS) == ParsedAction(action, None)


@pytest.mark.parametrize("reply", ["", "</action>", "   </action>", "\n\n"])
def test_action_tag_empty_falls_back(reply):
    assert ActionTag(fallback="wait").parse(reply, OBS) == ParsedAction(
        "wait", "empty or missing <action></action>"
    )


def test_action_tag_prompt_shows_choices_only_when_given():
    fmt = ActionTag()
    assert fmt.followup(OBS)["content"] == OBS.text + "\n\nValid commands: " + ", ".join(CHOICES)
    assert fmt.followup(Observation(task="t", text="dark room"))["content"] == "dark room"


# -- both -----------------------------------------------------------------------------------------


def _random_reply(rng: random.Random) -> str:
    pieces = ["<action>", "</action>", "<action", "action>", "\n", " ", "-", "0", "3", "42", "99999999999999999999",
              "\x00", "é", "🙂", "look", "<|im_end|>"]  # fmt: skip
    alphabet = string.printable + "日本"
    out = []
    for _ in range(rng.randint(0, 12)):
        out.append(
            rng.choice(pieces) if rng.random() < 0.5 else "".join(rng.choices(alphabet, k=rng.randint(1, 5)))
        )
    return "".join(out)


@pytest.mark.parametrize("name", ["numbered", "action_tag"])
def test_parse_never_raises_on_random_replies(name):
    fmt = build_format(name, fallback="look")
    rng = random.Random(0)
    for _ in range(400):
        reply = _random_reply(rng)
        parsed = fmt.parse(reply, OBS)
        if parsed.error is None:
            assert parsed.action and (name != "numbered" or parsed.action in CHOICES), reply
            assert "\n" not in parsed.action and parsed.action == parsed.action.strip(), reply
        else:
            assert parsed.action == "look" and isinstance(parsed.error, str) and parsed.error, reply


def test_build_format_unknown_name_lists_known():
    with pytest.raises(KeyError, match="action_tag, boxed, numbered, tool_call"):
        build_format("json")
    assert isinstance(build_format("numbered", fallback="wait"), NumberedChoice)
    assert build_format("numbered", fallback="wait").fallback == "wait"


# -- math formats: the action is the whole reply; parse only flags what the env cannot use ---------

QUESTION = "What is 6 times 7?"
MATH_OBS = Observation(task=QUESTION, text=QUESTION)
TOOLS = [{"name": "python", "description": "Run Python.", "parameters": {"type": "object", "properties": {}}}]
CALL = '<tool_call>{"name": "python", "arguments": {"code": "print(6 * 7)"}}</tool_call>'


def test_boxed_prompt_and_parse():
    fmt = build_format("boxed")
    assert (fmt.prefill, fmt.stop) == ("", [])
    assert fmt.messages(MATH_OBS) == [
        {"role": "system", "content": "Please reason step by step, and put your final answer within \\boxed{}."},
        {"role": "user", "content": QUESTION},
    ]
    assert fmt.parse("6*7 = 42, so \\boxed{42}", MATH_OBS) == ParsedAction("6*7 = 42, so \\boxed{42}")
    assert fmt.parse("#### 42", MATH_OBS) == ParsedAction("#### 42")
    assert fmt.parse("it is 42", MATH_OBS) == ParsedAction("it is 42", "no final answer in \\boxed{}")


def test_tool_call_prompt_lists_the_tools_hermes_style():
    fmt = ToolCalling()
    system, user = fmt.messages(Observation(task=QUESTION, text=QUESTION, tools=TOOLS))
    assert user == {"role": "user", "content": QUESTION}
    assert system["content"].startswith(fmt.intro)
    assert '<tools>\n{"type": "function", "function": {"name": "python", "description": "Run Python."' in system["content"]
    assert '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>' in system["content"]
    assert fmt.messages(Observation(task=QUESTION, text=QUESTION, tools=[]))[0]["content"] == fmt.intro
    # without tools on the observation (rollout.py does not pass them yet): the constructor's, else the math env's
    assert '"name": "calculator"' in fmt.messages(MATH_OBS)[0]["content"]
    assert '"name": "calculator"' not in ToolCalling(tools=TOOLS).messages(MATH_OBS)[0]["content"]


def test_tool_call_history_is_real_chat_turns():
    fmt = build_format("tool_call", tools=TOOLS)
    response = "<tool_response>\n42\n</tool_response>"
    now = Observation(task=QUESTION, text=response)
    roles = [(m["role"], m["content"]) for m in fmt.messages(now, history=[(QUESTION, CALL)])[1:]]
    assert roles == [("user", QUESTION), ("assistant", CALL), ("user", response)]
    assert fmt.followup(now) == {"role": "user", "content": response}


@pytest.mark.parametrize(
    "reply, error",
    [
        (CALL, None),
        (CALL + CALL, None),
        ("\\boxed{42}", None),
        ("<tool_call>{nope}</tool_call>", "tool call 1 is not valid JSON"),
        ('<tool_call>{"name": "web", "arguments": {}}</tool_call>', "unknown tool 'web'"),
        ("let me think", "neither a <tool_call> nor a final answer in \\boxed{}"),
    ],
)
def test_tool_call_parse_keeps_the_reply_and_flags_problems(reply, error):
    parsed = ToolCalling(tools=TOOLS).parse(reply, MATH_OBS)
    assert parsed.action == reply
    assert (parsed.error is None) if error is None else parsed.error.startswith(error)


@pytest.mark.parametrize("fmt", [Boxed(), ToolCalling(tools=TOOLS)])
def test_math_formats_never_raise_and_keep_the_reply(fmt):
    rng = random.Random(1)
    for _ in range(300):
        reply = _random_reply(rng) + rng.choice(["", "\\boxed{", "}", CALL, "<tool_call>", "####"])
        parsed = fmt.parse(reply, MATH_OBS)
        assert parsed.action == reply and (parsed.error is None or isinstance(parsed.error, str))


def test_boxed_fewshot_examples_come_before_the_question():
    from agents.prompts import Boxed

    shots = [{"user": "Calculate 2 + 3.", "assistant": "2 + 3 = 5. The answer is \\boxed{5}."}]
    messages = Boxed(fewshot=shots).messages(Observation(task="Calculate 4 + 4.", text="Calculate 4 + 4."))
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[1]["content"] == "Calculate 2 + 3." and messages[3]["content"] == "Calculate 4 + 4."
    with pytest.raises(ValueError, match=r"rollout.fewshot\[0\]"):
        Boxed(fewshot=[{"question": "x"}])


# -- fuzz: no reply text makes a format raise ------------------------------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_REPLY_PIECES = st.sampled_from(
    ["<action>", "</action>", "<tool_call>", "</tool_call>", "\\boxed{", "}", "{", '{"name": "python"', "####",
     "Answer:", "1", "42", "\n", " ", "\udcff", "é", "\x00"]  # fmt: skip
)


@settings(max_examples=300, deadline=None)
@given(pieces=st.lists(st.one_of(_REPLY_PIECES, st.text(max_size=20)), max_size=30))
def test_no_reply_makes_a_format_raise(pieces):
    from agents.prompts import FORMATS, build_format

    reply = "".join(pieces)
    obs = Observation(task="t", text="o", choices=["look", "take key"])
    for name in FORMATS:
        parsed = build_format(name).parse(reply, obs)
        assert isinstance(parsed.action, str) and (parsed.error is None or isinstance(parsed.error, str))


@settings(max_examples=100, deadline=None)
@given(reply=st.text(max_size=300))
def test_no_reply_makes_the_math_env_raise(reply):
    import environments

    env = environments.make("math", tools=["calculator"])
    env.reset(seed=1)
    obs, reward, terminated, truncated, info = env.step(reply)
    assert isinstance(obs, str) and reward in (0.0, 1.0)
    env.close()
