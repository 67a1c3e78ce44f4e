"""Facts: one read-only script, parsed."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from helpers import install_tiny_package
from workflow_agent.errors import TargetError
from workflow_agent.execution.local import LocalTarget
from workflow_agent.execution.target import Target
from workflow_agent.facts import (
    PackageListings,
    facts_script,
    listing_stamp,
    packages_listed,
    parse_facts,
)


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


def test_the_kernel_and_machine_are_read_from_proc() -> None:
    facts = asyncio.run(LocalTarget().facts())
    assert facts.kernel == os.uname().release


def _facts_output(target: Target, listings: PackageListings) -> tuple[str, str]:
    """A facts run spared by the kept listing: what the host printed, and the output
    with the kept listing in place."""
    previous = listings.previous(target.identity)
    result = asyncio.run(target.run(facts_script(listing_stamp(previous) if previous else None)))
    assert result.ok, result.stderr
    return result.stdout, listings.complete(target.identity, result.stdout, previous)


def test_a_kept_listing_spares_the_next_facts_run_until_the_packages_change(
    tmp_path: Path, sandbox: Target
) -> None:
    listings = PackageListings(tmp_path / "packages")
    printed, first = _facts_output(sandbox, listings)
    assert printed == first and "dpkg" in parse_facts(first).installed_packages
    assert listings.previous(sandbox.identity) == packages_listed(first)

    printed, again = _facts_output(sandbox, listings)
    assert packages_listed(printed).splitlines()[1:] == ["#same"]
    assert again == first and parse_facts(again) == parse_facts(first)
    assert parse_facts(again).arch == "amd64" or parse_facts(again).arch == "arm64"

    install_tiny_package(sandbox, "wa-listed-pkg", "2.5")
    printed, changed = _facts_output(sandbox, listings)
    assert printed == changed and "#same" not in printed
    assert parse_facts(changed).installed_packages == {
        **parse_facts(first).installed_packages, "wa-listed-pkg": "2.5"}
    assert listings.previous(sandbox.identity) == packages_listed(changed)
    assert [p.name for p in (tmp_path / "packages").iterdir()] == [
        p.name for p in (tmp_path / "packages").glob("*.txt")]  # no half-written file left


def test_a_listing_left_out_with_nothing_kept_is_an_error(tmp_path: Path) -> None:
    output = "distro=debian\n--packages--\n#db /var/lib/dpkg/status:1:2:3 \n#same\n"
    with pytest.raises(TargetError, match="left the package listing out"):
        PackageListings(tmp_path).complete("ssh://h", output, None)
    kept = "#db /var/lib/dpkg/status:9:9:9 \nii \tbash\t5.2\n"
    with pytest.raises(TargetError, match="left the package listing out"):
        PackageListings(tmp_path).complete("ssh://h", output, kept)
