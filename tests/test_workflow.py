"""The whole workflow on a real sandbox target: real apt, real daemon, real HTTP."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from helpers import plugin
from workflow_agent.agent import WorkflowAgent
from workflow_agent.agents.coordinator import WorkflowRequest
from workflow_agent.config import WorkflowConfiguration
from workflow_agent.container import Container
from workflow_agent.execution.local import LocalTarget
from workflow_agent.execution.sandbox import SandboxTarget
from workflow_agent.facts import Facts
from workflow_agent.state import WorkflowState

pytestmark = pytest.mark.sandbox

NODE = "prometheus-node-exporter"


def make_agent(tmp_path: Path, **settings: object) -> WorkflowAgent:
    config = WorkflowConfiguration(
        data_dir=tmp_path / "data", cache_dir=tmp_path / "cache", **settings  # type: ignore[arg-type]
    )
    return WorkflowAgent(Container(config))


def run(agent: WorkflowAgent, action: str, target: SandboxTarget, integration: str = NODE,
        **params: str) -> WorkflowState:
    request = WorkflowRequest(action=action, integration=integration,  # type: ignore[arg-type]
                              target="sandbox", params=params, target_object=target)
    return asyncio.run(agent.run(request))


def sh(target: SandboxTarget, script: str) -> str:
    result = asyncio.run(target.run(script, timeout=30))
    assert result.ok, result.stderr
    return result.stdout


def test_install_verify_uninstall_leaves_nothing(
    tmp_path: Path, sandbox: SandboxTarget
) -> None:
    agent = make_agent(tmp_path)
    installed = run(agent, "install", sandbox, listen_port="19101")
    assert installed.status == "succeeded", installed.error
    assert all(check.passed for check in installed.checks)

    # The sandbox shares this host's network: fetch the metrics as a user would.
    with urllib.request.urlopen("http://127.0.0.1:19101/metrics", timeout=10) as response:
        body = response.read().decode()
    assert "node_cpu_seconds_total" in body
    assert "node_exporter_build_info" in body

    verified = run(agent, "verify", sandbox, listen_port="19101")
    assert verified.status == "succeeded", verified.error

    removed = run(agent, "uninstall", sandbox, listen_port="19101")
    assert removed.status == "succeeded", removed.error
    assert removed.leftovers == []
    assert [s.name for s in removed.stages][-1] == "proof"
    left = sh(sandbox, "dpkg-query -W prometheus-node-exporter 2>&1 || true; "
                       "getent passwd prometheus || true; ls /var/lib/prometheus 2>&1 || true")
    assert "no packages found" in left and "prometheus:" not in left
    with pytest.raises(OSError):
        urllib.request.urlopen("http://127.0.0.1:19101/metrics", timeout=2)

    history = agent.container.history
    rows = history.list_workflows(limit=3)
    assert [(r.action, r.status) for r in rows] == [
        ("uninstall", "succeeded"), ("verify", "succeeded"), ("install", "succeeded")]
    record = history.get_workflow(installed.workflow_id)
    assert [s.name for s in record.stages] == [
        "validate", "facts", "knowledge", "strategy", "generate", "script-validation",
        "rehearsal", "baseline", "journal", "execute", "verify"]
    kinds = {a.kind for a in record.artifacts}
    assert {"facts", "script", "findings", "rehearsal", "baseline", "journal", "output",
            "verification"} <= kinds
    # Checkpoints leave the package lists out: the facts artifact holds them once.
    checkpoint = history.last_checkpoint(installed.workflow_id)
    assert checkpoint is not None and checkpoint[0] == "verify"
    checkpointed = WorkflowState.model_validate_json(checkpoint[1])
    assert installed.facts is not None and checkpointed.facts == installed.facts.model_copy(
        update={"installed_packages": {}, "config_only_packages": []})
    gathered = Facts.model_validate_json(
        next(a.content for a in record.artifacts if a.kind == "facts"))
    assert gathered.installed_packages == installed.facts.installed_packages
    assert "bash" in gathered.installed_packages


def test_uninstall_reports_what_is_left_behind(tmp_path: Path, sandbox: SandboxTarget) -> None:
    agent = make_agent(tmp_path)
    assert run(agent, "install", sandbox, listen_port="19102").status == "succeeded"
    sh(sandbox, "mkdir -p /etc/prometheus-extra && echo x > /etc/prometheus-extra/stray.conf")
    removed = run(agent, "uninstall", sandbox, listen_port="19102")
    assert removed.status == "failed"
    assert removed.exit_code == 5
    assert any("/etc/prometheus-extra/stray.conf" in line for line in removed.leftovers)


def test_policy_violation_is_refused_before_anything_runs(
    tmp_path: Path, sandbox: SandboxTarget
) -> None:
    plugins = plugin(tmp_path, "piped", "touch /etc/was-run\n"
                     "curl -fsSL http://example.invalid/install.sh | sh\n")
    agent = make_agent(tmp_path, plugin_dirs=[plugins])
    state = run(agent, "install", sandbox, integration="piped")
    assert state.status == "refused" and state.exit_code == 3
    assert "pipe" in (state.error.message if state.error else "")
    assert sh(sandbox, "ls /etc/was-run 2>&1 || true").strip().endswith("No such file or directory")
    stages = agent.container.history.get_workflow(state.workflow_id).stages
    assert stages[-1].name == "script-validation" and stages[-1].status == "failed"


@pytest.mark.parametrize("rehearse", [True, False], ids=["rehearsed", "not-rehearsed"])
def test_failing_install_reports_line_and_history_is_complete(
    tmp_path: Path, sandbox: SandboxTarget, rehearse: bool
) -> None:
    plugins = plugin(tmp_path, "broken", "echo starting\nmkdir -p /opt/demo\nfalse\necho never\n")
    agent = make_agent(tmp_path, plugin_dirs=[plugins], rehearse=rehearse)
    state = run(agent, "install", sandbox, integration="broken")
    assert state.status == "failed" and state.exit_code == 4
    script_lines = state.scripts["install"].text.splitlines()
    line = script_lines.index("false") + 1
    assert state.error is not None and f"line {line} with exit 1" in state.error.message
    record = agent.container.history.get_workflow(state.workflow_id)
    assert record.status == "failed"
    # Rehearsed, the failure stops everything before the target; not rehearsed, the
    # install runs, fails, and what it did (/opt/demo) is rolled back.
    failed = "rehearsal" if rehearse else "execute"
    assert [(s.name, s.status) for s in record.stages if s.status == "failed"] == [
        (failed, "failed")]
    if not rehearse:
        assert record.stages[-1].name == "rollback" and record.stages[-1].status == "succeeded"
    assert "/opt/demo" not in sh(sandbox, "ls -d /opt/*/ 2>/dev/null || true")
    output = next(a for a in record.artifacts if a.kind == "output")
    assert "starting" in output.content and "never" not in output.content


def test_hostile_parameter_is_refused_not_run(
    tmp_path: Path, sandbox_factory: Callable[..., SandboxTarget]
) -> None:
    agent = make_agent(tmp_path)
    target = sandbox_factory(network="none")
    state = run(agent, "install", target, listen_address="$(touch /tmp/pwned)")
    assert state.exit_code == 2 and state.stage == "validate"
    assert state.error is not None and "does not match the pattern" in state.error.message


class NoInitSystem(SandboxTarget):
    """A sandbox reporting no init system, so the integration must start its daemon itself."""

    async def facts(self, *, refresh: bool = False):  # type: ignore[no-untyped-def]
        facts = await super().facts(refresh=refresh)
        return facts.model_copy(update={"init_system": "none"})


def test_install_without_any_init_system(tmp_path: Path, sandbox_rootfs: Path) -> None:
    """The 'none' branch: the daemon is started directly and its pid recorded."""
    agent = make_agent(tmp_path)
    target = NoInitSystem(sandbox_rootfs)
    asyncio.run(target.open())
    try:
        installed = run(agent, "install", target, listen_port="19103")
        assert installed.status == "succeeded", installed.error
        pid = sh(target, "cat /run/prometheus/prometheus-node-exporter.pid").strip()
        assert sh(target, f"tr '\\0' ' ' < /proc/{pid}/cmdline").startswith(
            "/usr/bin/prometheus-node-exporter --web.listen-address=0.0.0.0:19103")
        removed = run(agent, "uninstall", target, listen_port="19103")
        assert removed.status == "succeeded", removed.error
        assert sh(target, f"[ -e /proc/{pid} ] && echo alive || echo gone").strip() == "gone"
    finally:
        asyncio.run(target.close())


def test_uninstall_without_a_template_is_refused_before_anything_runs(tmp_path: Path) -> None:
    plugins = plugin(tmp_path, "no-uninstall", "mkdir -p /opt/x\n")
    agent = make_agent(tmp_path, plugin_dirs=[plugins])
    request = WorkflowRequest(action="uninstall", integration="no-uninstall", target="local",
                              target_object=LocalTarget())
    state = asyncio.run(agent.run(request))
    assert state.exit_code == 2 and state.stage == "generate"
    assert state.error is not None and "has no uninstall template" in state.error.message


def test_keep_config_then_reinstall_then_purge_leaves_nothing(
    tmp_path: Path, sandbox: SandboxTarget
) -> None:
    """The first install's baseline stays the reference until a purge proves it again."""
    keep = make_agent(tmp_path, purge=False)
    agent = make_agent(tmp_path)
    assert run(agent, "install", sandbox, listen_port="19104").status == "succeeded"
    kept = run(keep, "uninstall", sandbox, listen_port="19104")
    assert kept.status == "succeeded" and kept.leftovers  # configuration kept, and said so
    again = run(agent, "install", sandbox, listen_port="19104")
    assert again.status == "succeeded", again.error
    assert next(s for s in again.stages if s.name == "baseline").detail.get("skipped")
    removed = run(agent, "uninstall", sandbox, listen_port="19104")
    assert removed.status == "succeeded", removed.error
    assert removed.leftovers == []
    params = agent.container.history.get_workflow(removed.workflow_id).params
    assert params["listen_port"] == 19104


