"""Rendering: shell quoting by construction, secrets kept out, golden files per method."""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from workflow_agent.errors import DefinitionError
from workflow_agent.execution.local import LocalTarget
from workflow_agent.facts import Facts
from workflow_agent.integrations.params import ResolvedParams, resolve_params
from workflow_agent.integrations.registry import BUILTIN_DIR, Registry, load_integration
from workflow_agent.scripting.render import render_script

GOLDEN = Path(__file__).parent.parent / "golden"


def facts(init: str = "sysv") -> Facts:
    return Facts(os_family="debian", distro="debian", distro_version="12",
                 distro_codename="bookworm", arch="amd64", package_manager="apt",
                 init_system=init, is_root=True)  # type: ignore[arg-type]


def _echo_integration(tmp_path: Path, parameters: dict[str, Any], body: str):  # type: ignore[no-untyped-def]
    folder = tmp_path / "echo"
    (folder / "templates").mkdir(parents=True)
    (folder / "templates" / "install.sh.j2").write_text(body)
    (folder / "definition.yaml").write_text(yaml.safe_dump({
        "name": "echo", "version": "1", "description": "test",
        "parameters": parameters,
        "platforms": [{"os_family": "debian"}],
        "methods": [{"name": "plain", "templates": {"install": "install.sh.j2"}}],
    }))
    return load_integration(folder)


# Any text bash can carry: everything but NUL (surrogates can't be encoded either).
HOSTILE = st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"),
                  max_size=60)


@pytest.fixture(scope="module")
def echo_lists(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return _echo_integration(
        tmp_path_factory.mktemp("hostile"),
        {"value": {"type": "string"}, "items": {"type": "list"}},
        'VALUE={{ value }}\nITEMS=({{ items }})\n'
        'printf "%s" "$VALUE" > {{ out }}\n'
        ': > {{ out }}.items\n'
        'for item in "${ITEMS[@]}"; do printf "%s\\0" "$item" >> {{ out }}.items; done\n'
    )


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=HOSTILE, items=st.lists(HOSTILE, max_size=3))
def test_hostile_values_reach_the_target_literally(
    echo_lists: Any, value: str, items: list[str]
) -> None:
    """Quotes, $(...), backticks, newlines, ';' and unicode arrive as literal strings."""
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "out"
        params = ResolvedParams({"value": value, "items": items}, {}, {})
        method = echo_lists.definition.methods[0]
        script = render_script(echo_lists, method, "install", facts(), params, {"out": str(out)})
        assert script is not None
        result = asyncio.run(LocalTarget().run(script.text, timeout=10))
        assert result.exit_code == 0, result.stderr
        assert out.read_bytes().decode() == value
        got_items = out.with_name("out.items").read_bytes().decode().split("\0")[:-1]
        assert got_items == items


def test_injection_attempt_does_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    integration = _echo_integration(tmp_path, {"value": {"type": "string"}},
                                    "echo {{ value }}\n")
    for attack in (f"$(touch {marker})", f"`touch {marker}`", f"x; touch {marker}",
                   f"x\ntouch {marker}", f"'; touch {marker}; '"):
        script = render_script(integration, integration.definition.methods[0], "install",
                               facts(), ResolvedParams({"value": attack}, {}, {}))
        assert script is not None
        result = asyncio.run(LocalTarget().run(script.text, timeout=10))
        assert result.stdout == attack + "\n"
        assert not marker.exists()


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ('echo "{{ value }}"\n', "double quotes"),
        ('echo "prefix $(echo {{ value }})"\n', "double quotes"),
        ("cat <<EOF\n{{ value }}\nEOF\n", "a here-document"),
        ("cat <<-'EOF'\n\tx={{ value }}\n\tEOF\n", "a here-document"),
        ("echo '{{ value }}'\n", "single quotes"),
    ],
)
def test_expression_in_a_quoting_context_is_refused(tmp_path: Path, body: str, where: str) -> None:
    """Where a quoted word would not stay one literal word, rendering refuses."""
    integration = _echo_integration(tmp_path, {"value": {"type": "string"}}, body)
    with pytest.raises(DefinitionError) as caught:
        render_script(integration, integration.definition.methods[0], "install", facts(),
                      ResolvedParams({"value": "$(touch /tmp/x)"}, {}, {}))
    assert where in caught.value.message


def test_bash_array_length_is_not_a_jinja_comment(tmp_path: Path) -> None:
    integration = _echo_integration(tmp_path, {}, 'A=(x y)\necho "${#A[@]}" {## note ##}\n')
    script = render_script(integration, integration.definition.methods[0], "install", facts(),
                           ResolvedParams({}, {}, {}))
    assert script is not None
    assert asyncio.run(LocalTarget().run(script.text, timeout=10)).stdout == "2\n"


