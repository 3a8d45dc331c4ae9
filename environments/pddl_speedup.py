"""Memoisation patch for textworld's PDDL backend (the ALFWorld simulator).

Stock `textworld.envs.pddl.PddlEnv` spends ~90 % of a step re-parsing the same grammar snippets
with TatSu: every admissible command and every feedback message is rendered by parsing its
template again. `apply()` memoises the three pure functions that do the repeated work:

- `textworld.envs.pddl.textgen._parse_and_convert(text, rule_name=...)`: grammar text -> symbol
  list, keyed by (text, rule_name). Callers set `context` on the symbols they get, so every call
  returns a deep copy of the cached parse.
- `textworld.logic.Rule.parse_conjunctive_query(text)`: a grammar condition -> query `Rule`,
  keyed by the text. Callers only match the rule against the state, never change it, so the
  cached object is shared.
- `fast_downward.pddl2sas(domain, problem, ...)`: PDDL -> SAS translation, ~1 s a call, done
  twice by every `load` and again twice by every `reset` of the same game. Keyed by all its
  arguments (a small LRU: the games of one worker's recent episodes). Callers only read the
  task and the SAS text.

The outputs are identical with and without the patch (tests/environments/test_alfworld.py
compares whole transcripts). `apply` is idempotent and `remove` restores the originals (tests).
The caches are process-wide; like textworld's own parsers they are not meant for concurrent
threads (use one env per process).
"""

from __future__ import annotations

import copy
import functools
import threading
from typing import Any

_LOCK = threading.Lock()
_ORIGINALS: dict[str, Any] = {}  # name -> original callable, while the patch is applied


def is_applied() -> bool:
    return bool(_ORIGINALS)


def apply(translation: bool = True) -> bool:
    """Patch textworld (and fast_downward's translator when `translation`); True if this call
    patched anything, False if it was already applied."""
    import fast_downward
    from textworld.envs.pddl import logic as pddl_logic  # noqa: F401 - imports fast_downward's users
    from textworld.envs.pddl import textgen
    from textworld.logic import Rule

    with _LOCK:
        if _ORIGINALS:
            return False
        parse = textgen._parse_and_convert
        query = Rule.__dict__["parse_conjunctive_query"]  # the classmethod object itself
        parse_cached = functools.lru_cache(maxsize=1 << 16)(
            lambda text, rule_name: parse(text, rule_name=rule_name)
        )
        query_cached = functools.lru_cache(maxsize=1 << 16)(functools.partial(query.__func__, Rule))

        def memo_parse(text: str, rule_name: str | None = None, **kwargs: Any) -> Any:
            if not isinstance(text, str) or rule_name is None or any(kwargs.values()):  # e.g. trace=True
                return parse(text, rule_name=rule_name, **kwargs)
            return copy.deepcopy(parse_cached(text, rule_name))

        def memo_query(cls: type, expr: str) -> Any:
            return query_cached(expr)

        _ORIGINALS["textgen._parse_and_convert"] = parse
        _ORIGINALS["Rule.parse_conjunctive_query"] = query
        textgen._parse_and_convert = memo_parse
        Rule.parse_conjunctive_query = classmethod(memo_query)
        if translation:
            translate = fast_downward.pddl2sas
            translate_cached = functools.lru_cache(maxsize=16)(translate)

            def memo_translate(
                domain: str, problem: str, verbose: bool = False, optimize: bool = False
            ) -> Any:
                return translate_cached(domain, problem, verbose, optimize)

            _ORIGINALS["fast_downward.pddl2sas"] = translate
            fast_downward.pddl2sas = memo_translate
        return True


def remove() -> bool:
    """Restore textworld's own functions and drop the caches; True if the patch was applied."""
    import fast_downward
    from textworld.envs.pddl import textgen
    from textworld.logic import Rule

    with _LOCK:
        if not _ORIGINALS:
            return False
        textgen._parse_and_convert = _ORIGINALS.pop("textgen._parse_and_convert")
        Rule.parse_conjunctive_query = _ORIGINALS.pop("Rule.parse_conjunctive_query")
        if "fast_downward.pddl2sas" in _ORIGINALS:
            fast_downward.pddl2sas = _ORIGINALS.pop("fast_downward.pddl2sas")
        return True
