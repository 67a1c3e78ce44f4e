"""The dependency container: builds each service once from the configuration.

Tests swap parts by passing them in (a bus, a history store, a target factory); nothing
else reads the configuration to build services.
"""

from __future__ import annotations

import functools
import getpass
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, cast

from workflow_agent.bus import MemoryBus, MessageBus
from workflow_agent.config import SshSettings, WorkflowConfiguration
from workflow_agent.errors import InvalidInputError
from workflow_agent.execution.pool import TargetPool
from workflow_agent.execution.target import Target
from workflow_agent.integrations.registry import Registry
from workflow_agent.secrets import Redactor
from workflow_agent.storage.baselines import BaselineIndex
from workflow_agent.storage.spool import HistorySpool, HistoryWriter

if TYPE_CHECKING:
    from workflow_agent.execution.journal import JournalStore
    from workflow_agent.llm import LLMService, UsageRecorder
    from workflow_agent.storage.history import HistoryStore

TARGET_KINDS = ("local", "sandbox", "systemd-sandbox", "docker://CONTAINER",
                "docker-image://IMAGE", "ssh://USER@HOST:PORT")
#: Throwaway targets: changing them needs no confirmation.
DISPOSABLE_KINDS = ("sandbox", "systemd-sandbox", "docker-image")


