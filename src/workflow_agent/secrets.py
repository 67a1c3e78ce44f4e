"""Keeping secret values out of everything that is stored, logged or shown."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from datetime import datetime

MASK = "********"


class Redactor:
    """Replaces every known secret value with ``MASK`` in text.

    Values shorter than 4 characters are not registered: masking them would mangle
    unrelated text, and a secret that short protects nothing anyway.
    """

    def __init__(self, values: Iterable[str] = ()) -> None:
        self._values: set[str] = set()
        #: ``_values``, longest first: the order ``redact`` replaces them in.
        self._longest_first: tuple[str, ...] = ()
        self.add(values)

    def add(self, values: Iterable[str]) -> None:
        """Register more secret values."""
        self._values.update(v for v in values if len(v) >= 4)
        self._longest_first = tuple(sorted(self._values, key=len, reverse=True))

    def redact(self, text: str) -> str:
        """``text`` with every registered secret replaced by ``MASK`` (longest first)."""
        for value in self._longest_first:
            if value in text:
                text = text.replace(value, MASK)
        return text

    def redact_value(self, value: object) -> object:
        """``value`` with every string in it (mapping keys too) redacted, JSON-ready."""
        if isinstance(value, str):
            return self.redact(value)
        if value is None or isinstance(value, bool | int | float):
            return value
        if isinstance(value, Mapping):
            return {self.redact(str(key)): self.redact_value(item) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return [self.redact_value(item) for item in value]
        if isinstance(value, set | frozenset):
            return sorted((self.redact_value(item) for item in value), key=str)
        if isinstance(value, datetime):
            return value.isoformat()
        # Paths, enums, ...: stored as their text, like json.dumps(default=str) would.
        return self.redact(str(value))

    def dump_json(self, value: object) -> str:
        """``value`` as JSON text with every string in it redacted."""
        # Redacting the structure, not just the JSON text, matters: a secret containing
        # a quote, a backslash or a control character is escaped in JSON, so the text
        # no longer contains it literally and a text-only redaction would miss it.
        return self.redact(json.dumps(self.redact_value(value), ensure_ascii=False))

    def redact_json_text(self, content: str) -> str:
        """``content`` redacted; if it is JSON, also the strings escaped inside it."""
        redacted = self.redact(content)
        if not self._values or not redacted.lstrip().startswith(("{", "[", '"')):
            return redacted
        try:
            parsed = json.loads(redacted)
        except ValueError:
            return redacted
        cleaned = self.redact_value(parsed)
        if cleaned == parsed:
            # Keep the caller's exact text (formatting, key order) when nothing changed.
            return redacted
        return self.redact(json.dumps(cleaned, ensure_ascii=False))

    def __bool__(self) -> bool:
        return bool(self._values)
