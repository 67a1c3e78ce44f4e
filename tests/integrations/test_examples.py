"""The example integrations in examples/integrations, which docs/writing-integrations.md
walks through, must keep loading, rendering and validating: the guide must not rot.

Fast: no sandbox, no target. Every example is loaded through the registry as a plugin
folder, then every script of every method is rendered for Debian facts (systemd and
sysv) with default parameters, and validated exactly as a run would validate it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from workflow_agent.facts import Facts
from workflow_agent.integrations.params import resolve_params
from workflow_agent.integrations.registry import Integration, Registry
from workflow_agent.integrations.schema import ACTIONS
from workflow_agent.scripting.render import render_checks, render_script
from workflow_agent.scripting.validate import validate_script
from workflow_agent.strategy import score_method

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "integrations"
GUIDE = ROOT / "docs" / "writing-integrations.md"
#: The example the guide shows in full, file by file.
GUIDE_EXAMPLE = "prometheus-process-exporter"

FOLDERS = sorted(p for p in EXAMPLES.iterdir() if p.is_dir()) if EXAMPLES.is_dir() else []
#: A placeholder for secret parameters: they reach scripts only as environment variables.
SECRET = "example-secret-value"


def debian(init: str) -> Facts:
    return Facts(os_family="debian", distro="debian", distro_version="12",
                 distro_codename="bookworm", arch="amd64", package_manager="apt",
                 init_system=init, is_root=True)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def registry() -> Registry:
    return Registry.discover([EXAMPLES], entry_points=False)


def _example(registry: Registry, folder: Path) -> Integration:
    matches = [i for i in registry if i.root == folder]
    assert matches, f"{folder} was not loaded as an integration (no definition.yaml?)"
    return matches[0]


def _uninstall_contexts(integration: Integration) -> list[dict[str, Any]]:
    """What uninstall templates see: a purge after an install that created everything
    the definition lists, a purge without a baseline, and a --keep-config removal."""
    spec = integration.definition.uninstall
    return [
        {"purge": True, "remove_users": spec.users, "remove_groups": spec.groups,
         "remove_paths": spec.paths},
        {"purge": True, "remove_users": [], "remove_groups": [], "remove_paths": []},
        {"purge": False, "remove_users": [], "remove_groups": [], "remove_paths": []},
    ]


def test_examples_exist() -> None:
    assert GUIDE_EXAMPLE in [f.name for f in FOLDERS]


@pytest.mark.parametrize("folder", FOLDERS, ids=[f.name for f in FOLDERS])
def test_example_loads_through_the_registry(registry: Registry, folder: Path) -> None:
    integration = _example(registry, folder)
    assert integration.name == folder.name, "name the folder after the integration"
    assert integration.source == f"plugin folder {EXAMPLES}"
    assert registry.get(folder.name) is integration


@pytest.mark.parametrize("init", ["systemd", "sysv"])
@pytest.mark.parametrize("folder", FOLDERS, ids=[f.name for f in FOLDERS])
def test_example_scripts_render_and_validate(
    registry: Registry, folder: Path, init: str
) -> None:
    integration = _example(registry, folder)
    definition = integration.definition
    secret_env = {spec.env: SECRET for spec in definition.parameters.values()
                  if spec.secret and spec.env}
    params = resolve_params(definition, {}, secret_env)
    facts = debian(init)
    methods = [m for m in definition.methods if score_method(m, facts).compatible]
    assert methods, f"no method of {integration.name} fits Debian 12 with {init}"
    rendered = 0
    for method in methods:
        for action in ACTIONS:
            extras = _uninstall_contexts(integration) if action == "uninstall" else [{}]
            for extra in extras:
                script = render_script(integration, method, action, facts, params, extra)
                if script is None:
                    continue
                rendered += 1
                report = validate_script(
                    script.text, name=f"{integration.name} {method.name} {action} {extra}",
                    secret_env=tuple(secret_env),
                )
                assert report.errors == [], "\n".join(
                    f"line {f.line}: {f.code}: {f.message}" for f in report.errors
                ) + "\n\n" + script.text
                assert SECRET not in script.text
    assert rendered


@pytest.mark.parametrize("folder", FOLDERS, ids=[f.name for f in FOLDERS])
def test_example_checks_render_with_defaults(registry: Registry, folder: Path) -> None:
    definition = _example(registry, folder).definition
    params = resolve_params(definition, {}, {})
    checks = render_checks(definition.checks, params.values)
    assert checks, "an example should show at least one check"


def test_guide_shows_the_example_files_verbatim() -> None:
    """The guide's worked example is these files, in full: editing one means editing both."""
    guide = GUIDE.read_text(encoding="utf-8")
    folder = EXAMPLES / GUIDE_EXAMPLE
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    assert files
    for path in files:
        text = path.read_text(encoding="utf-8")
        assert text in guide, f"{path.relative_to(ROOT)} is not shown in full in {GUIDE.name}"
