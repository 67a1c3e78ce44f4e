"""Bad input and broken hosts give clear errors, not tracebacks or hangs."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from lab import SUDO_USER, SshLab
from workflow_agent.config import WorkflowConfiguration
from workflow_agent.container import Container
from workflow_agent.errors import InvalidInputError, TargetError, TargetUnreachableError
from workflow_agent.execution.ssh import SshTarget, parse_ssh_spec

pytestmark = pytest.mark.sandbox


def open_error(target: SshTarget) -> TargetError:
    async def scenario() -> None:
        async with target:
            pass

    with pytest.raises(TargetError) as caught:
        asyncio.run(scenario())
    return caught.value


@pytest.mark.parametrize("spec", [
    "ssh://", "ssh://root@", "ssh://root@host:99999", "ssh://root@host:port",
    "ssh://root:hunter2@host", "ssh://root@host/some/path", "ssh://root@-oProxyCommand=x",
    "ssh://ro ot@host",
])
def test_malformed_specs_are_refused(tmp_path: Path, spec: str) -> None:
    container = Container(WorkflowConfiguration(data_dir=tmp_path, cache_dir=tmp_path))
    with pytest.raises(InvalidInputError) as caught:
        container.make_target(spec)
    assert "malformed SSH target" in caught.value.message
    assert "hunter2" not in caught.value.message
    assert caught.value.hint


def test_specs_parse() -> None:
    assert str(parse_ssh_spec("ssh://admin@db1.example:2222")) == "ssh://admin@db1.example:2222"
    assert str(parse_ssh_spec("ssh://[2001:db8::1]")) == "ssh://root@[2001:db8::1]:22"
    assert str(parse_ssh_spec("web1", default_user="ops")) == "ssh://ops@web1:22"


def test_the_container_builds_ssh_targets(tmp_path: Path) -> None:
    config = WorkflowConfiguration(data_dir=tmp_path, cache_dir=tmp_path,
                                   ssh={"connect_timeout": 3.0})
    target = Container(config).make_target("ssh://deploy@192.0.2.1:2200")
    assert isinstance(target, SshTarget)
    assert target.identity == "ssh://deploy@192.0.2.1:2200"
    assert target.settings.connect_timeout == 3.0


def test_host_key_mismatch_is_refused(ssh_lab: SshLab, tmp_path: Path) -> None:
    victim, other = ssh_lab.hosts[1], ssh_lab.hosts[2]
    forged = tmp_path / "known_hosts"
    forged.write_text(
        f"{victim.address} {other.host_key.export_public_key().decode().strip()}\n")
    error = open_error(SshTarget(victim.spec(), ssh_lab.ssh_settings(known_hosts=forged)))
    assert isinstance(error, TargetUnreachableError)
    assert "host key mismatch" in error.message and "refused" in error.message
    assert error.hint and f"ssh-keygen -R '{victim.address}' -f {forged}" in error.hint


def test_unknown_host_is_refused_unless_checking_is_off(ssh_lab: SshLab, tmp_path: Path) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    host = ssh_lab.hosts[1]
    error = open_error(SshTarget(host.spec(), ssh_lab.ssh_settings(known_hosts=empty)))
    assert "is not in" in error.message and error.hint and "ssh-keyscan" in error.hint

    async def unchecked() -> str:
        settings = ssh_lab.ssh_settings(known_hosts=empty, check_host_keys=False)
        async with SshTarget(host.spec(), settings) as target:
            return (await target.run("hostname")).stdout

    assert asyncio.run(unchecked()) == "lab02\n"


def test_accept_new_trusts_a_new_host_once_and_still_refuses_a_changed_key(
    ssh_lab: SshLab, tmp_path: Path
) -> None:
    host, other = ssh_lab.hosts[1], ssh_lab.hosts[2]
    known_hosts = tmp_path / "ssh" / "known_hosts"  # neither the file nor its folder yet
    settings = ssh_lab.ssh_settings(known_hosts=known_hosts, check_host_keys="accept-new")

    async def hostname() -> str:
        async with SshTarget(host.spec(), settings) as target:
            return (await target.run("hostname")).stdout

    assert asyncio.run(hostname()) == "lab02\n"
    recorded = known_hosts.read_text()
    assert recorded.split() == [host.address, *host.host_key.export_public_key().decode()
                                .split()[:2]]
    assert oct(known_hosts.stat().st_mode & 0o777) == "0o600"
    assert asyncio.run(hostname()) == "lab02\n" and known_hosts.read_text() == recorded

    # The host is known now: another key for it is a mismatch, refused, not re-learned.
    known_hosts.write_text(
        f"{host.address} {other.host_key.export_public_key().decode().strip()}\n")
    error = open_error(SshTarget(host.spec(), settings))
    assert isinstance(error, TargetUnreachableError) and "host key mismatch" in error.message
    assert host.host_key.export_public_key().decode().split()[1] not in known_hosts.read_text()


@pytest.mark.parametrize("content", [None, b"this is not a key\n"])
def test_unusable_key_file(ssh_lab: SshLab, tmp_path: Path, content: bytes | None) -> None:
    key = tmp_path / "id_broken"
    if content is not None:
        key.write_bytes(content)
    error = open_error(SshTarget(ssh_lab.hosts[1].spec(),
                                 ssh_lab.ssh_settings(client_keys=[key])))
    expected = "cannot read the SSH key" if content is None else "not a usable private key"
    assert expected in error.message and str(key) in error.message


def test_a_key_the_host_does_not_accept(ssh_lab: SshLab, tmp_path: Path) -> None:
    key = tmp_path / "id_other"
    asyncssh.generate_private_key("ssh-ed25519").write_private_key(str(key))
    error = open_error(SshTarget(ssh_lab.hosts[1].spec(),
                                 ssh_lab.ssh_settings(client_keys=[key])))
    assert isinstance(error, TargetUnreachableError)
    assert "authentication failed" in error.message and str(key) in error.message


def test_wrong_sudo_password(ssh_lab: SshLab) -> None:
    wrong = "not-the-password-123"
    target = SshTarget(ssh_lab.hosts[1].spec(SUDO_USER), ssh_lab.ssh_settings(
        sudo_password_env="WA_LAB_SUDO"), sudo_password=wrong)
    error = open_error(target)
    assert "sudo refused the password" in error.message
    assert error.hint and "$WA_LAB_SUDO" in error.hint
    assert wrong not in f"{error.message} {error.hint} {target!r}"


def test_sudo_without_a_password(ssh_lab: SshLab) -> None:
    error = open_error(SshTarget(ssh_lab.hosts[1].spec(SUDO_USER), ssh_lab.ssh_settings()))
    assert "needs a password" in error.message and error.hint


def test_sudo_off_runs_as_the_login_user(ssh_lab: SshLab) -> None:
    async def scenario() -> str:
        settings = ssh_lab.ssh_settings(sudo=False)
        async with SshTarget(ssh_lab.hosts[1].spec(SUDO_USER), settings) as target:
            return (await target.run("id -un")).stdout

    assert asyncio.run(scenario()) == f"{SUDO_USER}\n"


@pytest.mark.parametrize("where", ["no host", "closed port"])
def test_unreachable(ssh_lab: SshLab, where: str) -> None:
    subnet = ssh_lab.bridge_address.rsplit(".", 1)[0]
    spec: dict[str, Any] = {
        "no host": f"ssh://root@{subnet}.250:22",
        "closed port": f"ssh://root@{ssh_lab.hosts[1].address}:2222",
    }
    began = time.monotonic()
    error = open_error(SshTarget(spec[where], ssh_lab.ssh_settings(connect_timeout=2)))
    assert isinstance(error, TargetUnreachableError)
    assert time.monotonic() - began < 10
    assert ("did not answer" in error.message or "cannot connect" in error.message)
    if where == "closed port":
        assert "refused" in error.message.lower()


def test_a_host_that_dies_mid_run(ssh_lab: SshLab) -> None:
    """Its sshd killed during a run: the run fails as unreachable, promptly."""
    with SshLab(1) as lab:
        async def scenario() -> None:
            async with lab.target(0) as target:
                task = asyncio.create_task(target.run("sleep 30", timeout=60))
                await asyncio.sleep(0.5)
                await asyncio.to_thread(lab.kill_sshd, 0)
                await task

        began = time.monotonic()
        with pytest.raises(TargetUnreachableError) as caught:
            asyncio.run(scenario())
        assert "lost" in caught.value.message
        assert time.monotonic() - began < 15
