"""The promises every script-running target keeps, checked the same way on each.

Each check is a coroutine run in the caller's event loop (an SSH target's connection
belongs to one loop), asserts the shared promise, and returns the run's result so that a
target's own test can add what only it promises (``check_run_then_parts`` returns
nothing). Used by tests/execution/test_entered.py,
tests/docker/test_docker_target.py and tests/ssh/test_ssh_target.py; its asserts are
rewritten by pytest (tests/conftest.py registers it).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Sequence

from helpers import host_pids_with, unique_sleep, wait_until
from workflow_agent.execution.target import RunResult, Target

#: Echoes the secret, says it is waiting (on stderr), and waits for /tmp/go.
WAITS_WITH_A_SECRET = (
    'echo "got:$WA_SECRET"; echo waiting >&2\nwhile [ ! -e /tmp/go ]; do sleep 0.05; done\n'
)


async def check_env_never_reaches_a_command_line(
    target: Target, *, script: str = WAITS_WITH_A_SECRET, also_secret: Sequence[str] = ()
) -> RunResult:
    """``env`` reaches the script, and while it runs no host process has the secret (nor
    any of ``also_secret``) in its command line; the scan does see it in an environment.

    ``script`` must print ``got:$WA_SECRET``, then ``waiting``, and wait for /tmp/go.
    """
    token = f"wa-secret-{secrets.token_hex(16)}"
    started = asyncio.Event()

    def on_output(stream: str, line: str) -> None:
        if line == "waiting":
            started.set()

    task = asyncio.create_task(
        target.run(script, env={"WA_SECRET": token}, timeout=60, on_output=on_output)
    )
    await asyncio.wait_for(started.wait(), 30)  # streamed while the script still runs
    # A target's processes are host processes too: /proc on the host sees them all.
    in_argv = [
        pid
        for secret in (token, *also_secret)
        for pid in host_pids_with(secret.encode(), "cmdline")
    ]
    in_environ = host_pids_with(token.encode(), "environ")
    await target.put("/tmp/go", b"")
    result = await task
    assert result.ok and result.stdout == f"got:{token}\n"
    assert in_environ, "the scan must see the running script (positive control)"
    assert in_argv == []
    return result


async def check_timeout_kills_the_whole_process_tree(target: Target) -> RunResult:
    """A script past its timeout ends as exit 124 within seconds, its background and
    foreground processes killed, and the target still runs scripts afterwards."""
    marker = unique_sleep()
    needle = f"sleep\0{marker}".encode()
    script = f"sleep {marker} &\necho started\nsleep {marker}\necho never\n"
    began = time.monotonic()
    started = asyncio.Event()
    task = asyncio.create_task(
        target.run(script, timeout=2, on_output=lambda stream, line: started.set())
    )
    await asyncio.wait_for(started.wait(), 30)
    await asyncio.sleep(0.2)  # let the foreground sleep start too
    sleepers = len(host_pids_with(needle))
    result = await task
    took = time.monotonic() - began
    after = await target.run("echo still usable")
    assert sleepers == 2
    assert result.timed_out and result.exit_code == 124
    assert "started" in result.stdout and "never" not in result.stdout
    assert took < 15
    assert wait_until(lambda: not host_pids_with(needle)), "a sleep survived the timeout"
    assert after.stdout == "still usable\n"
    return result


async def check_run_then_parts(target: Target) -> None:
    """``run_then_parts``: the script alone has the caller's env and the marker, its
    output alone reaches ``on_output`` and its result, the parts run after it with
    their own results; a timeout kills the script's whole tree (exit 124) and the parts
    still run; a cancellation kills the script's tree too; nothing is left in /tmp."""
    token = f"wa-secret-{secrets.token_hex(16)}"
    lines: list[tuple[str, str]] = []
    result, parts = await target.run_then_parts(
        'echo "got:$WA_SECRET mark:${WA_MARK-none}"\necho to-stderr >&2\n'
        'echo\nprintf "last"\nexit 3',
        ['echo "part:${WA_SECRET-unset} mark:${WA_MARK-none}"', "echo bad >&2; exit 4"],
        env={"WA_SECRET": token}, timeout=30, marker="WA_MARK=m1",
        on_output=lambda stream, line: lines.append((stream, line)))
    assert (result.exit_code, result.stdout, result.stderr) == (
        3, f"got:{token} mark:m1\n\nlast\n", "to-stderr\n")
    assert [line for stream, line in lines if stream == "stdout"] == [
        f"got:{token} mark:m1", "", "last"]
    assert [line for stream, line in lines if stream == "stderr"] == ["to-stderr"]
    assert [(p.exit_code, p.stdout, p.stderr) for p in parts] == [
        (0, "part:unset mark:none\n", ""), (4, "", "bad\n")]

    marker = unique_sleep()
    needle = f"sleep\0{marker}".encode()
    began = time.monotonic()
    result, [after] = await target.run_then_parts(
        f"sleep {marker} &\necho started\nsleep {marker}\necho never\n",
        ["echo after"], timeout=2)
    assert result.timed_out and result.exit_code == 124 and result.stdout == "started\n"
    assert 1.9 < result.duration < 15 and time.monotonic() - began < 15
    assert (after.exit_code, after.stdout) == (0, "after\n")
    assert wait_until(lambda: not host_pids_with(needle)), "a sleep survived the timeout"

    started = asyncio.Event()
    task = asyncio.create_task(target.run_then_parts(
        f"sleep {marker} &\necho started\nsleep {marker}\n", ["echo after"],
        timeout=60, on_output=lambda stream, line: started.set()))
    await asyncio.wait_for(started.wait(), 30)
    await asyncio.sleep(0.2)  # let the foreground sleep start too
    assert len(host_pids_with(needle)) == 2
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert wait_until(lambda: not host_pids_with(needle)), "a sleep survived the cancellation"
    # The script's private directory goes with it (the guard removes it when cancelled).
    for _ in range(100):
        left = await target.run("find /tmp -maxdepth 1 -type d -regextype posix-extended "
                                "-regex '/tmp/workflow-agent-[A-Za-z0-9]{10}'")
        if not left.stdout:
            break
        await asyncio.sleep(0.05)
    assert left.ok and left.stdout == ""