class Container:
    """Services of one run, each built on first use."""

    def __init__(
        self,
        config: WorkflowConfiguration,
        *,
        bus: MessageBus | None = None,
        history: HistoryStore | None = None,
        registry: Registry | None = None,
        target_factory: Callable[[str], Target] | None = None,
        llm: LLMService | None = None,
    ) -> None:
        self.config = config
        # A given LLM service shares its redactor: secrets this run learns mask its prompts.
        self.redactor = llm.redactor if llm is not None else Redactor()
        self._llm = llm
        self._bus = bus
        self._history = history
        self._registry = registry
        self._target_factory = target_factory
        # Guards the sudo password prompt: several SSH targets may open at once.
        self._sudo_lock = threading.Lock()
        self._sudo_asked = False
        self._sudo_secret: str | None = None

    @functools.cached_property
    def bus(self) -> MessageBus:
        """The message bus (in-memory unless one was given)."""
        return self._bus or MemoryBus()

    @property
    def spool_dir(self) -> Path:
        """Where runs spool their history writes until the store ingests them."""
        return self.config.data_dir / "spool"

    @functools.cached_property
    def history(self) -> HistoryStore:
        """The opened history store (it ingests the spool); reads go here."""
        from workflow_agent.storage.history import HistoryStore

        store = self._history or HistoryStore(
            self.config.history_database, redactor=self.redactor, spool_dir=self.spool_dir,
            baselines=BaselineIndex.for_config(self.config),
        )
        store.open()
        return store

    @functools.cached_property
    def history_writer(self) -> HistoryWriter:
        """Where runs record history: a spool, so a run needs no database driver; or
        the given store itself."""
        if self._history is not None:
            return self._history
        return HistorySpool(self.spool_dir, self.redactor, BaselineIndex.for_config(self.config))

    def sync_history(self) -> None:
        """Bring a shared history database up to date now, rather than at its next read."""
        if self._history is not None or self.config.history_url:
            self.history.ingest()

    @functools.cached_property
    def llm(self) -> LLMService:
        """The LLM service (``llm`` in the configuration), built on first use; raises
        ``LLMNotConfiguredError`` when no provider is configured."""
        if self._llm is not None:
            return self._llm
        import os

        from workflow_agent.llm import build_llm_service

        return build_llm_service(
            self.config.llm, environ=os.environ, redactor=self.redactor,
            cache=self.history if self.config.llm.cache and self.config.llm.providers
            else None,
            usage=cast("UsageRecorder", self.history_writer),
            needed_for="scripts written from documentation",
        )

    @property
    def llm_configured(self) -> bool:
        """Whether an LLM is available (configured, or given) without building it."""
        return self._llm is not None or bool(self.config.llm.providers)

    @property
    def journals(self) -> JournalStore:
        """The change journals of the installs run from this machine."""
        from workflow_agent.execution.journal import JournalStore

        return JournalStore(self.config.data_dir / "journal")

    @functools.cached_property
    def registry(self) -> Registry:
        """Every integration this run can see."""
        return self._registry or Registry.discover(
            self.config.plugin_dirs, entry_points=self.config.entry_points
        )

    @functools.cached_property
    def pool(self) -> TargetPool:
        """Open targets by workflow."""
        return TargetPool(self._target_factory or self.make_target)

    def make_target(self, spec: str) -> Target:
        """Build (not open) the target named by ``spec``."""
        kind = spec.split(":", 1)[0]
        if kind == "local":
            from workflow_agent.execution.local import LocalTarget

            return LocalTarget()
        if kind == "sandbox":
            from workflow_agent.execution.rootfs import RootfsCache
            from workflow_agent.execution.sandbox import SandboxTarget

            settings = self.config.sandbox
            cache = RootfsCache(
                self.config.cache_dir, suite=settings.suite, variant=settings.variant,
                mirror=settings.mirror,
            )
            return SandboxTarget(cache.ensure(), network=settings.network)
        if kind == "systemd-sandbox":
            from workflow_agent.execution.nspawn import NspawnTarget, systemd_rootfs_cache

            settings = self.config.sandbox
            cache = systemd_rootfs_cache(self.config.cache_dir, suite=settings.suite,
                                         variant=settings.variant, mirror=settings.mirror)
            return NspawnTarget(cache.ensure())
        if kind in ("docker", "docker-image"):
            return self._docker_target(spec)
        if kind == "ssh":
            return self.ssh_target(spec)
        raise InvalidInputError(
            f"unknown target {spec!r}",
            hint=f"Use one of: {', '.join(TARGET_KINDS)}.",
        )

    def ssh_target(self, spec: str, settings: SshSettings | None = None,
                   sudo_password: str | None = None) -> Target:
        """``ssh://user@host:port``, with the ssh settings (or ``settings``, e.g. an
        inventory host's own key and jump host); sudo's password ``sudo_password`` (an
        inventory's), else on demand."""
        from workflow_agent.execution.ssh import SshTarget, parse_ssh_spec

        if sudo_password:
            self.redactor.add([sudo_password])
        return SshTarget(parse_ssh_spec(spec), settings or self.config.ssh,
                         sudo_password=sudo_password or self._sudo_password)

    def _sudo_password(self) -> str | None:
        """The sudo password for ssh targets: from ``ssh.sudo_password_env``, else asked
        once on the terminal (if any). Registered with the redactor; never stored."""
        with self._sudo_lock:
            if self._sudo_asked:
                return self._sudo_secret
            value = self.config.ssh.sudo_password()
            if value is None and sys.stdin.isatty():
                value = getpass.getpass("sudo password for the SSH targets: ") or None
            if value is not None:
                self.redactor.add([value])
            self._sudo_asked, self._sudo_secret = True, value
            return value

    def _docker_target(self, spec: str) -> Target:
        """``docker://CONTAINER`` or ``docker-image://IMAGE``, with the docker settings."""
        from workflow_agent.execution.docker import DockerImageTarget, DockerTarget

        kind, _, rest = spec.partition("://")
        if not rest:
            raise InvalidInputError(
                f"target {spec!r} names no {'image' if kind == 'docker-image' else 'container'}",
                hint="Use docker://CONTAINER (a running container's name or id) or "
                "docker-image://IMAGE (a fresh container from an image).",
            )
        settings = self.config.docker
        if kind == "docker":
            return DockerTarget(rest, host=settings.host, user=settings.user,
                                api_timeout=settings.api_timeout)
        return DockerImageTarget(rest, host=settings.host, user=settings.user,
                                 network=settings.network, pull=settings.pull,
                                 api_timeout=settings.api_timeout)
