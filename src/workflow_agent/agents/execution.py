"""The execution agent: the only agent that changes a target.

Gathers facts, takes the pre-install baseline, saves the change journal's pre-state,
and runs scripts, streaming their output as ``workflow.output`` events (secrets
masked). Each of these is one run on the target (over SSH every run is a round trip):
a journaled script's run also reads what it changed (``journal_probe.run_observed``).
"""

from __future__ import annotations

import asyncio
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from workflow_agent.bus import Message, MessageBus
from workflow_agent.errors import InvalidInputError
from workflow_agent.execution import journal, journal_probe
from workflow_agent.execution.pool import TargetPool
from workflow_agent.execution.rehearsal import Rehearsal, rehearse, supports_rehearsal
from workflow_agent.execution.target import OutputCallback, RunResult, run_parts
from workflow_agent.facts import (
    FACTS_TIMEOUT,
    Facts,
    PackageListings,
    facts_from,
    facts_script,
    listing_stamp,
    packages_listed,
)
from workflow_agent.scripting.render import FAILURE_MARKER, RenderedScript
from workflow_agent.secrets import Redactor
from workflow_agent.state import RunSummary
from workflow_agent.verification.snapshot import DEFAULT_IGNORE, Snapshot, SnapshotProbe

FACTS = "target.facts"
SNAPSHOT = "target.snapshot"
REHEARSE = "target.rehearse"
JOURNAL = "execute.journal"
RUN = "execute.run"
OUTPUT_EVENT = "workflow.output"

_FAILED = re.compile(re.escape(FAILURE_MARKER) + r"(\d+) with exit (\d+): (.*)")


class Baseline(BaseModel):
    """The target before install: what uninstall must bring it back to."""

    model_config = ConfigDict(frozen=True)

    snapshot: Snapshot
    #: Which of the integration's uninstall paths existed before install.
    preexisting_paths: list[str]
    #: Packages the installs since this baseline added (dependencies included).
    added_packages: dict[str, str] = {}
    #: Set once a purge-level uninstall proved the target back at this baseline: the
    #: next install starts from a new one.
    consumed_by: str | None = None


@dataclass(frozen=True)
class OutputLine:
    """A line a script printed (masked)."""

    workflow_id: str
    stage: str
    stream: str
    line: str


@dataclass(frozen=True)
class FactsRequest:
    """Gather facts from the workflow's target; with ``journal`` (its paths and ignore
    patterns), read what preparing that journal reads in the same run
    (``journal_probe.Before``), hashing only the files that changed since ``since``."""

    workflow_id: str
    journal: tuple[Sequence[str], Sequence[str]] | None = None
    since: Snapshot | None = None


@dataclass(frozen=True)
class FactsReply:
    """The facts, and the journal's read ahead when asked for."""

    facts: Facts
    ahead: journal_probe.Before | None = None


@dataclass(frozen=True)
class SnapshotRequest:
    """Record the baseline of the workflow's target. ``since``: a snapshot of the target
    taken earlier in the workflow, whose hashes stand for the files that did not change."""

    workflow_id: str
    paths: Sequence[str]
    ignore: Sequence[str]
    probe_paths: Sequence[str] = ()
    since: Snapshot | None = None


@dataclass(frozen=True)
class RehearseRequest:
    """Run ``script`` on a copy-on-write copy of the workflow's target."""

    workflow_id: str
    script: RenderedScript
    timeout: float
    env: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RunRequest:
    """Run ``script`` on the workflow's target; with ``journal``, record what it changed
    there, read in the same run (its ``executing`` phase must already be on disk).
    ``probes``: read-only scripts (verify's script checks) run right after, in the same
    run: their results are the checks' first attempt, without a round trip of its own."""

    workflow_id: str
    stage: str
    script: RenderedScript
    timeout: float
    env: Mapping[str, str] = field(default_factory=dict)
    journal: Path | None = None
    probes: Sequence[str] = ()


@dataclass(frozen=True)
class RunReply:
    """The script's result and, one each, the request's ``probes``' results."""

    result: RunResult
    probes: list[RunResult] = field(default_factory=list)


@dataclass(frozen=True)
class JournalRequest:
    """Save what the workflow's target holds before ``journal``'s workflow changes it:
    the snapshot, the backups (``predicted`` paths and configuration), the processes
    (read now, or ``ahead`` with the facts). ``since``: a snapshot of the target taken
    earlier (the baseline), whose hashes stand for the files that did not change."""

    workflow_id: str
    journal: Path
    predicted: Sequence[str] = ()
    ahead: journal_probe.Before | None = None
    since: Snapshot | None = None


def summarize(result: RunResult, redactor: Redactor) -> RunSummary:
    """The part of a run worth keeping: exit status, failing line, the end of the output."""
    failed_line = failed_command = None
    for line in result.stderr.splitlines():
        match = _FAILED.search(line)
        if match:
            failed_line, failed_command = int(match.group(1)), match.group(3)
            break
    tail = "\n".join((result.stdout + result.stderr).splitlines()[-30:])
    return RunSummary(
        exit_code=result.exit_code,
        duration=round(result.duration, 3),
        timed_out=result.timed_out,
        failed_line=failed_line,
        failed_command=redactor.redact(failed_command) if failed_command else None,
        output_tail=redactor.redact(tail),
    )


