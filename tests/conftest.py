"""Shared fixtures.

Sandbox fixtures
----------------
``sandbox_rootfs``  the cached Debian root file system (session scope). Built once per
                    machine by ``RootfsCache(default_cache_dir()).ensure()`` (~15 s, needs
                    the Debian archive) and reused by later runs. Skips when not root.
``sandbox``         an opened ``SandboxTarget`` (network "host"), closed after the test.
``systemd_rootfs``  the cached root file system with systemd, for ``NspawnTarget``.
``sandbox_factory`` ``sandbox_factory(**kwargs)`` opens another ``SandboxTarget`` with
                    those keyword arguments (e.g. ``network="none"``); all are closed
                    after the test.

No pytest-asyncio here: the fixtures are synchronous and tests drive the async API with
``asyncio.run(target.run(...))``. That is safe because a ``SandboxTarget`` keeps no
event-loop state between calls (its holder process is a plain ``subprocess.Popen``), so
opening in one loop and running in another is fine.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from workflow_agent.execution.nspawn import systemd_rootfs_cache
from workflow_agent.execution.rootfs import RootfsCache, default_cache_dir
from workflow_agent.execution.sandbox import SandboxTarget

# The shared target contract asserts inside a helper module: rewrite it like a test.
pytest.register_assert_rewrite("target_contract")


@pytest.fixture(scope="session")
def sandbox_rootfs() -> Path:
    """The extracted Debian root file system sandboxes start from (built once)."""
    if os.geteuid() != 0:
        pytest.skip("sandbox tests need root (namespaces, overlay mounts)")
    return RootfsCache(default_cache_dir()).ensure()


@pytest.fixture(scope="session")
def systemd_rootfs() -> Path:
    """The cached root file system with systemd, for ``NspawnTarget`` (built once, ~20 s)."""
    if os.geteuid() != 0:
        pytest.skip("the systemd sandbox needs root (namespaces, overlay mounts)")
    return systemd_rootfs_cache(default_cache_dir()).ensure()


@pytest.fixture
def sandbox_factory(sandbox_rootfs: Path) -> Iterator[Callable[..., SandboxTarget]]:
    """Open sandboxes on demand; every one opened is closed when the test ends."""
    opened: list[SandboxTarget] = []

    def factory(**kwargs: Any) -> SandboxTarget:
        target = SandboxTarget(sandbox_rootfs, **kwargs)
        asyncio.run(target.open())
        opened.append(target)
        return target

    yield factory
    for target in opened:
        asyncio.run(target.close())  # idempotent: fine if the test closed it already


@pytest.fixture
def sandbox(sandbox_factory: Callable[..., SandboxTarget]) -> SandboxTarget:
    """One opened sandbox with the host's network, closed after the test."""
    return sandbox_factory()
