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
    """All integrations visible to this run, by name. Later sources override earlier ones:
    built-ins < entry points < plugin folders (in the order given).

    Folder integrations are loaded when asked for by name (a folder is named after its
    integration), so one command reads one definition, and a broken definition stops
    only the commands that need it. Entry points are loaded on first use.
    """

    def __init__(
        self,
        folders: Sequence[tuple[Path, str]] = (),
        *,
        entry_points: bool = True,
    ) -> None:
        # (folder, source), lowest precedence first.
        self._folders = list(folders)
        self._entry_points = entry_points
        self._loaded: dict[Path, Integration] = {}
        self._from_entry_points: dict[str, Integration] | None = None

    @classmethod
    def discover(
        cls, plugin_dirs: Sequence[Path] = (), *, entry_points: bool = True
    ) -> Registry:
        """Built-ins, then entry points, then each plugin folder's sub-folders."""
        folders = [(f, "builtin") for f in sorted(BUILTIN_DIR.iterdir())
                   if (f / "definition.yaml").is_file()]
        plugin_folders: list[tuple[Path, str]] = []
        for plugin_dir in plugin_dirs:
            if not plugin_dir.is_dir():
                raise DefinitionError(str(plugin_dir), "(plugin folder)", "is not a directory")
            plugin_folders += [(f, f"plugin folder {plugin_dir}")
                               for f in sorted(plugin_dir.iterdir())
                               if (f / "definition.yaml").is_file()]
        return cls([*folders, *plugin_folders], entry_points=entry_points)

    def _load(self, folder: Path, source: str) -> Integration:
        if folder not in self._loaded:
            integration = load_integration(folder, source=source)
            if integration.name != folder.name:
                raise DefinitionError(
                    str(folder / "definition.yaml"), "name",
                    f"is {integration.name!r} but the folder is {folder.name!r}; "
                    "name the folder after the integration",
                )
            self._loaded[folder] = integration
        return self._loaded[folder]

    def _entry_point_map(self) -> dict[str, Integration]:
        if self._from_entry_points is None:
            found = _entry_point_integrations() if self._entry_points else ()
            self._from_entry_points = {i.name: i for i in found}
        return self._from_entry_points

    def _lookup(self, name: str) -> Integration | None:
        for folder, source in reversed(self._folders):
            if folder.name == name and source != "builtin":
                return self._load(folder, source)
        if name in self._entry_point_map():
            return self._entry_point_map()[name]
        for folder, source in self._folders:
            if folder.name == name:
                return self._load(folder, source)
        return None

    def names(self) -> list[str]:
        """Every integration name, sorted."""
        return sorted({*(f.name for f, _ in self._folders), *self._entry_point_map()})

    def get(self, name: str) -> Integration:
        """The named integration, or ``UnknownIntegrationError`` with close names."""
        found = self._lookup(name)
        if found is not None:
            return found
        names = self.names()
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
        close += [n for n in names if name in n and n not in close]
        raise UnknownIntegrationError(name, close[:3], names)

    def __iter__(self) -> Iterator[Integration]:
        """Every integration, loaded, sorted by name."""
        return iter([self.get(name) for name in self.names()])
