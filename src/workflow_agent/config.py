"""``WorkflowConfiguration``: every setting, merged in one place.

Precedence, lowest first: typed defaults < YAML file (``--config`` or
``WORKFLOW_AGENT_CONFIG_FILE``) < ``WORKFLOW_AGENT_*`` environment variables (nested with
``__``, e.g. ``WORKFLOW_AGENT_SANDBOX__NETWORK=none``) < command-line flags.
Environment variables are read here and nowhere else.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PlainValidator, ValidationError
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


class DockerSettings(BaseModel):
    """How ``docker://`` and ``docker-image://`` targets reach the engine."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: The engine's URL (``unix:///var/run/docker.sock``, ``tcp://host:2376``,
    #: ``ssh://user@host``); None: ``DOCKER_HOST``, else the local socket.
    host: str | None = None
    #: Whom scripts run as in the container; "0" (root) works without /etc/passwd.
    user: str = "0"
    #: Network mode of ``docker-image://`` containers ("host" shares this machine's
    #: network); None: the engine's default.
    network: str | None = None
    #: ``docker-image://`` pulls the image when the engine does not have it.
    pull: bool = True
    #: Seconds one engine API call may take.
    api_timeout: float = Field(default=60.0, gt=0)


class KnowledgeSettings(BaseModel):
    """How documentation is fetched into the knowledge base (``knowledge add``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Seconds for connecting and for each read when fetching a URL.
    fetch_timeout: float = Field(default=20.0, gt=0)
    #: Largest document accepted, in bytes (decoded), enforced while it streams in.
    max_document_bytes: int = Field(default=5 * 1024 * 1024, gt=0)


def _host_key_policy(value: Any) -> bool | Literal["accept-new"]:
    """``ssh.check_host_keys``: a boolean (as pydantic reads one) or ``accept-new``."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text == "accept-new":
        return "accept-new"
    if text in ("1", "true", "yes", "on", "y", "t"):
        return True
    if text in ("0", "false", "no", "off", "n", "f"):
        return False
    raise ValueError(f"{value!r} is none of true, false, accept-new")


class SshSettings(BaseModel):
    """How ``ssh://`` targets connect (see ``execution/ssh.py``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: known_hosts file the host key is checked against; None: ~/.ssh/known_hosts.
    known_hosts: Path | None = None
    #: Refuse hosts whose key is not in known_hosts. ``accept-new``: a host known_hosts
    #: has no key for is trusted the first time and its key added there (what OpenSSH's
    #: ``StrictHostKeyChecking=accept-new`` does); a changed key is refused all the same.
    #: Turning this off accepts any key (a man in the middle too): throwaway hosts only.
    check_host_keys: Annotated[bool | Literal["accept-new"],
                               PlainValidator(_host_key_policy)] = True
    #: Private key files to offer; empty: ~/.ssh/id_* (and the agent, if allowed).
    client_keys: list[Path] = []
    #: Offer the keys of the running ssh-agent (``SSH_AUTH_SOCK``).
    use_agent: bool = True
    #: Reach targets through this host: ``[ssh://][user@]host[:port]``.
    jump_host: str | None = None
    #: Seconds to wait for the TCP connection and the SSH handshake.
    connect_timeout: float = 10.0
    #: Seconds between keepalives; a host silent for three of them counts as lost.
    keepalive_interval: float = 15.0
    #: Run scripts through ``sudo`` when the login user is not root.
    sudo: bool = True
    #: Name of the environment variable holding the sudo password. Unset or empty:
    #: ask on the terminal when there is one, else try sudo without a password.
    sudo_password_env: str | None = None

    def sudo_password(self) -> str | None:
        """The value of ``sudo_password_env``, if set and not empty (read here because
        environment variables are read in this module only)."""
        return os.environ.get(self.sudo_password_env) or None if self.sudo_password_env else None


class LLMProviderSettings(BaseModel):
    """One LLM provider of the fallback chain (``llm.providers``), tried in list order."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: ``openai`` covers every OpenAI-compatible server (OpenAI, Ollama, llama.cpp, vLLM).
    kind: Literal["openai", "anthropic", "gemini"]
    model: str = Field(min_length=1)
    #: The API's address, e.g. ``http://127.0.0.1:11434/v1`` for Ollama; None: the
    #: provider's official service.
    base_url: str | None = None
    #: NAME of the environment variable holding the API key (never the key itself).
    #: None: OPENAI_API_KEY / ANTHROPIC_API_KEY / GEMINI_API_KEY for the official
    #: service, and no key for a ``base_url`` (a local server is never sent a cloud key).
    api_key_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    #: Seconds one attempt may take.
    timeout: float = Field(default=120.0, gt=0)
    #: Retries after a timeout, rate limit (429), server error (5xx) or lost connection.
    max_retries: int = Field(default=2, ge=0, le=10)
    #: US dollars per million prompt / completion tokens; both set: usage has a cost.
    prompt_cost_per_mtok: float | None = Field(default=None, ge=0)
    completion_cost_per_mtok: float | None = Field(default=None, ge=0)


class LLMSettings(BaseModel):
    """The optional LLM (``workflow_agent.llm``): nothing needs one unless asked to."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: The fallback chain; empty: no LLM configured.
    providers: list[LLMProviderSettings] = []
    #: Keep answers in the history store, keyed by a hash of the redacted prompt.
    cache: bool = True
    #: ``--approve`` may run LLM-written scripts without asking; otherwise they always
    #: need an interactive confirmation.
    allow_unattended: bool = False


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
    docker: DockerSettings = DockerSettings()
    ssh: SshSettings = SshSettings()
    knowledge: KnowledgeSettings = KnowledgeSettings()
    llm: LLMSettings = LLMSettings()
    #: Seconds to wait for checks to pass after install (daemons take a moment).
    verify_timeout: float = 20.0
    #: Default script timeout when the definition names none.
    script_timeout: float = 600.0
    #: Run the install script on a copy-on-write copy of the target first, show what it
    #: would change and back up exactly that before the real run. None (the default):
    #: install rehearses where the target supports it, plan only when asked.
    rehearse: bool | None = None
    #: When an install fails (script error, timeout, verification): undo what it
    #: changed (``rollback``) or leave the target as the failure left it (``keep``).
    on_failure: Literal["rollback", "keep"] = "rollback"
    #: How a failed install is undone: ``staged`` undoes this workflow only (a failed
    #: reconfiguration returns to the configuration that worked); ``full`` also undoes
    #: the earlier installs of the integration still in force.
    rollback_strategy: Literal["staged", "full"] = "staged"
    #: Prove rollback: the install script fails on purpose right after its N-th
    #: top-level command (1-based), as if that step had broken.
    fail_after_step: int | None = Field(default=None, ge=0)
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

    @property
    def knowledge_database(self) -> Path:
        """The knowledge base file (SQLite with FTS5, apart from history)."""
        return self.data_dir / "knowledge.db"

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
