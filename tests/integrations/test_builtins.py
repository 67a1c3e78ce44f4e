"""The built-in integrations (zabbix-agent, munin-node, collectd,
prometheus-node-exporter), for real.

Fast part: every script of each, for every init system, with and without purge and
with and without dependencies to remove, renders and validates with no finding at all.

Sandbox part: in a fresh sandbox each one installs (on a free port) with every check
passing, installs again with the same parameters without changing its configuration
or restarting its daemon, and uninstalls leaving nothing behind.
"""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from typing import NamedTuple

import pytest

from helpers import free_low_port
from workflow_agent.agent import WorkflowAgent
from workflow_agent.agents.coordinator import WorkflowRequest
from workflow_agent.config import WorkflowConfiguration
from workflow_agent.container import Container
from workflow_agent.execution.sandbox import SandboxTarget
from workflow_agent.facts import Facts
from workflow_agent.integrations.params import resolve_params
from workflow_agent.integrations.registry import Registry
from workflow_agent.integrations.schema import ACTIONS
from workflow_agent.scripting.render import render_script
from workflow_agent.scripting.validate import validate_script
from workflow_agent.state import WorkflowState


class Builtin(NamedTuple):
    config: str  # the file the install manages
    pidfile: str  # the daemon's pid file, as its init script writes it


BUILTINS = {
    "zabbix-agent": Builtin("/etc/zabbix/zabbix_agentd.conf.d/workflow-agent.conf",
                            "/run/zabbix/zabbix_agentd.pid"),
    "munin-node": Builtin("/etc/munin/munin-node.conf", "/run/munin/munin-node.pid"),
    "collectd": Builtin("/etc/collectd/collectd.conf", "/run/collectd.pid"),
    "prometheus-node-exporter": Builtin("/etc/default/prometheus-node-exporter",
                                        "/run/prometheus/prometheus-node-exporter.pid"),
}


def make_agent(tmp_path: Path) -> WorkflowAgent:
    config = WorkflowConfiguration(data_dir=tmp_path / "data", cache_dir=tmp_path / "cache")
    return WorkflowAgent(Container(config))


def run(agent: WorkflowAgent, action: str, target: SandboxTarget, integration: str,
        **params: str) -> WorkflowState:
    request = WorkflowRequest(action=action, integration=integration,  # type: ignore[arg-type]
                              target="sandbox", params=params, target_object=target)
    return asyncio.run(agent.run(request))


def read(target: SandboxTarget, path: str) -> bytes:
    return asyncio.run(target.get(path))


@pytest.mark.parametrize("name", sorted(BUILTINS))
@pytest.mark.parametrize("init", ["systemd", "sysv", "none"])
def test_scripts_validate_without_findings(name: str, init: str) -> None:
    integration = {i.name: i for i in Registry.discover(entry_points=False)}[name]
    facts = Facts(os_family="debian", distro="debian", distro_version="12",
                  distro_codename="bookworm", arch="amd64", package_manager="apt",
                  init_system=init, is_root=True)
    params = resolve_params(integration.definition, {}, {})
    spec = integration.definition.uninstall
    for purge, packages in itertools.product((True, False), ([], ["libexample1", "a+b"])):
        extra = {"purge": purge, "remove_users": spec.users, "remove_groups": spec.groups,
                 "remove_paths": spec.paths, "remove_packages": packages}
        for method in integration.definition.methods:
            for action in ACTIONS:
                script = render_script(integration, method, action, facts, params, extra)
                assert script is not None
                report = validate_script(script.text, name=f"{name} {action}")
                assert report.findings == [], (action, purge, packages, report.findings)


@pytest.mark.sandbox
@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_install_reinstall_uninstall(tmp_path: Path, sandbox: SandboxTarget, name: str) -> None:
    builtin = BUILTINS[name]
    agent = make_agent(tmp_path)
    port = str(free_low_port())

    installed = run(agent, "install", sandbox, name, listen_port=port)
    assert installed.status == "succeeded", installed.error
    assert installed.checks and all(check.passed for check in installed.checks)
    config, pid = read(sandbox, builtin.config), read(sandbox, builtin.pidfile)
    assert f"{port}".encode() in config

    # Same parameters: nothing rewritten, nothing restarted.
    again = run(agent, "install", sandbox, name, listen_port=port)
    assert again.status == "succeeded", again.error
    assert all(check.passed for check in again.checks)
    assert read(sandbox, builtin.config) == config
    assert read(sandbox, builtin.pidfile) == pid

    removed = run(agent, "uninstall", sandbox, name, listen_port=port)
    assert removed.status == "succeeded", removed.error
    assert removed.leftovers == []
    assert [s.name for s in removed.stages][-1] == "proof"


def installed(target: SandboxTarget, *packages: str) -> dict[str, bool]:
    result = asyncio.run(target.run(
        "for p in " + " ".join(packages) + "; do\n"
        "  printf '%s %s\\n' \"$p\" \"$(dpkg-query -W -f '${db:Status-Abbrev}' \"$p\""
        " 2>/dev/null || true)\"\n"
        "done\n", timeout=60))
    assert result.ok, result.stderr
    states = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    return {p: states.get(p, "").startswith("ii") for p in packages}


@pytest.mark.sandbox
def test_uninstall_keeps_the_dependencies_another_package_needs(
    tmp_path: Path, sandbox: SandboxTarget
) -> None:
    """remove_packages lists every package the install added, but uninstall purges only
    those nothing needs any more. libcurl4, installed by hand after zabbix-agent, needs
    libssl3 and more that zabbix-agent's install added: those stay, and what is left
    behind is exactly libcurl4 with what would go along with it. libcurl3-gnutls, which
    only zabbix-agent needed, goes."""
    agent = make_agent(tmp_path)
    port = str(free_low_port())
    done = run(agent, "install", sandbox, "zabbix-agent", listen_port=port)
    assert done.status == "succeeded", done.error
    assert installed(sandbox, "libssl3", "libcurl3-gnutls", "libcurl4") == {
        "libssl3": True, "libcurl3-gnutls": True, "libcurl4": False}
    by_hand = asyncio.run(sandbox.run(
        "apt-get install -y --no-install-recommends libcurl4\n", timeout=600))
    assert by_hand.ok, by_hand.stderr

    removed = run(agent, "uninstall", sandbox, "zabbix-agent", listen_port=port)
    assert installed(sandbox, "zabbix-agent", "libcurl3-gnutls", "libssl3", "libcurl4") == {
        "zabbix-agent": False, "libcurl3-gnutls": False, "libssl3": True, "libcurl4": True}
    # What purging libcurl4 would now take along: the dependencies the uninstall kept.
    along = asyncio.run(sandbox.run(
        "apt-get -s -o APT::AutoRemove::RecommendsImportant=false "
        "-o APT::AutoRemove::SuggestsImportant=false --autoremove purge libcurl4 "
        "| awk '$1 == \"Purg\" {print $2}'\n", timeout=60))
    assert along.ok, along.stderr
    assert "libssl3" in along.stdout.split()
    left = [line.split() for line in removed.leftovers]
    assert all(words[:2] == ["+", "package"] for words in left), removed.leftovers
    assert sorted(words[2].split(":")[0] for words in left) == sorted(along.stdout.split())
