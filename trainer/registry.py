"""A tiny name -> (function, params dataclass) registry, shared by advantages, losses and aggregation.

Config selects a variant by `name` and passes its `params` as a plain dict; `Registry.build`
checks the name and every key against the variant's own dataclass and returns a
`functools.partial` with the validated params bound. Errors list the valid names/keys.

This module knows nothing about tensors or about which registries exist; stdlib only.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class NoParams:
    """Params of a variant that has no knobs."""


@dataclass(frozen=True)
class Entry:
    """One registered variant.

    `needs` names optional inputs the variant reads (e.g. "entropy", "ref_logprobs"); it is a
    fixed set or a function of the params, so a flag like `entropy_adv_coef=0` can drop a need.
    `flags` carries free-form metadata (e.g. a recommended aggregation).
    """

    name: str
    fn: Callable[..., Any]
    params: type
    needs: frozenset[str] | Callable[[Any], Iterable[str]] = frozenset()
    flags: Mapping[str, Any] = field(default_factory=dict)

    def needs_for(self, params: Any) -> frozenset[str]:
        needs = self.needs(params) if callable(self.needs) else self.needs
        return frozenset(needs)


class Registry:
    """Maps names to `Entry`s. One instance per kind (ADVANTAGES, POLICY_LOSSES, ...)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def register(
        self,
        name: str,
        *,
        params: type = NoParams,
        needs: Iterable[str] | Callable[[Any], Iterable[str]] = (),
        **flags: Any,
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator: `@REG.register("name", params=ParamsDataclass, needs={"entropy"})`."""
        if not dataclasses.is_dataclass(params):
            raise TypeError(f"{self.kind} {name!r}: params must be a dataclass, got {params!r}")
        needs_value = needs if callable(needs) else frozenset(needs)

        def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._entries:
                raise ValueError(
                    f"{self.kind} {name!r} is already registered "
                    f"(by {self._entries[name].fn.__module__}.{self._entries[name].fn.__qualname__})"
                )
            self._entries[name] = Entry(name, fn, params, needs_value, dict(flags))
            return fn

        return decorator

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def get(self, name: str) -> Entry:
        if name not in self._entries:
            raise KeyError(
                f"unknown {self.kind} {name!r}; registered {self.kind}s: {', '.join(self.names())}"
            )
        return self._entries[name]

    def make_params(self, name: str, params: Mapping[str, Any] | Any | None = None) -> Any:
        """Validate a params dict (or an instance of the dataclass) into the variant's dataclass."""
        entry = self.get(name)
        if params is None:
            return entry.params()
        if isinstance(params, entry.params):
            return params
        if not isinstance(params, Mapping):
            raise TypeError(
                f"{self.kind} {name!r}: params must be a dict or {entry.params.__name__}, "
                f"got {type(params).__name__}"
            )
        fields = {f.name: f for f in dataclasses.fields(entry.params)}
        unknown = sorted(set(params) - set(fields))
        if unknown:
            valid = ", ".join(fields) if fields else "(none: this variant takes no params)"
            raise KeyError(f"{self.kind} {name!r}: unknown param(s) {unknown}; valid params: {valid}")
        hints = typing.get_type_hints(entry.params)
        checked = {}
        for key, value in params.items():
            hint = hints.get(key, Any)
            if not _matches(value, hint):
                raise TypeError(
                    f"{self.kind} {name!r}: param {key!r}={value!r} "
                    f"should be {_type_name(hint)}, got {type(value).__name__}"
                )
            checked[key] = float(value) if hint is float else value
        return entry.params(**checked)

    def build(self, name: str, params: Mapping[str, Any] | Any | None = None) -> functools.partial:
        """Return `partial(fn, params=<validated dataclass>)`.

        The partial also carries `.name`, `.params`, `.needs` (frozenset of optional inputs
        to compute, e.g. {"entropy"}), `.needs_entropy` and `.flags`.
        """
        entry = self.get(name)
        bound = self.make_params(name, params)
        built = functools.partial(entry.fn, params=bound)
        built.name = name  # type: ignore[attr-defined]
        built.params = bound  # type: ignore[attr-defined]
        built.needs = entry.needs_for(bound)  # type: ignore[attr-defined]
        built.needs_entropy = "entropy" in built.needs  # type: ignore[attr-defined]
        built.flags = entry.flags  # type: ignore[attr-defined]
        return built


def _matches(value: Any, hint: Any) -> bool:
    """Best-effort isinstance for the simple hints params use; unknown hints accept anything."""
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple) or hint in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin is dict or hint is dict:
        return isinstance(value, Mapping)
    return True


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    return getattr(hint, "__name__", None) or str(hint)