def test_refusal_names_the_line_after_continued_lines(tmp_path: Path) -> None:
    integration = _echo_integration(tmp_path, {"value": {"type": "string"}},
                                    'echo one \\\n  two\necho "{{ value }}"\n')
    with pytest.raises(DefinitionError) as caught:
        render_script(integration, integration.definition.methods[0], "install", facts(),
                      ResolvedParams({"value": "v"}, {}, {}))
    assert caught.value.field == "rendered line 3"


def test_expressions_after_heredocs_and_comments_are_fine(tmp_path: Path) -> None:
    body = ("V={{ value }}  # comment with \" and '\n"
            "cat <<EOF >/dev/null\nit's \"$V\"\nEOF\n"
            "printf '%s' {{ value }}\n")
    integration = _echo_integration(tmp_path, {"value": {"type": "string"}}, body)
    script = render_script(integration, integration.definition.methods[0], "install", facts(),
                           ResolvedParams({"value": "a 'b' $(c)"}, {}, {}))
    assert script is not None
    result = asyncio.run(LocalTarget().run(script.text, timeout=10))
    assert result.stdout == "a 'b' $(c)\n"  # output is collected line by line


def test_secret_cannot_be_rendered_into_a_script(tmp_path: Path) -> None:
    integration = _echo_integration(
        tmp_path, {"token": {"type": "string", "secret": True, "env": "TOKEN"}},
        "echo {{ token }}\n")
    with pytest.raises(DefinitionError) as caught:
        render_script(integration, integration.definition.methods[0], "install", facts(),
                      ResolvedParams({}, {"token": "s3cr3t-value"}, {"TOKEN": "s3cr3t-value"}))
    assert '"$TOKEN"' in caught.value.message
    assert "s3cr3t-value" not in caught.value.message


def test_secret_reaches_script_through_environment_only(tmp_path: Path) -> None:
    out = tmp_path / "out"
    integration = _echo_integration(
        tmp_path, {"token": {"type": "string", "secret": True, "env": "TOKEN"}},
        f'printf "%s" "$TOKEN" > {out}\n')
    params = ResolvedParams({}, {"token": "s3cr3t-value"}, {"TOKEN": "s3cr3t-value"})
    script = render_script(integration, integration.definition.methods[0], "install", facts(),
                           params)
    assert script is not None and "s3cr3t-value" not in script.text
    result = asyncio.run(LocalTarget().run(script.text, env=params.secret_env, timeout=10))
    assert result.ok and out.read_text() == "s3cr3t-value"


def test_failing_line_is_reported(tmp_path: Path) -> None:
    integration = _echo_integration(tmp_path, {}, "echo one\nfalse\necho never\n")
    script = render_script(integration, integration.definition.methods[0], "install", facts(),
                           ResolvedParams({}, {}, {}))
    assert script is not None
    result = asyncio.run(LocalTarget().run(script.text, timeout=10))
    failing = script.text.splitlines().index("false") + 1
    assert result.exit_code == 1
    assert f"failed at line {failing} with exit 1: false" in result.stderr
    assert "never" not in result.stdout


BUILTINS = {i.name: i for i in Registry.discover(entry_points=False)}
CUSTOM = {
    "prometheus-node-exporter": {"listen_address": "127.0.0.1", "listen_port": "9999",
                                 "disable_collectors": "wifi,hwmon"},
    "zabbix-agent": {"server": "127.0.0.1,10.0.0.0/24", "listen_port": "20050",
                     "hostname": "web-1"},
    "munin-node": {"allow": "10.0.0.0/8,^127\\.0\\.0\\.1$", "host_name": "web-1"},
    "collectd": {"listen_port": "9999", "interval": "30"},
}
CASES = [(name, f"apt-{init}", init, {}) for name in sorted(BUILTINS)
         for init in ("systemd", "sysv", "none")]
CASES += [(name, "apt-sysv-custom", "sysv", params) for name, params in CUSTOM.items()]


@pytest.mark.parametrize(("name", "case", "init", "given"), CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_golden_scripts(name: str, case: str, init: str, given: dict[str, str]) -> None:
    """Facts + parameters in, exact scripts out. UPDATE_GOLDEN=1 rewrites the files."""
    integration = BUILTINS[name]
    params = resolve_params(integration.definition, given, {})
    uninstall = integration.definition.uninstall
    extra = {"purge": True, "remove_users": uninstall.users,
             "remove_groups": uninstall.groups, "remove_paths": uninstall.paths,
             "remove_packages": ["libexample1"]}
    for method in integration.definition.methods:
        for action in ("install", "verify", "uninstall"):
            script = render_script(integration, method, action, facts(init), params, extra)
            if script is None:
                continue
            path = GOLDEN / name / case / f"{action}.sh"
            if os.environ.get("UPDATE_GOLDEN"):
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(script.text)
            assert path.exists(), f"no golden file {path}: run with UPDATE_GOLDEN=1"
            assert script.text == path.read_text(), f"{path} differs"


def test_every_builtin_is_covered_by_golden_files() -> None:
    names = {p.name for p in BUILTIN_DIR.iterdir() if (p / "definition.yaml").exists()}
    assert names <= {p.name for p in GOLDEN.iterdir()}
