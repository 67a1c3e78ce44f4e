"""The real workflow over SSH: install prometheus-node-exporter on lab hosts with the
CLI, fetch its metrics from this machine over the host's own address, uninstall it."""

from __future__ import annotations

import asyncio
import subprocess
import urllib.error
from pathlib import Path

import pytest

from helpers import metrics, run_cli
from lab import SUDO_USER, SshLab

pytestmark = pytest.mark.sandbox

NODE = "prometheus-node-exporter"


def cli(lab: SshLab, tmp_path: Path, *args: str,
        **extra_env: str) -> subprocess.CompletedProcess[str]:
    return run_cli(tmp_path, *args, env={**lab.config_env(), **extra_env})


def remote(lab: SshLab, index: int, script: str, **env: str) -> str:
    async def scenario() -> str:
        async with lab.target(index) as target:
            result = await target.run(script, timeout=60, env=env)
            assert result.ok, result.stderr
            return result.stdout

    return asyncio.run(scenario())


def test_install_verify_uninstall_over_ssh_with_the_cli(ssh_lab: SshLab, tmp_path: Path) -> None:
    host = ssh_lab.hosts[0]
    spec = host.spec()
    installed = cli(ssh_lab, tmp_path, "install", NODE, "--target", spec, "--yes")
    assert installed.returncode == 0, installed.stdout + installed.stderr
    body = metrics(host.address)  # from this machine, over the host's own address
    assert "node_cpu_seconds_total" in body and "node_exporter_build_info" in body
    # It is the lab host's exporter: its hostname in the uname collector.
    assert 'nodename="lab01"' in body

    verified = cli(ssh_lab, tmp_path, "verify", NODE, "--target", spec)
    assert verified.returncode == 0, verified.stdout + verified.stderr

    removed = cli(ssh_lab, tmp_path, "uninstall", NODE, "--target", spec, "--yes")
    assert removed.returncode == 0, removed.stdout + removed.stderr
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        metrics(host.address)
    left = remote(ssh_lab, 0, f"dpkg-query -W -f '${{Status}}' {NODE} 2>/dev/null || true; "
                              "getent passwd prometheus || true; ls -d /etc/default/" + NODE
                              + " 2>/dev/null || true")
    assert "install ok installed" not in left and left.strip() in ("", "unknown ok not-installed")

    history = cli(ssh_lab, tmp_path, "history", "--output", "json")
    assert history.returncode == 0 and history.stdout.count(spec) >= 3


def test_a_sudo_user_installs_with_the_password_from_the_environment(
    ssh_lab: SshLab, tmp_path: Path
) -> None:
    host = ssh_lab.hosts[2]
    spec = host.spec(SUDO_USER)
    secret_env = {"WORKFLOW_AGENT_SSH__SUDO_PASSWORD_ENV": "WA_LAB_SUDO",
                  "WA_LAB_SUDO": ssh_lab.sudo_password}
    installed = cli(ssh_lab, tmp_path, "install", NODE, "--target", spec, "--yes",
                    "--verbose", **secret_env)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    assert "node_cpu_seconds_total" in metrics(host.address)
    verified = cli(ssh_lab, tmp_path, "verify", NODE, "--target", spec, **secret_env)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    # The password is nowhere: not in output, history, nor on the host's disk.
    password = ssh_lab.sudo_password.encode()
    assert password not in (installed.stdout + installed.stderr).encode()
    stored = [path for path in (tmp_path / "data").rglob("*")
              if path.is_file() and password in path.read_bytes()]
    assert stored == []
    found = remote(ssh_lab, 2, 'grep -rlF -- "$PW" /tmp /root /home /var/log /etc/sudoers* '
                               "2>/dev/null || true", PW=ssh_lab.sudo_password)
    assert found == ""
    # A wrong password fails clearly (exit 6), naming no secret.
    wrong = cli(ssh_lab, tmp_path, "verify", NODE, "--target", spec,
                WORKFLOW_AGENT_SSH__SUDO_PASSWORD_ENV="WA_LAB_SUDO", WA_LAB_SUDO="wrong-pass")
    assert wrong.returncode == 6, wrong.stdout + wrong.stderr
    assert "sudo refused the password" in wrong.stdout + wrong.stderr
