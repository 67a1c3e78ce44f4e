"""Facts: one read-only script, parsed."""

from __future__ import annotations

import asyncio

from workflow_agent.execution.local import LocalTarget
from workflow_agent.facts import parse_facts


def test_this_host() -> None:
    facts = asyncio.run(LocalTarget().facts())
    assert (facts.os_family, facts.distro, facts.package_manager) == ("debian", "debian", "apt")
    assert facts.arch == "amd64" or facts.arch == "arm64"
    assert facts.init_system in ("systemd", "sysv", "none")
    assert "bash" in facts.installed_packages and facts.is_root


def test_parse_families_packages_and_config_only_leftovers() -> None:
    output = (
        "distro=linuxmint\ndistro_like=ubuntu debian\ndistro_version=21.3\n"
        "machine=aarch64\npackage_manager=apt-get\ninit=systemd\nuid=1000\n"
        "--packages--\nii \tbash\t5.2\nrc \tzabbix-agent\t1:6.0\n"
        "iU \thalf-done\t1.0\nun \tnever\t\n"
    )
    facts = parse_facts(output)
    assert (facts.os_family, facts.arch, facts.package_manager) == ("debian", "arm64", "apt")
    assert facts.installed_packages == {"bash": "5.2"}
    assert facts.config_only_packages == ["zabbix-agent"]
    assert not facts.is_root and facts.init_system == "systemd"
    unknown = parse_facts("distro=plan9\ninit=weird\n--packages--\n")
    assert (unknown.os_family, unknown.init_system) == ("unknown", "none")
