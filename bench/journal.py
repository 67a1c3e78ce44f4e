"""What rehearsal, the change journal and rollback cost, on sandbox targets (issue 3).

1. Rehearsal overhead: the prometheus-node-exporter install with ``rehearse=False`` and
   ``rehearse=True``, taking turns, each on a fresh sandbox; the rehearsal stage's time
   and the disk its overlay's upper layer used.
2. Journal overhead on a script touching 1,000 files: a plugin integration whose install
   appends a line to each of 1,000 existing files under /etc/bench (its watched path),
   installed through workflow-agent (journal stage, execute stage, backup.tar), without
   and with rehearsal, against the same rendered script run alone with ``target.run``.
3. Rollback time for the node-exporter install: an install that fails right after its
   last step (``fail_after_step``: everything is installed, then the script fails) and
   rolls back; and ``rollback --strategy staged`` of the successful installs of (1).
4. What a rollback reads of a machine's other journals: ``Staged().select`` (which checks
   that no later workflow changed the target) on a store holding N = 100, 1,000 and
   10,000 journals of other targets, against one scan of the whole store
   (``summaries()``, what every rollback read before the index by target).

In-process, as tests/test_workflow.py drives it: one ``WorkflowAgent`` per configuration
(data and cache directories in a temporary directory), wall time = ``perf_counter``
around ``agent.run``; opening and closing the sandboxes is not timed. Needs root, the
cached Debian root (RootfsCache) and the Debian archive (apt runs in every sandbox).
Changes nothing on this host.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from _agent import NODE_EXPORTER
from _timing import BenchError, Series, parse_args, print_table

from workflow_agent.agent import WorkflowAgent
from workflow_agent.agents.coordinator import WorkflowRequest
from workflow_agent.config import WorkflowConfiguration
from workflow_agent.container import Container
from workflow_agent.execution.journal import Header, JournalStore
from workflow_agent.execution.rootfs import RootfsCache, default_cache_dir
from workflow_agent.execution.sandbox import SandboxTarget
from workflow_agent.recovery.rollback import Staged
from workflow_agent.scripting.render import script_steps
from workflow_agent.state import StageRecord, WorkflowState
from workflow_agent.verification.snapshot import Snapshot

DEFAULT_RUNS = 3
CHANGES_HOST = False
PORT = "19190"  # the sandbox shares this host's network: keep off 9100
FILES = 1000
#: Part 4: journals of other targets in the store.
LOOKUP_SIZES = (100, 1000, 10000)
BENCH_DIR = "/etc/bench"
PLUGIN = "bench-files"
MiB = 1024 * 1024

# 1,000 files of 1 KiB each, made with bash builtins only.
MAKE_FILES = f"""set -e
mkdir -p {BENCH_DIR}
line=$(printf '%01023d' 0)
for i in $(seq {FILES}); do printf '%s\\n' "$line" > {BENCH_DIR}/file$i.conf; done
"""
TOUCH_FILES = f"""for f in {BENCH_DIR}/*.conf; do
  printf 'changed by the install\\n' >> "$f"
done
"""


class Bench:
    """Agents per configuration (one temporary data directory) and fresh sandboxes."""

    def __init__(self, root: Path, rootfs: Path) -> None:
        self.root = root
        self.rootfs = rootfs
        self.plugins = write_plugin(root / "plugins")
        self._agents: dict[str, WorkflowAgent] = {}

    def agent(self, **settings: Any) -> WorkflowAgent:
        """The agent for ``settings`` (built once); all share one data directory."""
        key = repr(sorted(settings.items()))
        if key not in self._agents:
            config = WorkflowConfiguration(
                data_dir=self.root / "data", cache_dir=self.root / "cache",
                plugin_dirs=[self.plugins], **settings)
            self._agents[key] = WorkflowAgent(Container(config))
        return self._agents[key]

    @contextmanager
    def sandbox(self) -> Iterator[SandboxTarget]:
        target = SandboxTarget(self.rootfs)
        asyncio.run(target.open())
        try:
            yield target
        finally:
            asyncio.run(target.close())

    def journal_dir(self, workflow_id: str) -> Path:
        return self.root / "data" / "journal" / workflow_id


def write_plugin(plugins: Path) -> Path:
    """The 1,000-file integration (as tests/test_workflow.py's ``plugin()`` writes one)."""
    folder = plugins / PLUGIN
    (folder / "templates").mkdir(parents=True)
    (folder / "templates" / "install.sh.j2").write_text(TOUCH_FILES)
    (folder / "definition.yaml").write_text(yaml.safe_dump({
        "name": PLUGIN, "version": "1", "description": f"appends a line to {FILES} files",
        "platforms": [{"os_family": "debian"}],
        "methods": [{"name": "script", "templates": {"install": "install.sh.j2"}}],
        "uninstall": {"watch": [BENCH_DIR]},
    }))
    return plugins


def run(agent: WorkflowAgent, request: WorkflowRequest, ok: bool = True
        ) -> tuple[float, WorkflowState]:
    """Run one workflow; its wall time and final state (BenchError unless it ended ``ok``)."""
    started = time.perf_counter()
    state = asyncio.run(agent.run(request))
    elapsed = time.perf_counter() - started
    if (state.status == "succeeded") != ok:
        why = state.error.message if state.error else state.status
        raise BenchError(f"{request.action} {request.integration} ended {state.status}: {why}")
    return elapsed, state


def install(agent: WorkflowAgent, target: SandboxTarget, integration: str = NODE_EXPORTER,
            ok: bool = True) -> tuple[float, WorkflowState]:
    params = {"listen_port": PORT} if integration == NODE_EXPORTER else {}
    return run(agent, WorkflowRequest(action="install", integration=integration,
                                      target="sandbox", params=params, target_object=target),
               ok=ok)


def sh(target: SandboxTarget, script: str) -> str:
    result = asyncio.run(target.run(script, timeout=300))
    if not result.ok:
        raise BenchError(f"sandbox script exited {result.exit_code}: {result.stderr[-400:]}")
    return result.stdout


def stage(state: WorkflowState, name: str) -> StageRecord:
    found = [s for s in state.stages if s.name == name]
    if not found:
        raise BenchError(f"workflow {state.workflow_id[:8]} has no {name} stage: "
                         f"{[s.name for s in state.stages]}")
    return found[-1]


def node_exporter_gone(target: SandboxTarget) -> str:
    """Empty when the exporter, its user and its defaults file are all gone."""
    return sh(target, f"""dpkg-query -W -f '${{Status}}' {NODE_EXPORTER} 2>/dev/null \\
  | grep -q 'install ok' && echo 'package still installed'
getent passwd prometheus >/dev/null && echo 'user still there'
[ -e /etc/default/{NODE_EXPORTER} ] && echo 'defaults file still there'
for exe in /proc/[0-9]*/exe; do  # no procps in the sandbox
  [ "$(readlink "$exe")" = /usr/bin/{NODE_EXPORTER} ] && echo "daemon still running: $exe"
