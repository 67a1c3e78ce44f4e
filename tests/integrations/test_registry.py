"""Loading integration definitions: built-ins, plugin folders, entry points, bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from workflow_agent.errors import DefinitionError, ParameterError, UnknownIntegrationError
from workflow_agent.integrations.params import resolve_params
from workflow_agent.integrations.registry import BUILTIN_DIR, Registry, load_integration
from workflow_agent.secrets import MASK

NODE = BUILTIN_DIR / "prometheus-node-exporter"


def _plugin(tmp_path: Path, name: str, mutate: dict[str, object] | None = None) -> Path:
    """A copy of the node exporter integration under a new name, with changes."""
    folder = tmp_path / "plugins" / name
    shutil.copytree(NODE, folder)
    data = yaml.safe_load((folder / "definition.yaml").read_text())
    data["name"] = name
    data.update(mutate or {})
    (folder / "definition.yaml").write_text(yaml.safe_dump(data))
    return folder


def test_builtin_node_exporter_loads() -> None:
    registry = Registry.discover(entry_points=False)
    integration = registry.get("prometheus-node-exporter")
    assert integration.definition.parameters["listen_port"].default == 9100
    assert [m.name for m in integration.definition.methods] == ["apt"]


def test_unknown_integration_offers_close_names() -> None:
    registry = Registry.discover(entry_points=False)
    with pytest.raises(UnknownIntegrationError) as caught:
        registry.get("node-exporter")
    assert "prometheus-node-exporter" in (caught.value.hint or "")


def test_plugin_folder_adds_an_integration(tmp_path: Path) -> None:
    _plugin(tmp_path, "my-exporter")
    registry = Registry.discover([tmp_path / "plugins"], entry_points=False)
    assert "my-exporter" in registry.names()
    assert registry.get("my-exporter").source.startswith("plugin folder")


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        ({"parameters": {"port": {"type": "integer", "secret": True}}},
         "parameters.port"),
        ({"methods": []}, "methods"),
        ({"parameters": {"p": {"type": "string", "pattern": "("}}}, "parameters.p.pattern"),
        ({"checks": [{"type": "no_such_check"}]}, "checks"),
        ({"checks": [{"type": "port_listening", "port": "{{ undefined_name }}"}]}, "checks"),
        ({"uninstall": {"paths": ["relative/path"]}}, "uninstall.paths"),
        ({"colour": "blue"}, "colour"),
        ({"parameters": {"facts": {"type": "string"}}}, "parameters"),
        ({"parameters": {"listen_port": {"type": "integer", "default": "x"}}},
         "parameters.listen_port.default"),
        ({"parameters": {"listen_port": {"type": "integer", "default": 70000, "maximum": 65535}}},
         "parameters.listen_port.default"),
    ],
)
def test_invalid_definition_names_file_and_field(
    tmp_path: Path, mutate: dict[str, object], field: str
) -> None:
    folder = _plugin(tmp_path, "broken", mutate)
    with pytest.raises(DefinitionError) as caught:
        load_integration(folder)
    assert str(folder / "definition.yaml") in caught.value.message
    assert caught.value.field.startswith(field)


def test_missing_template_is_named(tmp_path: Path) -> None:
    folder = _plugin(tmp_path, "no-template")
    (folder / "templates" / "apt" / "verify.sh.j2").unlink()
    with pytest.raises(DefinitionError) as caught:
        load_integration(folder)
    assert caught.value.field == "methods.0.templates.verify"
    assert "verify.sh.j2" in caught.value.message


def test_entry_point_integration(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A package declaring the entry point adds an integration without core changes."""
    folder = _plugin(tmp_path, "packaged-exporter")
    dist = tmp_path / "site" / "packaged_exporter-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: packaged-exporter\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[workflow_agent.integrations]\npackaged = packaged_exporter:ROOT\n"
    )
    (tmp_path / "site" / "packaged_exporter.py").write_text(f"ROOT = {str(folder)!r}\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    registry = Registry.discover()
    assert registry.get("packaged-exporter").source.startswith("entry point packaged")


def _definition():  # type: ignore[no-untyped-def]
    return load_integration(NODE).definition


def test_params_defaults_and_types() -> None:
    resolved = resolve_params(_definition(), {"listen_port": "9200",
                                              "disable_collectors": "wifi, hwmon"}, {})
    assert resolved.values == {"listen_address": "0.0.0.0", "listen_port": 9200,
                               "disable_collectors": ["wifi", "hwmon"]}


@pytest.mark.parametrize(
    ("given", "problem"),
    [
        ({"listen_port": "ninety"}, "is not a valid integer"),
        ({"listen_port": "70000"}, "above the maximum"),
        ({"listen_address": "0.0.0.0; rm -rf /"}, "does not match the pattern"),
        ({"disable_collectors": "wifi,Bad-Name"}, "does not match the pattern"),
        ({"listen_prot": "1"}, "unknown"),
    ],
)
def test_params_rejected_with_reason(given: dict[str, str], problem: str) -> None:
    with pytest.raises(ParameterError) as caught:
        resolve_params(_definition(), given, {})
    assert problem in caught.value.message


def test_unknown_param_suggests_close_name() -> None:
    with pytest.raises(ParameterError) as caught:
        resolve_params(_definition(), {"listen_prot": "1"}, {})
    assert "listen_port" in (caught.value.hint or "")


def test_secret_comes_from_environment_and_is_masked(tmp_path: Path) -> None:
    folder = _plugin(tmp_path, "with-secret", {"parameters": {
        "license_key": {"type": "string", "secret": True, "required": True,
                        "env": "LICENSE_KEY", "pattern": "^[a-z0-9]+$"}}, "checks": []})
    definition = load_integration(folder).definition
    with pytest.raises(ParameterError) as caught:
        resolve_params(definition, {}, {})
    assert "LICENSE_KEY" in (caught.value.hint or "")
    resolved = resolve_params(definition, {}, {"LICENSE_KEY": "abc123secret"})
    assert resolved.secret_env == {"LICENSE_KEY": "abc123secret"}
    assert resolved.masked() == {"license_key": MASK}
    assert "abc123secret" not in repr(resolved.values)
    with pytest.raises(ParameterError) as bad:
        resolve_params(definition, {"license_key": "NOT-VALID-secret"}, {})
    assert "NOT-VALID-secret" not in bad.value.message


def test_required_parameter_can_be_used_in_checks(tmp_path: Path) -> None:
    folder = _plugin(tmp_path, "required-port", {"parameters": {
        "listen_port": {"type": "integer", "required": True},
        "listen_address": {"type": "string", "default": "0.0.0.0"}}})
    assert load_integration(folder).definition.parameters["listen_port"].required


def test_list_choices_are_checked_per_item(tmp_path: Path) -> None:
    folder = _plugin(tmp_path, "choosy", {"parameters": {
        **yaml.safe_load((NODE / "definition.yaml").read_text())["parameters"],
        "collectors": {"type": "list", "default": ["cpu"], "choices": ["cpu", "meminfo"]}}})
    definition = load_integration(folder).definition
    assert resolve_params(definition, {"collectors": "cpu,meminfo"}, {}).values[
        "collectors"] == ["cpu", "meminfo"]
    with pytest.raises(ParameterError) as caught:
        resolve_params(definition, {"collectors": "cpu,wifi"}, {})
    assert "'wifi' is not one of cpu, meminfo" in caught.value.message


def test_list_min_items(tmp_path: Path) -> None:
    folder = _plugin(tmp_path, "needs-servers", {"parameters": {
        **yaml.safe_load((NODE / "definition.yaml").read_text())["parameters"],
        "servers": {"type": "list", "default": ["a"], "min_items": 1}}})
    definition = load_integration(folder).definition
    with pytest.raises(ParameterError) as caught:
        resolve_params(definition, {"servers": ""}, {})
    assert "needs at least 1 item(s), got 0" in caught.value.message


def test_a_broken_plugin_stops_only_the_commands_that_need_it(tmp_path: Path) -> None:
    broken = _plugin(tmp_path, "broken-one")
    (broken / "definition.yaml").write_text("name: broken-one\nversion: [\n")
    registry = Registry.discover([tmp_path / "plugins"], entry_points=False)
    assert registry.get("prometheus-node-exporter").name == "prometheus-node-exporter"
    assert "broken-one" in registry.names()
    with pytest.raises(DefinitionError):
        registry.get("broken-one")


def test_plugin_overrides_builtin_and_folder_must_match_name(tmp_path: Path) -> None:
    folder = _plugin(tmp_path, "prometheus-node-exporter", {"version": "9.9.9"})
    registry = Registry.discover([tmp_path / "plugins"], entry_points=False)
    assert registry.get("prometheus-node-exporter").definition.version == "9.9.9"
    folder.rename(folder.with_name("renamed"))
    with pytest.raises(DefinitionError) as caught:
        Registry.discover([tmp_path / "plugins"], entry_points=False).get("renamed")
    assert caught.value.field == "name" and "name the folder after" in caught.value.message
