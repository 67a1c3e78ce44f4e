"""The improvement agent: learns from failures and applies what it learned.

- ``improvement.analyse``: a failed run's output is matched against the rules of
  ``recovery.failures`` (always first); with an LLM configured, the model also summarises
  the root cause from the output tail and the knowledge passages (structured output;
  its text is stored and shown, never run). The signature is recorded in history.
- ``improvement.fixes``: before a run generates its scripts, the known fixes of this
  integration's learned failures: reviewed snippets to insert and parameter changes (a
  free port instead of a defaulted one that is taken; never a port the user set).
- ``improvement.outcome``: a run that applied fixes ended; success proves them.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from workflow_agent.agents import knowledge
from workflow_agent.bus import Message, MessageBus
from workflow_agent.errors import WorkflowAgentError
from workflow_agent.execution.pool import TargetPool
from workflow_agent.facts import Facts
from workflow_agent.integrations.schema import NAME_PATTERN, ParameterSpec
from workflow_agent.recovery.failures import (
    APT_UPDATE_FIRST,
    CHOOSE_FREE_PORT,
    FIX_DESCRIPTIONS,
    LISTENING_PORTS_SCRIPT,
    SNIPPETS,
    WAIT_DPKG_LOCK,
    AppliedFix,
    FailureText,
    Kind,
    Signature,
    free_port,
    match,
)
from workflow_agent.state import WorkflowState
from workflow_agent.storage.spool import HistoryWriter

if TYPE_CHECKING:
    from workflow_agent.llm.service import LLMService
    from workflow_agent.storage.failures import FailureEntry
    from workflow_agent.storage.history import HistoryStore

ANALYSE = "improvement.analyse"
FIXES = "improvement.fixes"
OUTCOME = "improvement.outcome"

#: Fixes that only make sense where apt and dpkg manage packages.
_APT_FIXES = (WAIT_DPKG_LOCK, APT_UPDATE_FIRST)

#: How long one look-up of an integration's learned fixes answers the runs that ask (a
#: fleet's hosts ask within a second or two of each other, each batch again).
_LOOKUP_REUSE_S = 30.0
#: The marker of the releases that kept one for every integration: "this machine learned
#: some failure". Where it is left, the first look-up replaces it by per-integration ones.
_ANY_MARKER = "failures.learned"


class RootCause(BaseModel):
    """What the LLM is asked for: a short root-cause summary of one failure."""

    summary: str = Field(max_length=600, description="The root cause, in one or two sentences.")
    kind: Kind | Literal["other"] = Field(description="The closest failure kind, or 'other'.")
    confidence: Literal["low", "medium", "high"]


@dataclass(frozen=True)
class AnalyseRequest:
    """Analyse the failure of one workflow (all texts masked already)."""

    workflow_id: str
    integration: str
    failure: FailureText
    facts: Facts | None = None


class Analysis(BaseModel):
    """The signature of a failure, and the LLM's root-cause summary when one is configured."""

    model_config = ConfigDict(frozen=True)

    signature: Signature
    llm_summary: str | None = None
    #: Why there is no LLM summary although an LLM is configured.
    llm_error: str | None = None


@dataclass(frozen=True)
class FixesRequest:
    """Which learned fixes apply to this run of ``integration``."""

    workflow_id: str
    integration: str
    parameters: Mapping[str, ParameterSpec]
    values: Mapping[str, Any]
    #: Parameters the user set: a fix never overrides them.
    given: frozenset[str]
    package_manager: str | None


@dataclass(frozen=True)
class FixPlan:
    """The fixes to apply: snippets to insert, parameter changes, and what to tell."""

    applied: list[AppliedFix] = field(default_factory=list)
    snippets: list[str] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class OutcomeRequest:
    """A run that applied ``fixes`` ended, successfully or not."""

    workflow_id: str
    integration: str
    fixes: Sequence[AppliedFix]
    succeeded: bool


#: The stages whose failure says something about the target or the integration.
ANALYSED_STAGES = ("rehearsal", "execute", "verify")


def failure_text(state: WorkflowState) -> FailureText | None:
    """What a failed run left to analyse; ``None`` when it did not fail in a stage
    that ran something (a refused script or a bad parameter teaches nothing new)."""
    failed = next((s for s in state.stages if s.status == "failed"), None)
    if state.status != "failed" or failed is None or failed.name not in ANALYSED_STAGES:
        return None
    error = state.error
    message = error.message if error else ""
    hint = error.hint or "" if error else ""
    run = None
    if failed.name == "execute":
        run = state.runs.get(state.action)
    elif failed.name == "verify":
        run = state.runs.get("verify")
    # A rehearsal's output tail is in the error's hint ("Last output: ...").
    tail = run.output_tail if run is not None else hint
    return FailureText(
        stage=failed.name,
        exit_code=run.exit_code if run is not None else failed.detail.get("exit_code"),
        failed_command=run.failed_command if run is not None else None,
        output_tail=tail,
        checks=[f"{c.name}: {c.detail}" for c in state.checks if not c.passed],
        message=message,
    )


