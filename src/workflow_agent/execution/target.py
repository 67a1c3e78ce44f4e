"""The ``Target`` seam: somewhere a script can run, files can be put and fetched.

Every target runs scripts the same way: the script text is written to a private file on
the target and run with ``bash`` under a clean environment (``BASE_ENV`` plus what the
caller passes), standard input from ``/dev/null``. Secrets travel only in ``env``, never
in the script text or a process argument.

A run costs a round trip, and over SSH a session and a runner on the host: ``run_parts``
runs several independent read-only scripts in one run and hands each its own result.
"""

from __future__ import annotations

import re
import secrets
import shlex
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
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


# Each part runs in a subshell of its own, through eval so that even a syntax error
# stays in its part; after it, the wrapper prints a frame line on stdout
# (``<RS>part-NONCE INDEX STATUS``) and on stderr (``<RS>part-NONCE INDEX``), each after
# a newline of its own, so a part's last line needs none. NONCE is random per run: no
# part's output can fake a frame.
_PART = """( eval {script} )
s=$?
printf '\\n\\036part-{nonce} {index} %d\\n' "$s"
printf '\\n\\036part-{nonce} {index}\\n' >&2
"""


async def run_parts(
    target: Target,
    scripts: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = 600.0,
) -> list[RunResult]:
    """Run independent bash ``scripts`` one after the other in ONE ``target.run``; one
    ``RunResult`` each: its own stdout, stderr and exit status.

    Each script runs in a subshell of its own (``exit``, ``set`` options and even a
    syntax error stay in it).
    A part the run never finished (timeout, lost connection) gets the run's exit status
    (or -1) and what it printed so far; ``duration`` is the whole run's.
    """
    nonce = secrets.token_hex(8)
    whole = await target.run(
        "".join(_PART.format(script=shlex.quote(script), nonce=nonce, index=index)
                for index, script in enumerate(scripts)),
        env=env, timeout=timeout,
    )
    frame = f"\n\x1epart-{nonce} \\d+"
    stdouts = re.split(frame + r" (-?\d+)\n", whole.stdout)  # text, status, text, ...
    stderrs = re.split(frame + r"\n", whole.stderr)
    results = []
    for index in range(len(scripts)):
        stdout = stdouts[2 * index] if 2 * index < len(stdouts) else ""
        stderr = stderrs[index] if index < len(stderrs) else ""
        if 2 * index + 1 < len(stdouts):
            results.append(RunResult(int(stdouts[2 * index + 1]), stdout, stderr,
                                     whole.duration))
        else:  # the run ended before this part did
            results.append(RunResult(whole.exit_code or -1, stdout, stderr, whole.duration,
                                     timed_out=whole.timed_out))
    return results
