"""Agent formats: how an env observation becomes chat messages, and a reply becomes an action.

A format is a small pair (build messages, parse reply). Parsing never raises: a reply it cannot
read yields `ParsedAction(action=fallback, error=...)`, the env plays the fallback, and the error
is counted (and can be penalised by a reward term). The math formats (`boxed`, `tool_call`) pass
the whole reply on as the action, because the env itself runs tool calls and checks answers;
their parse only flags replies the env will not be able to use.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from agents.parsing import ParseError, ToolCall, final_answer, parse_tool_calls


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
    tools: list[dict] | None = None  # the env's tool specs (name, description, parameters)


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

    def reply_for(self, action: str, obs: Observation) -> str | None:
        """The reply (after the prefill) that `parse` reads back as `action`: what an expert's
        action looks like as model output, for supervised fine-tuning. None when this format
        cannot express the action here."""
        return f"{action}{self.stop[0]}"


class NumberedChoice(_Format):
    """Pick a command by its number from the admissible list: `<action>3</action>`.

    Measured on SmolLM2-135M (a calibration on small TextWorld games): numbers parse far
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

    def reply_for(self, action: str, obs: Observation) -> str | None:
        if action not in (obs.choices or []):
            return None  # an expert command the env does not list cannot be picked by number
        return f"{obs.choices.index(action) + 1}{self.stop[0]}"


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


def _conversation(
    system: str, obs: Observation, history: list[tuple[str, str]], fewshot: list[dict] = ()
) -> list[dict]:
    """System, the few-shot examples as earlier chat turns, the question, then the past turns as
    real chat turns (observation as user, reply as assistant), then the current observation. The
    first observation of an episode is the question itself and is not repeated."""
    question = obs.task or obs.text
    messages = [{"role": "system", "content": system}]
    for shot in fewshot:
        messages += [{"role": "user", "content": shot["user"]}, {"role": "assistant", "content": shot["assistant"]}]
    messages.append({"role": "user", "content": question})
    for past_obs, past_action in history:
        if past_obs != question:
            messages.append({"role": "user", "content": past_obs})
        messages.append({"role": "assistant", "content": past_action})
    if obs.text != question:
        messages.append({"role": "user", "content": obs.text})
    return messages


class Boxed(_Format):
    """Math RLVR: the question under Qwen2.5-Math's instruction to reason step by step and box the
    final answer. No prefill; the reply runs to EOS. A reply without a final answer is flagged."""

    system = "Please reason step by step, and put your final answer within \\boxed{}."
    prefill = ""
    stop: list[str] = []

    def __init__(self, fallback: str = "", fewshot: list[dict] = ()):
        super().__init__(fallback)
        for i, shot in enumerate(fewshot):
            if set(shot) != {"user", "assistant"}:
                raise ValueError(f"rollout.fewshot[{i}] must have exactly the keys user and assistant, got {sorted(shot)}")
        self.fewshot = list(fewshot)  # worked examples shown before the question (small models need them)

    def messages(self, obs: Observation, history: list[tuple[str, str]] = ()) -> list[dict]:
        return _conversation(self.system, obs, history, self.fewshot)

    def followup(self, obs: Observation) -> dict:
        return {"role": "user", "content": obs.text}

    def reply_for(self, action: str, obs: Observation) -> str | None:
        return action  # the whole reply is the action (no prefill, no stop string: it ends at EOS)

    def parse(self, reply: str, obs: Observation) -> ParsedAction:
        if isinstance(final_answer(reply), ParseError):
            return ParsedAction(reply, "no final answer in \\boxed{}")
        return ParsedAction(reply)


class ToolCalling(Boxed):
    """Hermes tool calling, as Qwen2.5 and Hermes models are trained for it: the system prompt lists
    the env's tool specs in `<tools></tools>`, the model calls them with `<tool_call>{json}</tool_call>`
    (several for parallel calls) and gives the final answer in \\boxed{}. Tool results come back as
    the env's `<tool_response>` text in a user turn, which is what Qwen2.5's template renders for a
    "tool" message. Malformed or unknown calls, and replies with neither a call nor an answer, are
    flagged."""

    intro = (
        "You are a helpful assistant. Solve the problem step by step. You may call the tools below to "
        "compute; when you know the answer, reply without a tool call and put the final answer within \\boxed{}."
    )

    def __init__(self, fallback: str = "", tools: list[dict] | None = None, fewshot: list[dict] = ()):
        super().__init__(fallback, fewshot)
        self.tools = tools

    def tool_specs(self, obs: Observation) -> list[dict]:
        """The observation's tools; rollout.py does not set them yet, so else the constructor's,
        else the math env's defaults."""
        if obs.tools is not None:
            return obs.tools
        if self.tools is not None:
            return self.tools
        from environments.math_env import TOOL_SPECS

        return list(TOOL_SPECS.values())

    def system_prompt(self, tools: list[dict]) -> str:
        if not tools:
            return self.intro
        specs = "\n".join(json.dumps({"type": "function", "function": spec}, ensure_ascii=False) for spec in tools)
        return (
            f"{self.intro}\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            f"You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{specs}\n</tools>\n\n"
            "For each function call, return a json object with function name and arguments within "
            '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
        )

    def messages(self, obs: Observation, history: list[tuple[str, str]] = ()) -> list[dict]:
        return _conversation(self.system_prompt(self.tool_specs(obs)), obs, history, self.fewshot)

    def parse(self, reply: str, obs: Observation) -> ParsedAction:
        calls = parse_tool_calls(reply)
        known = {spec["name"] for spec in self.tool_specs(obs)}
        errors = [c.reason for c in calls if isinstance(c, ParseError)]
        errors += [f"unknown tool {c.name!r}" for c in calls if isinstance(c, ToolCall) and c.name not in known]
        if errors:
            return ParsedAction(reply, "; ".join(errors))
        if not calls and isinstance(final_answer(reply), ParseError):
            return ParsedAction(reply, "neither a <tool_call> nor a final answer in \\boxed{}")
        return ParsedAction(reply)


FORMATS = {"numbered": NumberedChoice, "action_tag": ActionTag, "boxed": Boxed, "tool_call": ToolCalling}


def build_format(name: str, **kwargs):
    if name not in FORMATS:
        raise KeyError(f"unknown agent format {name!r}; known: {', '.join(sorted(FORMATS))}")
    return FORMATS[name](**kwargs)