class ExecutionAgent:
    """Answers ``target.facts``, ``target.snapshot``, ``target.rehearse`` and ``execute.run``."""

    def __init__(self, pool: TargetPool, redactor: Redactor,
                 listings: PackageListings | None = None) -> None:
        self.pool = pool
        self.redactor = redactor
        #: Each target's last package listing, which spares the next facts run one.
        self.listings = listings
        self._bus: MessageBus | None = None

    def attach(self, bus: MessageBus) -> None:
        """Serve this agent's topics on ``bus``."""
        self._bus = bus
        bus.serve(FACTS, self._facts)
        bus.serve(SNAPSHOT, self._snapshot)
        bus.serve(REHEARSE, self._rehearse)
        bus.serve(JOURNAL, self._journal)
        bus.serve(RUN, self._run)

    async def _facts(self, message: Message) -> FactsReply:
        request: FactsRequest = message.payload
        target = self.pool.get(request.workflow_id)
        if request.journal is None:
            return FactsReply(await target.facts(refresh=True))
        # Read-only all of them: parts of one run. The packages are listed once, by the
        # facts (dpkg-query costs a host a few ms, tens with a thousand packages).
        paths, ignore = request.journal
        read = journal_probe.before_read(paths, ignore, packages=False, since=request.since)
        previous = self.listings.previous(target.identity) if self.listings else None
        result, state = await run_parts(
            target, [facts_script(listing_stamp(previous) if previous else None), read.script],
            timeout=FACTS_TIMEOUT + journal_probe.OBSERVE_TIMEOUT)
        if self.listings is not None and result.ok:
            result = replace(result, stdout=self.listings.complete(
                target.identity, result.stdout, previous))
        facts = facts_from(result, target.identity)
        ahead = journal_probe.Before(tuple(paths), tuple(ignore), (), read, state,
                                     packages_listed(result.stdout), since=request.since)
        return FactsReply(facts, ahead)

    async def _snapshot(self, message: Message) -> Baseline:
        request: SnapshotRequest = message.payload
        target = self.pool.get(request.workflow_id)
        probe = SnapshotProbe.of(request.paths, [*DEFAULT_IGNORE, *request.ignore],
                                 since=request.since)
        # Which of probe_paths exist, one per line, in the same run.
        exists = "".join(f"[ -e {shlex.quote(p)} ] && printf '%s\\n' {shlex.quote(p)}\n"
                         for p in request.probe_paths) + "true\n"
        listed, existing = await run_parts(target, [probe.script, exists])
        return Baseline(snapshot=probe.parse(listed, target.identity),
                        preexisting_paths=existing.stdout.splitlines())

    async def _rehearse(self, message: Message) -> Rehearsal:
        request: RehearseRequest = message.payload
        target = self.pool.get(request.workflow_id)
        if not supports_rehearsal(target):
            raise InvalidInputError(
                f"{target.identity} cannot be rehearsed on: only this host and sandboxes can",
                hint="Run without --rehearse.",
            )
        forward, pending = self._forwarder(request.workflow_id, "rehearsal")
        rehearsal = await rehearse(target, request.script.text, env=request.env,
                                   timeout=request.timeout, redactor=self.redactor,
                                   on_output=forward)
        if pending:
            await asyncio.gather(*pending)
        return rehearsal

    async def _journal(self, message: Message) -> list[journal.Entry]:
        request: JournalRequest = message.payload
        return await journal_probe.prepare(self.pool.get(request.workflow_id),
                                           journal.Journal(request.journal),
                                           request.predicted, self._masked, request.ahead,
                                           since=request.since)

    async def _run(self, message: Message) -> RunReply:
        request: RunRequest = message.payload
        target = self.pool.get(request.workflow_id)
        forward, pending = self._forwarder(request.workflow_id, request.stage)
        probes: list[RunResult] = []
        if request.journal is not None:
            result, probes = await journal_probe.run_observed(
                target, journal.Journal(request.journal), request.script.text,
                request.workflow_id, env=request.env, timeout=request.timeout,
                on_output=forward, mask=self._masked, probes=request.probes)
        elif request.probes:
            result, probes = await target.run_then_parts(
                request.script.text, request.probes, env=request.env,
                timeout=request.timeout, parts_timeout=journal_probe.OBSERVE_TIMEOUT,
                on_output=forward)
        else:
            result = await target.run(request.script.text, env=request.env,
                                      timeout=request.timeout, on_output=forward)
        if pending:
            await asyncio.gather(*pending)
        return RunReply(result, probes)

    def _masked(self, process: journal.ProcessInfo) -> journal.ProcessInfo:
        """A process with secrets masked in its command line, fit for the journal."""
        return process.model_copy(update={"argv": [self.redactor.redact(a)
                                                   for a in process.argv]})

    def _forwarder(
        self, workflow_id: str, stage: str
    ) -> tuple[OutputCallback, list[asyncio.Task[None]]]:
        """An output callback publishing masked lines as events, and its pending sends."""
        loop = asyncio.get_running_loop()
        bus = self._bus
        pending: list[asyncio.Task[None]] = []

        def forward(stream: str, line: str) -> None:
            if bus is not None:
                event = OutputLine(workflow_id, stage, stream, self.redactor.redact(line))
                pending.append(loop.create_task(bus.publish(OUTPUT_EVENT, event)))

        return forward, pending
