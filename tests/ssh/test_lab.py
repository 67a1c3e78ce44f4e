"""The lab itself: hosts with their own address, file system and sshd; nothing leaks."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest

from helpers import host_pids_with
from lab import SshLab

pytestmark = pytest.mark.sandbox


def _links() -> str:
    return subprocess.run(["ip", "-o", "link"], capture_output=True, text=True,
                          check=True).stdout


def test_hosts_are_separate_machines(ssh_lab: SshLab) -> None:
    async def scenario() -> list[str]:
        outputs = []
        for index in range(2):
            async with ssh_lab.target(index) as target:
                result = await target.run(
                    "hostname; ip -4 -o addr show eth0 | awk '{print $4}'; "
                    "cat /etc/wa-lab-mark 2>/dev/null || echo none; echo mark > /etc/wa-lab-mark; "
                    "ip route | grep -c default || true")
                assert result.ok, result.stderr
                outputs.append(result.stdout)
        return outputs

    first, second = asyncio.run(scenario())
    assert first.split()[:2] == ["lab01", f"{ssh_lab.hosts[0].address}/24"]
    assert second.split()[:2] == ["lab02", f"{ssh_lab.hosts[1].address}/24"]
    # Each has its own file system: host 1 did not see host 0's write.
    assert first.split()[2] == "none" and second.split()[2] == "none"
    # No default route: the archive is reachable only through the apt proxy.
    assert first.split()[3] == "0"


def test_a_lab_tears_down_completely(sandbox_rootfs: Path) -> None:
    lab = SshLab(3)
    lab.start()
    bridge = lab.bridge
    holders = [host.holder_pid for host in lab.hosts]
    assert bridge in _links() and all(holders)
    assert host_pids_with(f"bind={lab.bridge_address}".encode())  # the apt forwarder
    lab.stop()
    assert bridge not in _links()
    assert not lab.directory.exists()
    assert not host_pids_with(f"bind={lab.bridge_address}".encode())
    assert not [pid for pid in holders if Path(f"/proc/{pid}").exists()]
    assert not host_pids_with(str(lab.directory).encode())
    lab.stop()  # idempotent


def test_ten_hosts_start_in_seconds(sandbox_rootfs: Path) -> None:
    with SshLab(10) as lab:
        assert len({host.address for host in lab.hosts}) == 10
        assert lab.started_in < 10  # measured here: ~0.4 s with a cached root
