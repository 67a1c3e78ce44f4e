"""The target contract over SSH, against real sshd hosts (tests/lab.py): the same
promises tests/execution/test_entered.py checks for the nsenter targets, as root and
as a sudo user."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest

from helpers import host_pids_with, unique_sleep, wait_until
from lab import SUDO_USER, SshLab
from target_contract import (
    check_env_never_reaches_a_command_line,
    check_run_then_parts,
    check_timeout_kills_the_whole_process_tree,
)
from workflow_agent.execution.ssh import SshTarget
from workflow_agent.execution.target import RunResult

pytestmark = pytest.mark.sandbox

T = TypeVar("T")
USERS = ["root", SUDO_USER]


def on_target(lab: SshLab, user: str, body: Callable[[SshTarget], Awaitable[T]],
              index: int = 1) -> T:
    """Open host ``index`` as ``user``, run ``body`` in one event loop, close."""
    async def scenario() -> T:
        async with lab.target(index, user) as target:
            assert isinstance(target, SshTarget)
            return await body(target)

    return asyncio.run(scenario())


@pytest.mark.parametrize("user", USERS)
def test_env_and_password_never_reach_a_command_line(ssh_lab: SshLab, user: str) -> None:
    # The wait runs in a child shell: it holds the exported environment for its whole
    # life (the script's own bash read its variables from a file after it started).
    script = ('echo "got:$WA_SECRET"; echo waiting >&2\n'
              "bash -c 'while [ ! -e /tmp/go ]; do sleep 0.05; done'\n")
    result = on_target(ssh_lab, user, lambda target: check_env_never_reaches_a_command_line(
        target, script=script, also_secret=[ssh_lab.sudo_password]))
    assert result.stderr == "waiting\n"
    # Nothing of the run is left on the host: the env file deleted itself, and the
    # runner shell's directory goes with the connection (the one listing them remains).
    on_target(ssh_lab, "root", lambda t: t.run("rm -f /tmp/go"))
    assert wait_until(lambda: on_target(ssh_lab, "root", lambda t: t.run(
        "ls -d /tmp/workflow-agent-shell.* 2>/dev/null | wc -l")).stdout == "1\n")


@pytest.mark.parametrize("user", USERS)
def test_scripts_run_as_root_in_the_base_environment(ssh_lab: SshLab, user: str) -> None:
    result = on_target(ssh_lab, user, lambda t: t.run(
        'id -u; pwd; echo "$HOME $LANG $DEBIAN_FRONTEND"; [ -t 0 ] || read -r x || echo eof; '
        'printf "no newline"; exit 7', env={"EXTRA": "a b'c"}))
    assert result.exit_code == 7
    assert result.stdout == "0\n/\n/root C.UTF-8 noninteractive\neof\nno newline\n"


@pytest.mark.parametrize("user", USERS)
def test_timeout_kills_the_whole_process_tree(ssh_lab: SshLab, user: str) -> None:
    result = on_target(ssh_lab, user, check_timeout_kills_the_whole_process_tree)
    assert result.stdout == "started\n" and result.stderr == ""


@pytest.mark.parametrize("user", USERS)
def test_a_script_then_read_only_parts_in_one_run(ssh_lab: SshLab, user: str) -> None:
    on_target(ssh_lab, user, check_run_then_parts)


def test_a_daemon_holding_the_pipes_does_not_hold_the_run(ssh_lab: SshLab) -> None:
    marker = unique_sleep()
    needle = f"sleep\0{marker}".encode()

    async def body(target: SshTarget) -> tuple[float, RunResult]:
        began = time.monotonic()
        result = await target.run(f"(sleep {marker} &)\necho done\n", timeout=60)
        return time.monotonic() - began, result

    took, result = on_target(ssh_lab, "root", body)
    assert result.ok and result.stdout == "done\n"
    assert took < 3
    daemons = host_pids_with(needle)
    assert daemons, "the daemon must still run (positive control)"
    on_target(ssh_lab, "root", lambda t: t.run(f"pkill -f 'sleep {marker}'"))
    assert wait_until(lambda: not host_pids_with(needle))


@pytest.mark.parametrize("user", USERS)
def test_put_and_get_roundtrip(ssh_lab: SshLab, user: str) -> None:
    data = bytes(range(256)) * 300
    path = f"/opt/wa-{user}/deep/dir/blob.bin"

    async def body(target: SshTarget) -> None:
        await target.put(path, data, 0o640)
        assert await target.get(path) == data
        check = await target.run(f"stat -c '%a %U' {path}")
        assert check.stdout == "640 root\n"
        await target.put(path, b"replaced\n", 0o755)
        assert await target.get(path) == b"replaced\n"
        check = await target.run(f"stat -c %a {path}; ls -A /opt/wa-{user}/deep/dir")
        assert check.stdout == "755\nblob.bin\n"  # no temporary file left beside it
        with pytest.raises(FileNotFoundError):
            await target.get("/etc/no-such-file")
        with pytest.raises(IsADirectoryError):
            await target.get("/etc")
        with pytest.raises(ValueError):
            await target.get("etc/hostname")
        assert (await target.get("/etc/shadow")).startswith(b"root:")  # root's view

    on_target(ssh_lab, user, body)


def test_one_connection_serves_every_command(ssh_lab: SshLab) -> None:
    async def body(target: SshTarget) -> list[str]:
        counts = []
        for _ in range(50):  # an earlier test's connection may take a moment to go
            if (await target.run("pgrep -c -f '^sshd: root@notty'")).stdout == "1\n":
                break
            await asyncio.sleep(0.1)
        for _ in range(5):
            result = await target.run("pgrep -c -f '^sshd: root@notty'")
            counts.append(result.stdout.strip())
        await target.put("/tmp/wa-one", b"x")
        await target.get("/tmp/wa-one")
        counts.append((await target.run("pgrep -c -f '^sshd: root@notty'")).stdout.strip())
        return counts

    assert on_target(ssh_lab, "root", body) == ["1"] * 6


def test_identity_and_facts(ssh_lab: SshLab) -> None:
    host = ssh_lab.hosts[1]

    async def body(target: SshTarget) -> tuple[str, str, str, bool]:
        facts = await target.facts()
        return target.identity, facts.hostname, facts.os_family, facts.is_root

    identity, hostname, family, is_root = on_target(ssh_lab, SUDO_USER, body)
    assert identity == f"ssh://{SUDO_USER}@{host.address}:22"
    assert (hostname, family, is_root) == ("lab02", "debian", True)


def test_jump_host(ssh_lab: SshLab) -> None:
    jump, far = ssh_lab.hosts[0], ssh_lab.hosts[3]
    # In far's /proc/net/tcp, the peer of its established port-22 connection.
    script = (
        "awk 'NR>1 && $4==\"01\" && substr($2, index($2,\":\")+1)==\"0016\" "
        "{print substr($3,1,8)}' /proc/net/tcp"
    )

    async def scenario() -> str:
        settings = ssh_lab.ssh_settings(jump_host=f"root@{jump.address}")
        async with SshTarget(far.spec(), settings) as target:
            return (await target.run(script)).stdout

    peers = asyncio.run(scenario()).split()
    jump_hex = "".join(f"{int(octet):02X}" for octet in reversed(jump.address.split(".")))
    assert peers == [jump_hex]
