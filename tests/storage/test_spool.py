"""The history spool: runs write durable event files; the store ingests them on read."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import Engine, event

from workflow_agent.errors import HistoryError
from workflow_agent.secrets import Redactor
from workflow_agent.storage.baselines import BaselineIndex
from workflow_agent.storage.history import HistoryStore
from workflow_agent.storage.spool import HistorySpool

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def store_for(tmp_path: Path, redactor: Redactor | None = None) -> HistoryStore:
    return HistoryStore.for_path(tmp_path / "history.db", redactor=redactor,
                                 spool_dir=tmp_path / "spool")


def spool_file(directory: Path) -> Path:
    """The one file a spool wrote to."""
    [path] = directory.glob("*.jsonl")
    return path


def events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


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
    path = spool_file(tmp_path / "spool")
    raw = path.read_bytes()
    assert secret.encode() not in raw and json.dumps(secret).encode()[1:-1] not in raw
    assert path.stat().st_mode & 0o777 == 0o600


def test_a_damaged_line_is_named_and_kept(tmp_path: Path) -> None:
    spool = HistorySpool(tmp_path / "spool", Redactor())
    spool.start_workflow(workflow_id="w3", action="plan", integration="x", target="local",
                         params={})
    spool.set_params("w3", params={"port": 1})
    path = spool_file(tmp_path / "spool")
    with path.open("a") as handle:
        handle.write("{not json\n")
    spool.finish_workflow("w3", status="succeeded")
    with pytest.raises(HistoryError) as caught:
        store_for(tmp_path).open()
    assert f"{path}, line 3" in caught.value.message
    assert path.exists()
    # The lines before the damage are history all the same, each stored once.
    with HistoryStore.for_path(tmp_path / "history.db") as store:
        record = store.get_workflow("w3")
        assert store.spool_progress(path.name) == 2
    assert (record.status, record.params) == ("running", {"port": 1})


def test_a_partly_written_last_line_waits(tmp_path: Path) -> None:
    spool = HistorySpool(tmp_path / "spool", Redactor())
    spool.start_workflow(workflow_id="w4", action="plan", integration="x", target="local",
                         params={})
    path = spool_file(tmp_path / "spool")
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


# -- writing: group commit off the event loop --------------------------------------------


def test_concurrent_workflows_share_writes_and_fsyncs_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the writer syncs one batch, every workflow's lines queue for the next: one
    write and one fsync for them all, on the writer thread."""
    real_fsync, real_write = os.fsync, os.write
    fsyncs: list[int] = []
    writes: list[int] = []
    held = threading.Event()
    loop_thread = threading.get_ident()

    def fsync(fd: int) -> None:
        assert threading.get_ident() != loop_thread
        if not fsyncs:
            held.wait(10)  # the first batch's disk is slow
        fsyncs.append(fd)
        real_fsync(fd)

    def write(fd: int, data: Any) -> int:
        assert threading.get_ident() != loop_thread
        writes.append(fd)
        return real_write(fd, data)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "write", write)
    spool = HistorySpool(tmp_path / "spool", Redactor())

    async def workflow(n: int) -> None:
        wid = f"w{n:02d}"
        spool.start_workflow(workflow_id=wid, action="plan", integration="x", target="t",
                             params={})
        spool.record_stage(wid, name="facts", status="succeeded", started_at=T0,
                           finished_at=T0)
        spool.checkpoint(wid, stage="facts", state_json="{}")
        await spool.durable(wid)

    async def fleet() -> None:
        spool.start_workflow(workflow_id="first", action="plan", integration="x",
                             target="t", params={})
        runs = asyncio.gather(*(workflow(n) for n in range(20)))
        await asyncio.sleep(0.2)  # every workflow has queued its lines by now
        assert not runs.done()  # none went past a line that is not on disk
        held.set()
        await runs
        await spool.durable("first")

    asyncio.run(fleet())
    # "first" (with whatever else was queued when the writer took it), then all the rest.
    assert len(fsyncs) == len(writes) <= 2
    by_workflow: dict[str, list[str]] = {}
    for line in events(spool_file(tmp_path / "spool")):
        by_workflow.setdefault(line["args"]["workflow_id"], []).append(line["op"])
    assert len(by_workflow) == 21
    assert by_workflow["w07"] == ["start_workflow", "record_stage", "checkpoint"]


