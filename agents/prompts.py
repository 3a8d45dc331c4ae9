"""Agent formats: how an env observation becomes chat messages, and a reply becomes an action.

A format is a small pair (build messages, parse reply). Parsing never raises: a reply it cannot
read yields `ParsedAction(action=fallback, error=...)`, the env plays the fallback, and the error
is counted (and can be penalised by a reward term).
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass
class ParsedAction:
    action: str
    error: str | None = None  # why the reply could not be read, or None


@dataclass
class Observation:
    """What a prompt is built from: the task, the current observation, optional choices."""

    task: str
    text: str
    choices: list[str] | None = None  # admissible commands, when the env exposes them


# `(?:<action>\s*)+`: a model that repeats the prefilled tag still has its action read
_ACTION_TAG = re.compile(r"(?:<action>\s*)+(.*?)(?:</action>|$)", re.DOTALL)
_FIRST_INT = re.compile(r"\d+")


def _tag_body(reply: str) -> str | None:
    match = _ACTION_TAG.search(reply)
    if match is None:
        return None
    lines = match.group(1).strip().splitlines()
    return lines[0].strip() if lines else ""


class _Format:
    """Shared prompt layout: system line; goal, the last k (observation, action) pairs, then the
    format's own rendering of the current observation (`followup`)."""

    system = ""
    prefill = "<action>"
    stop = ["</action>"]

    def __init__(self, fallback: str = "look"):
        self.fallback = fallback  # the action played when a reply cannot be parsed

    def messages(self, obs: Observation, history: list[tuple[str, str]] = ()) -> list[dict]:
        lines = [f"Goal: {obs.task}", ""]
        for past_obs, past_action in history:
            lines += [past_obs, f"> {past_action}", ""]
        lines.append(self.followup(obs)["content"])
        return [{"role": "system", "content": self.system}, {"role": "user", "content": "\n".join(lines)}]

    def followup(self, obs: Observation) -> dict:
        raise NotImplementedError

    def parse(self, reply: str, obs: Observation) -> ParsedAction:
        raise NotImplementedError


class NumberedChoice(_Format):
    """Pick a command by its number from the admissible list: `<action>3</action>`.

    Measured on SmolLM2-135M (research/quickstart_calibration.md, prompt "ep"): numbers parse far
    more often than command text, and prefilling `<action>` cuts unparsable replies further.
    """

    system = "You are playing a text adventure game. Reply with the number of one valid command inside <action></action>."

    def followup(self, obs: Observation) -> dict:
        """The user message after an action, in trajectory mode (the goal was said once)."""
        if obs.choices is None:
            raise ValueError("format 'numbered' needs admissible commands: set env.kwargs.admissible_commands=true")
        lines = [obs.text, "", "Valid commands:"]
        lines += [f"{i}. {cmd}" for i, cmd in enumerate(obs.choices, 1)]
        lines += ["", "Which command number?"]
        return {"role": "user", "content": "\n".join(lines)}

    def parse(self, reply: str, obs: Observation) -> ParsedAction:
        body = _tag_body(self.prefill + reply)  # the prefill is part of the prompt, not the reply
        match = _FIRST_INT.search(body or "")
        if match is None:
            return ParsedAction(self.fallback, "no command number in <action></action>")
        number = int(match.group())
        if not 1 <= number <= len(obs.choices or []):
            return ParsedAction(self.fallback, f"command number {number} is not in 1..{len(obs.choices or [])}")
        return ParsedAction(obs.choices[number - 1])


class ActionTag(_Format):
    """Free-text command inside `<action></action>` (for models that can write commands)."""

    system = "You are playing a text adventure game. Reply with one command inside <action></action>."

    def followup(self, obs: Observation) -> dict:
        text = obs.text
        if obs.choices is not None:
            text += "\n\nValid commands: " + ", ".join(obs.choices)
        return {"role": "user", "content": text}

    def parse(self, reply: str, obs: Observation) -> ParsedAction:
        body = _tag_body(self.prefill + reply)
        if not body:
            return ParsedAction(self.fallback, "empty or missing <action></action>")
        return ParsedAction(body)


FORMATS = {"numbered": NumberedChoice, "action_tag": ActionTag}


def build_format(name: str, **kwargs):
    if name not in FORMATS:
        raise KeyError(f"unknown agent format {name!r}; known: {', '.join(sorted(FORMATS))}")
    return FORMATS[name](**kwargs)
