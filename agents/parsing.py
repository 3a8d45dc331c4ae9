"""Pure extraction of tool calls, actions and final answers from model text. Nothing here raises
on model output: what cannot be read comes back as a `ParseError` naming the reason.

    parse_tool_calls   Hermes `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one or
                       several (parallel calls), each a ToolCall or a ParseError, in order
    parse_action_tag   the body of the first `<action>...</action>`
    parse_react        ReAct `Action: name` + `Action Input: ...`, or `Action: name[input]`
    extract_boxed      the last complete `\\boxed{...}` (nested braces allowed)
    final_answer       `\\boxed{}`, else the last `#### ...`, else the last `Answer: ...`

environments/math_env.py reads tool calls and answers with its own small copy (environments import
no project code); tests/agents/test_parsing.py checks that both agree.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from environments.answers import BOXED, BRACE, extract_answer, last_boxed


@dataclass(frozen=True)
class ParseError:
    """Why some model output could not be read (returned, never raised)."""

    reason: str


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ReActStep:
    action: str
    action_input: str  # raw text; decoding JSON is the caller's choice


_TOOL_CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.DOTALL)
_CALL_HINT = 'write <tool_call>{"name": "<tool>", "arguments": {...}}</tool_call>'


def parse_tool_calls(text: str) -> list[ToolCall | ParseError]:
    """Every `<tool_call>` block in order; an unclosed last block is read to the end of the text.
    `arguments` may also be a JSON string (OpenAI style). Empty list: no tool call at all."""
    calls: list[ToolCall | ParseError] = []
    for k, match in enumerate(_TOOL_CALL.finditer(text), 1):
        try:
            call = json.loads(match.group(1).strip(), strict=False)  # strict=False: raw newlines in code
        except Exception as exc:  # noqa: BLE001 - JSONDecodeError, RecursionError, over-long ints
            calls.append(
                ParseError(
                    f"tool call {k} is not valid JSON ({type(exc).__name__}: {str(exc)[:100]}); {_CALL_HINT}"
                )
            )
            continue
        args = call.get("arguments", {}) if isinstance(call, dict) else None
        if isinstance(args, str):
            try:
                args = json.loads(args, strict=False)
            except Exception:  # noqa: BLE001
                args = None
        if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not isinstance(args, dict):
            calls.append(
                ParseError(f'tool call {k} needs a string "name" and an object "arguments"; {_CALL_HINT}')
            )
        else:
            calls.append(ToolCall(call["name"], args))
    return calls


_ACTION = re.compile(r"<action>(.*?)(?:</action>|\Z)", re.DOTALL)


def parse_action_tag(text: str) -> str | ParseError:
    """The stripped body of the first `<action>` tag (an unclosed tag runs to the end)."""
    match = _ACTION.search(text)
    if match is None:
        return ParseError("no <action></action> tag")
    body = match.group(1).strip()
    return body if body else ParseError("empty <action></action> tag")


_REACT_ACTION = re.compile(r"^[ \t]*Action[ \t]*:[ \t]*(.*)$", re.MULTILINE | re.IGNORECASE)
_REACT_INPUT = re.compile(r"^[ \t]*Action[ \t]+Input[ \t]*:[ \t]*(.*?)(?=^[ \t]*Observation[ \t]*:|\Z)", re.MULTILINE | re.DOTALL | re.IGNORECASE)  # fmt: skip


def parse_react(text: str) -> ReActStep | ParseError:
    """The first `Action:` line and its `Action Input:` (up to an `Observation:` line), or the
    ReAct-paper form `Action: search[query]`. A missing input is the empty string."""
    action = _REACT_ACTION.search(text)
    if action is None:
        return ParseError("no 'Action:' line")
    name = action.group(1).strip()
    tool, bracket, rest = name.partition("[")
    if bracket and tool.strip() and rest.endswith("]"):
        return ReActStep(tool.strip(), rest[:-1].strip())
    if not name:
        return ParseError("empty 'Action:' line")
    given = _REACT_INPUT.search(text, action.end())
    return ReActStep(name, given.group(1).strip() if given else "")


def extract_boxed(text: str) -> str | ParseError:
    """The content of the last `\\boxed{...}` (or `\\fbox{...}`) whose braces close."""
    boxed = last_boxed(text)
    return ParseError("no complete \\boxed{...}") if boxed is None else boxed


def final_answer(text: str) -> str | ParseError:
    """The final answer (`environments/answers.py`: the last complete `\\boxed{}`, else the last
    `#### ...` line, else the last `Answer: ...` line), or a ParseError saying none was found."""
    answer = extract_answer(text)
    return ParseError("no final answer (\\boxed{...}, '#### ...' or 'Answer: ...')") if answer is None else answer


# -- token roles (entropy by role) -----------------------------------------------------------------

ROLES = ("reasoning", "action", "tool_call", "answer")


def char_roles(text: str) -> list[str]:
    """The role of every character of a reply: inside <action>...</action> "action", inside
    <tool_call>...</tool_call> "tool_call", inside \\boxed{...} "answer", else "reasoning"."""
    roles = ["reasoning"] * len(text)
    for pattern, role in ((_ACTION, "action"), (_TOOL_CALL, "tool_call")):
        for match in pattern.finditer(text):
            roles[match.start() : match.end()] = [role] * (match.end() - match.start())
    for match in BOXED.finditer(text):
        depth, end = 1, len(text)
        for brace in BRACE.finditer(text, match.end()):
            depth += 1 if brace.group() == "{" else -1
            if depth == 0:
                end = brace.end()
                break
        roles[match.start() : end] = ["answer"] * (end - match.start())
    return roles


def token_roles(pieces: list[str], prefill: str = "") -> list[str]:
    """The role of each sampled token, from its decoded text `pieces` (one string per token) and
    the format's prefill (an `<action>` prefill makes the reply an action): the role of the
    token's first non-space character; a blank piece takes its predecessor's role."""
    roles = char_roles(prefill + "".join(pieces))
    out, at = [], len(prefill)
    for piece in pieces:
        lead = len(piece) - len(piece.lstrip())
        if piece.strip():
            out.append(roles[at + lead])
        else:
            out.append(out[-1] if out else "reasoning")
        at += len(piece)
    return out
