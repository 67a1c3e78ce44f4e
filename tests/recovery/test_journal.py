"""The journal without a target: which processes it says a script started or stopped,
and which journals it finds unfinished."""

from __future__ import annotations

import os
import shutil
from datetime import UTC, datetime
from pathlib import Path

import pytest

from workflow_agent.errors import InvalidInputError
from workflow_agent.execution.journal import (
    Entry,
    Header,
    Journal,
    JournalStore,
    ProcessInfo,
)
from workflow_agent.execution.journal_probe import observed
from workflow_agent.recovery.rollback import Full, Staged
from workflow_agent.verification.snapshot import FileEntry, Snapshot


def process(pid: int, exe: str, *, daemon: bool = True, marked: bool = False,
            uid: int = 0) -> ProcessInfo:
    return ProcessInfo(pid=pid, start=str(1000 + pid), uid=uid, gid=uid, exe=exe,
                       argv=[exe], cwd="/", daemon=daemon, marked=marked)


def changes(before: list[ProcessInfo], after: list[ProcessInfo]) -> set[tuple[str, int]]:
    entries = observed(Snapshot(), Snapshot(), [], before, after, first_id=1)
    return {(e.op, e.process.pid) for e in entries if e.process is not None}


def test_a_restarted_service_is_stopped_and_started() -> None:
    old = process(10, "/usr/bin/exporter", uid=100)
    new = process(20, "/usr/bin/exporter", uid=100, marked=True)
    assert changes([old], [new]) == {("stopped", 10), ("started", 20)}


def test_unrelated_processes_ending_meanwhile_are_none_of_the_journals_business() -> None:
    started = process(20, "/usr/bin/sleep", marked=True)
    # Someone's foreground `sleep`, a login shell, a service of another user: all gone
    # while the script ran, none of them restarted by it.
    gone = [process(11, "/usr/bin/sleep", daemon=False), process(12, "/usr/bin/bash"),
            process(13, "/usr/bin/exporter", uid=5)]
    shell = process(21, "/usr/bin/bash", marked=True)
    assert changes(gone, [started, shell]) == {("started", 20), ("started", 21)}


def test_only_processes_the_script_started_count() -> None:
    other = process(30, "/usr/sbin/cron")  # started meanwhile by something else
    assert changes([], [other]) == set()


# -- which journals are unfinished: the index of open journals ------------------------------


def header(workflow_id: str, target: str = "ssh://root@web1:22") -> Header:
    return Header(workflow_id=workflow_id, action="install", integration="x", target=target,
                  target_identity=target, paths=["/etc"], ignore=[], predicted=False,
                  pid=os.getpid(), created=datetime.now(UTC))


def executing(store: JournalStore, workflow_id: str, target: str = "ssh://root@web1:22"
              ) -> Journal:
    journal = store.create(header(workflow_id, target))
    journal.record_prepared(Snapshot(), None, [], [])
    return journal


def open_ids(store: JournalStore, target: str = "ssh://root@web1:22") -> list[str]:
    return [summary.header.workflow_id for summary in store.unfinished(target)]


def test_a_journal_is_unfinished_from_executing_until_a_final_phase(tmp_path: Path) -> None:
    store = JournalStore(tmp_path / "journal")
    assert open_ids(store) == []
    prepared = store.create(header("prepared"))  # nothing changed yet: not unfinished
    journal = executing(store, "a")
    executing(store, "b", "ssh://root@db1:22")
    assert open_ids(store) == ["a"] and open_ids(store, "ssh://root@db1:22") == ["b"]
    journal.set_phase("executed")
    assert [s.phase for s in store.unfinished("ssh://root@web1:22")] == ["executed"]
    journal.set_phase("committed")
    assert open_ids(store) == []
    assert len(os.listdir(store.directory / ".open")) == 1  # only db1's "b" is indexed
    journal.set_phase("rolling-back")  # a later rollback of the committed install
    assert open_ids(store) == ["a"]
    journal.set_phase("rollback-failed")
    assert open_ids(store) == ["a"]
    journal.set_phase("rolled-back")
    assert open_ids(store) == []
    assert {s.header.workflow_id: s.phase for s in store.summaries()} == {
        "prepared": "prepared", "a": "rolled-back", "b": "executing"}
    assert prepared.phase == "prepared"


def test_finished_journals_are_not_read(tmp_path: Path) -> None:
    store = JournalStore(tmp_path / "journal")
    for number in range(20):
        executing(store, f"done-{number}").set_phase("committed")
    executing(store, "open")
    assert open_ids(store) == ["open"]
    # Finished journals made unreadable: asking which are unfinished does not notice.
    for number in range(20):
        path = store.directory / f"done-{number}" / "journal.jsonl"
        path.unlink()
        path.mkdir()
    assert open_ids(store) == ["open"]


def test_journals_from_before_the_index_are_found_by_one_scan(tmp_path: Path) -> None:
    store = JournalStore(tmp_path / "journal")
    executing(store, "old-open")
    executing(store, "old-done").set_phase("committed")
    executing(store, "old-kept").set_phase("kept")
    shutil.rmtree(store.directory / ".open")  # a data directory from before the index
    (store.directory / "not-a-journal").mkdir()
    assert open_ids(store) == ["old-open"]
    indexed = os.listdir(store.directory / ".open")
    assert [name.partition(".")[2] for name in indexed] == ["old-open"]