def test_dependencies_the_install_added_are_removed(tmp_path: Path, sandbox: SandboxTarget) -> None:
    folder = tmp_path / "plugins" / "jq"
    (folder / "templates").mkdir(parents=True)
    (folder / "templates" / "install.sh.j2").write_text(
        "apt-get install -y --no-install-recommends jq\n")
    (folder / "templates" / "uninstall.sh.j2").write_text(
        "apt-get purge -y jq\n"
        "{% if remove_packages %}\napt-get purge -y {{ remove_packages }}\n{% endif %}\n")
    (folder / "definition.yaml").write_text(yaml.safe_dump({
        "name": "jq", "version": "1", "description": "jq and its libraries",
        "platforms": [{"os_family": "debian"}],
        "methods": [{"name": "apt", "templates": {"install": "install.sh.j2",
                                                  "uninstall": "uninstall.sh.j2"}}],
        "uninstall": {"packages": ["jq"], "watch": ["/usr/bin", "/usr/lib/x86_64-linux-gnu"]},
    }))
    agent = make_agent(tmp_path, plugin_dirs=[tmp_path / "plugins"])
    installed = run(agent, "install", sandbox, integration="jq")
    assert installed.status == "succeeded", installed.error
    assert "libjq1" in sh(sandbox, "dpkg-query -W -f '${Package}\\n'")
    removed = run(agent, "uninstall", sandbox, integration="jq")
    assert removed.status == "succeeded", removed.error
    assert "libjq1" in removed.scripts["uninstall"].text
    assert removed.leftovers == []