def test_lines_from_many_workflows_land_whole_and_in_order(tmp_path: Path) -> None:
    spool = HistorySpool(tmp_path / "spool", Redactor())
    payload = "x" * 300_000  # several pages: each line is still one piece

    async def workflow(n: int) -> None:
        wid = f"w{n:02d}"
        spool.start_workflow(workflow_id=wid, action="install", integration="x",
                             target=f"host{n}", params={})
        await spool.durable(wid)
        for stage in range(4):
            spool.record_stage(wid, name=f"s{stage}", status="succeeded", started_at=T0,
                               finished_at=T0)
            spool.add_artifact(wid, stage=f"s{stage}", kind="output", name="out",
                               content=json.dumps({"n": n, "stage": stage, "pad": payload}))
            await spool.durable(wid)
        spool.finish_workflow(wid, status="succeeded")
        await spool.durable(wid)

    async def fleet() -> None:
        await asyncio.gather(*(workflow(n) for n in range(12)))

    asyncio.run(fleet())
    lines = events(spool_file(tmp_path / "spool"))
    for n in range(12):
        mine = [e for e in lines if e["args"]["workflow_id"] == f"w{n:02d}"]
        artifacts = [json.loads(e["args"]["content"]) for e in mine if e["op"] == "add_artifact"]
        assert [(a["n"], a["stage"], len(a["pad"])) for a in artifacts] == [
            (n, stage, len(payload)) for stage in range(4)]
        assert [e["op"] for e in mine][-1] == "finish_workflow"
    with store_for(tmp_path) as store:
        runs = store.list_workflows(limit=None)
        assert len(runs) == 12 and {r.status for r in runs} == {"succeeded"}
        record = store.get_workflow("w07")
        assert [s.name for s in record.stages] == ["s0", "s1", "s2", "s3"]
        assert len(record.artifacts) == 4
    assert list((tmp_path / "spool").iterdir()) == []


def test_a_write_error_reaches_the_workflows_whose_lines_it_held(tmp_path: Path) -> None:
    spool_dir = tmp_path / "spool"
    spool_dir.write_text("a file where the spool folder should be")
    spool = HistorySpool(spool_dir, Redactor())

    async def workflow(wid: str) -> None:
        spool.start_workflow(workflow_id=wid, action="plan", integration="x", target="t",
                             params={})
        await spool.durable(wid)

    async def both() -> tuple[BaseException | None, BaseException | None]:
        return await asyncio.gather(workflow("a"), workflow("b"), return_exceptions=True)

    for failed in asyncio.run(both()):
        assert isinstance(failed, HistoryError)
        assert f"cannot write the history spool {spool_dir}" in failed.message
        assert failed.hint == "Check that the data directory is writable and not full."
    spool_dir.unlink()
    asyncio.run(workflow("c"))  # the writer goes on once the disk is fixed
    assert [e["args"]["workflow_id"] for e in events(spool_file(spool_dir))] == ["c"]


def test_a_failed_index_write_reaches_only_its_workflow(tmp_path: Path) -> None:
    (tmp_path / "baselines").write_text("not a folder")
    spool = HistorySpool(tmp_path / "spool", Redactor(), BaselineIndex(tmp_path / "baselines"))

    async def workflow(wid: str, snapshot: bool) -> None:
        spool.start_workflow(workflow_id=wid, action="install", integration="x", target=wid,
                             params={})
        if snapshot:
            spool.save_snapshot(target=wid, integration="x", workflow_id=wid, content="{}")
        await spool.durable(wid)

    async def both() -> tuple[BaseException | None, BaseException | None]:
        return await asyncio.gather(workflow("a", True), workflow("b", False),
                                    return_exceptions=True)

    failed, fine = asyncio.run(both())
    assert fine is None
    assert isinstance(failed, HistoryError) and "cannot write the baseline index" in failed.message


def test_a_write_error_outside_the_event_loop_is_raised_at_once(tmp_path: Path) -> None:
    (tmp_path / "spool").write_text("a file where the spool folder should be")
    spool = HistorySpool(tmp_path / "spool", Redactor())
    with pytest.raises(HistoryError, match="cannot write the history spool"):
        spool.start_workflow(workflow_id="w", action="plan", integration="x", target="t",
                             params={})


