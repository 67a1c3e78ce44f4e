"""Which processes the journal says a script started or stopped (pure logic)."""

from __future__ import annotations

from workflow_agent.execution.journal import ProcessInfo, observed
from workflow_agent.verification.snapshot import Snapshot


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