def test_purge_after_keep_config_removes_the_dependencies_left_as_config(
    tmp_path: Path, sandbox: SandboxTarget
) -> None:
    """zabbix-agent pulls in dependencies; a kept-configuration uninstall leaves some of
    them as configuration files only, and the purge after it must finish them."""
    keep = make_agent(tmp_path, purge=False)
    agent = make_agent(tmp_path)
    params = {"listen_port": "20551"}
    assert run(agent, "install", sandbox, "zabbix-agent", **params).status == "succeeded"
    assert run(keep, "uninstall", sandbox, "zabbix-agent", **params).status == "succeeded"
    removed = run(agent, "uninstall", sandbox, "zabbix-agent", **params)
    assert removed.status == "succeeded", removed.error
    assert removed.leftovers == []


def test_rehearsal_shows_the_changes_and_leaves_the_target_alone(
    tmp_path: Path, sandbox: SandboxTarget
) -> None:
    agent = make_agent(tmp_path, rehearse=True)
    before = sh(sandbox, "dpkg-query -W -f '${Package}\\n' | sort; ls -la /etc")
    planned = run(agent, "plan", sandbox, listen_port="19105")
    assert planned.status == "succeeded", planned.error
    assert planned.rehearsal is not None
    assert "prometheus-node-exporter" in planned.rehearsal.packages_added
    assert "prometheus" in planned.rehearsal.users_added
    defaults = next(c for c in planned.rehearsal.files
                    if c.path == "/etc/default/prometheus-node-exporter")
    assert defaults.kind in ("created", "modified")
    assert sh(sandbox, "dpkg-query -W -f '${Package}\\n' | sort; ls -la /etc") == before


def test_an_install_that_fails_in_rehearsal_never_touches_the_target(
    tmp_path: Path, sandbox: SandboxTarget
) -> None:
    plugins = plugin(tmp_path, "half", "mkdir -p /opt/half\necho x > /opt/half/file\nfalse\n")
    agent = make_agent(tmp_path, plugin_dirs=[plugins], rehearse=True)
    state = run(agent, "install", sandbox, integration="half")
    assert state.status == "failed" and state.exit_code == 4
    assert state.error is not None and "failed in rehearsal" in state.error.message
    assert state.rehearsal is not None
    assert [c.path for c in state.rehearsal.files if c.kind == "created"] == [
        "/opt/half", "/opt/half/file"]
    assert sh(sandbox, "ls /opt").strip() == ""
    assert [s.name for s in state.stages][-1] == "rehearsal"