def test_a_full_disk_never_leaves_half_a_line(tmp_path: Path) -> None:
    """A write cut short by the file size limit (as by a full disk) is taken back to its
    last whole line, so the lines after it do not continue a torn one."""
    code = textwrap.dedent("""
        import asyncio, resource, signal, sys
        from pathlib import Path
        from workflow_agent.errors import HistoryError
        from workflow_agent.secrets import Redactor
        from workflow_agent.storage.spool import HistorySpool

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
        spool = HistorySpool(Path(sys.argv[1]), Redactor())
        spool.start_workflow(workflow_id="w", action="plan", integration="x", target="t",
                             params={})
        [path] = Path(sys.argv[1]).glob("*.jsonl")
        size = path.stat().st_size
        resource.setrlimit(resource.RLIMIT_FSIZE, (size + 3000, size + 3000))

        async def stage():
            for n in range(2):  # the first line fits, the second only in part
                spool.add_artifact("w", stage="s", kind="k", name=str(n),
                                   content="x" * 2000)
            await spool.durable("w")

        try:
            asyncio.run(stage())
        except HistoryError as exc:
            print(exc.message)
    """)
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "spool")],
                            capture_output=True, text=True, timeout=60, check=True)
    assert "cannot write the history spool" in result.stdout
    assert "too large" in result.stdout
    data = spool_file(tmp_path / "spool").read_bytes()
    assert data.endswith(b"\n")
    # The first line is whole (in one batch with the second, or in one of its own).
    assert [json.loads(line)["op"] for line in data.splitlines()] == [
        "start_workflow", "add_artifact"]


# -- ingesting: one transaction per file, each event exactly once -------------------------


@contextmanager
def counted_commits() -> Iterator[list[str]]:
    commits: list[str] = []

    def on_commit(conn: Any) -> None:
        commits.append(str(conn.engine.url))

    event.listen(Engine, "commit", on_commit)
    try:
        yield commits
    finally:
        event.remove(Engine, "commit", on_commit)


def _spool_run(spool: HistorySpool, wid: str, stages: int, *, finish: bool = True) -> int:
    spool.start_workflow(workflow_id=wid, action="install", integration="x", target="t",
                         params={})
    for n in range(stages):
        spool.record_stage(wid, name=f"s{n}", status="succeeded", started_at=T0,
                           finished_at=T0 + timedelta(seconds=n))
        spool.add_artifact(wid, stage=f"s{n}", kind="plan", name="p", content=f'{{"n": {n}}}')
        spool.checkpoint(wid, stage=f"s{n}", state_json=f'{{"stage": {n}}}')
    if finish:
        spool.finish_workflow(wid, status="succeeded", exit_code=0)
    return 1 + 3 * stages + int(finish)


def test_ingest_is_one_transaction_per_file(tmp_path: Path) -> None:
    store = store_for(tmp_path)
    store.open()  # the schema, before anything is spooled
    try:
        # Three processes' spools: one with four workflows, two with one each.
        spools = [HistorySpool(tmp_path / "spool", Redactor()) for _ in range(3)]
        names = [("a", 0), ("b", 0), ("c", 0), ("d", 0), ("e", 1), ("f", 2)]
        spooled = sum(_spool_run(spools[n], wid, 30) for wid, n in names)
        with counted_commits() as commits:
            assert store.ingest() == spooled == 6 * 92
        # One per file, and one to forget the counts of the three finished files.
        assert len(commits) == 3 + 1
        for wid, _ in names:
            record = store.get_workflow(wid)
            assert record.status == "succeeded"
            assert [s.name for s in record.stages] == [f"s{i}" for i in range(30)]
            assert len(record.artifacts) == len(record.checkpoints) == 30
    finally:
        store.close()
    assert list((tmp_path / "spool").iterdir()) == []


def test_a_file_is_taken_in_exactly_once_even_after_a_crash(tmp_path: Path) -> None:
    spool = HistorySpool(tmp_path / "spool", Redactor())
    _spool_run(spool, "w1", 2, finish=False)
    path = spool_file(tmp_path / "spool")
    with store_for(tmp_path) as store:
        assert store.spool_progress(path.name) == 7
        spool.finish_workflow("w1", status="succeeded")
        kept = path.read_bytes()
        assert store.ingest() == 1 and not path.exists()
        # A crash after the commit, before the file was deleted and its count forgotten:
        path.write_bytes(kept)
        with store.batch():
            store.record_spool_progress(path.name, 8)
        assert store.ingest() == 0 and not path.exists()
        record = store.get_workflow("w1")
        assert (record.status, len(record.stages), len(record.checkpoints)) == (
            "succeeded", 2, 2)
        assert store.spool_progress(path.name) is None  # forgotten once the file is gone


