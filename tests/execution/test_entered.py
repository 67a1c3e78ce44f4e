"""The contract both nsenter-entered targets keep (execution/entered.py): the sandbox and
the systemd sandbox, each tested for real."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Iterator

import pytest

from helpers import host_pids_with, run_sh, unique_sleep, wait_until
from workflow_agent.execution.entered import EnteredTarget
from workflow_agent.execution.nspawn import NspawnTarget
from workflow_agent.execution.target import RunResult

pytestmark = pytest.mark.sandbox


@pytest.fixture(params=["sandbox", "systemd-sandbox"])
def entered(request: pytest.FixtureRequest) -> Iterator[EnteredTarget]:
    """An opened target of each kind, closed after the test."""
    if request.param == "sandbox":
        yield request.getfixturevalue("sandbox")
        return
    target = NspawnTarget(request.getfixturevalue("systemd_rootfs"))
    asyncio.run(target.open())
    try:
        yield target
    finally:
        asyncio.run(target.close())


def test_env_reaches_the_script_but_never_a_command_line(entered: EnteredTarget) -> None:
    token = f"wa-secret-{secrets.token_hex(16)}"
    script = (
        'echo "got:$WA_SECRET"; echo waiting >&2\nwhile [ ! -e /tmp/go ]; do sleep 0.05; done\n'
    )

    async def scenario() -> tuple[RunResult, list[int], list[int]]:
        started = asyncio.Event()

        def on_output(stream: str, line: str) -> None:
            if line == "waiting":
                started.set()

        task = asyncio.create_task(
            entered.run(script, env={"WA_SECRET": token}, timeout=60, on_output=on_output)
        )
        await asyncio.wait_for(started.wait(), 30)
        in_argv = host_pids_with(token.encode(), "cmdline")
        in_environ = host_pids_with(token.encode(), "environ")
        await entered.put("/tmp/go", b"")
        return await task, in_argv, in_environ

    result, in_argv, in_environ = asyncio.run(scenario())
    assert result.ok and result.stdout == f"got:{token}\n"
    assert in_environ, "the scan must see the running script (positive control)"
    assert in_argv == []


def test_timeout_kills_the_whole_process_tree(entered: EnteredTarget) -> None:
    marker = unique_sleep()
    needle = f"sleep\0{marker}".encode()
    script = f"sleep {marker} &\necho started\nsleep {marker}\necho never\n"

    async def scenario() -> tuple[RunResult, int]:
        started = asyncio.Event()
        task = asyncio.create_task(
            entered.run(script, timeout=2, on_output=lambda s, line: started.set())
        )
        await asyncio.wait_for(started.wait(), 30)
        await asyncio.sleep(0.2)  # let the foreground sleep start too
        sleepers = len(host_pids_with(needle))
        return await task, sleepers

    began = time.monotonic()
    result, sleepers = asyncio.run(scenario())
    assert sleepers == 2
    assert result.timed_out and result.exit_code == 124
    assert "started" in result.stdout and "never" not in result.stdout
    assert time.monotonic() - began < 15
    assert wait_until(lambda: not host_pids_with(needle)), "a sleep survived the timeout"
    assert run_sh(entered, "echo still usable").stdout == "still usable\n"


def test_put_and_get_roundtrip(entered: EnteredTarget) -> None:
    data = bytes(range(256)) * 3
    asyncio.run(entered.put("/opt/wa/deep/dir/blob.bin", data, 0o640))
    assert asyncio.run(entered.get("/opt/wa/deep/dir/blob.bin")) == data
    assert run_sh(entered, "stat -c %a /opt/wa/deep/dir/blob.bin").stdout == "640\n"
    asyncio.run(entered.put("/opt/wa/deep/dir/blob.bin", b"replaced\n", 0o755))
    check = run_sh(entered, "cat /opt/wa/deep/dir/blob.bin; stat -c %a /opt/wa/deep/dir/blob.bin")
    assert check.stdout == "replaced\n755\n"
    assert asyncio.run(entered.get("/opt/wa/deep/dir/blob.bin")) == b"replaced\n"
    with pytest.raises(FileNotFoundError):
        asyncio.run(entered.get("/etc/no-such-file"))
    with pytest.raises(IsADirectoryError):
        asyncio.run(entered.get("/etc"))
    with pytest.raises(ValueError):
        asyncio.run(entered.get("etc/hostname"))
    # Nothing is left behind in the exchange directory.
    assert run_sh(entered, "ls -A /run/workflow-agent | grep -v '^run-' || true").stdout == ""
