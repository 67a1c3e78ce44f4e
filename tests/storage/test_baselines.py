"""The baseline index: the baseline in force per (target, integration), without the store."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from workflow_agent.agents.coordinator import Coordinator
from workflow_agent.agents.execution import Baseline
from workflow_agent.bus import MemoryBus
from workflow_agent.config import WorkflowConfiguration
from workflow_agent.errors import HistoryError
from workflow_agent.execution.local import LocalTarget
from workflow_agent.execution.pool import TargetPool
from workflow_agent.secrets import MASK, Redactor
from workflow_agent.state import WorkflowState
from workflow_agent.storage.baselines import BaselineIndex
from workflow_agent.storage.history import HistoryStore
from workflow_agent.storage.spool import HistorySpool
from workflow_agent.verification.snapshot import Snapshot

T0 = datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)


def baseline(path: str, consumed_by: str | None = None) -> str:
    return Baseline(snapshot=Snapshot(), preexisting_paths=[path],
                    consumed_by=consumed_by).model_dump_json()


def start(writer: HistoryStore | HistorySpool, wid: str) -> None:
    writer.start_workflow(workflow_id=wid, action="install", integration="x", target="t",
                          params={})


def test_a_spooled_baseline_is_indexed_once_it_is_on_disk(tmp_path: Path) -> None:
    index = BaselineIndex(tmp_path / "baselines")
    spool = HistorySpool(tmp_path / "spool", Redactor(), index)

    async def run() -> None:
        start(spool, "w1")
        spool.save_snapshot(target="ssh:h1", integration="x", workflow_id="w1",
                            content=baseline("/etc/x"))
        await spool.durable("w1")

    asyncio.run(run())
    assert index.latest(target="ssh:h1", integration="x") == baseline("/etc/x")
    assert index.latest(target="ssh:h2", integration="x") is None
    assert not index.complete  # nothing says the database holds no other baseline
    with HistoryStore.for_path(tmp_path / "h.db", spool_dir=tmp_path / "spool",
                               baselines=index) as store:
        assert index.complete
        assert store.latest_snapshot(target="ssh:h1", integration="x") == baseline("/etc/x")
    [entry] = index.directory.glob("*.json")
    assert json.loads(entry.read_text())["target"] == "ssh:h1"
    assert entry.stat().st_mode & 0o777 == 0o600


def test_the_first_open_copies_the_newest_baselines_from_the_database(tmp_path: Path) -> None:
    secret = "hunter2-host"
    redactor = Redactor([secret])
    with HistoryStore.for_path(tmp_path / "h.db", redactor=redactor) as store:  # no index yet
        for wid in ("w1", "w2", "w3"):
            start(store, wid)
        store.save_snapshot(target=f"ssh:{secret}", integration="x", workflow_id="w1",
                            content=baseline("/old"), at=T0)
        store.save_snapshot(target=f"ssh:{secret}", integration="x", workflow_id="w2",
                            content=baseline("/new"), at=T0 + timedelta(days=1))
        store.save_snapshot(target="ssh:b", integration="x", workflow_id="w1",
                            content=baseline("/b"), at=T0)
        # Uninstalled with purge since: the newest says the baseline is used up.
        store.save_snapshot(target="ssh:b", integration="x", workflow_id="w3",
                            content=baseline("/b", consumed_by="w3"), at=T0 + timedelta(days=2))
    index = BaselineIndex(tmp_path / "baselines")
    with HistoryStore.for_path(tmp_path / "h.db", redactor=redactor, baselines=index):
        pass
    assert index.complete
    # Stored keys are redacted: lookups redact theirs the same way.
    assert index.latest(target=f"ssh:{secret}", integration="x") is None
    assert index.latest(target=f"ssh:{MASK}", integration="x") == baseline("/new")
    assert index.latest(target="ssh:b", integration="x") == baseline("/b", consumed_by="w3")
    assert not any(secret.encode() in p.read_bytes() for p in index.directory.iterdir())


def test_only_a_newer_snapshot_replaces_an_entry(tmp_path: Path) -> None:
    index = BaselineIndex(tmp_path / "baselines")
    index.save(target="t", integration="x", content="new", at=T0 + timedelta(seconds=1))
    index.save(target="t", integration="x", content="old", at=T0)  # e.g. replayed late
    index.save(target="t", integration="x", content="again", at=T0 + timedelta(seconds=1))
    assert index.latest(target="t", integration="x") == "new"
    index.save(target="t", integration="x", content="newer", at=T0 + timedelta(seconds=2))
    assert index.latest(target="t", integration="x") == "newer"


def test_the_store_indexes_what_it_saves_and_replays(tmp_path: Path) -> None:
    index = BaselineIndex(tmp_path / "baselines")
    plain = HistorySpool(tmp_path / "spool", Redactor())  # e.g. another data directory's
    start(plain, "w1")
    plain.save_snapshot(target="a", integration="x", workflow_id="w1", content=baseline("/a"))
    with HistoryStore.for_path(tmp_path / "h.db", spool_dir=tmp_path / "spool",
                               baselines=index) as store:
        assert index.latest(target="a", integration="x") == baseline("/a")
        store.save_snapshot(target="b", integration="x", workflow_id="w1",
                            content=baseline("/b"))
        assert index.latest(target="b", integration="x") == baseline("/b")


# -- the coordinator's lookup --------------------------------------------------------------


def coordinator(config: WorkflowConfiguration, store: HistoryStore | None) -> Coordinator:
    def history() -> HistoryStore:
        assert store is not None, "the history store was opened"
        return store

    return Coordinator(MemoryBus(), TargetPool(lambda spec: LocalTarget()), config,
                       Redactor(), history)


def state(target: str) -> WorkflowState:
    return WorkflowState(workflow_id="now", action="install", integration="x",
                         target=target, target_identity=target, started_at=T0)


def test_the_coordinator_reads_a_complete_index_without_the_store(tmp_path: Path) -> None:
    config = WorkflowConfiguration(data_dir=tmp_path)
    index = BaselineIndex.for_config(config)
    assert index is not None
    index.save(target="a", integration="x", content=baseline("/a"), at=T0)
    index.save(target="b", integration="x", content=baseline("/b", consumed_by="w9"), at=T0)
    index.mark_complete()
    found = coordinator(config, None)._stored_baseline(state("a"))
    assert found is not None and found.preexisting_paths == ["/a"]
    assert coordinator(config, None)._stored_baseline(state("b")) is None  # used up
    assert coordinator(config, None)._stored_baseline(state("c")) is None  # none taken


def test_the_coordinator_asks_the_store_until_the_index_is_complete(tmp_path: Path) -> None:
    config = WorkflowConfiguration(data_dir=tmp_path)
    index = BaselineIndex.for_config(config)
    assert index is not None
    with HistoryStore.for_path(tmp_path / "history.db") as store:  # an index-less store
        start(store, "w1")
        store.save_snapshot(target="a", integration="x", workflow_id="w1",
                            content=baseline("/a"))
        found = coordinator(config, store)._stored_baseline(state("a"))
    assert found is not None and found.preexisting_paths == ["/a"]
    assert not index.complete and index.latest(target="a", integration="x") is None


def test_with_a_shared_database_the_coordinator_always_asks_it(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    config = WorkflowConfiguration(data_dir=tmp_path, history_url=url)
    assert BaselineIndex.for_config(config) is None
    # A complete local index from before would be stale: other machines write the store.
    local = BaselineIndex(tmp_path / "baselines")
    local.save(target="a", integration="x", content=baseline("/stale"), at=T0)
    local.mark_complete()
    with HistoryStore(url) as store:
        start(store, "w1")
        store.save_snapshot(target="a", integration="x", workflow_id="w1",
                            content=baseline("/a"))
        found = coordinator(config, store)._stored_baseline(state("a"))
    assert found is not None and found.preexisting_paths == ["/a"]


def test_a_rerun_finds_its_baseline_without_importing_sqlalchemy(tmp_path: Path) -> None:
    """The first install (no index yet) asks the store, which fills the index; the second
    finds the first one's baseline in the index."""
    plugin = tmp_path / "plugins" / "touch-file"
    (plugin / "templates").mkdir(parents=True)
    (plugin / "templates" / "install.sh.j2").write_text("touch {{ path }}\n")
    watched = tmp_path / "watched"
    watched.mkdir()
    (plugin / "definition.yaml").write_text(yaml.safe_dump({
        "name": "touch-file", "version": "1", "description": "test",
        "parameters": {"path": {"type": "string", "required": True}},
        "platforms": [{"os_family": "debian"}],
        "methods": [{"name": "script", "templates": {"install": "install.sh.j2"}}],
        # No packages: every install looks up the baseline in force.
        "uninstall": {"watch": [str(watched)]},
    }))
    env = {**os.environ, "WORKFLOW_AGENT_DATA_DIR": str(tmp_path / "data"),
           "WORKFLOW_AGENT_PLUGIN_DIRS": json.dumps([str(tmp_path / "plugins")])}

    def install() -> list[str]:
        result = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "workflow_agent", "install",
             "touch-file", "-p", f"path={watched / 'marker'}", "--target", "local",
             "--no-rehearse", "--yes"],
            env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        return [line.split("|")[-1].strip() for line in result.stderr.splitlines()
                if line.startswith("import time:")]

    assert "sqlalchemy" in install()
    assert "sqlalchemy" not in install()
    data = tmp_path / "data"
    with HistoryStore.for_path(data / "history.db", spool_dir=data / "spool") as store:
        second, first = store.list_workflows()
        details = [{s.name: s.detail for s in store.get_workflow(run.id).stages}["baseline"]
                   for run in (first, second)]
    assert "files" in details[0]
    assert "stays the reference" in str(details[1]["skipped"])


@pytest.mark.parametrize("damage", [b"", b"{not json", b'{"at": "yesterday", "content": 1}'])
def test_a_damaged_entry_is_reported_and_replaced_by_the_next_save(
    tmp_path: Path, damage: bytes
) -> None:
    index = BaselineIndex(tmp_path / "baselines")
    index.save(target="t", integration="x", content="c", at=T0)
    [entry] = index.directory.glob("*.json")
    entry.write_bytes(damage)
    with pytest.raises(HistoryError, match="cannot be read") as caught:
        index.latest(target="t", integration="x")
    assert "rebuilds the index" in str(caught.value.hint)
    index.save(target="t", integration="x", content="d", at=T0)
    assert index.latest(target="t", integration="x") == "d"
