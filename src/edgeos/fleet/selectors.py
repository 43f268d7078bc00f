"""Target selectors: which devices a rollout is for.

A selector is one or more comma-separated terms, all of which must hold::

    all                    every device
    group=stores           the devices enrolled into group ``stores``
    label:zone=north       the devices whose label ``zone`` is ``north``
    device=0190c3a1-...    one device

``group=stores,label:zone=north`` is the northern stores. Parsing refuses an unknown or
malformed term and names it, so a typo never widens a rollout.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from edgeos.errors import ConfigError

TermKind = Literal["all", "group", "label", "device"]

# The characters group names, label keys and values, and device ids are made of.
_WORD = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}$")
_HELP = "use all, group=G, label:K=V or device=ID, joined by commas"


@dataclass(frozen=True)
class Term:
    """One condition of a selector; ``key`` is the label key for ``label`` terms."""

    kind: TermKind
    value: str = ""
    key: str = ""

    def matches(self, device_id: str, group: str, labels: Mapping[str, str]) -> bool:
        """Whether a device with this id, group and labels satisfies the term."""
        if self.kind == "all":
            return True
        if self.kind == "group":
            return group == self.value
        if self.kind == "device":
            return device_id == self.value
        return labels.get(self.key) == self.value

    def __str__(self) -> str:
        if self.kind == "all":
            return "all"
        if self.kind == "label":
            return f"label:{self.key}={self.value}"
        return f"{self.kind}={self.value}"


@dataclass(frozen=True)
class Selector:
    """A parsed selector: every term must match."""

    terms: tuple[Term, ...]

    @property
    def groups(self) -> tuple[str, ...]:
        """The groups the selector names (each must exist for a rollout to be accepted)."""
        return tuple(t.value for t in self.terms if t.kind == "group")

    def matches(self, device_id: str, group: str, labels: Mapping[str, str]) -> bool:
        """Whether a device with this id, group and labels is selected."""
        return all(term.matches(device_id, group, labels) for term in self.terms)

    def __str__(self) -> str:
        return ",".join(str(term) for term in self.terms)


def parse_selector(text: str) -> Selector:
    """The selector ``text`` describes; ConfigError naming the first bad term otherwise."""
    if not text.strip():
        raise ConfigError(f"target is empty: {_HELP}")
    terms = tuple(_parse_term(raw.strip(), text) for raw in text.split(","))
    return Selector(terms)


def _parse_term(raw: str, text: str) -> Term:
    where = f"target {text!r}, term {raw!r}"
    if not raw:
        raise ConfigError(f"target {text!r} has an empty term: {_HELP}")
    if raw == "all":
        return Term("all")
    if raw.startswith("label:"):
        key, sep, value = raw[len("label:") :].partition("=")
        if not sep:
            raise ConfigError(f"{where}: a label term is label:KEY=VALUE")
        _check_word(key, f"{where}: label key")
        _check_word(value, f"{where}: label value")
        return Term("label", value=value, key=key)
    name, sep, value = raw.partition("=")
    if not sep or name not in ("group", "device"):
        raise ConfigError(f"{where}: unknown term; {_HELP}")
    _check_word(value, f"{where}: {name}")
    return Term("group" if name == "group" else "device", value=value)


def _check_word(value: str, what: str) -> None:
    if not _WORD.match(value):
        raise ConfigError(
            f"{what} {value!r}: use 1-128 of A-Z a-z 0-9 . _ : / @ + - "
            "starting with a letter or digit"
        )
