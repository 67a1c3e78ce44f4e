"""Turning user-supplied parameter values into typed, checked values and secrets."""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from workflow_agent.errors import ParameterError
from workflow_agent.integrations.schema import Definition, ParameterSpec
from workflow_agent.secrets import MASK

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


@dataclass(frozen=True)
class ResolvedParams:
    """Checked parameter values. Secrets are kept apart and reach scripts only as env."""

    values: dict[str, Any]
    secrets: dict[str, str]
    #: Environment variable name -> secret value, for the script's environment.
    secret_env: dict[str, str]

    def masked(self) -> dict[str, Any]:
        """Every parameter, secrets replaced by a mask: safe to store and show."""
        return {**self.values, **{name: MASK for name in self.secrets}}


def _coerce(name: str, spec: ParameterSpec, value: Any) -> Any:
    kind = spec.type
    if isinstance(value, str) and "\x00" in value:
        raise ParameterError(name, "contains a NUL byte, which no script can carry")
    try:
        if kind == "integer":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind == "number":
            return float(value)
        if kind == "boolean":
            if isinstance(value, bool):
                return value
            lowered = str(value).strip().lower()
            if lowered in _TRUE | _FALSE:
                return lowered in _TRUE
            raise ValueError
        if kind == "list":
            if isinstance(value, list | tuple):
                return [str(item) for item in value]
            return [item.strip() for item in str(value).split(",") if item.strip()]
        return value if isinstance(value, str) else str(value)
    except ValueError:
        raise ParameterError(
            name, f"{value!r} is not a valid {kind}", hint=spec.description or None
        ) from None


def _check(name: str, spec: ParameterSpec, value: Any) -> None:
    if spec.min_items is not None and isinstance(value, list) and len(value) < spec.min_items:
        raise ParameterError(
            name, f"needs at least {spec.min_items} item(s), got {len(value)}",
            hint=spec.description or None,
        )
    if spec.choices is not None:
        for item in value if isinstance(value, list) else [value]:
            if item not in spec.choices:
                raise ParameterError(
                    name, f"{item!r} is not one of {', '.join(map(str, spec.choices))}"
                )
    if isinstance(value, int | float) and not isinstance(value, bool):
        if spec.minimum is not None and value < spec.minimum:
            raise ParameterError(name, f"{value} is below the minimum {spec.minimum:g}")
        if spec.maximum is not None and value > spec.maximum:
            raise ParameterError(name, f"{value} is above the maximum {spec.maximum:g}")
    if spec.pattern is not None:
        items = value if isinstance(value, list) else [value]
        for item in items:
            if not re.fullmatch(spec.pattern, str(item)):
                shown = "(secret value)" if spec.secret else repr(item)
                raise ParameterError(
                    name,
                    f"{shown} does not match the pattern {spec.pattern}",
                    hint=spec.description or None,
                )


#: A stand-in value of each type, to check a definition's checks without real values.
SAMPLES: dict[str, Any] = {"string": "x", "integer": 1, "number": 1.0, "boolean": False,
                           "list": []}


def checked_default(name: str, spec: ParameterSpec) -> Any:
    """The default coerced and checked like a given value (``ParameterError`` if bad)."""
    value = _coerce(name, spec, spec.default)
    _check(name, spec, value)
    return value


def resolve_params(
    definition: Definition, given: Mapping[str, Any], environ: Mapping[str, str]
) -> ResolvedParams:
    """Check ``given`` against the definition; fill defaults; read secrets from ``environ``.

    A secret may be given as a parameter, but the safe way is its environment variable
    (``ParameterSpec.env``): command-line arguments are visible to every local user.
    """
    for name in given:
        if name not in definition.parameters:
            close = difflib.get_close_matches(name, definition.parameters, n=1)
            known = ", ".join(sorted(definition.parameters)) or "none"
            hint = f"Did you mean {close[0]!r}?" if close else f"Known parameters: {known}"
            raise ParameterError(name, f"unknown for {definition.name}", hint=hint)
    values: dict[str, Any] = {}
    secrets: dict[str, str] = {}
    secret_env: dict[str, str] = {}
    for name, spec in definition.parameters.items():
        if name in given:
            raw = given[name]
        elif spec.secret and spec.env and spec.env in environ:
            raw = environ[spec.env]
        elif spec.default is not None:
            raw = spec.default
        elif spec.required:
            where = f" or set the environment variable {spec.env}" if spec.env else ""
            raise ParameterError(
                name, "is required", hint=f"Pass --param {name}=VALUE{where}. {spec.description}"
            )
        else:
            continue
        value = _coerce(name, spec, raw)
        _check(name, spec, value)
        if spec.secret:
            assert spec.env is not None  # enforced by the schema
            secrets[name] = str(value)
            secret_env[spec.env] = str(value)
        else:
            values[name] = value
    return ResolvedParams(values, secrets, secret_env)