def test_the_phase_comes_from_the_journal_while_it_is_indexed(tmp_path: Path) -> None:
    # A crash right after the `executing` line was written, before the phase file was:
    # the phase file is only a mirror, the journal says what happened.
    store = JournalStore(tmp_path / "journal")
    journal = executing(store, "crashed")
    (journal.directory / "phase").unlink()
    assert open_ids(store) == ["crashed"]
    assert [s.phase for s in store.summaries()] == ["executing"]
    with open(journal.directory / "journal.jsonl", "a") as handle:
        handle.write('{"type": "phase", "pha')  # a line cut short
    assert journal.phase == "executing" and open_ids(store) == ["crashed"]


def test_a_deleted_journal_leaves_nothing_unfinished(tmp_path: Path) -> None:
    store = JournalStore(tmp_path / "journal")
    shutil.rmtree(executing(store, "gone").directory)
    assert open_ids(store) == []


# -- names that are not UTF-8 ----------------------------------------------------------------


def test_names_that_are_not_utf8_are_written_and_read_back_as_they_were(
    tmp_path: Path
) -> None:
    odd = "/etc/app-\udcff.conf"  # the byte 0xff, as file names are read from a target
    entry = FileEntry(type="f", mode=0o640, uid=0, gid=0, size=3, sha256="0" * 64)
    pre = Snapshot(files={odd: entry, "/etc/plain": entry}, users={"r\udcfe": "r\udcfe:x"})
    saved = [Entry(id=1, kind="file", op="modified", name=odd, before=entry, backup=True)]
    running = [ProcessInfo(pid=5, start="9", uid=0, gid=0, exe="/usr/bin/x\udcfe",
                           argv=["x\udcfe", "--flag=\udcff"], cwd="/")]
    store = JournalStore(tmp_path / "journal")
    journal = store.create(header("w1").model_copy(update={"paths": ["/etc", odd]}))
    journal.record_prepared(pre, None, saved, running)
    journal.add_entries([Entry(id=2, kind="file", op="created", name="/etc/new-\udcfe")])
    assert (journal.directory / "journal.jsonl").read_bytes().isascii()
    state = Journal(journal.directory).read()
    assert state.header.paths == ["/etc", odd]
    assert state.entries[0] == saved[0] and state.entries[1].name == "/etc/new-\udcfe"
    assert state.processes == running
    assert journal.pre_snapshot() == pre
    assert state.entries[1].describe() == "+ file /etc/new-\\xfe (created)"


# -- which journals a rollback reads: the index by target -------------------------------------


def test_a_targets_journals_are_found_without_reading_the_others(tmp_path: Path) -> None:
    store = JournalStore(tmp_path / "journal")
    first = executing(store, "web-1")
    first.set_phase("committed")
    for number in range(20):
        executing(store, f"db-{number}", "ssh://root@db1:22").set_phase("committed")
    executing(store, "web-2")
    # The other target's journals made unreadable: a rollback on web1 does not notice.
    for number in range(20):
        path = store.directory / f"db-{number}" / "journal.jsonl"
        path.unlink()
        path.mkdir()
    assert [(s.header.workflow_id, s.phase) for s in store.of_target("ssh://root@web1:22")
            ] == [("web-1", "committed"), ("web-2", "executing")]
    assert store.of_target("ssh://root@web2:22") == []


def test_journals_from_before_the_target_index_are_found_by_one_scan(tmp_path: Path) -> None:
    store = JournalStore(tmp_path / "journal")
    executing(store, "old-web").set_phase("committed")
    executing(store, "old-db", "ssh://root@db1:22")
    shutil.rmtree(store.directory / ".by-target")  # a data directory from before it
    (store.directory / "not-a-journal").mkdir()
    executing(store, "new-web")  # written by this release: builds the index first
    assert [s.header.workflow_id for s in store.of_target("ssh://root@web1:22")] == [
        "old-web", "new-web"]
    assert [s.header.workflow_id for s in store.of_target("ssh://root@db1:22")] == ["old-db"]
    assert len(os.listdir(store.directory / ".by-target")) == 3


def test_a_staged_rollback_under_a_later_install_of_the_same_target_is_refused(
    tmp_path: Path,
) -> None:
    store = JournalStore(tmp_path / "journal")
    first = executing(store, "first")
    first.set_phase("committed")
    executing(store, "elsewhere", "ssh://root@db1:22").set_phase("committed")
    assert [s.journal.workflow_id for s in Staged().select(store, first)] == ["first"]
    executing(store, "second").set_phase("committed")
    with pytest.raises(InvalidInputError, match=r"later workflow.*second"):
        Staged().select(store, first)
    second = store.get("second")
    assert second is not None
    assert [s.journal.workflow_id for s in Full().select(store, second)] == [
        "second", "first"]


def test_the_journals_a_process_left_unfinished(tmp_path: Path) -> None:
    store = JournalStore(tmp_path / "journal")
    executing(store, "mine-open")
    executing(store, "mine-done").set_phase("committed")
    store.create(header("mine-prepared"))  # nothing changed yet
    other = store.create(header("other").model_copy(update={"pid": os.getpid() + 1}))
    other.record_prepared(Snapshot(), None, [], [])
    assert [s.header.workflow_id for s in store.left_by(os.getpid())] == ["mine-open"]
    assert [s.header.workflow_id for s in store.left_by(os.getpid() + 1)] == ["other"]
