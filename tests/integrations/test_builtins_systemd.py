"""The built-in integrations on a host that runs systemd: their systemd branch, for real.

Each one is installed, verified, installed again and uninstalled through the whole
workflow in a container booted with systemd (``NspawnTarget``), on a free port (the
container shares this host's network). Besides what the workflow checks itself, the
daemon must be a systemd unit, active and enabled; a second install with the same
parameters must neither rewrite its configuration nor restart it (same main PID); the
uninstall must leave nothing behind and the unit must be gone.

Each integration gets a freshly booted container: a boot takes ~0.3 s here, against
~10-30 s of apt per integration, so sharing one would save nothing worth the coupling.

Needs root, systemd-nspawn (systemd-container) and the Debian archive; the first run on
a machine builds the systemd root file system (~20 s).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from helpers import free_low_port
from workflow_agent.agent import WorkflowAgent
from workflow_agent.agents.coordinator import WorkflowRequest
from workflow_agent.config import WorkflowConfiguration
from workflow_agent.container import Container
from workflow_agent.execution.nspawn import NspawnTarget
from workflow_agent.state import WorkflowState

pytestmark = pytest.mark.sandbox


class Builtin(NamedTuple):
    config: str  # the file the install manages
    unit: str  # the daemon's systemd unit


BUILTINS = {
    "prometheus-node-exporter": Builtin("/etc/default/prometheus-node-exporter",
                                        "prometheus-node-exporter.service"),
    "zabbix-agent": Builtin("/etc/zabbix/zabbix_agentd.conf.d/workflow-agent.conf",
                            "zabbix-agent.service"),
    "munin-node": Builtin("/etc/munin/munin-node.conf", "munin-node.service"),
    "collectd": Builtin("/etc/collectd/collectd.conf", "collectd.service"),
}


@pytest.fixture
def booted(systemd_rootfs: Path) -> Iterator[NspawnTarget]:
    """A freshly booted container, powered off (killed) after the test."""
    target = NspawnTarget(systemd_rootfs)
    asyncio.run(target.open())
    try:
        yield target
    finally:
        asyncio.run(target.close())


def make_agent(tmp_path: Path) -> WorkflowAgent:
    config = WorkflowConfiguration(data_dir=tmp_path / "data", cache_dir=tmp_path / "cache")
    return WorkflowAgent(Container(config))


def run(agent: WorkflowAgent, action: str, target: NspawnTarget, integration: str,
        **params: str) -> WorkflowState:
    request = WorkflowRequest(action=action, integration=integration,  # type: ignore[arg-type]
                              target="systemd-sandbox", params=params, target_object=target)
    return asyncio.run(agent.run(request))


def explain(state: WorkflowState) -> str:
    """The error, failed checks and leftovers of a run, for assertion messages."""
    failed = [f"{c.name}: {c.detail}" for c in state.checks if not c.passed]
    return f"{state.error}\nfailed checks: {failed}\nleftovers: {state.leftovers}"


def unit_state(target: NspawnTarget, unit: str) -> dict[str, str]:
    """``systemctl show`` properties of ``unit`` plus ``is-enabled``."""
    result = asyncio.run(target.run(
        f"systemctl show -p ActiveState -p SubState -p MainPID -p LoadState {unit}\n"
        f"echo \"Enabled=$(systemctl is-enabled {unit} 2>/dev/null || true)\"\n", timeout=30))
    assert result.ok, result.stderr
    return dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)


def read(target: NspawnTarget, path: str) -> bytes:
    return asyncio.run(target.get(path))


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_install_verify_reinstall_uninstall_on_systemd(
    tmp_path: Path, booted: NspawnTarget, name: str
) -> None:
    builtin = BUILTINS[name]
    agent = make_agent(tmp_path)
    port = str(free_low_port())

    began = time.monotonic()
    installed = run(agent, "install", booted, name, listen_port=port)
    install_seconds = time.monotonic() - began
    assert installed.facts is not None and installed.facts.init_system == "systemd"
    assert installed.status == "succeeded", explain(installed)
    assert installed.checks and all(check.passed for check in installed.checks), explain(
        installed)
    unit = unit_state(booted, builtin.unit)
    assert (unit["LoadState"], unit["ActiveState"], unit["SubState"]) == (
        "loaded", "active", "running"), unit
    assert unit["Enabled"] == "enabled", unit
    pid = unit["MainPID"]
    assert pid != "0", unit
    config = read(booted, builtin.config)
    assert port.encode() in config

    verified = run(agent, "verify", booted, name, listen_port=port)
    assert verified.status == "succeeded", explain(verified)
    assert verified.checks and all(check.passed for check in verified.checks), explain(
        verified)

    # Same parameters: nothing rewritten, nothing restarted.
    again = run(agent, "install", booted, name, listen_port=port)
    assert again.status == "succeeded", explain(again)
    assert all(check.passed for check in again.checks), explain(again)
    assert read(booted, builtin.config) == config
    unit = unit_state(booted, builtin.unit)
    assert (unit["ActiveState"], unit["MainPID"]) == ("active", pid), unit

    began = time.monotonic()
    removed = run(agent, "uninstall", booted, name, listen_port=port)
    uninstall_seconds = time.monotonic() - began
    assert removed.status == "succeeded", explain(removed)
    assert removed.leftovers == []
    assert [s.name for s in removed.stages][-1] == "proof"
    unit = unit_state(booted, builtin.unit)
    assert unit["LoadState"] == "not-found" and unit["ActiveState"] == "inactive", unit
    with pytest.raises(FileNotFoundError):
        read(booted, builtin.config)
    print(f"{name}: install {install_seconds:.1f} s, uninstall {uninstall_seconds:.1f} s")
