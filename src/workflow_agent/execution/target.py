"""The ``Target`` seam: somewhere a script can run, files can be put and fetched.

Every target runs scripts the same way: the script text is written to a private file on
the target and run with ``bash`` under a clean environment (``BASE_ENV`` plus what the
caller passes), standard input from ``/dev/null``. Secrets travel only in ``env``, never
in the script text or a process argument.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from workflow_agent.facts import Facts

#: ``(stream, line)`` where stream is ``"stdout"`` or ``"stderr"``; line has no newline.
OutputCallback = Callable[[str, str], None]

#: The environment every script starts from, on every target.
BASE_ENV: Mapping[str, str] = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "HOME": "/root",
    "DEBIAN_FRONTEND": "noninteractive",
    "TERM": "dumb",
}


@dataclass(frozen=True)
class RunResult:
    """What one script run produced."""

    exit_code: int
    stdout: str
    stderr: str
    duration: float
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        """True when the script exited 0 within its timeout."""
        return self.exit_code == 0 and not self.timed_out


@dataclass
class OutputCollector:
    """Collects streamed lines and forwards them to an optional callback."""

    forward: OutputCallback | None = None
    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def __call__(self, stream: str, line: str) -> None:
        (self.stdout if stream == "stdout" else self.stderr).append(line)
        if self.forward is not None:
            self.forward(stream, line)

    def result(self, exit_code: int, *, timed_out: bool = False) -> RunResult:
        """Freeze what was collected into a ``RunResult``."""
        return RunResult(
            exit_code=exit_code,
            stdout="".join(line + "\n" for line in self.stdout),
            stderr="".join(line + "\n" for line in self.stderr),
            duration=time.monotonic() - self.started,
            timed_out=timed_out,
        )


def script_env(env: Mapping[str, str] | None) -> dict[str, str]:
    """The full environment a script runs with: ``BASE_ENV`` overlaid by ``env``."""
    merged = dict(BASE_ENV)
    if env:
        merged.update(env)
    return merged


class Target(ABC):
    """Somewhere scripts run. Use as ``async with target:``; ``open`` is idempotent."""

    kind: ClassVar[str]

    def __init__(self) -> None:
        self._facts: Facts | None = None

    @property
    @abstractmethod
    def identity(self) -> str:
        """A stable name for this target, used in history, locks and snapshots."""

    async def open(self) -> None:
        """Connect or start the target. The default has nothing to do."""

    async def close(self) -> None:
        """Disconnect or destroy the target. The default has nothing to do."""

    async def __aenter__(self) -> Target:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @abstractmethod
    async def run(
        self,
        script: str,
        *,
        env: Mapping[str, str] | None = None,
        timeout: float = 600.0,
        on_output: OutputCallback | None = None,
    ) -> RunResult:
        """Run a bash script; stream its output; kill its whole process tree on timeout."""

    @abstractmethod
    async def put(self, path: str, data: bytes, mode: int = 0o644) -> None:
        """Write ``data`` to ``path`` on the target (parents created)."""

    @abstractmethod
    async def get(self, path: str) -> bytes:
        """Read ``path`` from the target; ``FileNotFoundError`` when absent."""

    async def facts(self, *, refresh: bool = False) -> Facts:
        """Facts about the target, gathered once per target object unless ``refresh``."""
        if self._facts is None or refresh:
            from workflow_agent.facts import gather_facts

            self._facts = await gather_facts(self)
        return self._facts
