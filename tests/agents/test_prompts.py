"""Agent formats (agents/prompts.py): prompt layout and reply parsing that never raises.

Run: .venv/bin/python -m pytest tests/agents/test_prompts.py -q
"""

import random
import string

import pytest

from agents.prompts import ActionTag, NumberedChoice, Observation, ParsedAction, build_format

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
    with pytest.raises(KeyError, match="action_tag, numbered"):
        build_format("json")
    assert isinstance(build_format("numbered", fallback="wait"), NumberedChoice)
    assert build_format("numbered", fallback="wait").fallback == "wait"
