"""How often an install reaches the target (every run is a round trip, over SSH to a
runner on the host), and what the journal records of a script run together with the
read of what it changed. Real sandboxes, real apt."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from helpers import host_pids_with, unique_sleep, wait_until
from workflow_agent.agent import WorkflowAgent
from workflow_agent.agents.coordinator import STAGE_EVENT, StageEvent, WorkflowRequest
from workflow_agent.agents.execution import OUTPUT_EVENT, OutputLine, summarize
from workflow_agent.bus import Message
from workflow_agent.config import WorkflowConfiguration
from workflow_agent.container import Container
from workflow_agent.execution import journal, journal_probe
from workflow_agent.execution.local import LocalTarget
from workflow_agent.execution.sandbox import SandboxTarget
from workflow_agent.execution.target import RunResult, Target, run_parts
from workflow_agent.facts import FACTS_SCRIPT, packages_listed, parse_facts
from workflow_agent.recovery.rollback import Staged, roll_back
from workflow_agent.scripting.render import PROLOGUE
from workflow_agent.secrets import Redactor
from workflow_agent.verification.snapshot import DEFAULT_IGNORE, compare, take_snapshot

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
    book = new_journal(store, sandbox, "w1", ["/etc", "/opt/app"], predicted=True)
    predicted = ["/opt/app/tool", "/opt/app", "/opt/app/absent", "/etc/app/app.conf"]
    calls = count_calls(sandbox)

    saved = asyncio.run(journal_probe.prepare(sandbox, book, predicted))
    assert calls == ["run"]
    pre = book.pre_snapshot()
    expected = [p for p in journal_probe.backup_paths(pre, predicted) if p in pre.files]
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
       env={journal_probe.RUN_MARKER: "w1"})
    calls.clear()
    changes = asyncio.run(journal_probe.observe(sandbox, book, "w1"))
    assert calls == ["run"]
    assert {change.describe() for change in changes if change.kind == "file"} == {
        "~ file /etc/app/app.conf (modified)", "- file /opt/app/tool (deleted)"}
    assert any(change.kind == "process" and change.op == "started"
               and change.process is not None and change.process.argv[-1] == "1234"
               for change in changes)
    assert book.read().phase == "executed"


@pytest.mark.parametrize("rehearse", [None, False])
def test_a_journaled_install_reads_the_target_once_per_stage(
    tmp_path: Path, sandbox: SandboxTarget, rehearse: bool | None
) -> None:
    config = WorkflowConfiguration(data_dir=tmp_path / "data", cache_dir=tmp_path / "cache",
                                   rehearse=rehearse)
    agent = WorkflowAgent(Container(config))
    calls = count_calls(sandbox)
    per_stage: dict[str, int] = {}
    streamed: dict[str, list[str]] = {"stdout": [], "stderr": []}

    async def stage_ended(message: Message) -> None:
        event: StageEvent = message.payload
        per_stage[event.record.name] = len(calls) - sum(per_stage.values())

    async def output(message: Message) -> None:
        line: OutputLine = message.payload
        if line.stage == "execute":
            streamed[line.stream].append(line.line)

    agent.container.bus.subscribe(STAGE_EVENT, stage_ended)
    agent.container.bus.subscribe(OUTPUT_EVENT, output)
    state = asyncio.run(agent.run(WorkflowRequest(
        action="install", integration="prometheus-node-exporter", target="sandbox",
        target_object=sandbox, params={"listen_port": "19141"})))
    assert state.status == "succeeded", state.error
    # Facts; the baseline (snapshot + which uninstall paths exist); the journal
    # (snapshot, backup, processes); the script, then what it changed (snapshot,
    # processes); the verify script, then the first try of the package, process and
    # port checks: one run each. The metrics check fetches in a run of its own. Without
    # a rehearsal, the facts' run reads what the journal saves too.
    assert {stage: per_stage[stage] for stage in (
        "facts", "baseline", "journal", "execute", "verify")} == {
        "facts": 1, "baseline": 1, "journal": 1 if rehearse is None else 0, "execute": 1,
        "verify": 2}
    assert book_of(tmp_path, state.workflow_id).read().saved > 0
    # The output recorded and streamed is the script's, nothing of what ran after it.
    [recorded] = [artifact.content for artifact
                  in agent.container.history.get_workflow(state.workflow_id).artifacts
                  if artifact.kind == "output" and artifact.name == "install"]
    assert streamed["stdout"] and "\x1e" not in recorded
    assert recorded == "".join(line + "\n" for line in streamed["stdout"] + streamed["stderr"])
    assert "Setting up prometheus-node-exporter" in recorded
    assert [e.describe() for e in book_of(tmp_path, state.workflow_id).read().changes
            if e.kind == "process" and "exporter" not in e.name] == []


def test_a_read_ahead_is_what_the_journal_saves_unless_it_is_stale(
    tmp_path: Path, sandbox: SandboxTarget
) -> None:
    sh(sandbox, "mkdir -p /etc/app && echo a=1 > /etc/app/app.conf")
    paths, ignore = ["/etc/app"], list(DEFAULT_IGNORE)
    read = journal_probe.before_read(paths, ignore)
    ahead = journal_probe.Before(tuple(paths), tuple(ignore), (), read,
                                 asyncio.run(sandbox.run(read.script)))
    # What it read stands for a snapshot (the baseline's hashes come from it); a garbled
    # read stands for none.
    held = ahead.snapshot("sandbox")
    assert held is not None and held.files == asyncio.run(
        take_snapshot(sandbox, paths=paths, ignore=ignore)).files
    assert replace(ahead, result=RunResult(0, "garbled", "", 0.1)).snapshot("sandbox") is None
    sh(sandbox, "echo a=2 > /etc/app/app.conf")
    store = journal.JournalStore(tmp_path / "journal")
    calls = count_calls(sandbox)

    def saved(workflow_id: str, before: journal_probe.Before, watched: list[str]) -> bytes:
        book = new_journal(store, sandbox, workflow_id, watched)
        asyncio.run(journal_probe.prepare(sandbox, book, ahead=before))
        book.set_phase("committed")
        return book.pre_snapshot().files["/etc/app/app.conf"].sha256 or ""

    # Fresh and for this journal: no run, and what it read (a=1) is what is saved.
    assert saved("w5", ahead, paths) == hashlib.sha256(b"a=1\n").hexdigest()
    assert calls == []
    # Too old (a prompt waited), or for other paths: the target is read again (a=2).
    stale = replace(ahead, read_at=ahead.read_at - journal_probe.AHEAD_MAX_AGE - 1)
    assert saved("w6", stale, paths) == hashlib.sha256(b"a=2\n").hexdigest()
    assert saved("w7", ahead, ["/etc/app", "/opt"]) == hashlib.sha256(b"a=2\n").hexdigest()
    assert calls == ["run", "run"]


def test_a_read_ahead_since_an_earlier_snapshot_saves_every_hash(
    tmp_path: Path, sandbox: SandboxTarget
) -> None:
    """A re-run's read ahead hashes only what changed since the stored baseline; the
    journal then saves every file's hash all the same: the baseline's for the files that
    kept their stamps, the new one for the file that changed."""
    sh(sandbox, "mkdir -p /etc/app && for i in $(seq 40); do "
                "head -c 32768 /dev/urandom > /etc/app/f$i; done")
    paths, ignore = ["/etc/app"], list(DEFAULT_IGNORE)
    earlier = asyncio.run(take_snapshot(sandbox, paths=paths, ignore=ignore))
    sh(sandbox, "echo changed > /etc/app/f1")
    read = journal_probe.before_read(paths, ignore, since=earlier)
    assert "declare -A known" in read.script
    ahead = journal_probe.Before(tuple(paths), tuple(ignore), (), read,
                                 asyncio.run(sandbox.run(read.script)), since=earlier)
    book = new_journal(journal.JournalStore(tmp_path / "journal"), sandbox, "w9", paths)
    asyncio.run(journal_probe.prepare(sandbox, book, ahead=ahead))
    book.set_phase("committed")
    now = asyncio.run(take_snapshot(sandbox, paths=paths, ignore=ignore))
    assert book.pre_snapshot().files == now.files
    assert now.files["/etc/app/f1"].sha256 == hashlib.sha256(b"changed\n").hexdigest()


def test_a_read_ahead_with_the_facts_lists_the_packages_once(
    tmp_path: Path, sandbox: SandboxTarget
) -> None:
    paths, ignore = ["/etc/apt"], list(DEFAULT_IGNORE)
    calls = count_calls(sandbox)
    read = journal_probe.before_read(paths, ignore, packages=False)
    facts_run, state = asyncio.run(run_parts(sandbox, [FACTS_SCRIPT, read.script]))
    assert calls == ["run"]
    assert "dpkg-query" not in read.script and FACTS_SCRIPT.count("dpkg-query -W") == 1
    facts = parse_facts(facts_run.stdout)
    book = new_journal(journal.JournalStore(tmp_path / "journal"), sandbox, "w8", paths)
    asyncio.run(journal_probe.prepare(sandbox, book, ahead=journal_probe.Before(
        tuple(paths), tuple(ignore), (), read, state, packages_listed(facts_run.stdout))))
    # The same packages a snapshot of its own lists (dpkg's names: libc6:amd64)...
    alone = asyncio.run(take_snapshot(sandbox, paths=paths, ignore=ignore))
    assert book.pre_snapshot().packages == alone.packages
    assert any(name.startswith("libc6:") for name in alone.packages)
    # ...and the facts name them plainly, as ever.
    assert {name.partition(":")[0] for name in alone.packages} == set(facts.installed_packages)
    assert "libc6" in facts.installed_packages


def book_of(tmp_path: Path, workflow_id: str) -> journal.Journal:
    found = journal.JournalStore(tmp_path / "data" / "journal").get(workflow_id)
    assert found is not None
    return found


def new_journal(store: journal.JournalStore, sandbox: SandboxTarget, workflow_id: str,
                paths: list[str], *, predicted: bool = False) -> journal.Journal:
    """A new journal in ``store`` of an install of "app" on ``sandbox`` watching
    ``paths`` (with the default ignore patterns)."""
    return store.create(journal.Header(
        workflow_id=workflow_id, action="install", integration="app", target="sandbox",
        target_identity=sandbox.identity, paths=paths, ignore=list(DEFAULT_IGNORE),
        predicted=predicted, pid=os.getpid(), created=datetime.now(UTC)))


def prepared(tmp_path: Path, sandbox: SandboxTarget, workflow_id: str) -> journal.Journal:
    """A journal of /etc and /opt on ``sandbox``, prepared (phase ``executing``)."""
    book = new_journal(journal.JournalStore(tmp_path / "journal"), sandbox, workflow_id,
                       ["/etc", "/opt"])
    asyncio.run(journal_probe.prepare(sandbox, book))
    return book


def run_observed(sandbox: SandboxTarget, book: journal.Journal, script: str,
                 **kwargs: Any) -> tuple[RunResult, list[tuple[str, str]], list[RunResult]]:
    lines: list[tuple[str, str]] = []
    result, probed = asyncio.run(journal_probe.run_observed(
        sandbox, book, script, book.workflow_id, on_output=lambda *line: lines.append(line),
        **kwargs))
    return result, lines, probed


def rolled_back(tmp_path: Path, sandbox: SandboxTarget, book: journal.Journal,
                sleep: str) -> None:
    """Undo ``book``'s workflow: the rollback succeeds and the ``sleep`` the script
    started is gone."""
    report = asyncio.run(roll_back(sandbox, Staged().select(
        journal.JournalStore(tmp_path / "journal"), book), "staged"))
    assert report.ok, report.problems
    assert wait_until(lambda: not host_pids_with(f"sleep\0{sleep}".encode()))


def test_the_script_and_what_it_changed_in_one_run(
    tmp_path: Path, sandbox: SandboxTarget
) -> None:
    sh(sandbox, "mkdir -p /etc/app && echo a=1 > /etc/app/app.conf")
    book = prepared(tmp_path, sandbox, "w2")
    sleep = unique_sleep()
    prologue = PROLOGUE.format(version="test", integration="app", action="install",
                               method="m")
    script = (prologue + 'echo "changing with $TOKEN"\necho a=2 > /etc/app/app.conf\n'
              f"setsid sleep {sleep} </dev/null >/dev/null 2>&1 &\n"
              "echo to-stderr >&2\nfalse\necho never\n")
    calls = count_calls(sandbox)
    result, lines, [probed] = run_observed(sandbox, book, script, env={"TOKEN": "s3cret"},
                                           timeout=60, probes=["cat /etc/app/app.conf"])
    assert calls == ["run"]
    assert (probed.exit_code, probed.stdout) == (0, "a=2\n")  # read after the script
    assert result.exit_code == 1 and not result.timed_out
    failed = summarize(result, Redactor()).failed_line
    assert failed == script.splitlines().index("false") + 1
    assert result.stdout == "changing with s3cret\n"
    assert result.stderr.startswith("to-stderr\nworkflow-agent: failed at line ")
    assert sorted(lines) == sorted(
        [("stdout", line) for line in result.stdout.splitlines()]
        + [("stderr", line) for line in result.stderr.splitlines()])
    state = book.read()
    assert state.phase == "executed"
    # The sleep the script started, marked, is its only process: not the wrapper that
    # ran it, not its guard, not the probes after it.
    [changed, started] = state.changes
    assert changed.describe() == "~ file /etc/app/app.conf (modified)"
    assert started.kind == "process" and started.op == "started"
    assert started.process is not None and started.process.marked
    assert started.process.argv == ["sleep", sleep]
    rolled_back(tmp_path, sandbox, book, sleep)
    assert sh(sandbox, "cat /etc/app/app.conf") == "a=1\n"


def test_a_script_that_times_out_is_observed_and_rolled_back(
    tmp_path: Path, sandbox: SandboxTarget
) -> None:
    book = prepared(tmp_path, sandbox, "w3")
    sleep = unique_sleep()
    script = (f"mkdir -p /opt/slow && echo x > /opt/slow/file\n"
              f"setsid sleep {sleep} </dev/null >/dev/null 2>&1 &\n"
              f"echo waiting\nsleep {sleep}\n")
    calls = count_calls(sandbox)
    result, lines, _ = run_observed(sandbox, book, script, timeout=2)
    assert calls == ["run"]
    assert result.timed_out and result.exit_code == 124 and result.stdout == "waiting\n"
    assert lines == [("stdout", "waiting")]
    state = book.read()
    assert state.phase == "executed"
    assert {e.describe() for e in state.changes if e.kind == "file"} == {
        "+ file /opt/slow (created)", "+ file /opt/slow/file (created)"}
    # The foreground sleep died with the script; the detached one is the script's.
    [started] = [e for e in state.changes if e.kind == "process"]
    assert started.process is not None and started.process.argv == ["sleep", sleep]
    rolled_back(tmp_path, sandbox, book, sleep)
    assert sh(sandbox, "ls /opt") == ""


def test_when_the_run_ends_before_the_script_what_it_changed_is_read_in_a_run_of_its_own(
    tmp_path: Path, sandbox: SandboxTarget
) -> None:
    book = prepared(tmp_path, sandbox, "w4")
    # The script kills the shell running it: the read after it never happens.
    calls = count_calls(sandbox)
    result, _, _ = run_observed(sandbox, book, "mkdir /opt/cut\necho bye\nkill -KILL $PPID\n"
                                "sleep 30\n", timeout=60)
    assert calls == ["run", "run"]
    assert not result.ok and result.stdout == "bye\n"
    state = book.read()
    assert state.phase == "executed"
    assert [e.describe() for e in state.changes] == ["+ file /opt/cut (created)"]


def test_sections_each_get_their_own_output_status_and_errors() -> None:
    """Bytes of any kind (a NUL, a frame with another nonce) stay in their section; a
    section that exits ends the stream, and the sections after it are reported unfinished
    with the run's status, never as empty successes."""
    read = journal_probe.Sections(
        "printf 'a\\0b\\036wa-section-0000000000000000 0\\0\\377'; echo oops >&2; false",
        "printf second; echo two >&2",
        "printf third; exit 7",
        "printf never")
    [part] = asyncio.run(run_parts(LocalTarget(), [read.script]))
    first, second, third, fourth = read.split(part)
    assert (first.exit_code, first.data, first.stderr) == (
        1, b"a\0b\x1ewa-section-0000000000000000 0\0\xff", "oops\n")
    assert (second.exit_code, second.data, second.stderr) == (0, b"second", "two\n")
    assert (third.exit_code, third.data) == (7, b"third")  # the run's status: the subshell's
    assert (fourth.exit_code, fourth.data) == (7, b"")
    garbled = journal_probe.Sections("true", "true").split(RunResult(0, "@@@=x=", "", 0.1))
    assert [(r.exit_code, r.data) for r in garbled] == [(-1, b""), (-1, b"")]
