"""A parser for the Prometheus text exposition format (and the OpenMetrics additions).

Strict about what it understands (a malformed sample or an unknown TYPE is a
``ValueError`` naming the line), lenient about what it may skip (other comments,
``# UNIT``, ``# EOF``, exemplars). Supports quoted UTF-8 metric names (``{"a.b"} 1``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Sample:
    """One sample of the Prometheus text exposition format."""

    name: str
    labels: dict[str, str] = field(default_factory=dict)
    value: float = 0.0
    timestamp: float | None = None


_TYPES = {"counter", "gauge", "histogram", "summary", "untyped", "unknown", "info",
          "stateset", "gaugehistogram"}
# Sample-name suffixes that belong to a family of the given type (text format and OpenMetrics).
_SUFFIXES = {
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "summary": ("_sum", "_count", "_created"),
    "counter": ("_total", "_created"),
    "info": ("_info",),
}
_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_QUOTED = r'"((?:[^"\\]|\\.)*)"'
_COMMENT_RE = re.compile(rf"#\s*(HELP|TYPE)\s+(?:({_NAME})|{_QUOTED})(?:\s+(.*))?$")
_NAME_RE = re.compile(_NAME)
_LABEL_RE = re.compile(rf"\s*(?:([a-zA-Z_][a-zA-Z0-9_]*)|{_QUOTED})\s*(?:=\s*{_QUOTED})?\s*([,}}])")
_CLOSE_RE = re.compile(r"\s*\}")
_ESCAPES = re.compile(r"\\(.)")


def _unescape(value: str) -> str:
    # Only \\, \" and \n are escapes; any other backslash stays as written.
    escapes = {"\\": "\\", '"': '"', "n": "\n"}
    return _ESCAPES.sub(lambda m: escapes.get(m.group(1), m.group(0)), value)


def _number(token: str, what: str) -> float:
    if "_" in token:
        raise ValueError(f"invalid {what} {token!r}")
    try:
        return float(token)  # accepts +Inf, -Inf, NaN like Go's ParseFloat
    except ValueError:
        raise ValueError(f"invalid {what} {token!r}") from None


def _parse_sample(line: str) -> Sample:
    match = _NAME_RE.match(line)
    name, pos = (match.group(), match.end()) if match else (None, 0)
    labels: dict[str, str] = {}
    brace = line.find("{", pos)
    if brace >= 0 and not line[pos:brace].strip():  # blanks may precede the brace
        pos = brace + 1
        while True:
            close = _CLOSE_RE.match(line, pos)
            if close:
                pos = close.end()
                break
            label = _LABEL_RE.match(line, pos)
            if not label:
                raise ValueError(f"malformed labels at column {pos + 1}")
            key, quoted, value, end = label.groups()
            if value is None:  # a bare quoted string is a UTF-8 metric name: {"a.b", x="y"}
                if quoted is None or name is not None:
                    raise ValueError(f"label {key or quoted!r} has no value")
                name = _unescape(quoted)
            else:
                key = key if key is not None else _unescape(quoted)
                if key in labels:
                    raise ValueError(f"duplicate label {key!r}")
                labels[key] = _unescape(value)
            pos = label.end()
            if end == "}":
                break
    if not name:
        raise ValueError("missing metric name")
    rest = line[pos:].split()
    if not rest or rest[0] == "#":
        raise ValueError("missing value")
    value = _number(rest[0], "value")
    timestamp = None
    if len(rest) > 1 and rest[1] != "#":  # "#" starts an OpenMetrics exemplar
        timestamp = _number(rest[1], "timestamp")
        if len(rest) > 2 and rest[2] != "#":
            raise ValueError(f"unexpected {rest[2]!r} after the timestamp")
    return Sample(name, labels, value, timestamp)


def _family_of(name: str, types: Mapping[str, str]) -> str:
    if name in types:
        return name
    for suffix in ("_bucket", "_sum", "_count", "_created", "_gsum", "_gcount", "_total", "_info"):
        base = name.removesuffix(suffix)
        if base != name and suffix in _SUFFIXES.get(types.get(base, ""), ()):
            return base
    return name


def parse_exposition(text: str) -> dict[str, list[Sample]]:
    """Parse the Prometheus text exposition format into family name -> samples.

    ``x_bucket``/``x_sum``/``x_count`` samples belong to family ``x`` when ``# TYPE x``
    says histogram or summary (``x_total`` when it says counter, OpenMetrics style);
    families declared by HELP/TYPE without samples map to an empty list.
    ``ValueError`` names the line of the first malformed sample or TYPE.
    """
    types: dict[str, str] = {}
    families: dict[str, list[Sample]] = {}
    samples: list[Sample] = []
    for lineno, raw in enumerate(text.split("\n"), 1):
        line = raw.strip()
        try:
            if line.startswith("#"):
                comment = _COMMENT_RE.match(line)
                if comment:  # other comments (and OpenMetrics "# EOF", "# UNIT") are skipped
                    kind, plain, quoted, rest = comment.groups()
                    name = plain if plain is not None else _unescape(quoted)
                    families.setdefault(name, [])
                    if kind == "TYPE":
                        if (rest or "").strip().lower() not in _TYPES:
                            raise ValueError(f"unknown metric type {rest!r}")
                        types[name] = (rest or "").strip().lower()
            elif line:
                samples.append(_parse_sample(line))
        except ValueError as exc:
            raise ValueError(f"line {lineno}: {exc}: {raw[:120]!r}") from None
    for sample in samples:
        families.setdefault(_family_of(sample.name, types), []).append(sample)
    return families
