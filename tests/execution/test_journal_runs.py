"""How often the change journal reaches the target: every run is a round trip, and over
SSH a session and a runner on the host. Real sandboxes, real apt."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from workflow_agent.agent import WorkflowAgent
from workflow_agent.agents.coordinator import STAGE_EVENT, StageEvent, WorkflowRequest
from workflow_agent.bus import Message
from workflow_agent.config import WorkflowConfiguration
from workflow_agent.container import Container
from workflow_agent.execution import journal
from workflow_agent.execution.sandbox import SandboxTarget
from workflow_agent.execution.target import Target
from workflow_agent.verification.snapshot import DEFAULT_IGNORE, compare

pytestmark = pytest.mark.sandbox


def count_calls(target: Target) -> list[str]:
    """Wrap ``target``'s run, get and put to note each call (``"run"``, ``"get"``...)."""
    calls: list[str] = []

    def counted(name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        async def call(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            return await real(*args, **kwargs)
        return call

    for name in ("run", "get", "put"):
        setattr(target, name, counted(name, getattr(target, name)))
    return calls


def sh(target: Target, script: str, **kwargs: Any) -> str:
    result = asyncio.run(target.run(script, timeout=60, **kwargs))
    assert result.ok, result.stderr
    return result.stdout


def test_prepare_and_observe_each_read_the_target_in_one_run(
    tmp_path: Path, sandbox: SandboxTarget
) -> None:
    sh(sandbox, "mkdir -p /etc/app /opt/app && echo a=1 > /etc/app/app.conf && "
                "ln -s app.conf /etc/app/current && ln -s nowhere /etc/app/dangling && "
                "printf 'bin' > /opt/app/tool && chmod 750 /opt/app/tool && "
                "chown 12:34 /etc/app/app.conf")
    store = journal.JournalStore(tmp_path / "journal")
    book = store.create(journal.Header(
        workflow_id="w1", action="install", integration="app", target="sandbox",
        target_identity=sandbox.identity, paths=["/etc", "/opt/app"],
        ignore=list(DEFAULT_IGNORE), predicted=True, pid=os.getpid(),
        created=datetime.now(UTC)))
    predicted = ["/opt/app/tool", "/opt/app", "/opt/app/absent", "/etc/app/app.conf"]
    calls = count_calls(sandbox)

    saved = asyncio.run(journal.prepare(sandbox, book, predicted))
    assert calls == ["run"]
    pre = book.pre_snapshot()
    expected = [p for p in journal.backup_paths(pre, predicted) if p in pre.files]
    assert sorted(entry.name for entry in saved) == expected
    assert {"/etc/app/current", "/etc/app/dangling", "/opt/app/tool", "/opt/app"} <= set(
        expected)
    assert "/etc/app" not in expected  # under /etc only files and links are saved
    assert set(book.backup_members()) == set(expected)
    # Each saved entry is the state the snapshot saw, read back from the archive.
    for entry in saved:
        assert entry.before is not None
        assert compare(entry.before, pre.files[entry.name]) is None, entry.name
    state = book.read()
    assert state.phase == "executing" and state.saved == len(saved) and state.processes
    assert [s.header.workflow_id for s in store.unfinished(sandbox.identity)] == ["w1"]

    sh(sandbox, "echo a=2 > /etc/app/app.conf; rm /opt/app/tool; "
                "setsid sleep 1234 </dev/null >/dev/null 2>&1 &",
       env={journal.RUN_MARKER: "w1"})
    calls.clear()
    changes = asyncio.run(journal.observe(sandbox, book, "w1"))
    assert calls == ["run"]
    assert {change.describe() for change in changes if change.kind == "file"} == {
        "~ file /etc/app/app.conf (modified)", "- file /opt/app/tool (deleted)"}
    assert any(change.kind == "process" and change.op == "started"
               and change.process is not None and change.process.argv[-1] == "1234"
               for change in changes)
    assert book.read().phase == "executed"


def test_a_journaled_install_reads_the_target_once_per_journal_stage(
    tmp_path: Path, sandbox: SandboxTarget
) -> None:
    config = WorkflowConfiguration(data_dir=tmp_path / "data", cache_dir=tmp_path / "cache")
    agent = WorkflowAgent(Container(config))
    calls = count_calls(sandbox)
    per_stage: dict[str, int] = {}

    async def stage_ended(message: Message) -> None:
        event: StageEvent = message.payload
        per_stage[event.record.name] = len(calls) - sum(per_stage.values())

    agent.container.bus.subscribe(STAGE_EVENT, stage_ended)
    state = asyncio.run(agent.run(WorkflowRequest(
        action="install", integration="prometheus-node-exporter", target="sandbox",
        target_object=sandbox, params={"listen_port": "19141"})))
    assert state.status == "succeeded", state.error
    # The baseline (snapshot + which uninstall paths exist), the journal (snapshot,
    # backup, processes) and what the install changed (snapshot, processes) are one run
    # each; execute is the script itself, then that one.
    assert (per_stage["baseline"], per_stage["journal"], per_stage["execute"]) == (1, 1, 2)