done
true
""").strip()


# -- 1. rehearsal overhead (and 3b. a later rollback of each install) ----------------------


def rehearsal_overhead(bench: Bench, runs: int) -> tuple[list[Series], list[Series], int]:
    plain = Series("install, rehearse=False")
    rehearsed = Series("install, rehearse=True")
    rehearsal = Series("  rehearsal stage")
    upper = Series("  rehearsal upper layer", unit="MiB")
    journal_plain = Series("  journal stage, rehearse=False")
    journal_rehearsed = Series("  journal stage, rehearse=True")
    execute_plain = Series("  execute stage, rehearse=False")
    execute = Series("  execute stage, rehearse=True")
    rollback_wall = Series("later rollback (staged), whole workflow")
    rollback_report = Series("  RollbackReport.duration")
    steps = saved = 0
    for round_ in range(1 + runs):  # one untimed warm-up round first
        order = (False, True) if round_ % 2 == 0 else (True, False)
        for rehearse in order:
            with bench.sandbox() as target:
                elapsed, state = install(bench.agent(rehearse=rehearse), target)
                steps = len(script_steps(state.scripts["install"].text))
                back_wall, back = run(bench.agent(), WorkflowRequest(
                    action="rollback", integration=NODE_EXPORTER, target="sandbox",
                    target_object=target, rollback_of=state.workflow_id, strategy="staged"))
                left = node_exporter_gone(target)
            if left:
                print(f"WARNING: after the rollback of {state.workflow_id[:8]}: {left}")
            if round_ == 0:
                continue
            journal = stage(state, "journal").duration
            if rehearse:
                rehearsed.samples.append(elapsed)
                detail = stage(state, "rehearsal").detail
                rehearsal.samples.append(stage(state, "rehearsal").duration)
                upper.samples.append(detail["upper_bytes"] / MiB)
                journal_rehearsed.samples.append(journal)
                saved = stage(state, "journal").detail["saved"]
                execute.samples.append(stage(state, "execute").duration)
            else:
                plain.samples.append(elapsed)
                journal_plain.samples.append(journal)
                execute_plain.samples.append(stage(state, "execute").duration)
            rollback_wall.samples.append(back_wall)
            assert back.rollback is not None
            rollback_report.samples.append(back.rollback.duration)
    overhead = rehearsed.median - plain.median
    rehearsed.note = f"+{overhead:.2f} s (+{overhead / plain.median:.0%}) on the medians"
    assert back.rollback is not None
    rollback_wall.note = f"{len(back.rollback.undone)} changes undone and verified"
    journal_rehearsed.note = f"{saved} files saved in backup.tar"
    return ([plain, rehearsed, rehearsal, upper, journal_plain, journal_rehearsed,
             execute_plain, execute],
            [rollback_wall, rollback_report], steps)


# -- 2. journal overhead on 1,000 files --------------------------------------------------


def journal_overhead(bench: Bench, runs: int) -> list[Series]:
    bare = Series(f"script alone (target.run), {FILES} files")
    series = {rehearse: [
        Series(f"install, rehearse={rehearse}, whole workflow"),
        Series("  journal stage (snapshot, backup, processes)"),
        Series("  execute stage (script + observe)"),
        Series("  script alone, inside execute"),
        Series("  journal total (journal + observe)"),
        Series("  backup.tar", unit="KiB"),
    ] for rehearse in (False, True)}
    rehearsal = Series("  rehearsal stage (rehearse=True)")
    script_text = ""
    changes = 0
    for round_ in range(1 + runs):
        for rehearse in ((False, True) if round_ % 2 == 0 else (True, False)):
            with bench.sandbox() as target:
                sh(target, MAKE_FILES)
                elapsed, state = install(bench.agent(rehearse=rehearse), target, PLUGIN)
            script_text = state.scripts["install"].text
            changes = len(state.changes)
            if round_ == 0:
                continue
            whole, journal, execute, script, total, tar = series[rehearse]
            whole.samples.append(elapsed)
            journal.samples.append(stage(state, "journal").duration)
            execute.samples.append(stage(state, "execute").duration)
            script.samples.append(state.runs["install"].duration)
            total.samples.append(journal.samples[-1] + execute.samples[-1] - script.samples[-1])
            size = (bench.journal_dir(state.workflow_id) / "backup.tar").stat().st_size
            tar.samples.append(size / 1024)
            tar.note = f"{stage(state, 'journal').detail['saved']} files saved"
            if rehearse:
                rehearsal.samples.append(stage(state, "rehearsal").duration)
        if round_ == 0:
            continue
        with bench.sandbox() as target:
            sh(target, MAKE_FILES)
            started = time.perf_counter()
            result = asyncio.run(target.run(script_text, timeout=300))
            bare.samples.append(time.perf_counter() - started)
            if not result.ok:
                raise BenchError(f"the plain script exited {result.exit_code}")
    if changes != FILES:
        print(f"WARNING: the journal recorded {changes} changes, not {FILES}")
    for rehearse in (False, True):
        whole, _, _, _, total, _ = series[rehearse]
        total.note = f"{total.median / FILES * 1000:.2f} ms per file"
        whole.note = f"{whole.median / bare.median:.0f}x the script alone"
    return [bare, *series[False], *series[True], rehearsal]


# -- 3. rollback after a failure at the last step ------------------------------------------


def rollback_after_failure(bench: Bench, runs: int, steps: int) -> list[Series]:
    whole = Series(f"install failing after step {steps}/{steps}, whole workflow")
    execute = Series("  execute stage (install, then fail)")
    stage_time = Series("  rollback stage")
    report = Series("  RollbackReport.duration")
    agent = bench.agent(fail_after_step=steps)
    for round_ in range(1 + runs):
        with bench.sandbox() as target:
            elapsed, state = install(agent, target, ok=False)
            left = node_exporter_gone(target)
        if state.rollback is None or state.rollback.problems or left:
            raise BenchError(f"rollback of {state.workflow_id[:8]} did not finish cleanly: "
                             f"{state.error.message if state.error else ''} {left}")
        if round_ == 0:
            continue
        whole.samples.append(elapsed)
        execute.samples.append(stage(state, "execute").duration)
        stage_time.samples.append(stage(state, "rollback").duration)
        report.samples.append(state.rollback.duration)
    assert state.rollback is not None
    whole.note = f"{len(state.rollback.undone)} changes undone and verified"
    return [whole, execute, stage_time, report]


def rollback_lookup(runs: int, root: Path) -> list[Series]:
    """Part 4: in-process, no target; the timed calls read the store only."""
    rows: list[Series] = []
    store = JournalStore(root / "lookup")
    mine = store.create(_header("mine", "ssh://root@web1:22"))
    mine.record_prepared(Snapshot(), None, [], [])
    others = 0
    for count in LOOKUP_SIZES:
        while others < count:
            # Finished installs on other hosts, as a fleet's machine accumulates them.
            other = store.create(_header(f"other-{others:05d}", f"ssh://root@10.0.{others}:22"))
            other.record_prepared(Snapshot(), None, [], [])
            other.set_phase("committed")
            others += 1
        select = Series(f"N = {count}: Staged().select (index by target)")
        scan = Series(f"N = {count}: one scan of the store (summaries())")
        for _ in range(runs):
            started = time.perf_counter()
            Staged().select(store, mine)
            select.samples.append(time.perf_counter() - started)
            started = time.perf_counter()
            store.summaries()
            scan.samples.append(time.perf_counter() - started)
        rows += [select, scan]
    return rows


def _header(workflow_id: str, target: str) -> Header:
    return Header(workflow_id=workflow_id, action="install", integration="bench",
                  target=target, target_identity=target, paths=["/etc/bench"], ignore=[],
                  predicted=False, pid=os.getpid(), created=datetime.now(UTC))


def load() -> str:
    return "load average " + " ".join(f"{v:.2f}" for v in os.getloadavg())


def main(runs: int) -> None:
    rootfs = RootfsCache(default_cache_dir()).ensure()
    print(f"journal: {os.cpu_count()} cores, {load()} at the start", flush=True)
    root = Path(tempfile.mkdtemp(prefix="workflow-agent-bench-journal-"))
    try:
        bench = Bench(root, rootfs)
        rehearsal, later_rollback, steps = rehearsal_overhead(bench, runs)
        print_table(f"journal (1): rehearsal overhead, {NODE_EXPORTER} install on a fresh "
                    f"sandbox, {runs} runs taking turns after 1 warm-up round", rehearsal)
        journal = journal_overhead(bench, runs)
        print_table(f"journal (2): journal overhead, an install appending a line to {FILES} "
                    f"files of 1 KiB under {BENCH_DIR}, {runs} runs after 1 warm-up round",
                    journal)
        failed = rollback_after_failure(bench, runs, steps)
        print_table(f"journal (3): rollback of the {NODE_EXPORTER} install, {runs} runs after "
                    "1 warm-up (the later rollbacks: one after each install of (1))",
                    failed + later_rollback)
        lookup = rollback_lookup(runs, root)
        print_table(f"journal (4): what a rollback reads, with N journals of other targets "
                    f"in the store, {runs} runs", lookup)
        print(f"\n{load()} at the end")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main(parse_args(__doc__ or "", DEFAULT_RUNS).runs)
