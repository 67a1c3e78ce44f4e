"""Strategy selection: compatible methods scored; incompatible ones explained."""

from __future__ import annotations

import pytest

from workflow_agent.errors import UnsupportedPlatformError
from workflow_agent.facts import Facts
from workflow_agent.integrations.schema import Definition
from workflow_agent.strategy import select_method


def facts(**changes: object) -> Facts:
    base: dict[str, object] = dict(os_family="debian", distro="debian", distro_version="12",
                                   arch="amd64", package_manager="apt", init_system="sysv")
    base.update(changes)
    return Facts.model_validate(base)


DEFINITION = Definition.model_validate({
    "name": "x", "version": "1", "description": "d",
    "platforms": [{"os_family": "debian", "arch": ["amd64", "arm64"]},
                  {"os_family": "rhel"}],
    "methods": [
        {"name": "tarball", "complexity": 3, "security": 2,
         "templates": {"install": "t.sh"}},
        {"name": "apt", "requires": {"package_manager": "apt"}, "complexity": 1,
         "security": 5, "templates": {"install": "a.sh"}},
        {"name": "systemd-unit", "requires": {"init_system": ["systemd"]}, "complexity": 1,
         "security": 5, "templates": {"install": "s.sh"}},
    ],
})


def test_simplest_safest_compatible_method_wins_and_says_why() -> None:
    decision = select_method(DEFINITION, facts())
    assert decision.method == "apt"
    assert "beats tarball" in decision.reason
    by_name = {s.method: s for s in decision.scores}
    assert not by_name["systemd-unit"].compatible
    assert by_name["systemd-unit"].reasons == ["needs init_system systemd, target has sysv"]
    assert by_name["apt"].score > by_name["tarball"].score > 0


def test_fallback_when_the_preferred_method_does_not_fit() -> None:
    assert select_method(DEFINITION, facts(os_family="rhel", distro="fedora",
                                           package_manager="dnf")).method == "tarball"


def test_unsupported_platform_names_what_is_supported() -> None:
    with pytest.raises(UnsupportedPlatformError) as caught:
        select_method(DEFINITION, facts(arch="armhf"))
    assert "armhf" in caught.value.message
    assert "debian on amd64, arm64" in (caught.value.hint or "")


def test_no_compatible_method_explains_each() -> None:
    only_apt = DEFINITION.model_copy(update={"methods": DEFINITION.methods[1:2]})
    with pytest.raises(UnsupportedPlatformError) as caught:
        select_method(only_apt, facts(os_family="rhel", distro="rocky", package_manager="dnf"))
    assert "needs package_manager apt, target has dnf" in (caught.value.hint or "")
