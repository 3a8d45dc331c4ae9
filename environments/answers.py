"""Final-answer extraction from model text (stdlib only): the math env checks answers with it,
and `agents/parsing.py` builds its parse errors on it, so both read a reply the same way."""

from __future__ import annotations

import re

BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
BRACE = re.compile(r"(?<!\\)[{}]")  # escaped braces (\{ \}) are LaTeX text, not grouping
_HASHES = re.compile(r"####[ \t]*([^\n]*)")
_ANSWER_LINE = re.compile(r"\banswer(?:[ \t]+is)?[ \t]*:[ \t]*([^\n]*)", re.IGNORECASE)


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (or `\\fbox{...}`) whose braces close, else None."""
    stack, closing = [], {}
    for match in BRACE.finditer(text):
        if match.group() == "{":
            stack.append(match.start())
        elif stack:
            closing[stack.pop()] = match.start()
    for match in reversed(list(BOXED.finditer(text))):
        opening = match.end() - 1
        if opening in closing:
            return text[opening + 1 : closing[opening]].strip()
    return None


def extract_answer(reply: str) -> str | None:
    """The final answer: the last complete `\\boxed{}` (nested braces allowed), else the last
    non-empty `#### ...` line (GSM8K), else the last `Answer: ...` / `The answer is: ...` line;
    `$...$` and a final period are stripped from the line forms. None when there is none."""
    boxed = last_boxed(reply)
    if boxed is not None:
        return boxed
    for pattern in (_HASHES, _ANSWER_LINE):
        found = [a for a in (_strip(m) for m in pattern.findall(reply)) if a]
        if found:
            return found[-1]
    return None


def _strip(answer: str) -> str:
    answer = answer.strip().rstrip(".").strip()
    if len(answer) >= 2 and answer[0] == answer[-1] == "$":
        answer = answer[1:-1].strip()
    return answer
