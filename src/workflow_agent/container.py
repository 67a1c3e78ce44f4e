"""The dependency container: builds each service once from the configuration.

Tests swap parts by passing them in (a bus, a history store, a target factory); nothing
else reads the configuration to build services.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from workflow_agent.bus import MemoryBus, MessageBus
from workflow_agent.config import WorkflowConfiguration
from workflow_agent.errors import InvalidInputError
from workflow_agent.execution.pool import TargetPool
from workflow_agent.execution.target import Target
from workflow_agent.integrations.registry import Registry
from workflow_agent.secrets import Redactor
from workflow_agent.storage.spool import HistorySpool, HistoryWriter

if TYPE_CHECKING:
    from workflow_agent.storage.history import HistoryStore

TARGET_KINDS = ("local", "sandbox", "systemd-sandbox")
#: Throwaway targets: changing them needs no confirmation.
DISPOSABLE_KINDS = ("sandbox", "systemd-sandbox")


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
    ) -> None:
        self.config = config
        self.redactor = Redactor()
        self._bus = bus
        self._history = history
        self._registry = registry
        self._target_factory = target_factory

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
            self.config.history_database, redactor=self.redactor, spool_dir=self.spool_dir
        )
        store.open()
        return store

    @functools.cached_property
    def history_writer(self) -> HistoryWriter:
        """Where runs record history: a spool, so a run needs no database driver; or
        the given store itself."""
        if self._history is not None:
            return self._history
        return HistorySpool(self.spool_dir, self.redactor)

    def sync_history(self) -> None:
        """Bring a shared history database up to date now, rather than at its next read."""
        if self._history is not None or self.config.history_url:
            self.history.ingest()

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
        raise InvalidInputError(
            f"unknown target {spec!r}",
            hint=f"Use one of: {', '.join(TARGET_KINDS)}.",
        )
