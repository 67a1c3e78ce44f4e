"""The history spool: runs write durable event files; the store ingests them on read."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from workflow_agent.errors import HistoryError
from workflow_agent.secrets import Redactor
from workflow_agent.storage.history import HistoryStore
from workflow_agent.storage.spool import HistorySpool

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def store_for(tmp_path: Path, redactor: Redactor | None = None) -> HistoryStore:
    return HistoryStore.for_path(tmp_path / "history.db", redactor=redactor,
                                 spool_dir=tmp_path / "spool")


def test_spooled_run_reads_back_like_a_direct_one(tmp_path: Path) -> None:
    spool = HistorySpool(tmp_path / "spool", Redactor())
    spool.start_workflow(workflow_id="w1", action="install", integration="x", target="local",
                         params={"port": 9100})
    spool.record_stage("w1", name="facts", status="succeeded", started_at=T0,
                       finished_at=T0 + timedelta(seconds=2), detail={"distro": "debian"})
    spool.checkpoint("w1", stage="facts", state_json='{"stage": "facts"}')
    spool.add_artifact("w1", stage="facts", kind="facts", name="facts", content="{}")
    spool.save_snapshot(target="local:vm", integration="x", workflow_id="w1", content='{"a": 1}')
    with store_for(tmp_path) as store:
        running = store.get_workflow("w1")
        assert running.status == "running"  # this process is alive: not incomplete
        assert running.pid == os.getpid() and running.params == {"port": 9100}
        assert [(s.name, s.duration) for s in running.stages] == [("facts", 2.0)]
        spool.finish_workflow("w1", status="succeeded", exit_code=0)
        done = store.get_workflow("w1")
        assert done.status == "succeeded" and done.exit_code == 0
        assert len(done.stages) == 1 and len(done.checkpoints) == 1  # nothing applied twice
        assert [a.kind for a in done.artifacts] == ["facts"]
        assert store.latest_snapshot(target="local:vm", integration="x") == '{"a": 1}'
    assert list((tmp_path / "spool").iterdir()) == []  # a finished run's file is gone


def test_secrets_never_reach_the_spool_file(tmp_path: Path) -> None:
    secret = 'pa"ss\\word-42'
    spool = HistorySpool(tmp_path / "spool", Redactor([secret]))
    spool.start_workflow(workflow_id="w2", action="install", integration="x", target="local",
                         params={"key": secret})
    spool.add_artifact("w2", stage="execute", kind="output", name="install",
                       content=json.dumps({"line": f"token {secret}"}))
    spool.finish_workflow("w2", status="failed", error=f"bad {secret}", exit_code=4)
    raw = (tmp_path / "spool" / "w2.jsonl").read_bytes()
    assert secret.encode() not in raw and json.dumps(secret).encode()[1:-1] not in raw
    assert (tmp_path / "spool" / "w2.jsonl").stat().st_mode & 0o777 == 0o600


def test_a_damaged_line_is_named_and_kept(tmp_path: Path) -> None:
    spool = HistorySpool(tmp_path / "spool", Redactor())
    spool.start_workflow(workflow_id="w3", action="plan", integration="x", target="local",
                         params={})
    path = tmp_path / "spool" / "w3.jsonl"
    with path.open("a") as handle:
        handle.write("{not json\n")
    with pytest.raises(HistoryError) as caught:
        store_for(tmp_path).open()
    assert f"{path}, line 2" in caught.value.message
    assert path.exists()


def test_a_partly_written_last_line_waits(tmp_path: Path) -> None:
    spool = HistorySpool(tmp_path / "spool", Redactor())
    spool.start_workflow(workflow_id="w4", action="plan", integration="x", target="local",
                         params={})
    path = tmp_path / "spool" / "w4.jsonl"
    with path.open("a") as handle:
        handle.write('{"op": "finish_wor')  # the writer is mid-line
    with store_for(tmp_path) as store:
        assert store.get_workflow("w4").status == "running"
    assert path.exists()


def test_a_run_records_history_without_importing_sqlalchemy(tmp_path: Path) -> None:
    """The re-run path: a start-up budget of 0.35 s has no room for a database driver."""
    plugin = tmp_path / "plugins" / "touch-file"
    (plugin / "templates").mkdir(parents=True)
    (plugin / "templates" / "install.sh.j2").write_text("touch {{ path }}\n")
    (plugin / "definition.yaml").write_text(yaml.safe_dump({
        "name": "touch-file", "version": "1", "description": "test",
        "parameters": {"path": {"type": "string", "required": True}},
        "platforms": [{"os_family": "debian"}],
        "methods": [{"name": "script", "templates": {"install": "install.sh.j2"}}],
        # Declared and installed: the run takes no baseline and reads no history.
        "uninstall": {"packages": ["bash"], "watch": ["/opt"]},
    }))
    env = {**os.environ, "WORKFLOW_AGENT_DATA_DIR": str(tmp_path / "data"),
           "WORKFLOW_AGENT_PLUGIN_DIRS": json.dumps([str(tmp_path / "plugins")])}
    marker = tmp_path / "marker"
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "workflow_agent", "install", "touch-file",
         "-p", f"path={marker}", "--target", "local", "--no-rehearse", "--yes"],
        env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert marker.exists()
    imported = [line.split("|")[-1].strip() for line in result.stderr.splitlines()
                if line.startswith("import time:")]
    assert "sqlalchemy" not in imported
    with store_for(tmp_path / "data") as store:
        (row,) = store.list_workflows()
        assert (row.integration, row.status) == ("touch-file", "succeeded")
