"""Finding integrations: built-ins, the ``workflow_agent.integrations`` entry points, and
plugin folders named in the configuration.

An integration is a folder holding ``definition.yaml`` and ``templates/``. An entry point
may name such a folder (a ``str``/``Path``, or a callable returning one) or an
``IntegrationBase`` subclass whose ``root`` is the folder.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar

import yaml
from pydantic import ValidationError

from workflow_agent.errors import DefinitionError, ParameterError, UnknownIntegrationError
from workflow_agent.integrations.params import SAMPLES, checked_default
from workflow_agent.integrations.schema import ACTIONS, Definition

BUILTIN_DIR = Path(__file__).parent / "builtin"
ENTRY_POINT_GROUP = "workflow_agent.integrations"


class IntegrationBase:
    """Optional Python side of an integration, for logic a definition cannot express.

    Subclass it, set ``root`` to the folder holding ``definition.yaml``, and override
    ``template_context`` to add values the templates see (they are shell-quoted like
    parameters when rendered).
    """

    root: ClassVar[Path]

    def template_context(self, facts: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
        """Extra template variables for these facts and parameters."""
        return {}


@dataclass(frozen=True)
class Integration:
    """A loaded, validated integration."""

    definition: Definition
    root: Path
    source: str
    extension: IntegrationBase = field(default_factory=IntegrationBase)

    @property
    def name(self) -> str:
        """The integration's name."""
        return self.definition.name

    @property
    def templates_dir(self) -> Path:
        """The folder template paths are relative to."""
        return self.root / "templates"


def _error_field(error: dict[str, Any]) -> str:
    return ".".join(str(part) for part in error["loc"]) or "(top level)"


def load_integration(
    root: Path, *, source: str = "folder", extension: IntegrationBase | None = None
) -> Integration:
    """Load and validate the integration in ``root``; ``DefinitionError`` names file + field."""
    path = root / "definition.yaml"
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise DefinitionError(str(path), "(file)", "no definition.yaml in this folder") from exc
    except yaml.YAMLError as exc:
        raise DefinitionError(str(path), "(file)", f"not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise DefinitionError(str(path), "(top level)", "must be a mapping of fields")
    try:
        definition = Definition.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise DefinitionError(str(path), _error_field(dict(first)), first["msg"]) from exc
    integration = Integration(definition, root, source, extension or IntegrationBase())
    _check_templates(integration, path)
    _check_parameters_and_checks(integration, path)
    return integration


def _check_templates(integration: Integration, path: Path) -> None:
    for index, method in enumerate(integration.definition.methods):
        for action in ACTIONS:
            template = getattr(method.templates, action)
            if template is not None and not (integration.templates_dir / template).is_file():
                raise DefinitionError(
                    str(path),
                    f"methods.{index}.templates.{action}",
                    f"template {template!r} not found in {integration.templates_dir}",
                )


def _check_parameters_and_checks(integration: Integration, path: Path) -> None:
    # Defaults must pass their own type, range and pattern; and every check must render
    # with the defaults (a stand-in where there is none), so a typo fails at load.
    from workflow_agent.scripting.render import render_checks

    values: dict[str, Any] = {}
    for name, spec in integration.definition.parameters.items():
        if spec.secret:
            continue  # checks never see secrets
        if spec.default is None:
            values[name] = SAMPLES[spec.type]
            continue
        try:
            values[name] = checked_default(name, spec)
        except ParameterError as exc:
            raise DefinitionError(str(path), f"parameters.{name}.default", exc.message) from exc
    try:
        render_checks(integration.definition.checks, values)
    except ValueError as exc:
        raise DefinitionError(str(path), "checks", str(exc)) from exc


def _entry_point_integrations() -> Iterable[Integration]:
    for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
        source = f"entry point {entry.name} ({entry.value})"
        try:
            obj = entry.load()
        except (ImportError, AttributeError) as exc:
            raise DefinitionError(source, "(entry point)", f"cannot be loaded: {exc}") from exc
        if isinstance(obj, type) and issubclass(obj, IntegrationBase):
            yield load_integration(Path(obj.root), source=source, extension=obj())
            continue
        if callable(obj):
            obj = obj()
        if not isinstance(obj, str | Path):
            raise DefinitionError(
                source, "(entry point)", "must name a folder or an IntegrationBase subclass"
            )
        yield load_integration(Path(obj), source=source)


class Registry:
    """All integrations visible to this run, by name. Later sources override earlier ones."""

    def __init__(self, integrations: Iterable[Integration]) -> None:
        self._by_name: dict[str, Integration] = {}
        for integration in integrations:
            self._by_name[integration.name] = integration

    @classmethod
    def discover(
        cls, plugin_dirs: Sequence[Path] = (), *, entry_points: bool = True
    ) -> Registry:
        """Built-ins, then entry points, then each plugin folder's sub-folders."""
        found: list[Integration] = [
            load_integration(folder, source="builtin")
            for folder in sorted(BUILTIN_DIR.iterdir())
            if (folder / "definition.yaml").is_file()
        ]
        if entry_points:
            found.extend(_entry_point_integrations())
        for plugin_dir in plugin_dirs:
            if not plugin_dir.is_dir():
                raise DefinitionError(str(plugin_dir), "(plugin folder)", "is not a directory")
            found.extend(
                load_integration(folder, source=f"plugin folder {plugin_dir}")
                for folder in sorted(plugin_dir.iterdir())
                if (folder / "definition.yaml").is_file()
            )
        return cls(found)

    def names(self) -> list[str]:
        """Every integration name, sorted."""
        return sorted(self._by_name)

    def get(self, name: str) -> Integration:
        """The named integration, or ``UnknownIntegrationError`` with close names."""
        try:
            return self._by_name[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._by_name, n=3, cutoff=0.5)
            close += [n for n in self._by_name if name in n and n not in close]
            raise UnknownIntegrationError(name, close[:3], self.names()) from None

    def __iter__(self) -> Iterator[Integration]:
        return iter(self._by_name[name] for name in self.names())
