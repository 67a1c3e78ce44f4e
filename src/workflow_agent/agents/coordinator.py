"""The coordinator: drives one workflow through its stages over the bus.

install:   validate > facts > knowledge > strategy > [known-fixes] > generate >
           script-validation > [rehearsal] > (confirm) > baseline > journal > execute >
           verify [> rollback]
verify:    validate > facts > knowledge > strategy > generate > script-validation > verify
uninstall: validate > facts > knowledge > strategy > generate > script-validation >
           (confirm) > execute > proof
plan:      validate > facts > knowledge > strategy > generate > script-validation >
           [rehearsal]
rollback:  validate > (confirm) > rollback

[rehearsal] runs for install where the target supports it, for plan when asked
(``rehearse``, ``--rehearse/--no-rehearse``). The journal stage saves, durably, what the
install is about to change (the rehearsal says what) before execute starts; when execute
or verify fails, the rollback stage undoes it (``on_failure``) and verifies the undo.

Each stage returns a new ``WorkflowState``; after each, a ``workflow.stage`` event carries
the state and the stage's artifacts (history and progress subscribe). Only the
execution agent changes the target, and only after validation passed and the user
confirmed.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from workflow_agent.agents import (
    builder,
    execution,
    generator,
    improvement,
    knowledge,
    recovery,
    verification,
)
from workflow_agent.bus import MessageBus
from workflow_agent.config import WorkflowConfiguration
from workflow_agent.container import DISPOSABLE_KINDS
from workflow_agent.errors import (
    ExecutionFailedError,
    InvalidInputError,
    LeftoversError,
    NotConfirmedError,
    RecoveryNeededError,
    RollbackFailedError,
    UnsupportedPlatformError,
    ValidationRefusedError,
    VerificationFailedError,
    WorkflowAgentError,
)
from workflow_agent.execution import journal_probe
from workflow_agent.execution.journal import Entry, Header, Journal, JournalStore
from workflow_agent.execution.lock import TargetLock
from workflow_agent.execution.pool import TargetPool
from workflow_agent.execution.rehearsal import Rehearsal, supports_rehearsal
from workflow_agent.execution.target import RunResult, Target
from workflow_agent.integrations.params import ResolvedParams, resolve_params
from workflow_agent.integrations.registry import Integration
from workflow_agent.recovery.failures import insert_snippets
from workflow_agent.recovery.rollback import RollbackReport
from workflow_agent.scripting.render import RenderedScript, fail_after_step, render_checks
from workflow_agent.secrets import Redactor
from workflow_agent.state import (
    Action,
    ErrorInfo,
    Provenance,
    StageRecord,
    WorkflowState,
    now,
)
from workflow_agent.verification.checks import Check, batched_scripts
from workflow_agent.verification.snapshot import DEFAULT_IGNORE, Snapshot

if TYPE_CHECKING:
    from workflow_agent.knowledge.store import Hit
    from workflow_agent.storage.history import HistoryStore

STARTED_EVENT = "workflow.started"
STAGE_EVENT = "workflow.stage"
FINISHED_EVENT = "workflow.finished"

#: Called with the state just before the target is changed; False declines.
Confirm = Callable[[WorkflowState], Awaitable[bool]]


@dataclass(frozen=True)
class WorkflowRequest:
    """What the user asked for. ``params`` are raw and may hold secrets: never stored."""

    action: Action
    integration: str
    target: str
    params: Mapping[str, Any] = field(default_factory=dict)
    environ: Mapping[str, str] = field(default_factory=dict)
    #: An already open target to use instead of opening ``target``; the caller closes it.
    target_object: Target | None = None
    #: For ``rollback``: the workflow whose journal to undo, how, and which changes.
    rollback_of: str | None = None
    strategy: str = "staged"
    changes: tuple[int, ...] = ()
    #: Undo even what was changed again after that workflow (a user's later edits).
    force: bool = False
    #: The interrupted or failed workflow this one runs again (``resume``).
    resumed_from: str | None = None
    #: Generation without a template (``agents/generator.py``): documentation to write the
    #: integration from, LLM-written scripts approved in advance (needs
    #: ``llm.allow_unattended``), and where to save them as an integration folder.
    from_docs: str | None = None
    approve: bool = False
    save_as: str | None = None
    #: The fleet rollout this workflow belongs to (``fleet/rollout.py``), if any.
    fleet_id: str | None = None


@dataclass(frozen=True)
class Artifact:
    """Something a stage produced that history keeps (already masked)."""

    kind: str
    name: str
    content: str


@dataclass(frozen=True)
class StageEvent:
    """A stage ended: the new state, its record and its artifacts."""

    state: WorkflowState
    record: StageRecord
    artifacts: tuple[Artifact, ...] = ()


@dataclass
class _Outcome:
    changes: dict[str, Any] = field(default_factory=dict)
    detail: dict[str, Any] = field(default_factory=dict)
    artifacts: list[Artifact] = field(default_factory=list)


class _Failed(Exception):
    """A stage failed but produced something worth keeping (output, findings, results)."""

    def __init__(self, error: WorkflowAgentError, outcome: _Outcome) -> None:
        super().__init__(error.message)
        self.error = error
        self.outcome = outcome


class _Stopped(Exception):
    """A stage failed; carries the final state."""

    def __init__(self, state: WorkflowState) -> None:
        super().__init__(state.error.message if state.error else "stopped")
        self.state = state


@dataclass
class _Run:
    """What one workflow has learned so far that is not part of the stored state."""

    request: WorkflowRequest
    lock: TargetLock | None = None
    integration: Integration | None = None
    params: ResolvedParams | None = None
    baseline: execution.Baseline | None = None
    journal: Journal | None = None
    #: Documentation passages the knowledge stage found (they ground generated scripts).
    passages: tuple[Hit, ...] = ()
    #: No template fits: an LLM writes this run's integration (then ``generation``).
    generating: bool = False
    generation: generator.Generation | None = None
    #: Fixes learned from earlier failures that this run applies (improvement agent).
    fixes: improvement.FixPlan | None = None
    #: The integration's checks with this run's parameters (``Coordinator._checks``).
    checks: list[Check] | None = None
    #: The first attempt of verify's script checks, read in the install script's run.
    first_checks: list[RunResult] | None = None
    #: What preparing the journal reads, read ahead with the facts.
    ahead: journal_probe.Before | None = None


class Coordinator:
    """Runs workflows; one instance serves many."""

    def __init__(
        self,
        bus: MessageBus,
        pool: TargetPool,
        config: WorkflowConfiguration,
        redactor: Redactor,
        history: Callable[[], HistoryStore],
    ) -> None:
        self.bus = bus
        self.pool = pool
        self.config = config
        self.redactor = redactor
        #: Opened only when a run must read history (uninstall, plan, package-less install).
        self.history = history

    async def run(self, request: WorkflowRequest, confirm: Confirm | None = None) -> WorkflowState:
        """Run ``request`` to the end and return the final state (errors are in it)."""
        state = WorkflowState(
            workflow_id=str(uuid.uuid4()),
            action=request.action,
            integration=request.integration,
            target=request.target,
            fleet_id=request.fleet_id,
            started_at=now(),
        )
        await self.bus.publish(STARTED_EVENT, state)
        run = _Run(request)
        try:
            state = await self._stages(state, run, confirm)
            state = state.model_copy(update={"status": "succeeded", "finished_at": now()})
        except _Stopped as stopped:
            state = stopped.state
        except BaseException as exc:
            # A bug or an interrupt: still leave a complete record, then let it propagate.
            info = ErrorInfo(type=type(exc).__name__, message=str(exc) or repr(exc), exit_code=1)
            state = state.model_copy(update={"status": "failed", "error": info,
                                             "finished_at": now()})
            await self.bus.publish(FINISHED_EVENT, state)
            await self._release(state, run)
            raise
        state = await self._learn(state, run)
        await self._release(state, run)
        await self.bus.publish(FINISHED_EVENT, state)
        return state

    async def _release(self, state: WorkflowState, run: _Run) -> None:
        await self.pool.release(state.workflow_id)
        if run.lock is not None:
            run.lock.release()

    async def _stage(
        self,
        state: WorkflowState,
        name: str,
        body: Callable[[WorkflowState], Awaitable[_Outcome]],
    ) -> WorkflowState:
        started = now()
        try:
            outcome = await body(state)
        except (WorkflowAgentError, _Failed) as caught:
            kept = caught.outcome if isinstance(caught, _Failed) else _Outcome()
            exc = caught.error if isinstance(caught, _Failed) else caught
            record = StageRecord(
                name=name, status="failed", started_at=started, finished_at=now(),
                detail={**kept.detail, "error": self.redactor.redact(exc.message)},
            )
            status = "refused" if isinstance(exc, ValidationRefusedError) else "failed"
            info = ErrorInfo(
                type=type(exc).__name__,
                message=self.redactor.redact(exc.message),
                hint=self.redactor.redact(exc.hint) if exc.hint else None,
                exit_code=exc.exit_code,
            )
            failed = state.after(
                record, status=status, error=info, finished_at=now(), **kept.changes
            )
            await self.bus.publish(STAGE_EVENT, StageEvent(failed, record, tuple(kept.artifacts)))
            raise _Stopped(failed) from exc
        record = StageRecord(
            name=name, status="succeeded", started_at=started, finished_at=now(),
            detail=outcome.detail,
        )
        new = state.after(record, **outcome.changes)
        await self.bus.publish(STAGE_EVENT, StageEvent(new, record, tuple(outcome.artifacts)))
        return new

    async def _stages(
        self, state: WorkflowState, run: _Run, confirm: Confirm | None
    ) -> WorkflowState:
        action = run.request.action
        if action == "rollback":
            return await self._rollback_stages(state, run, confirm)
        state = await self._stage(state, "validate", lambda s: self._validate(s, run))
        state = await self._stage(state, "facts", lambda s: self._facts(s, run))
        state = await self._stage(state, "knowledge", lambda s: self._knowledge(s, run))
        state = await self._stage(state, "strategy", lambda s: self._strategy(s, run))
        state = await self._known_fixes(state, run)
        state = await self._stage(state, "generate", lambda s: self._generate(s, run))
        state = self._with_fix_snippets(state, run)
        state = await self._stage(state, "script-validation", lambda s: self._check(s, run))
        if self._rehearses(state, run):
            state = await self._stage(state, "rehearsal", lambda s: self._rehearse(s, run))
        if action == "plan":
            return state
        changes_target = action in ("install", "uninstall")
        if run.generation is not None:
            # LLM-written scripts run only when approved: never implied by --yes or by a
            # disposable target; --approve was checked against llm.allow_unattended.
            if not (run.request.approve or (confirm is not None and await confirm(state))):
                raise _Stopped(generator.unapproved(state))
        elif changes_target and confirm is not None and not await confirm(state):
            raise _Stopped(self._declined(state))
        if action == "install":
            state = await self._stage(state, "baseline", lambda s: self._baseline(s, run))
            state = await self._stage(state, "journal", lambda s: self._journal(s, run))
            try:
                state = await self._stage(state, "execute", lambda s: self._execute(s, run))
                state = await self._stage(state, "verify", lambda s: self._verify(s, run))
            except _Stopped as stopped:
                raise _Stopped(await self._after_failure(stopped.state, run)) from None
            assert run.journal is not None
            await asyncio.to_thread(run.journal.set_phase, "committed")
            if run.request.save_as is not None:
                state = await self._stage(state, "save", lambda s: self._save(s, run))
            return state
        if changes_target:
            state = await self._stage(state, "execute", lambda s: self._execute(s, run))
        if action == "verify":
            state = await self._stage(state, "verify", lambda s: self._verify(s, run))
        if action == "uninstall":
            state = await self._stage(state, "proof", lambda s: self._proof(s, run))
        return state

    def _journals_ahead(self, state: WorkflowState, run: _Run) -> bool:
        """Whether the facts' run also reads what the journal saves: an install that
        will not rehearse (the rehearsal's paths would widen the journal) of an
        integration already known (``--from-docs`` learns it after the facts). A read
        that a prompt made stale is taken again (``journal_probe.prepare``)."""
        if state.action != "install" or run.request.from_docs is not None:
            return False
        return self.config.rehearse is False or (
            self.config.rehearse is None
            and not supports_rehearsal(self.pool.get(state.workflow_id)))

    def _rehearses(self, state: WorkflowState, run: _Run) -> bool:
        """Whether this run rehearses: when asked; by default, installs where possible,
        unless the integration is already installed: its daemon, running on the target,
        would hold the ports the copy's daemon needs (the copy shares the network)."""
        if state.action not in ("install", "plan") or self.config.rehearse is False:
            return False
        if self.config.rehearse:
            return True
        if state.action != "install" or not supports_rehearsal(self.pool.get(state.workflow_id)):
            return False
        assert run.integration is not None and state.facts is not None
        packages = run.integration.definition.uninstall.packages
        return not (packages and all(p in state.facts.installed_packages for p in packages))

    @property
    def journals(self) -> JournalStore:
        """Every change journal on this machine."""
        return JournalStore(self.config.data_dir / "journal")

    def _resumed_note(self, run: _Run, scripts: Mapping[str, RenderedScript]) -> list[str]:
        """Say which workflow this one resumes, from which checkpoint, and whether the
        scripts are still the ones that workflow had validated."""
        previous = run.request.resumed_from
        if previous is None:
            return []
        checkpoint = self.history().last_checkpoint(previous)
        if checkpoint is None:
            return [f"resumes workflow {previous[:8]}, which reached no checkpoint"]
        stage, state_json = checkpoint
        before = WorkflowState.model_validate_json(state_json).scripts
        same = all(before.get(a) is not None and before[a].sha256 == s.sha256
                   for a, s in scripts.items() if a in before) and bool(before)
        verdict = ("with the same scripts" if same else
                   "with different scripts (the integration or its parameters changed)")
        return [f"resumes workflow {previous[:8]} from its checkpoint after {stage}, {verdict}"]

    async def _rollback_stages(
        self, state: WorkflowState, run: _Run, confirm: Confirm | None
    ) -> WorkflowState:
        state = await self._stage(state, "validate", lambda s: self._validate_rollback(s, run))
        if confirm is not None and not await confirm(state):
            raise _Stopped(self._declined(state))
        return await self._stage(state, "rollback", lambda s: self._rollback(s, run))

    async def _after_failure(self, failed: WorkflowState, run: _Run) -> WorkflowState:
        """After execute or verify failed: undo the install's changes, or keep them."""
        journal = run.journal
        if journal is None or journal.read().phase not in ("executing", "executed"):
            return failed
        assert failed.error is not None
        if self.config.on_failure == "keep":
            await asyncio.to_thread(journal.set_phase, "kept", "on_failure: keep")
            return failed.model_copy(update={"notes": [*failed.notes, (
                "the failed install's changes were kept (on_failure: keep); undo them with "
                f"`workflow-agent rollback {failed.workflow_id[:8]}`")]})
        try:
            rolled = await self._stage(failed, "rollback", lambda s: self._rollback(s, run))
        except _Stopped as stopped:
            # Both failures matter: the install's (first) and the rollback's.
            assert stopped.state.error is not None
            error = stopped.state.error.model_copy(update={
                "message": f"{failed.error.message}; then {stopped.state.error.message}"})
            return stopped.state.model_copy(update={"error": error})
        report = rolled.rollback
        assert report is not None
        message = (f"{failed.error.message}; rolled back ({report.strategy}): "
                   f"{len(report.undone)} change(s) undone and verified")
        return rolled.model_copy(update={
            "status": failed.status, "finished_at": now(),
            "error": failed.error.model_copy(update={"message": message}),
        })
    # -- failure learning (agents/improvement.py) ---------------------------------------

    async def _known_fixes(self, state: WorkflowState, run: _Run) -> WorkflowState:
        """Before an install generates its scripts: apply what earlier failures taught.

        A stage of its own only when something applies, so an ordinary run looks as before.
        """
        if state.action != "install" or run.integration is None or run.params is None:
            return state
        definition = run.integration.definition
        plan: improvement.FixPlan = await self.bus.request(
            improvement.FIXES,
            improvement.FixesRequest(
                state.workflow_id, state.integration, definition.parameters,
                run.params.values, frozenset(run.request.params),
                state.facts.package_manager if state.facts else None),
            timeout=self.config.bus_timeout,
        )
        if not plan.applied and not plan.notes:
            return state
        run.fixes = plan
        return await self._stage(state, "known-fixes", lambda s: self._apply_fixes(s, run))

    async def _apply_fixes(self, state: WorkflowState, run: _Run) -> _Outcome:
        plan, integration = run.fixes, run.integration
        assert plan is not None and integration is not None and run.params is not None
        if plan.params:
            # Through the integration's own parameter checks, like any value a user gives.
            run.params = resolve_params(integration.definition,
                                        {**run.request.params, **plan.params},
                                        run.request.environ)
        notes = [*state.notes, *plan.notes, *(
            f"applied the learned fix {f.fix} ({f.change}) for {f.kind}, learned from "
            f"workflow {f.learned_from[:8]}" + (" (proven)" if f.proven else "")
            for f in plan.applied)]
        return _Outcome(
            changes={"fixes": plan.applied, "params": run.params.masked(), "notes": notes},
            detail={"fixes": [f.model_dump() for f in plan.applied], "notes": plan.notes},
        )

    def _with_fix_snippets(self, state: WorkflowState, run: _Run) -> WorkflowState:
        """The install script with the learned fixes' reviewed snippets inserted; the
        script-validation stage that follows checks it like any other."""
        if run.fixes is None or not run.fixes.snippets or "install" not in state.scripts:
            return state
        script = insert_snippets(state.scripts["install"], run.fixes.snippets)
        return state.model_copy(update={"scripts": {**state.scripts, "install": script}})

    async def _learn(self, state: WorkflowState, run: _Run) -> WorkflowState:
        """After the run: record whether applied fixes worked; analyse a failure."""
        notes: list[str] = []
        try:
            if state.fixes:
                await self.bus.request(improvement.OUTCOME, improvement.OutcomeRequest(
                    state.workflow_id, state.integration, state.fixes,
                    state.status == "succeeded"), timeout=self.config.bus_timeout)
            failure = improvement.failure_text(state)
            if failure is not None:
                analysis: improvement.Analysis = await self.bus.request(
                    improvement.ANALYSE, improvement.AnalyseRequest(
                        state.workflow_id, state.integration, failure, state.facts),
                    timeout=self.config.bus_timeout)
                notes = improvement.describe(analysis)
        except WorkflowAgentError as exc:
            # The run's own outcome stands; losing what it would teach is reported.
            notes = [f"the failure could not be analysed: {exc.message}"]
        if not notes:
            return state
        return state.model_copy(update={"notes": [*state.notes, *notes]})

    def _declined(self, state: WorkflowState) -> WorkflowState:
        error = NotConfirmedError(
            f"{state.action} of {state.integration} on {state.target} was not confirmed; "
            "nothing was changed",
            hint="Pass --yes to confirm without a prompt.",
        )
        info = ErrorInfo(type=type(error).__name__, message=error.message, hint=error.hint,
                         exit_code=error.exit_code)
        return state.model_copy(update={"status": "refused", "error": info, "finished_at": now()})

    # -- stages ---------------------------------------------------------------------------

    async def _validate(self, state: WorkflowState, run: _Run) -> _Outcome:
        request = run.request
        await self.bus.request(generator.CHECK, generator.CheckRequest(
            request.integration, request.from_docs, request.approve, request.save_as),
            timeout=self.config.bus_timeout)
        # --from-docs: the integration and its parameters exist after the generate stage.
        if request.from_docs is None:
            reply: knowledge.Knowledge = await self.bus.request(
                knowledge.TOPIC, knowledge.KnowledgeRequest(run.request.integration),
                timeout=self.config.bus_timeout,
            )
            run.integration = reply.integration
            run.params = resolve_params(
                reply.integration.definition, run.request.params, run.request.environ
            )
            # From here on, nothing this run stores or shows may contain a secret value.
            self.redactor.add(run.params.secrets.values())
        if run.request.target_object is not None:
            target = run.request.target_object
            self.pool.adopt(state.workflow_id, target)
        else:
            target = await self.pool.open(state.workflow_id, run.request.target)
        if state.action in ("install", "uninstall"):
            run.lock = TargetLock(
                self.config.data_dir / "locks", target.identity,
                holder={"workflow": state.workflow_id, "action": state.action,
                        "integration": state.integration},
            )
            run.lock.acquire(wait=self.config.lock_wait)
            unfinished = self.journals.unfinished(target.identity)
            if unfinished:
                raise RecoveryNeededError(target.identity,
                                          [j.header.workflow_id for j in unfinished])
        masked = run.params.masked() if run.params is not None else {}
        return _Outcome(
            changes={"params": masked, "target_identity": target.identity},
            detail={"params": masked, "target": target.identity},
        )

    async def _facts(self, state: WorkflowState, run: _Run) -> _Outcome:
        scope = since = None
        if self._journals_ahead(state, run):
            assert run.integration is not None
            scope = _journal_scope(run.integration, [])
            # A re-run's hashes of the files that kept their stamps since the first install.
            stored = self._stored_baseline(state, indexed_only=True)
            since = stored.snapshot if stored is not None else None
        reply: execution.FactsReply = await self.bus.request(
            execution.FACTS, execution.FactsRequest(state.workflow_id, scope, since),
            timeout=self.config.bus_timeout,
        )
        facts, run.ahead = reply.facts, reply.ahead
        summary = facts.summary()
        return _Outcome(
            changes={"facts": facts},
            detail={**summary, "packages": len(facts.installed_packages)},
            artifacts=[Artifact("facts", "facts", facts.model_dump_json())],
        )

    async def _knowledge(self, state: WorkflowState, run: _Run) -> _Outcome:
        assert state.facts is not None
        if run.request.from_docs is not None:  # learn it first: the integration is unwritten
            docs: knowledge.Documentation = await self.bus.request(
                knowledge.DOCUMENTATION, knowledge.DocumentationRequest(
                    state.integration, state.facts, (run.request.from_docs,)),
                timeout=self.config.bus_timeout,
            )
            run.passages = docs.passages
            return _Outcome(detail={"sources": list(docs.sources)})
        reply: knowledge.Knowledge = await self.bus.request(
            knowledge.TOPIC, knowledge.KnowledgeRequest(state.integration, state.facts),
            timeout=self.config.bus_timeout,
        )
        run.passages = reply.passages
        return _Outcome(detail={"sources": list(reply.sources)})

    async def _strategy(self, state: WorkflowState, run: _Run) -> _Outcome:
        assert state.facts is not None
        try:
            if run.integration is None:
                raise UnsupportedPlatformError(f"{state.integration} has no templates yet")
            decision = await self.bus.request(
                builder.STRATEGY, builder.StrategyRequest(run.integration, state.facts),
                timeout=self.config.bus_timeout,
            )
        except UnsupportedPlatformError as exc:
            if state.action not in ("install", "plan"):
                raise
            # No template for these facts: an LLM may write the scripts (then approval).
            decision = await self.bus.request(
                generator.STRATEGY,
                generator.StrategyRequest(run.integration, state.facts, exc),
                timeout=self.config.bus_timeout,
            )
            run.generating = True
        return _Outcome(
            changes={"strategy": decision},
            detail={"method": decision.method, "reason": decision.reason},
            artifacts=[Artifact("plan", "strategy", decision.model_dump_json())],
        )

    def _stored_baseline(self, state: WorkflowState, *, indexed_only: bool = False
                         ) -> execution.Baseline | None:
        """The baseline in force for this integration on this target, if any.

        From this machine's baseline index once it is complete, with no database to open
        (``storage/baselines.py``); else, and always with a shared database, from the store
        (unless ``indexed_only``: then none).
        """
        from workflow_agent.storage.baselines import BaselineIndex

        target, integration = state.target_identity or "", state.integration
        index = BaselineIndex.for_config(self.config)
        if index is not None and index.complete:
            # Stored keys were redacted, like the store's (see latest_snapshot).
            stored = index.latest(target=self.redactor.redact(target),
                                  integration=self.redactor.redact(integration))
        elif indexed_only:
            return None
        else:
            stored = self.history().latest_snapshot(target=target, integration=integration)
        if stored is None:
            return None
        baseline = execution.Baseline.model_validate_json(stored)
        return None if baseline.consumed_by else baseline

    def _uninstall_context(self, state: WorkflowState, run: _Run) -> dict[str, Any]:
        """What uninstall may remove: only what the install created, per the baseline."""
        assert run.integration is not None and state.facts is not None
        spec = run.integration.definition.uninstall
        purge = self.config.purge
        baseline = run.baseline = self._stored_baseline(state)
        if baseline is None:
            return {"purge": purge, "remove_users": [], "remove_groups": [], "remove_paths": [],
                    "remove_packages": []}
        return {
            "purge": purge,
            "remove_users": [u for u in spec.users if u not in baseline.snapshot.users],
            "remove_groups": [g for g in spec.groups if g not in baseline.snapshot.groups],
            "remove_paths": [p for p in spec.paths if p not in baseline.preexisting_paths],
            # Dependencies only: templates remove their declared packages themselves.
            # Packages a kept-configuration uninstall left as configuration files only
            # stay listed, so a later purge finishes them; templates check each name.
            "remove_packages": sorted(
                p for p in baseline.added_packages
                if p not in _package_names(baseline.snapshot) and p not in spec.packages
            ),
        }

    async def _generate(self, state: WorkflowState, run: _Run) -> _Outcome:
        assert state.facts is not None and state.strategy is not None
        if run.generating and run.generation is None:
            return await self._write(state, run)
        assert run.integration is not None and run.params is not None
        actions = {
            "install": ("install", "verify"),
            "verify": ("verify",),
            "uninstall": ("uninstall",),
            "plan": ("install", "verify", "uninstall"),
        }[state.action]
        extra = self._uninstall_context(state, run) if "uninstall" in actions else {}
        scripts = await self.bus.request(
            builder.GENERATE,
            builder.GenerateRequest(
                run.integration, state.strategy.method, state.facts, run.params, actions, extra
            ),
            timeout=self.config.bus_timeout,
        )
        if state.action in ("install", "uninstall") and state.action not in scripts:
            raise UnsupportedPlatformError(
                f"method {state.strategy.method} of {state.integration} has no "
                f"{state.action} template",
                hint=f"Add templates.{state.action} to that method in the definition.",
            )
        notes = [*state.notes, *self._resumed_note(run, scripts)]
        if state.action == "uninstall" and run.baseline is None:
            notes.append(
                "no pre-install baseline for this target: uninstall removes the package "
                "but cannot prove nothing is left, nor remove users it did not see created"
            )
        provenance = run.generation.provenance() if run.generation else {
            a: [Provenance(kind="template", source=str(run.integration.templates_dir / s.template))]
            for a, s in scripts.items()}
        provenance = {a: p for a, p in provenance.items() if a in scripts}
        return _Outcome(
            changes={"scripts": scripts, "notes": notes, "provenance": provenance},
            detail={"scripts": {a: s.template for a, s in scripts.items()}},
            artifacts=[Artifact("script", a, self.redactor.redact(s.text))
                       for a, s in scripts.items()],
        )

    async def _write(self, state: WorkflowState, run: _Run) -> _Outcome:
        """Generation without a template: the LLM writes the integration from the
        passages; then its scripts are rendered like any template's."""
        assert state.facts is not None
        generation: generator.Generation = await self.bus.request(
            generator.WRITE, generator.WriteRequest(
                state.workflow_id, state.integration, state.facts, run.passages,
                run.integration, tuple(run.request.params)),
            timeout=self.config.bus_timeout,
        )
        run.generation, run.integration = generation, generation.integration
        if run.params is None:
            run.params = resolve_params(generation.integration.definition,
                                        run.request.params, run.request.environ)
            self.redactor.add(run.params.secrets.values())
        outcome = await self._generate(state, run)
        root = generation.integration.root
        outcome.changes["params"] = run.params.masked()
        outcome.detail.update(llm=f"{generation.provider}/{generation.model}",
                              attempts=generation.attempts, cited=list(generation.cited),
                              folder=str(root))
        outcome.artifacts += [
            Artifact("provenance", a, json.dumps([p.model_dump() for p in items]))
            for a, items in outcome.changes["provenance"].items()]
        outcome.artifacts.append(Artifact("generation", "definition", self.redactor.redact(
            (root / "definition.yaml").read_text(encoding="utf-8"))))
        outcome.artifacts.append(Artifact("generation", "answer", self.redactor.redact(
            generation.answer.model_dump_json())))
        return outcome

    async def _save(self, state: WorkflowState, run: _Run) -> _Outcome:
        """``--save-as``: the approved, installed and verified scripts as an integration."""
        assert run.request.save_as is not None
        if run.generation is None:
            return _Outcome(detail={"skipped": "templates wrote these scripts: nothing to save"})
        folder = await self.bus.request(
            generator.SAVE, generator.SaveRequest(run.generation, run.request.save_as),
            timeout=self.config.bus_timeout)
        return _Outcome(changes={"notes": [*state.notes, f"saved as integration {folder}"]},
                        detail={"saved": str(folder)})

    async def _check(self, state: WorkflowState, run: _Run) -> _Outcome:
        assert run.integration is not None
        secret_env = tuple(
            spec.env for spec in run.integration.definition.parameters.values()
            if spec.secret and spec.env
        )
        reports = await self.bus.request(
            builder.VALIDATE, builder.ValidateRequest(state.scripts, secret_env),
            timeout=self.config.bus_timeout,
        )
        errors = [(a, f) for a, r in reports.items() for f in r.errors]
        warnings = [(a, f) for a, r in reports.items() for f in r.warnings]
        artifacts = [Artifact("findings", a, r.model_dump_json()) for a, r in reports.items()]
        outcome = _Outcome(
            changes={"validation": reports},
            detail={"errors": len(errors), "warnings": len(warnings)},
            artifacts=artifacts,
        )
        refusing = errors + (warnings if self.config.strict_validation else [])
        if refusing:
            first = "; ".join(
                f"{a} line {f.line}: {f.code}: {f.message}" for a, f in refusing[:5]
            )
            raise _Failed(ValidationRefusedError(
                f"{len(refusing)} validation finding(s) refuse these scripts: {first}",
                hint="Nothing was run. Fix the integration's templates "
                "(`workflow-agent plan` shows every finding).",
            ), outcome)
        return outcome

    async def _rehearse(self, state: WorkflowState, run: _Run) -> _Outcome:
        assert run.params is not None
        rehearsal: Rehearsal = await self.bus.request(
            execution.REHEARSE,
            execution.RehearseRequest(state.workflow_id, state.scripts["install"],
                                      self._timeout(run, "install"), run.params.secret_env),
            timeout=self.config.bus_timeout,
        )
        changes = rehearsal.changes
        summary = execution.summarize(rehearsal.result, self.redactor)
        outcome = _Outcome(
            changes={"rehearsal": changes},
            detail={"changes": len(changes.lines()), "exit_code": summary.exit_code,
                    "upper_bytes": rehearsal.upper_bytes,
                    "duration": round(rehearsal.duration, 3)},
            artifacts=[Artifact("rehearsal", "install", changes.model_dump_json()),
                       Artifact("output", "rehearsal", self.redactor.redact(
                           rehearsal.result.stdout + rehearsal.result.stderr))],
        )
        if not rehearsal.result.ok:
            where = (f" at line {summary.failed_line}" if summary.failed_line else "")
            raise _Failed(ExecutionFailedError(
                f"the install script failed in rehearsal{where} with exit "
                f"{summary.exit_code}; the target was not changed",
                hint=f"Last output:\n{summary.output_tail}" if summary.output_tail else None,
            ), outcome)
        return outcome

    async def _validate_rollback(self, state: WorkflowState, run: _Run) -> _Outcome:
        request = run.request
        assert request.rollback_of is not None
        journal = self.journals.get(request.rollback_of)
        if journal is None:
            raise InvalidInputError(
                f"no change journal for workflow {request.rollback_of!r} on this machine",
                hint="Only installs leave a journal; list them with: workflow-agent history "
                "--action install",
            )
        header = journal.read().header
        run.journal = journal
        if request.target_object is not None:
            target = request.target_object
            self.pool.adopt(state.workflow_id, target)
        elif header.target.split(":", 1)[0] in DISPOSABLE_KINDS:
            raise InvalidInputError(
                f"workflow {header.workflow_id[:8]} ran on a disposable {header.target} "
                "that is gone, with everything it changed",
                hint="Nothing to roll back.",
            )
        else:
            target = await self.pool.open(state.workflow_id, header.target)
        if target.identity != header.target_identity:
            raise InvalidInputError(
                f"workflow {header.workflow_id[:8]} changed {header.target_identity}, but "
                f"{header.target} is now {target.identity}",
                hint="Roll back from where the target is reachable under the same identity.",
            )
        run.lock = TargetLock(
            self.config.data_dir / "locks", target.identity,
            holder={"workflow": state.workflow_id, "action": "rollback",
                    "integration": header.integration},
        )
        run.lock.acquire(wait=self.config.lock_wait)
        return _Outcome(
            changes={"target_identity": target.identity,
                     "params": {"workflow": header.workflow_id,
                                "strategy": request.strategy,
                                "changes": list(request.changes)}},
            detail={"workflow": header.workflow_id, "strategy": request.strategy,
                    "target": target.identity},
        )

    async def _rollback(self, state: WorkflowState, run: _Run) -> _Outcome:
        assert run.journal is not None
        strategy = (run.request.strategy if state.action == "rollback"
                    else self.config.rollback_strategy)
        report: RollbackReport = await self.bus.request(
            recovery.ROLLBACK,
            recovery.RollbackRequest(
                state.workflow_id, run.journal.directory, strategy,
                run.request.changes if state.action == "rollback" else (),
                # Right after a failed install nothing else has touched its changes.
                check_drift=state.action == "rollback" and not run.request.force),
            timeout=self.config.bus_timeout,
        )
        outcome = _Outcome(
            changes={"rollback": report},
            detail={"strategy": report.strategy, "workflows": report.workflows,
                    "undone": len(report.undone), "problems": report.problems,
                    "unrecorded": report.unrecorded, "duration": round(report.duration, 3)},
            artifacts=[Artifact("rollback", report.strategy, report.model_dump_json())],
        )
        if not report.ok:
            raise _Failed(RollbackFailedError(
                f"rollback could not restore {len(report.problems)} change(s): "
                + "; ".join(report.problems[:5]),
                hint="The journal and its backups are kept: fix the cause and retry with "
                f"`workflow-agent rollback {report.workflows[-1][:8]}`.",
            ), outcome)
        return outcome

    async def _journal(self, state: WorkflowState, run: _Run) -> _Outcome:
        assert run.integration is not None and state.target_identity is not None
        predicted = [] if state.rehearsal is None else [
            change.path for change in state.rehearsal.files if change.kind != "created"]
        touched = [] if state.rehearsal is None else [c.path for c in state.rehearsal.files]
        paths, ignore = _journal_scope(run.integration, touched)
        journal = run.journal = self.journals.create(Header(
            workflow_id=state.workflow_id, action=state.action,
            integration=state.integration, target=state.target,
            target_identity=state.target_identity, paths=paths, ignore=ignore,
            predicted=state.rehearsal is not None, pid=os.getpid(), created=now(),
        ))
        saved: list[Entry] = await self.bus.request(
            execution.JOURNAL,
            execution.JournalRequest(state.workflow_id, journal.directory, predicted,
                                     run.ahead, run.baseline.snapshot if run.baseline else None),
            timeout=self.config.bus_timeout,
        )
        run.ahead = None
        return _Outcome(
            detail={"saved": len(saved), "predicted": state.rehearsal is not None,
                    "journal": str(journal.directory)},
            artifacts=[Artifact("journal", "before",
                                json.dumps([e.model_dump(mode="json") for e in saved]))],
        )

    async def _baseline(self, state: WorkflowState, run: _Run) -> _Outcome:
        assert run.integration is not None and state.facts is not None
        spec = run.integration.definition.uninstall
        if spec.packages and all(p in state.facts.installed_packages for p in spec.packages):
            return _Outcome(detail={"skipped": "already installed; the first install's "
                                    "baseline stays the reference"})
        # Not (fully) installed, but an earlier install's baseline may still be in force:
        # after an uninstall that kept configuration, the target is not back at it. With
        # no trace of the declared packages, there is none to look up (and the history
        # database need not even be opened).
        traces = set(state.facts.installed_packages) | set(state.facts.config_only_packages)
        fresh = bool(spec.packages) and not traces & set(spec.packages)
        stored = None if fresh else self._stored_baseline(state)
        if stored is not None:
            run.baseline = stored
            return _Outcome(detail={"skipped": "the baseline from before the first install "
                                    "stays the reference (no purge proved it since)"})
        # What the facts' run read ahead for the journal was read moments ago: its hashes
        # stand for the files that kept their stamps.
        since = run.ahead.snapshot(state.target_identity or "") if run.ahead else None
        baseline: execution.Baseline = await self.bus.request(
            execution.SNAPSHOT,
            execution.SnapshotRequest(state.workflow_id, spec.watch, spec.ignore, spec.paths,
                                      since),
            timeout=self.config.bus_timeout,
        )
        run.baseline = baseline
        return _Outcome(
            detail={"files": len(baseline.snapshot.files),
                    "packages": len(baseline.snapshot.packages)},
            artifacts=[Artifact("baseline", "baseline", baseline.model_dump_json())],
        )

    def _timeout(self, run: _Run, action: str) -> float:
        assert run.integration is not None
        timeouts = {str(key): value for key, value in run.integration.definition.timeouts.items()}
        return timeouts.get(action, self.config.script_timeout)

    async def _execute(self, state: WorkflowState, run: _Run) -> _Outcome:
        assert run.params is not None
        action = state.action
        script = state.scripts[action]
        if action == "install" and self.config.fail_after_step is not None:
            script = fail_after_step(script, self.config.fail_after_step)
        probes: list[str] = []
        if action == "install" and "verify" not in state.scripts:
            # verify's script checks, first attempt: read right after the script.
            probes = batched_scripts(self._checks(run))
        reply: execution.RunReply = await self.bus.request(
            execution.RUN,
            execution.RunRequest(state.workflow_id, "execute", script,
                                 self._timeout(run, action), run.params.secret_env,
                                 run.journal.directory if run.journal else None, probes),
            timeout=self.config.bus_timeout,
        )
        result = reply.result
        if probes:
            run.first_checks = reply.probes
        summary = execution.summarize(result, self.redactor)
        runs = {**state.runs, action: summary}
        output = Artifact("output", action,
                          self.redactor.redact(result.stdout + result.stderr))
        recorded: list[Artifact] = []
        journaled: dict[str, Any] = {}
        if run.journal is not None:
            made = run.journal.read().changes
            journaled = {"changes": [e.describe() for e in made]}
            recorded += self._record_added_packages(run, made)
            recorded.append(Artifact("journal", "changes",
                                     json.dumps([e.model_dump(mode="json") for e in made])))
        if not result.ok:
            if summary.timed_out:
                why = f"timed out after {self._timeout(run, action):g} s"
            elif summary.failed_line is not None:
                why = (f"failed at line {summary.failed_line} with exit "
                       f"{result.exit_code}: {summary.failed_command}")
            else:
                why = f"exited with status {result.exit_code}"
            raise _Failed(ExecutionFailedError(
                f"the {action} script {why}",
                hint=f"Last output:\n{summary.output_tail}" if summary.output_tail else None,
            ), _Outcome(changes={"runs": runs, **journaled}, detail=summary.model_dump(),
                        artifacts=[output, *recorded]))
        return _Outcome(changes={"runs": runs, **journaled}, detail=summary.model_dump(),
                        artifacts=[output, *recorded])

    def _record_added_packages(self, run: _Run, made: list[Entry]) -> list[Artifact]:
        """After an install ran (even partly), note the packages it added to the baseline,
        so uninstall removes exactly those and no package that was there before. The
        journal observed them; the target need not be asked again."""
        if run.baseline is None:
            return []
        before = _package_names(run.baseline.snapshot)
        now_added = {entry.name.split(":", 1)[0]: entry.version_after or ""
                     for entry in made if entry.kind == "package" and entry.op == "added"}
        added = {**run.baseline.added_packages,
                 **{p: v for p, v in now_added.items() if p not in before}}
        if added == run.baseline.added_packages:
            return []
        run.baseline = run.baseline.model_copy(update={"added_packages": added})
        return [Artifact("baseline", "baseline", run.baseline.model_dump_json())]

    @staticmethod
    def _checks(run: _Run) -> list[Check]:
        """The integration's checks with this run's parameters (rendered once)."""
        if run.checks is None:
            assert run.integration is not None and run.params is not None
            run.checks = render_checks(run.integration.definition.checks, run.params.values)
        return run.checks

    async def _verify(self, state: WorkflowState, run: _Run) -> _Outcome:
        assert run.integration is not None and run.params is not None
        checks = self._checks(run)
        reply: verification.VerifyReply = await self.bus.request(
            verification.VERIFY,
            verification.VerifyRequest(
                state.workflow_id, checks, self.config.verify_timeout,
                state.scripts.get("verify"), self._timeout(run, "verify"),
                run.params.secret_env, run.first_checks,
            ),
            timeout=self.config.bus_timeout,
        )
        runs = dict(state.runs)
        problems = [f"{r.name}: {r.detail}" for r in reply.checks if not r.passed]
        if reply.script_result is not None:
            runs["verify"] = execution.summarize(reply.script_result, self.redactor)
            if not reply.script_result.ok:
                problems.insert(0, f"verify script: {runs['verify'].output_tail}")
        artifact = Artifact("verification", "checks",
                            json.dumps([r.model_dump() for r in reply.checks]))
        outputs = [artifact]
        if reply.script_result is not None:
            outputs.append(Artifact("output", "verify", self.redactor.redact(
                reply.script_result.stdout + reply.script_result.stderr)))
        if problems:
            raise _Failed(VerificationFailedError(
                f"{state.integration} does not work on {state.target}: "
                + "; ".join(problems),
                hint=f"`workflow-agent show {state.workflow_id[:8]}` has every check and "
                "the scripts' output.",
            ), _Outcome(changes={"checks": reply.checks, "runs": runs},
                        detail={"failed": problems}, artifacts=outputs))
        return _Outcome(
            changes={"checks": reply.checks, "runs": runs},
            detail={"passed": [r.name for r in reply.checks]},
            artifacts=outputs,
        )

    async def _proof(self, state: WorkflowState, run: _Run) -> _Outcome:
        assert run.integration is not None
        if run.baseline is None:
            return _Outcome(detail={"skipped": "no pre-install baseline for this target"})
        spec = run.integration.definition.uninstall
        reply: verification.LeftoversReply = await self.bus.request(
            verification.LEFTOVERS,
            verification.LeftoversRequest(
                state.workflow_id, run.baseline.snapshot, spec.watch, spec.ignore,
                self.config.purge,
            ),
            timeout=self.config.bus_timeout,
        )
        detail = {"leftovers": reply.leftovers, "removed_empty_dirs": reply.removed_dirs}
        outcome = _Outcome(changes={"leftovers": reply.leftovers}, detail=detail)
        if not reply.leftovers and self.config.purge:
            # Proven back at the baseline: the next install measures from a fresh one.
            consumed = execution.Baseline(snapshot=Snapshot(), preexisting_paths=[],
                                          consumed_by=state.workflow_id)
            outcome.artifacts.append(Artifact("baseline", "consumed", consumed.model_dump_json()))
        if reply.leftovers and self.config.purge:
            raise _Failed(LeftoversError(
                f"uninstall left {len(reply.leftovers)} change(s) behind: "
                + "; ".join(reply.leftovers[:10]),
                hint="These differ from the snapshot taken before install. Remove them by "
                "hand or extend the integration's uninstall section.",
            ), outcome)
        return outcome


def _journal_scope(integration: Integration, touched: Sequence[str]
                   ) -> tuple[list[str], list[str]]:
    """The paths an install's journal watches (``touched``: those a rehearsal saw
    changed) and its ignore patterns."""
    spec = integration.definition.uninstall
    return sorted({*spec.watch, *spec.paths, *touched}), [*DEFAULT_IGNORE, *spec.ignore]


def _package_names(snapshot: Snapshot) -> set[str]:
    """Package names without dpkg's ``:arch`` suffix, as facts list them."""
    return {name.split(":", 1)[0] for name in snapshot.packages}
