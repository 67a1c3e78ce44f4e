"""Rollback on real sandboxes: real apt, real users, real daemons, real files.

The tracked state a rollback must restore is what a snapshot sees under the
integration's watched paths (contents, modes, owners), the dpkg package set, and
``/etc/passwd`` and ``/etc/group``.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import pytest

from helpers import plugin
from workflow_agent.agent import WorkflowAgent
from workflow_agent.agents.coordinator import WorkflowRequest
from workflow_agent.config import WorkflowConfiguration
from workflow_agent.container import Container
from workflow_agent.execution.journal import JournalStore
from workflow_agent.execution.sandbox import SandboxTarget
from workflow_agent.integrations.registry import Registry
from workflow_agent.scripting.render import INJECTED_FAILURE_EXIT, script_steps
from workflow_agent.state import WorkflowState
from workflow_agent.verification.snapshot import Snapshot, diff, ignore_regex, take_snapshot

pytestmark = pytest.mark.sandbox

NODE = "prometheus-node-exporter"
GOLDEN = Path(__file__).parents[1] / "golden" / NODE / "apt-sysv" / "install.sh"
DEFAULTS = "/etc/default/prometheus-node-exporter"


def watched() -> list[str]:
    spec = Registry.discover([]).get(NODE).definition.uninstall
    return [*spec.watch, *spec.paths]


def agent_for(tmp_path: Path, **settings: Any) -> WorkflowAgent:
    config = WorkflowConfiguration(data_dir=tmp_path / "data", cache_dir=tmp_path / "cache",
                                   **settings)
    return WorkflowAgent(Container(config))


def run(agent: WorkflowAgent, target: SandboxTarget, action: str = "install",
        integration: str = NODE, **fields: Any) -> WorkflowState:
    request = WorkflowRequest(action=action,  # type: ignore[arg-type]
                              integration=integration, target="sandbox",
                              target_object=target, **fields)
    return asyncio.run(agent.run(request))


def snapshot(target: SandboxTarget) -> Snapshot:
    return asyncio.run(take_snapshot(target, paths=watched()))


def sh(target: SandboxTarget, script: str) -> str:
    result = asyncio.run(target.run(script, timeout=60))
    assert result.ok, result.stderr
    return result.stdout


STEPS = len(script_steps(GOLDEN.read_text()))


@pytest.mark.parametrize("step", range(1, STEPS + 1))
def test_a_failure_after_any_step_rolls_back_to_the_exact_pre_install_state(
    tmp_path: Path, sandbox: SandboxTarget, step: int
) -> None:
    before = snapshot(sandbox)
    state = run(agent_for(tmp_path, fail_after_step=step), sandbox,
                params={"listen_port": "19131"})
    assert state.status == "failed"
    assert state.runs["install"].exit_code == INJECTED_FAILURE_EXIT
    assert state.rollback is not None and state.rollback.ok, state.rollback
    assert state.exit_code == 4
    left = diff(before, snapshot(sandbox))
    assert left.is_empty, left.lines()
    # Nothing of the exporter runs any more, whatever step started it.
    assert "prometheus-node-exporter" not in sh(sandbox, "cat /proc/[0-9]*/cmdline | tr '\\0' ' '")


@pytest.mark.parametrize("rehearse", [True, False], ids=["rehearsed", "not-rehearsed"])
def test_a_user_edited_config_file_comes_back_byte_for_byte(
    tmp_path: Path, sandbox: SandboxTarget, rehearse: bool
) -> None:
    edited = b'# my own settings, do not lose them\nARGS="--collector.systemd"\n\xff\n'
    asyncio.run(sandbox.put(DEFAULTS, edited, mode=0o640))
    sh(sandbox, f"chown 4242:4343 {DEFAULTS}; touch -d '2020-02-02 02:02:02.123456789' "
                f"{DEFAULTS}")
    stat_before = sh(sandbox, f"stat -c '%a %u %g %y' {DEFAULTS}")
    before = snapshot(sandbox)
    state = run(agent_for(tmp_path, fail_after_step=STEPS, rehearse=rehearse), sandbox)
    assert state.rollback is not None and state.rollback.ok, state.rollback
    assert any(line.startswith(f"~ file {DEFAULTS}") for line in state.changes), state.changes
    assert asyncio.run(sandbox.get(DEFAULTS)) == edited
    assert sh(sandbox, f"stat -c '%a %u %g %y' {DEFAULTS}") == stat_before
    assert diff(before, snapshot(sandbox)).is_empty


def test_the_rehearsal_predicts_what_the_journal_then_records(
    tmp_path: Path, sandbox: SandboxTarget
) -> None:
    agent = agent_for(tmp_path)
    untouched = snapshot(sandbox)
    plan = asyncio.run(agent.run(WorkflowRequest(
        action="plan", integration=NODE, target="sandbox", target_object=sandbox)))
    assert diff(untouched, snapshot(sandbox)).is_empty, "plan --rehearse changed the target"

    state = run(agent, sandbox, params={"listen_port": "19132"})
    assert state.status == "succeeded", state.error
    assert state.rehearsal is not None
    journal = JournalStore(tmp_path / "data" / "journal").get(state.workflow_id)
    assert journal is not None
    recorded = journal.read()
    assert recorded.phase == "committed"
    ignore = recorded.header.ignore
    prefixes = tuple(p.rstrip("/") for p in recorded.header.paths)

    regex = re.compile(ignore_regex(ignore) or "$^", re.DOTALL)

    def tracked(path: str) -> bool:
        return path.startswith(prefixes) and not regex.fullmatch(path)

    predicted = {(c.path, c.kind) for c in state.rehearsal.files if tracked(c.path)}
    made = {(e.name, e.op) for e in recorded.changes if e.kind == "file"}
    assert predicted == made
    assert state.rehearsal.packages_added == {
        e.name: e.version_after for e in recorded.changes if e.kind == "package"}
    assert plan.status == "succeeded"


def test_a_failed_rollback_names_what_it_could_not_restore_and_keeps_the_journal(
    tmp_path: Path, sandbox: SandboxTarget
) -> None:
    before = snapshot(sandbox)
    agent = agent_for(tmp_path, fail_after_step=STEPS, on_failure="keep")
    failed = run(agent, sandbox, params={"listen_port": "19133"})
    assert failed.status == "failed" and failed.rollback is None
    assert "prometheus-node-exporter" in sh(sandbox, "dpkg-query -W -f '${Package}\\n'")

    journal = JournalStore(tmp_path / "data" / "journal").get(failed.workflow_id)
    assert journal is not None and journal.read().phase == "kept"
    saved = journal.backup_path.read_bytes()
    journal.backup_path.unlink()  # "deleted by hand"
    retry_agent = agent_for(tmp_path)
    broken = run(retry_agent, sandbox, action="rollback", rollback_of=failed.workflow_id)
    assert broken.exit_code == 8
    assert broken.rollback is not None
    not_restored = {line.split(": ", 1)[1].split(" (")[0] for line in broken.rollback.problems
                    if "backup" in line}
    assert {"~ file /etc/passwd", "~ file /etc/group", "~ file /etc/shadow",
            "~ file /etc/gshadow"} <= not_restored
    state = journal.read()
    assert state.phase == "rollback-failed" and state.changes  # the journal is intact

    journal.backup_path.write_bytes(saved)  # the backup found again: retry
    retried = run(retry_agent, sandbox, action="rollback", rollback_of=failed.workflow_id)
    assert retried.exit_code == 0, retried.error
    assert diff(before, snapshot(sandbox)).is_empty


def test_staged_rollback_keeps_the_install_that_worked_and_full_undoes_both(
    tmp_path: Path, sandbox: SandboxTarget
) -> None:
    before = snapshot(sandbox)
    first = run(agent_for(tmp_path), sandbox, params={"listen_port": "19134"})
    assert first.status == "succeeded", first.error
    working = asyncio.run(sandbox.get(DEFAULTS))
    pid = sh(sandbox, "cat /run/prometheus/prometheus-node-exporter.pid 2>/dev/null || "
                      "pidof prometheus-node-exporter")

    # Reconfiguring breaks (after its last step): staged undoes only the reconfiguration,
    # so the first install's configuration and a running exporter are back.
    broken = run(agent_for(tmp_path, fail_after_step=STEPS), sandbox,
                 params={"listen_port": "19135"})
    assert broken.rollback is not None and broken.rollback.ok, broken.rollback
    assert asyncio.run(sandbox.get(DEFAULTS)) == working
    assert "19134" in sh(sandbox, "cat /proc/[0-9]*/cmdline | tr '\\0' ' '")
    assert pid.strip()

    second = run(agent_for(tmp_path), sandbox, params={"listen_port": "19136"})
    assert second.status == "succeeded", second.error
    refused = run(agent_for(tmp_path), sandbox, action="rollback",
                  rollback_of=first.workflow_id)
    assert refused.exit_code == 2
    assert refused.error is not None and second.workflow_id[:8] in refused.error.message

    full = run(agent_for(tmp_path), sandbox, action="rollback",
               rollback_of=second.workflow_id, strategy="full")
    assert full.exit_code == 0, full.error
    assert full.rollback is not None
    assert full.rollback.workflows == [second.workflow_id, first.workflow_id]
    left = diff(before, snapshot(sandbox))
    assert left.is_empty, left.lines()


def test_per_change_rollback_undoes_only_the_chosen_change(
    tmp_path: Path, sandbox: SandboxTarget
) -> None:
    installed = run(agent_for(tmp_path), sandbox, params={"listen_port": "19137"})
    assert installed.status == "succeeded", installed.error
    journal = JournalStore(tmp_path / "data" / "journal").get(installed.workflow_id)
    assert journal is not None
    [logrotate] = [e for e in journal.read().changes
                   if e.name == "/etc/logrotate.d/prometheus-node-exporter"]
    undone = run(agent_for(tmp_path), sandbox, action="rollback",
                 rollback_of=installed.workflow_id, strategy="change",
                 changes=(logrotate.id,))
    assert undone.exit_code == 0, undone.error
    assert undone.rollback is not None and len(undone.rollback.undone) == 1
    with pytest.raises(FileNotFoundError):
        asyncio.run(sandbox.get(logrotate.name))
    assert "prometheus-node-exporter" in sh(sandbox, "dpkg-query -W -f '${Package}\\n'")


def test_a_later_rollback_does_not_overwrite_edits_made_since_unless_forced(
    tmp_path: Path, sandbox: SandboxTarget
) -> None:
    before = snapshot(sandbox)
    installed = run(agent_for(tmp_path), sandbox, params={"listen_port": "19138"})
    assert installed.status == "succeeded", installed.error
    asyncio.run(sandbox.put(DEFAULTS, b'ARGS="--web.listen-address=:19139"\n'))

    refused = run(agent_for(tmp_path), sandbox, action="rollback",
                  rollback_of=installed.workflow_id)
    assert refused.exit_code == 2
    assert refused.error is not None and DEFAULTS in refused.error.message
    assert "--force" in (refused.error.hint or "")
    assert "prometheus-node-exporter" in sh(sandbox, "dpkg-query -W -f '${Package}\\n'")

    forced = run(agent_for(tmp_path), sandbox, action="rollback",
                 rollback_of=installed.workflow_id, force=True)
    assert forced.exit_code == 0, forced.error
    assert diff(before, snapshot(sandbox)).is_empty


ODD = "/etc/prometheus-node-exporter-$'\\xff'.conf"  # a name that is not UTF-8, in bash
ODD_NAME = "/etc/prometheus-node-exporter-\udcff.conf"  # the same, as read back


def odd_file(sandbox: SandboxTarget) -> str:
    """Make ``ODD`` (content not UTF-8 either, mode 640); its ``stat`` line."""
    sh(sandbox, f"printf 'ARGS=1\\n\\376\\n' > {ODD}; chmod 640 {ODD}")
    return sh(sandbox, f"stat -c '%a %s %y' {ODD}")


def test_a_file_name_that_is_not_utf8_is_journaled_and_backed_up(
    tmp_path: Path, sandbox: SandboxTarget
) -> None:
    stat = odd_file(sandbox)
    before = asyncio.run(take_snapshot(sandbox, paths=["/etc", "/opt"]))
    assert ODD_NAME in before.files
    plugins = plugin(tmp_path, "plain", "mkdir -p /opt/plain\necho 1 > /opt/plain/x\n")
    state = run(agent_for(tmp_path, plugin_dirs=[plugins], fail_after_step=2), sandbox,
                integration="plain")
    assert state.status == "failed" and state.rehearsal is not None
    assert state.rollback is not None and state.rollback.ok, state.rollback
    journal = JournalStore(tmp_path / "data" / "journal").get(state.workflow_id)
    assert journal is not None and ODD_NAME in journal.pre_snapshot().files
    assert ODD_NAME in journal.backup_members()
    assert ODD_NAME in {entry.name for entry in journal.read().entries}
    assert sh(sandbox, f"stat -c '%a %s %y' {ODD}") == stat
    assert diff(before, asyncio.run(take_snapshot(sandbox, paths=["/etc", "/opt"]))).is_empty


def test_a_file_name_that_is_not_utf8_is_restored_byte_for_byte(
    tmp_path: Path, sandbox: SandboxTarget
) -> None:
    stat = odd_file(sandbox)
    before = asyncio.run(take_snapshot(sandbox, paths=["/etc", "/opt"]))
    plugins = plugin(tmp_path, "bytes", f"echo 'ARGS=2' > {ODD}\n"
                     "echo new > /etc/created-$'\\xfe'.conf\nfalse\n")
    state = run(agent_for(tmp_path, plugin_dirs=[plugins], rehearse=False), sandbox,
                integration="bytes")
    assert state.status == "failed" and state.runs["install"].exit_code == 1
    assert state.rollback is not None and state.rollback.ok, state.rollback
    assert set(state.changes) >= {
        "~ file /etc/prometheus-node-exporter-\\xff.conf (modified)",
        "+ file /etc/created-\\xfe.conf (created)"}
    journal = JournalStore(tmp_path / "data" / "journal").get(state.workflow_id)
    assert journal is not None
    assert {e.name for e in journal.read().changes} == {
        ODD_NAME, "/etc/created-\udcfe.conf"}
    assert sh(sandbox, f"od -An -c {ODD}").split() == [
        "A", "R", "G", "S", "=", "1", "\\n", "376", "\\n"]
    assert sh(sandbox, f"stat -c '%a %s %y' {ODD}") == stat
    assert diff(before, asyncio.run(take_snapshot(sandbox, paths=["/etc", "/opt"]))).is_empty
