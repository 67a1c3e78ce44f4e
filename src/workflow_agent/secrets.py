"""Keeping secret values out of everything that is stored, logged or shown."""

from __future__ import annotations

from collections.abc import Iterable

MASK = "********"


class Redactor:
    """Replaces every known secret value with ``MASK`` in text.

    Values shorter than 4 characters are not registered: masking them would mangle
    unrelated text, and a secret that short protects nothing anyway.
    """

    def __init__(self, values: Iterable[str] = ()) -> None:
        self._values: set[str] = set()
        self.add(values)

    def add(self, values: Iterable[str]) -> None:
        """Register more secret values."""
        self._values.update(v for v in values if len(v) >= 4)

    def redact(self, text: str) -> str:
        """``text`` with every registered secret replaced by ``MASK`` (longest first)."""
        for value in sorted(self._values, key=len, reverse=True):
            if value in text:
                text = text.replace(value, MASK)
        return text

    def __bool__(self) -> bool:
        return bool(self._values)