def test_the_writer_goes_on_in_a_new_file_once_its_file_is_done(tmp_path: Path) -> None:
    spool = HistorySpool(tmp_path / "spool", Redactor())
    _spool_run(spool, "w1", 1)
    first = spool_file(tmp_path / "spool")
    with store_for(tmp_path) as store:
        assert not first.exists()  # every workflow in it finished: taken in, deleted
        _spool_run(spool, "w2", 1, finish=False)
        second = spool_file(tmp_path / "spool")
        assert second != first  # never the old name: its count may still be in the store
        assert store.ingest() == 4 and second.exists()
        assert [r.id for r in store.list_workflows()] == ["w2", "w1"]



def test_the_file_of_a_killed_run_is_deleted_once_taken_in(tmp_path: Path) -> None:
    """A process killed mid-workflow never finishes it: its file is taken in, the
    workflow reads as incomplete, and the file is deleted rather than read again by
    every ingest; a live writer's unfinished file stays."""
    code = textwrap.dedent(f"""
        import os, signal
        from datetime import UTC, datetime
        from pathlib import Path
        from workflow_agent.secrets import Redactor
        from workflow_agent.storage.spool import HistorySpool
        spool = HistorySpool(Path({str(tmp_path / "spool")!r}), Redactor())
        spool.start_workflow(workflow_id="killed", action="install", integration="x",
                             target="t", params={{}})
        now = datetime.now(UTC)
        spool.record_stage("killed", name="facts", status="succeeded", started_at=now,
                           finished_at=now)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    child = subprocess.run([sys.executable, "-c", code], timeout=60, check=False)
    assert child.returncode == -9
    killed = spool_file(tmp_path / "spool")
    spool = HistorySpool(tmp_path / "spool", Redactor())
    _spool_run(spool, "alive", 1, finish=False)
    [alive] = set((tmp_path / "spool").glob("*.jsonl")) - {killed}
    with store_for(tmp_path) as store:
        record = store.get_workflow("killed")
        assert (record.status, [s.name for s in record.stages]) == ("incomplete", ["facts"])
        assert not killed.exists() and alive.exists()
        assert store.spool_progress(killed.name) is None
        assert store.get_workflow("alive").status == "running"
        assert store.ingest() == 0


def test_a_count_left_by_an_older_version_is_honoured(tmp_path: Path) -> None:
    """An older version wrote a file per workflow, and its count in ``<file>.applied``."""
    spool_dir = tmp_path / "spool"
    HistorySpool(spool_dir, Redactor()).start_workflow(
        workflow_id="w1", action="plan", integration="x", target="t", params={})
    path = spool_file(spool_dir)
    with store_for(tmp_path) as store:
        store.forget_spool_progress([path.name])  # the start is in; counted the old way:
    legacy = path.rename(spool_dir / "w1.jsonl")
    (spool_dir / "w1.applied").write_text("1")
    HistorySpool(tmp_path / "elsewhere", Redactor()).finish_workflow(
        "w1", status="failed", error="boom")
    with legacy.open("ab") as handle:
        handle.write(spool_file(tmp_path / "elsewhere").read_bytes())
    with store_for(tmp_path) as store:
        record = store.get_workflow("w1")
        assert (record.status, record.error) == ("failed", "boom")
    assert list(spool_dir.iterdir()) == []


def test_readers_ingesting_at_once_take_each_event_in_once(tmp_path: Path) -> None:
    spools = [HistorySpool(tmp_path / "spool", Redactor()) for _ in range(3)]
    for n in range(6):
        _spool_run(spools[n % 3], f"w{n}", 5, finish=n != 1)
    with HistoryStore.for_path(tmp_path / "history.db"):
        pass  # the database exists: the readers only ingest
    stores = [store_for(tmp_path) for _ in range(3)]
    with ThreadPoolExecutor(len(stores)) as pool:
        for opened in [pool.submit(store.open) for store in stores]:
            opened.result()
    try:
        for n in range(6):
            record = stores[0].get_workflow(f"w{n}")
            assert (len(record.stages), len(record.artifacts), len(record.checkpoints)) == (
                5, 5, 5)
        assert len(list((tmp_path / "spool").iterdir())) == 1  # w1's: it never finished
    finally:
        for store in stores:
            store.close()
