"""One workflow at a time changes a target: a lock file per target, held with ``flock``.

The kernel drops a ``flock`` when its process dies, however it dies, so a lock left by a
killed run is never stale: the next run simply gets it. The file also names its holder
(workflow, action, pid, since when) so a refused run can say who holds the target.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType

from workflow_agent.errors import TargetBusyError


class TargetLock:
    """Exclusive right to change ``target`` (its identity), for one workflow."""

    def __init__(self, directory: Path, target: str, *, holder: dict[str, str]) -> None:
        digest = hashlib.sha256(target.encode()).hexdigest()[:24]
        self.path = directory / f"{digest}.lock"
        self.target = target
        self.holder = holder
        self._fd: int | None = None

    def acquire(self, *, wait: float = 0.0) -> None:
        """Take the lock, waiting up to ``wait`` seconds; ``TargetBusyError`` names the holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = _read_holder(fd)
                    os.close(fd)
                    raise TargetBusyError(self.target, holder) from None
                time.sleep(0.1)
        info = {**self.holder, "pid": str(os.getpid()), "since": datetime.now(UTC).isoformat()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Give the lock up (closing the file drops the flock)."""
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> TargetLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def _read_holder(fd: int) -> dict[str, str]:
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}
