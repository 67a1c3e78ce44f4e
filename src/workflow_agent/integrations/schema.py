"""The integration definition format (``definition.yaml``), as typed models.

docs/writing-integrations.md explains every field; this module is the authority.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from workflow_agent.validators import Regex

NAME_PATTERN = r"^[a-z0-9][a-z0-9-]*$"
ENV_NAME_PATTERN = r"^[A-Z_][A-Z0-9_]*$"
ACTIONS = ("install", "verify", "uninstall")
#: Template variables the tool provides; a parameter may not hide one of them.
RESERVED_NAMES = frozenset({"params", "facts", "integration", "method", "action", "uninstall",
                            "purge", "remove_users", "remove_groups", "remove_paths",
                            "remove_packages"})

ParameterType = Literal["string", "integer", "number", "boolean", "list"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ParameterSpec(_Strict):
    """One parameter an integration accepts."""

    type: ParameterType = "string"
    description: str = ""
    required: bool = False
    default: Any = None
    secret: bool = False
    #: Regular expression the whole value must match (strings, and each list item).
    pattern: Regex | None = None
    choices: list[Any] | None = None
    minimum: float | None = None
    maximum: float | None = None
    #: For lists: the fewest items a value may have.
    min_items: Annotated[int, Field(ge=1)] | None = None
    #: For secrets: the environment variable the scripts read the value from.
    env: Annotated[str, Field(pattern=ENV_NAME_PATTERN)] | None = None

    @model_validator(mode="after")
    def _secret_rules(self) -> ParameterSpec:
        if self.secret and self.default is not None:
            raise ValueError("a secret parameter cannot have a default")
        if self.secret and self.env is None:
            raise ValueError("a secret parameter needs 'env': the variable scripts read it from")
        if not self.secret and self.env is not None:
            raise ValueError("'env' is only for secret parameters")
        if self.min_items is not None and self.type != "list":
            raise ValueError("'min_items' is only for list parameters")
        return self


class PlatformSpec(_Strict):
    """A platform the integration supports; empty lists mean any."""

    os_family: str
    distros: list[str] = []
    versions: list[str] = []
    arch: list[str] = []


class TemplateSet(_Strict):
    """Template files (relative to the integration's ``templates/``) for each action."""

    install: str
    verify: str | None = None
    uninstall: str | None = None


class MethodSpec(_Strict):
    """One way to install the integration, with the facts it needs."""

    name: Annotated[str, Field(pattern=NAME_PATTERN)]
    description: str = ""
    #: Facts this method needs, e.g. ``{package_manager: apt, init_system: [systemd, sysv]}``.
    requires: dict[str, str | list[str]] = {}
    #: 1 (one package command) .. 5 (build from source); lower wins.
    complexity: Annotated[int, Field(ge=1, le=5)] = 3
    #: 1 (unsigned download) .. 5 (signed distribution package); higher wins.
    security: Annotated[int, Field(ge=1, le=5)] = 3
    templates: TemplateSet


class UninstallSpec(_Strict):
    """What uninstall removes, and where to look for anything left behind."""

    packages: list[str] = []
    #: Removed on a purge, but only when the install created them.
    paths: list[str] = []
    #: Removed on a purge, but only when the install created them.
    users: list[str] = []
    groups: list[str] = []
    #: Directories snapshotted before install and compared after uninstall.
    watch: list[str] = ["/etc", "/usr", "/var/lib", "/opt"]
    #: Extra glob patterns (beyond the package-manager bookkeeping) not to compare.
    ignore: list[str] = []

    @field_validator("paths", "watch")
    @classmethod
    def _absolute(cls, value: list[str]) -> list[str]:
        for path in value:
            if not path.startswith("/") or ".." in path.split("/"):
                raise ValueError(f"{path!r} must be an absolute path without '..'")
        return value


class Definition(_Strict):
    """A whole ``definition.yaml``."""

    name: Annotated[str, Field(pattern=NAME_PATTERN)]
    version: str
    description: str
    parameters: dict[str, ParameterSpec] = {}
    platforms: list[PlatformSpec]
    methods: Annotated[list[MethodSpec], Field(min_length=1)]
    #: Verification checks; string values are Jinja2 expressions over the parameters.
    checks: list[dict[str, Any]] = []
    uninstall: UninstallSpec = UninstallSpec()
    #: Seconds each action's script may run before it is killed.
    timeouts: dict[Literal["install", "verify", "uninstall"], float] = {}

    @field_validator("parameters")
    @classmethod
    def _parameter_names(cls, value: dict[str, ParameterSpec]) -> dict[str, ParameterSpec]:
        for name in value:
            if not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
                raise ValueError(f"parameter name {name!r} must be lower_snake_case")
            if name in RESERVED_NAMES:
                raise ValueError(f"parameter name {name!r} is a built-in template variable")
        return value

    @model_validator(mode="after")
    def _unique_methods(self) -> Definition:
        names = [m.name for m in self.methods]
        if len(names) != len(set(names)):
            raise ValueError("method names must be unique")
        return self
