"""Run a host process with streamed output and a timeout that kills its process group.

The run ends when the process exits, not when its output pipes close: a daemon the
script starts in the background may keep them open for hours. The process is watched
through a pidfd; the pipes get a short grace period for what is still buffered in them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence

from workflow_agent.execution.target import OutputCallback, OutputCollector, RunResult

#: A line longer than this is delivered in pieces rather than buffered without bound.
MAX_LINE = 1024 * 1024
#: After the process exits, how long its pipes may take to deliver the rest.
DRAIN_GRACE = 0.5


class _Lines:
    """Splits a byte stream into lines for one output stream. When nothing watches the
    lines as they come (the sink forwards nothing: a probe's run), the bytes are held
    and split once, when flushed: the same lines, without a split and a call per chunk."""

    def __init__(self, name: str, sink: OutputCollector) -> None:
        self.name = name
        self.sink = sink
        self.pending = b""
        self.held: list[bytes] = []

    @property
    def midline(self) -> bool:
        """Whether the text of a line not ended yet was fed."""
        last = self.held[-1] if self.held else self.pending
        return not last.endswith(b"\n") if last else False

    def feed(self, chunk: bytes) -> None:
        if self.sink.forward is None:
            if chunk:
                self.held.append(chunk)
            return
        self._split(chunk)

    def _split(self, chunk: bytes) -> None:
        self.pending += chunk
        *lines, self.pending = self.pending.split(b"\n")
        while len(self.pending) > MAX_LINE:
            lines.append(self.pending[:MAX_LINE])
            self.pending = self.pending[MAX_LINE:]
        for raw in lines:
            self.sink(self.name, raw.decode("utf-8", errors="replace"))

    def flush(self) -> None:
        if self.held:
            held, self.held = b"".join(self.held), []
            self._split(held)
        if self.pending:
            self.sink(self.name, self.pending.decode("utf-8", errors="replace"))
            self.pending = b""


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


async def run_process(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    timeout: float,
    on_output: OutputCallback | None = None,
) -> RunResult:
    """Run ``argv`` in its own session, stdin ``/dev/null``; on timeout (or cancellation)
    SIGKILL the whole process group. Output is streamed line by line to ``on_output`` and
    also collected in the result."""
    sink = OutputCollector(on_output)
    loop = asyncio.get_running_loop()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    try:
        proc = subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL, stdout=out_w, stderr=err_w,
            env=dict(env), start_new_session=True,
        )
    except BaseException:
        for fd in (out_r, err_r):
            os.close(fd)
        raise
    finally:
        os.close(out_w)
        os.close(err_w)
    streams = {out_r: _Lines("stdout", sink), err_r: _Lines("stderr", sink)}
    drained = {fd: loop.create_future() for fd in streams}

    def readable(fd: int) -> None:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return
        if chunk:
            streams[fd].feed(chunk)
        else:
            loop.remove_reader(fd)
            if not drained[fd].done():
                drained[fd].set_result(None)

    for fd in streams:
        os.set_blocking(fd, False)
        loop.add_reader(fd, readable, fd)
    timed_out = False
    try:
        try:
            await asyncio.wait_for(_exited(proc.pid), timeout)
        except TimeoutError:
            timed_out = True
            _kill_group(proc.pid)
            await _exited(proc.pid)
        except asyncio.CancelledError:
            _kill_group(proc.pid)
            await asyncio.shield(_exited(proc.pid))
            proc.wait()  # it has exited: this only reaps it
            raise
        code = proc.wait()  # it has exited: this only reaps it
        # What the script printed last may still sit in the pipes; a daemon it left
        # running may hold them open for good, so wait only briefly for their end.
        await asyncio.wait(list(drained.values()), timeout=DRAIN_GRACE)
    finally:
        for fd, lines in streams.items():
            loop.remove_reader(fd)
            with contextlib.suppress(BlockingIOError, OSError):
                while chunk := os.read(fd, 65536):
                    lines.feed(chunk)
            lines.flush()
            os.close(fd)
        for future in drained.values():
            future.cancel()
    return sink.result(124 if timed_out else code, timed_out=timed_out)


async def _exited(pid: int) -> None:
    """Return once process ``pid`` (our child) has exited."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return  # already gone
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not done.done():
            done.set_result(None)

    loop.add_reader(pidfd, ready)
    try:
        await done
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)