def describe(analysis: Analysis) -> list[str]:
    """What the user is told about an analysed failure."""
    signature = analysis.signature
    fix = (f"the next install applies the fix {signature.fix}: "
           f"{FIX_DESCRIPTIONS[signature.fix]}" if signature.fix
           else "no automatic fix is known for it")
    about = f" ({signature.subject})" if signature.subject else ""
    notes = [f"failure recognised as {signature.kind}{about}: {signature.summary}; {fix}"]
    if analysis.llm_summary:
        notes.append(f"root cause according to the LLM: {analysis.llm_summary}")
    elif analysis.llm_error:
        notes.append(f"the LLM could not summarise the root cause: {analysis.llm_error}")
    return notes


class ImprovementAgent:
    """Answers ``improvement.analyse``, ``improvement.fixes`` and ``improvement.outcome``."""

    def __init__(
        self,
        pool: TargetPool,
        writer: HistoryWriter,
        history: Callable[[], HistoryStore],
        llm: Callable[[], LLMService | None] = lambda: None,
        learned: Path | None = None,
    ) -> None:
        self.pool = pool
        #: A folder with a file for each integration this machine learned a fix for:
        #: until its integration has one, an install need not open the history store
        #: (importing SQLAlchemy and taking in the spool cost a re-run a third of its
        #: time, a 30-host fleet run 0.4 s). A failure with no known fix teaches no run
        #: anything, so it leaves no marker. ``None``: always look (a shared store may
        #: hold what other machines learned).
        self.learned = learned
        self.writer = writer
        #: Opened only when a run looks up what was learned.
        self.history = history
        self.llm = llm
        self._bus: MessageBus | None = None
        #: Each integration's last look-up: when it started, and its fixes.
        self._lookups: dict[str, tuple[float, asyncio.Future[list[FailureEntry]]]] = {}
        self._opened = False

    def attach(self, bus: MessageBus) -> None:
        """Serve this agent's topics on ``bus``."""
        self._bus = bus
        bus.serve(ANALYSE, self._analyse)
        bus.serve(FIXES, self._fixes)
        bus.serve(OUTCOME, self._outcome)

    async def _analyse(self, message: Message) -> Analysis:
        request: AnalyseRequest = message.payload
        analysis = await self.analyse(request)
        signature = analysis.signature
        self.writer.record_failure(
            workflow_id=request.workflow_id, integration=request.integration,
            stage=request.failure.stage, signature=signature.key, kind=signature.kind,
            summary=signature.summary, evidence=signature.evidence, subject=signature.subject,
            fix=signature.fix, llm_summary=analysis.llm_summary,
        )
        if signature.fix is not None:
            # On disk before the marker says so: a look-up takes the spool in.
            await self.writer.durable(request.workflow_id)
            if self.learned is not None:
                self.learned.mkdir(parents=True, exist_ok=True)
                (self.learned / _marker_name(request.integration)).touch()
            self._lookups.pop(request.integration, None)
        self.writer.add_artifact(request.workflow_id, stage="analysis", kind="failure",
                                 name=signature.kind, content=analysis.model_dump_json())
        return analysis

    async def analyse(self, request: AnalyseRequest) -> Analysis:
        """Rules first; then, with an LLM configured, its root-cause summary."""
        signature = match(request.failure)
        service = self.llm()
        if service is None:
            return Analysis(signature=signature)
        from workflow_agent.llm.provider import Message as Prompt

        passages = await self._passages(request)
        failure = request.failure
        lines = [
            f"Integration: {request.integration}",
            f"Failed stage: {failure.stage}",
            f"Failing command: {failure.failed_command or 'unknown'}",
            f"Exit status: {failure.exit_code if failure.exit_code is not None else 'unknown'}",
            f"Rule-based signature: {signature.kind} ({signature.summary})",
            "Failed checks:\n" + ("\n".join(failure.checks) or "none"),
            "Output tail:\n" + (failure.output_tail or "(no output)"),
        ]
        if passages:
            lines.append("Documentation passages:\n" + "\n\n".join(passages))
        messages = [
            Prompt.system(
                "You analyse why a script that installs a monitoring integration on a Linux "
                "host failed. Name the root cause from the evidence given; do not suggest "
                "commands. If the evidence is not enough, say so with low confidence."),
            Prompt.user("\n\n".join(lines)),
        ]
        try:
            answer = await service.complete_structured(
                messages, RootCause, workflow_id=request.workflow_id,
                purpose="failure-analysis")
        except WorkflowAgentError as exc:
            # The rules' answer stands; the model's absence is reported, not fatal.
            return Analysis(signature=signature, llm_error=exc.message)
        cause = answer.output
        return Analysis(signature=signature,
                        llm_summary=f"{cause.summary} (kind {cause.kind}, "
                                    f"confidence {cause.confidence})")

    async def _passages(self, request: AnalyseRequest) -> list[str]:
        """The knowledge base's passages for this integration, with their citations."""
        if self._bus is None or request.facts is None:
            return []
        reply: knowledge.Knowledge = await self._bus.request(
            knowledge.TOPIC, knowledge.KnowledgeRequest(request.integration, request.facts),
            timeout=30)
        return [f"[{hit.citation}]\n{hit.text[:1500]}" for hit in reply.passages[:3]]

    async def _fixes(self, message: Message) -> FixPlan:
        request: FixesRequest = message.payload
        if self.learned is not None and not (
                (self.learned / _marker_name(request.integration)).exists()
                or self.learned.with_name(_ANY_MARKER).exists()):
            return FixPlan()
        learned = await self._learned_fixes(request.integration)
        plan = FixPlan()
        listening: list[int] | None = None
        for failure in learned:
            fix = failure.fix
            assert fix is not None
            why = (f"{failure.kind}: {failure.summary}; seen {failure.count} time(s), last in "
                   f"workflow {failure.last_workflow_id[:8]}")
            if fix in SNIPPETS:
                if request.package_manager != "apt" or fix in plan.snippets:
                    continue
                plan.snippets.append(fix)
                plan.applied.append(AppliedFix(
                    signature=failure.signature, kind=failure.kind, fix=fix,
                    learned_from=failure.last_workflow_id, reason=why,
                    change=FIX_DESCRIPTIONS[fix], proven=failure.proven))
            elif fix == CHOOSE_FREE_PORT:
                if listening is None:
                    listening = await self._listening(request.workflow_id)
                self._choose_ports(request, failure.signature, failure.kind,
                                   failure.last_workflow_id, why, failure.proven,
                                   listening, plan)
        return plan

    async def _learned_fixes(self, integration: str) -> list[FailureEntry]:
        """The failures of ``integration`` learned with a fix: read in a worker thread
        (the event loop runs the other hosts of a fleet meanwhile), once for the runs
        that ask within ``_LOOKUP_REUSE_S`` of each other."""
        now = time.monotonic()
        lookup = self._lookups.get(integration)
        if lookup is None or now - lookup[0] > _LOOKUP_REUSE_S:
            lookup = (now, asyncio.ensure_future(
                asyncio.to_thread(self._look_up, integration)))
            self._lookups[integration] = lookup
        try:
            return await asyncio.shield(lookup[1])
        except Exception:
            if self._lookups.get(integration) is lookup:  # the next run tries again
                del self._lookups[integration]
            raise

    def _look_up(self, integration: str) -> list[FailureEntry]:
        if self._opened:
            self.history().ingest()  # what was learned since the store was opened
        store, self._opened = self.history(), True  # opening it takes the spool in
        any_marker = None if self.learned is None else self.learned.with_name(_ANY_MARKER)
        if any_marker is None or not any_marker.exists():
            return [f for f in store.list_failures(integration=integration)
                    if f.fix is not None]
        assert self.learned is not None
        learned = [f for f in store.list_failures() if f.fix is not None]
        for name in {f.integration for f in learned}:
            self.learned.mkdir(parents=True, exist_ok=True)
            (self.learned / _marker_name(name)).touch()
        any_marker.unlink(missing_ok=True)
        return [f for f in learned if f.integration == integration]

    def _choose_ports(
        self, request: FixesRequest, signature: str, kind: str, learned_from: str,
        why: str, proven: bool, listening: list[int], plan: FixPlan,
    ) -> None:
        """A free port for each defaulted port parameter whose value is taken now."""
        for name, spec in request.parameters.items():
            if spec.type != "integer" or "port" not in name or name in plan.params:
                continue
            value = request.values.get(name)
            if not isinstance(value, int) or value not in listening:
                continue
            if name in request.given:
                plan.notes.append(
                    f"{name}={value} is taken on the target (as when workflow "
                    f"{learned_from[:8]} failed), but you set it explicitly: left as is")
                continue
            chosen = free_port(listening, value, int(spec.maximum or 65535))
            if chosen is None:
                plan.notes.append(f"{name}={value} is taken and no free port follows it")
                continue
            plan.params[name] = chosen
            plan.applied.append(AppliedFix(
                signature=signature, kind=kind, fix=CHOOSE_FREE_PORT,
                learned_from=learned_from, reason=why, proven=proven,
                change=f"{name} {value} -> {chosen} (the default {value} is taken on "
                       "the target)"))

    async def _listening(self, workflow_id: str) -> list[int]:
        """The TCP ports something listens on at the target (a read-only probe)."""
        result = await self.pool.get(workflow_id).run(LISTENING_PORTS_SCRIPT, timeout=30)
        return [int(word) for word in result.stdout.split() if word.isdigit()]

    async def _outcome(self, message: Message) -> None:
        request: OutcomeRequest = message.payload
        for fix in {f.signature: f for f in request.fixes}.values():
            self.writer.record_fix_outcome(
                workflow_id=request.workflow_id, integration=request.integration,
                signature=fix.signature, succeeded=request.succeeded)


def _marker_name(integration: str) -> str:
    """The marker file of ``integration``: its name (a file name by the definitions'
    rules), else a hash of it."""
    if re.fullmatch(NAME_PATTERN, integration):
        return integration
    return hashlib.sha256(integration.encode()).hexdigest()
