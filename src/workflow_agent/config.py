"""``WorkflowConfiguration``: every setting, merged in one place.

Precedence, lowest first: typed defaults < YAML file (``--config`` or
``WORKFLOW_AGENT_CONFIG_FILE``) < ``WORKFLOW_AGENT_*`` environment variables (nested with
``__``, e.g. ``WORKFLOW_AGENT_SANDBOX__NETWORK=none``) < command-line flags.
Environment variables are read here and nowhere else.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from workflow_agent.errors import ConfigurationError


def _xdg(variable: str, fallback: str) -> Path:
    base = os.environ.get(variable) or str(Path.home() / fallback)
    return Path(base) / "workflow-agent"


class SandboxSettings(BaseModel):
    """How sandbox targets are built."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    suite: str = "bookworm"
    variant: str = "minbase"
    mirror: str = "http://deb.debian.org/debian"
    #: "host" shares this machine's network (apt can reach the archive); "none" isolates.
    network: Literal["host", "none"] = "host"


class WorkflowConfiguration(BaseSettings):
    """All settings of one run."""

    model_config = SettingsConfigDict(
        env_prefix="WORKFLOW_AGENT_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    config_file: Path | None = None
    data_dir: Path = Field(default_factory=lambda: _xdg("XDG_DATA_HOME", ".local/share"))
    cache_dir: Path = Field(default_factory=lambda: _xdg("XDG_CACHE_HOME", ".cache"))
    #: SQLAlchemy URL of the history store; default: SQLite in ``data_dir``.
    history_url: str | None = None
    #: Folders whose sub-folders are integrations (definition.yaml + templates/).
    plugin_dirs: list[Path] = []
    #: Whether to load integrations from the ``workflow_agent.integrations`` entry points.
    entry_points: bool = True
    target: str = "local"
    sandbox: SandboxSettings = SandboxSettings()
    #: Seconds to wait for checks to pass after install (daemons take a moment).
    verify_timeout: float = 20.0
    #: Default script timeout when the definition names none.
    script_timeout: float = 600.0
    #: Install (and plan) first run the install script on a copy-on-write copy of the
    #: target and show what it would change. Off by default: it doubles a first
    #: install's time (the package is installed twice), until it also feeds rollback.
    rehearse: bool = False
    #: Uninstall removes configuration, users and data the install created.
    purge: bool = True
    #: Validation warnings are shown; with this set they refuse execution like errors.
    strict_validation: bool = False
    #: Seconds to wait for another workflow's lock on the same target (0: refuse at once).
    lock_wait: float = 0.0
    #: Seconds a bus request waits for its reply before failing.
    bus_timeout: float = 900.0

    @property
    def history_database(self) -> str:
        """The history store URL actually used."""
        return self.history_url or f"sqlite:///{self.data_dir / 'history.db'}"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _YamlFileSource(settings_cls, init_settings))


class _YamlFileSource(PydanticBaseSettingsSource):
    """Values from the YAML file named by ``config_file`` (flag or environment)."""

    def __init__(self, settings_cls: type[BaseSettings], init: PydanticBaseSettingsSource) -> None:
        super().__init__(settings_cls)
        self._init = init

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ returns the whole mapping

    def __call__(self) -> dict[str, Any]:
        given = self._init().get("config_file") or os.environ.get("WORKFLOW_AGENT_CONFIG_FILE")
        if not given:
            return {}
        path = Path(given)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigurationError(
                f"cannot read configuration file {path}: {exc.strerror}",
                hint="Check the path given to --config or WORKFLOW_AGENT_CONFIG_FILE.",
            ) from exc
        except yaml.YAMLError as exc:
            raise ConfigurationError(f"{path} is not valid YAML: {exc}") from exc
        if data is None:
            return {}
        if not isinstance(data, dict):
            raise ConfigurationError(f"{path} must hold a mapping of settings")
        return data


def load_configuration(**overrides: Any) -> WorkflowConfiguration:
    """Build the configuration; ``overrides`` are command-line values (``None`` = not given)."""
    given = {key: value for key, value in overrides.items() if value is not None}
    try:
        return WorkflowConfiguration(**given)
    except SettingsError as exc:
        # e.g. WORKFLOW_AGENT_PLUGIN_DIRS=/x: list settings from the environment are JSON.
        raise ConfigurationError(
            f"invalid setting: {exc}",
            hint='List and mapping settings in the environment are JSON, e.g. '
            "WORKFLOW_AGENT_PLUGIN_DIRS='[\"/srv/integrations\"]'.",
        ) from exc
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigurationError(
            f"invalid setting {where}: {first['msg']}",
            hint="Settings come from --config FILE, WORKFLOW_AGENT_* variables and flags.",
        ) from exc
