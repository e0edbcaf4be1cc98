"""PCRE include/exclude rules over full module paths (``model.layers.0.mlp.experts``).

``+:regex`` includes, ``-:regex`` excludes, a bare ``regex`` includes.  A path passes when it
matches at least one include rule and no exclude rule (exclusion wins).  No rules: all pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pcre

__all__ = ["PathFilter", "compile_filter"]


@dataclass(frozen=True)
class PathFilter:
    """Compiled include and exclude rules."""

    include: tuple[Any, ...] = ()
    exclude: tuple[Any, ...] = ()
    active: bool = False

    def allows(self, path: str) -> bool:
        """True when ``path`` passes the rules."""
        if not self.active:
            return True
        if any(rule.search(path) for rule in self.exclude):
            return False
        return any(rule.search(path) for rule in self.include)


def compile_filter(rules: Sequence[str] | None) -> PathFilter:
    """Compile ``rules``; raise ``TypeError`` for a non-list and ``ValueError`` naming a bad rule."""
    if rules is None:
        return PathFilter()
    if isinstance(rules, (str, bytes)) or not isinstance(rules, Sequence):
        raise TypeError(f"filter must be a list of rule strings, got {type(rules).__name__}: {rules!r}")
    include: list[Any] = []
    exclude: list[Any] = []
    for rule in rules:
        if not isinstance(rule, str):
            raise TypeError(f"filter rule must be a string, got {type(rule).__name__}: {rule!r}")
        if rule.startswith("-:"):
            target, pattern = exclude, rule[2:]
        else:
            target, pattern = include, rule[2:] if rule.startswith("+:") else rule
        if not pattern:
            raise ValueError(f"invalid filter rule {rule!r}: empty pattern")
        try:
            target.append(pcre.compile(pattern))
        except Exception as error:  # pypcre raises a family of PcreError subclasses
            raise ValueError(f"invalid filter rule {rule!r}: {error}") from error
    return PathFilter(tuple(include), tuple(exclude), active=True)
