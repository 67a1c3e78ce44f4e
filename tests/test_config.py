"""Configuration precedence: defaults < YAML file < environment < command line."""

from __future__ import annotations

from pathlib import Path

import pytest

from workflow_agent.config import load_configuration
from workflow_agent.errors import ConfigurationError


def test_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("target: sandbox\nverify_timeout: 5\nsandbox:\n  network: none\n"
                      "script_timeout: 30\n")
    assert load_configuration().target == "local"
    from_file = load_configuration(config_file=config)
    assert (from_file.target, from_file.verify_timeout, from_file.sandbox.network) == (
        "sandbox", 5.0, "none")
    monkeypatch.setenv("WORKFLOW_AGENT_VERIFY_TIMEOUT", "7")
    monkeypatch.setenv("WORKFLOW_AGENT_SANDBOX__NETWORK", "host")
    from_env = load_configuration(config_file=config)
    assert (from_env.verify_timeout, from_env.sandbox.network, from_env.script_timeout) == (
        7.0, "host", 30.0)
    from_flags = load_configuration(config_file=config, target="local", verify_timeout=None)
    assert (from_flags.target, from_flags.verify_timeout) == ("local", 7.0)


def test_config_file_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("purge: false\n")
    monkeypatch.setenv("WORKFLOW_AGENT_CONFIG_FILE", str(config))
    assert load_configuration().purge is False


@pytest.mark.parametrize(
    ("content", "problem"),
    [("target: [unclosed", "not valid YAML"), ("- a\n- b\n", "mapping"),
     ("verify_timeout: soon\n", "verify_timeout"), ("colour: blue\n", "colour")],
)
def test_bad_configuration_is_explained(tmp_path: Path, content: str, problem: str) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(content)
    with pytest.raises(ConfigurationError) as caught:
        load_configuration(config_file=config)
    assert problem in caught.value.message


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError) as caught:
        load_configuration(config_file=tmp_path / "nope.yaml")
    assert "cannot read" in caught.value.message


def test_list_setting_from_environment_must_be_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKFLOW_AGENT_PLUGIN_DIRS", "/srv/integrations")
    with pytest.raises(ConfigurationError) as caught:
        load_configuration()
    assert "WORKFLOW_AGENT_PLUGIN_DIRS='[" in (caught.value.hint or "")
    monkeypatch.setenv("WORKFLOW_AGENT_PLUGIN_DIRS", '["/srv/integrations"]')
    assert [str(p) for p in load_configuration().plugin_dirs] == ["/srv/integrations"]
