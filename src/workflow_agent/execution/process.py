"""Run a host process with streamed output and a timeout that kills its process group."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Mapping, Sequence

from workflow_agent.execution.target import OutputCallback, OutputCollector, RunResult

#: A line longer than this is delivered in pieces rather than buffered without bound.
MAX_LINE = 1024 * 1024


async def _pump(stream: asyncio.StreamReader, name: str, sink: OutputCollector) -> None:
    pending = b""
    while True:
        chunk = await stream.read(65536)
        if not chunk:
            break
        pending += chunk
        *lines, pending = pending.split(b"\n")
        while len(pending) > MAX_LINE:
            lines.append(pending[:MAX_LINE])
            pending = pending[MAX_LINE:]
        for raw in lines:
            sink(name, raw.decode("utf-8", errors="replace"))
    if pending:
        sink(name, pending.decode("utf-8", errors="replace"))


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


async def run_process(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    timeout: float,
    on_output: OutputCallback | None = None,
    stdin: bytes | None = None,
) -> RunResult:
    """Run ``argv`` in its own session; on timeout SIGKILL the whole process group.

    Output is streamed line by line to ``on_output`` and also collected in the result.
    ``stdin`` is fed to the process (then closed); without it stdin is ``/dev/null``.
    """
    sink = OutputCollector(on_output)
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=dict(env),
        start_new_session=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    if stdin is not None:
        assert proc.stdin is not None
        proc.stdin.write(stdin)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            await proc.stdin.drain()
        proc.stdin.close()
    pumps = asyncio.gather(_pump(proc.stdout, "stdout", sink), _pump(proc.stderr, "stderr", sink))
    timed_out = False
    try:
        await asyncio.wait_for(proc.wait(), timeout)
    except TimeoutError:
        timed_out = True
        _kill_group(proc.pid)
        await proc.wait()
    except asyncio.CancelledError:
        _kill_group(proc.pid)
        await proc.wait()
        raise
    # Daemons started by the script may keep the pipes open; don't wait on them forever.
    try:
        await asyncio.wait_for(asyncio.shield(pumps), 2.0)
    except TimeoutError:
        pumps.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pumps
    code = proc.returncode if proc.returncode is not None else -1
    return sink.result(124 if timed_out else code, timed_out=timed_out)
