"""What the sandbox and systemd sandbox targets share: a target entered with ``nsenter``.

Both keep a holder process on this host that owns a set of namespaces, and a private
scratch directory whose ``exchange/`` subdirectory is bind-mounted at
``EXCHANGE_INSIDE`` in the target. Scripts and file transfers go through that directory:
the host writes a private file there (``O_EXCL | O_NOFOLLOW``, mode 0600), and a process
entered into the target's namespaces reads or writes it. The environment travels only in
the process environment, never in a file or an argument.

A subclass says how to enter (``_enter_argv``), starts the holder in ``open()`` and hands
the state over with ``_opened``; ``close()`` runs the teardown it registered.
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import subprocess
import uuid
import weakref
from abc import abstractmethod
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import ClassVar, Generic, Protocol, TypeVar

from workflow_agent.errors import SandboxToolingMissingError, TargetError, TargetUnreachableError
from workflow_agent.execution.process import run_process
from workflow_agent.execution.rootfs import Scratch
from workflow_agent.execution.target import OutputCallback, RunResult, Target, script_env

#: Where the host exchange directory appears inside the target.
EXCHANGE_INSIDE = "/run/workflow-agent"


def which(tool: str, package: str) -> str:
    """The path of ``tool``; ``SandboxToolingMissingError`` naming ``package`` if absent."""
    found = shutil.which(tool)
    if found is None:
        raise SandboxToolingMissingError(tool, package)
    return found


class EnteredState(Protocol):
    """What an open entered target must keep: its scratch directory and holder."""

    @property
    def scratch(self) -> Scratch: ...

    @property
    def proc(self) -> subprocess.Popen[bytes] | None: ...

    @property
    def exchange(self) -> Path: ...


StateT = TypeVar("StateT", bound=EnteredState)


class EnteredTarget(Target, Generic[StateT]):
    """A target entered with ``nsenter``, with an exchange directory shared with the host."""

    #: What paths inside are called in errors ("sandbox paths must be absolute").
    path_noun: ClassVar[str]
    #: Why ``_running`` says the target has stopped, and what to do about it.
    stopped_reason: ClassVar[str]
    stopped_hint: ClassVar[str]

    def __init__(self, name: str | None, dir_name: str) -> None:
        super().__init__()
        self.name = name
        # Chosen now so identity is stable before open() and across re-opens.
        self._dir_name = dir_name
        self._state: StateT | None = None
        self._finalizer: weakref.finalize[[StateT], EnteredTarget[StateT]] | None = None
        self._tools: dict[str, str] = {}

    @property
    def identity(self) -> str:
        return f"{self.kind}:{self.name or self._dir_name}"

    @property
    def scratch_path(self) -> Path | None:
        """The host scratch directory while open."""
        return self._state.scratch.path if self._state else None

    def _opened(self, state: StateT, teardown: Callable[[StateT], None]) -> None:
        """Take over an opened ``state``; ``teardown`` runs once, on close or at exit."""
        self._state = state
        self._finalizer = weakref.finalize(self, teardown, state)

    async def close(self) -> None:
        """Kill everything in the target and remove its scratch directory. Idempotent."""
        finalizer, self._finalizer, self._state = self._finalizer, None, None
        if finalizer is not None:
            await asyncio.to_thread(finalizer)

    # -- running and files -----------------------------------------------------------

    @abstractmethod
    def _enter_argv(self, state: StateT, *inside: str, all_ns: bool = True) -> list[str]:
        """The argv running ``inside`` in the target: in all its namespaces, or (for file
        helpers) only in its mount namespace."""

    def _running(self) -> StateT:
        state = self._state
        if state is None:
            raise TargetError(
                f"{self.identity} is not open", hint="Use it as `async with target:`."
            )
        if state.proc is None or state.proc.poll() is not None:
            raise TargetUnreachableError(
                f"{self.identity} has stopped ({self.stopped_reason})", hint=self.stopped_hint
            )
        return state

    def _exchange_file(self, state: StateT, prefix: str, data: bytes | None) -> str:
        """Create a private file in the exchange directory; return its name."""
        name = f"{prefix}-{uuid.uuid4().hex}"
        if data is not None:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
            with os.fdopen(os.open(state.exchange / name, flags, 0o600), "wb") as handle:
                handle.write(data)
        return name

    async def run(
        self,
        script: str,
        *,
        env: Mapping[str, str] | None = None,
        timeout: float = 600.0,
        on_output: OutputCallback | None = None,
    ) -> RunResult:
        state = self._running()
        name = self._exchange_file(state, "run", script.encode("utf-8"))
        try:
            # env travels in the process environment: nsenter (and chroot) pass it on.
            return await run_process(
                self._enter_argv(state, "/bin/bash", f"{EXCHANGE_INSIDE}/{name}"),
                env=script_env(env),
                timeout=timeout,
                on_output=on_output,
            )
        finally:
            (state.exchange / name).unlink(missing_ok=True)

    async def _helper(self, state: StateT, shell: str, *args: str) -> RunResult:
        # Only the mount namespace is needed to touch files; skipping --pid saves a fork.
        argv = self._enter_argv(state, "/bin/sh", "-c", shell, "sh", *args, all_ns=False)
        return await run_process(argv, env=script_env(None), timeout=120.0)

    def _check_path(self, path: str) -> None:
        if not path.startswith("/"):
            raise ValueError(f"{self.path_noun} paths must be absolute: {path!r}")

    async def put(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self._check_path(path)
        state = self._running()
        name = self._exchange_file(state, "put", data)
        shell = (
            'set -e; d=$(dirname -- "$1"); mkdir -p -- "$d"; t="$d/.wa-put-$$"; '
            'cat -- "$2" > "$t"; chmod "$3" "$t"; mv -f -- "$t" "$1"'
        )
        try:
            result = await self._helper(
                state, shell, path, f"{EXCHANGE_INSIDE}/{name}", format(mode, "o")
            )
        finally:
            (state.exchange / name).unlink(missing_ok=True)
        if not result.ok:
            raise TargetError(f"writing {path} in {self.identity} failed: {result.stderr}")

    async def get(self, path: str) -> bytes:
        self._check_path(path)
        state = self._running()
        name = self._exchange_file(state, "get", None)
        shell = '[ -e "$1" ] || exit 3; [ -d "$1" ] && exit 4; cat -- "$1" > "$2"'
        host_copy = state.exchange / name
        try:
            result = await self._helper(state, shell, path, f"{EXCHANGE_INSIDE}/{name}")
            if result.exit_code == 3:
                raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
            if result.exit_code == 4:
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
            if not result.ok:
                raise TargetError(f"reading {path} in {self.identity} failed: {result.stderr}")
            fd = os.open(host_copy, os.O_RDONLY | os.O_NOFOLLOW)
            with os.fdopen(fd, "rb") as handle:
                return handle.read()
        finally:
            host_copy.unlink(missing_ok=True)
