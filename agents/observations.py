"""Env output as the prompt sees it: `Observation`s built from an env's text and info, sanitised.

Env text is untrusted: it may be bytes, carry undecodable characters or lone surrogates, or be
gigantic. `sanitize_observation` makes any of it safe to tokenize (undecodable characters become
U+FFFD, text longer than `max_obs_chars` is cut around a marker), and `_observation` applies it to
everything an env hands the prompt (objective, text, offered commands). `anchor_key` hashes an
observation into GiGPO's anchor state. Pure functions, no engine, no env, no tokenizer: split out
of the rollout loop (agents/rollout.py), which calls them on every reset and step.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from agents.prompts import Observation

_SURROGATE = re.compile("[\ud800-\udfff]")


def _observation(env_task: str, tools: list[dict], text: Any, info: dict, max_chars: int = 0) -> Observation:
    """The prompt's view of an env's output; all env text sanitised (`sanitize_observation`)."""
    task = sanitize_observation(info.get("objective") or env_task or "", max_chars)
    choices = info.get("admissible_commands")
    if isinstance(choices, (list, tuple)):
        choices = [sanitize_observation(c, max_chars) for c in choices]
    text = sanitize_observation(text, max_chars)
    return Observation(task=task, text=text, choices=choices, tools=tools or None)


def sanitize_observation(text: Any, max_chars: int = 0) -> str:
    """Env text made safe to tokenize, as readable as it can stay.

    Bytes are decoded as UTF-8 (bad bytes -> U+FFFD), None is "", anything else `str()`. Lone
    surrogates, which a str decoded with `surrogateescape` carries and tokenizers refuse (a
    TypeError, or "surrogates not allowed"), become U+FFFD; a well-formed surrogate pair becomes
    its character.
    With `max_chars` > 0, a longer text keeps its first ceil(max_chars / 2) and last
    floor(max_chars / 2) characters around `\\n[... N chars dropped ...]\\n`. Pure; never raises.
    """
    text = _as_text(text)
    if max_chars > 0 and len(text) > max_chars:
        tail = max_chars // 2
        head = max_chars - tail
        text = f"{text[:head]}\n[... {len(text) - max_chars} chars dropped ...]\n{text[len(text) - tail :]}"
    if _SURROGATE.search(text):
        text = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    return text


def _as_text(text: Any) -> str:
    if isinstance(text, str):
        return text
    if isinstance(text, (bytes, bytearray)):
        return bytes(text).decode("utf-8", errors="replace")
    return "" if text is None else str(text)


def anchor_key(obs: Observation | None) -> str | None:
    """GiGPO anchor state: a stable hash (same across processes and runs, unlike `hash`) of the
    raw observation a turn's prompt was built from (objective, text, offered commands), without
    the history."""
    if obs is None:
        return None
    raw = json.dumps([obs.task, obs.text, obs.choices], ensure_ascii=False)
    return hashlib.sha1(raw.encode("utf-8")).hexdigest()[:16]
