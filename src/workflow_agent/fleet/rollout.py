"""Fleet rollouts: one workflow per inventory host, in batches gated on verification.

    hosts ──plan_batches(canary, serial)──▶ [canary] [batch 2] [batch 3] ...

    each batch: up to ``forks`` hosts at once, each its own workflow (install, verify or
                uninstall) on its own target, all in one event loop, all with one fleet id
    after it:   failed share of its reachable hosts > ``max_fail`` ─▶ stop: later batches
                never start; the batch's installs that succeeded get a ``rollback``
                workflow (every install so far with ``rollback_all``); the failed ones
                already rolled themselves back (``on_failure``)
                no host of it verified (all unreachable) ─▶ stop, nothing to roll back

A host *succeeds* when its workflow succeeded, which for install includes the verify
stage (the exporter really serves its metrics). A host is *unreachable* when its target
could not be reached or its connection was lost (``TargetUnreachableError``); such hosts
are reported apart and do not count against ``max_fail``: a host that is down says
nothing about whether the change is good, and the rollout gate is about the change. A
host that died mid-install may hold half its changes; ``workflow-agent recover`` undoes
them once it is back.

Each host's SSH settings come from the inventory (user, port, key file, jump host,
become) over the configuration's ``ssh`` section: ``fleet_container`` builds targets
that way.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from workflow_agent.agents.coordinator import STAGE_EVENT, WorkflowRequest
from workflow_agent.errors import InvalidInputError, TargetUnreachableError
from workflow_agent.execution.sshlib import asyncssh
from workflow_agent.fleet.inventory import Host
from workflow_agent.fleet.plan import RolloutOptions, crossed, plan_batches, target_spec

if TYPE_CHECKING:
    from workflow_agent.agent import WorkflowAgent
    from workflow_agent.agents.coordinator import StageEvent
    from workflow_agent.bus import Message
    from workflow_agent.state import Action, WorkflowState

log = logging.getLogger(__name__)

HostStatus = Literal["pending", "running", "succeeded", "failed", "unreachable", "skipped"]
#: Actions a rollout runs per host (rollback is what it does after a failed batch).
FLEET_ACTIONS = ("install", "verify", "uninstall", "plan")
_UNREACHABLE = TargetUnreachableError.__name__
_HALF_MADE = ("; its changes may be half-made: run `workflow-agent recover` once the "
              "host is back")


# -- results ------------------------------------------------------------------------


@dataclass
class HostResult:
    """What happened on one host (updated while the rollout runs)."""

    name: str
    target: str
    batch: int
    status: HostStatus = "pending"
    #: The last stage its workflow finished (``rollback`` while a batch rollback runs).
    stage: str = ""
    workflow_id: str | None = None
    error: str | None = None
    #: What to do about ``error``, when its error says.
    hint: str | None = None
    exit_code: int = 0
    #: The workflow reached the execute stage: the host may have been changed.
    changed: bool = False
    #: Its changes were undone: by the failed install itself, or by the batch rollback.
    rolled_back: bool = False
    rollback_workflow_id: str | None = None
    rollback_error: str | None = None
    started: float | None = None
    duration: float | None = None

    @property
    def unreachable(self) -> bool:
        """The host could not be reached, or its connection was lost."""
        return self.status == "unreachable"

    def as_json(self) -> dict[str, Any]:
        """The machine-readable result (``--output json``)."""
        return {
            "host": self.name, "target": self.target, "batch": self.batch,
            "workflow_id": self.workflow_id, "status": self.status, "stage": self.stage,
            "error": self.error, "hint": self.hint, "exit_code": self.exit_code,
            "changed": self.changed,
            "rolled_back": self.rolled_back, "rollback_workflow_id": self.rollback_workflow_id,
            "rollback_error": self.rollback_error, "unreachable": self.unreachable,
            "duration": None if self.duration is None else round(self.duration, 3),
        }


@dataclass
class RolloutReport:
    """The whole rollout: every host, the batches, and why it stopped (if it did)."""

    fleet_id: str
    action: str
    integration: str
    options: RolloutOptions
    hosts: list[HostResult]
    batches: list[list[str]]
    #: Why later batches never started; None when every batch ran.
    stopped: str | None = None
    duration: float = 0.0
    #: A plan's result on each host that finished one (by host name).
    plans: dict[str, WorkflowState] = field(default_factory=dict)

    def count(self, status: HostStatus) -> int:
        """How many hosts ended with ``status``."""
        return sum(1 for host in self.hosts if host.status == status)

    @property
    def exit_code(self) -> int:
        """0 when every host succeeded and nothing was rolled back; else the highest exit
        code among the failed hosts (8 if a batch rollback failed); 6 when hosts were
        only unreachable (or the rollout stopped for that)."""
        codes = [host.exit_code for host in self.hosts if host.status == "failed"]
        codes += [8 for host in self.hosts if host.rollback_error]
        if codes:
            return max(codes)
        if self.count("unreachable") or self.stopped:
            return 6
        return 0

    def as_json(self) -> dict[str, Any]:
        """The machine-readable report (``--output json``)."""
        return {
            "fleet_id": self.fleet_id, "action": self.action,
            "integration": self.integration, "exit_code": self.exit_code,
            "stopped": self.stopped, "duration": round(self.duration, 3),
            "options": {"forks": self.options.forks, "canary": self.options.canary,
                        "serial": None if self.options.serial is None else (
                            f"{self.options.serial.value:g}"
                            + ("%" if self.options.serial.percent else "")),
                        "max_fail": self.options.max_fail,
                        "rollback_all_on_failure": self.options.rollback_all},
            "counts": {status: self.count(status) for status in
                       ("succeeded", "failed", "unreachable", "skipped")},
            "batches": self.batches,
            "hosts": [host.as_json() for host in self.hosts],
            **(self._plans_json() if self.action == "plan" else {}),
        }

    def _plans_json(self) -> dict[str, Any]:
        """Each host's method and scripts (by digest) and the distinct scripts once."""
        scripts: dict[str, dict[str, Any]] = {}
        plans: dict[str, Any] = {}
        for host in self.hosts:  # in inventory order
            name, state = host.name, self.plans.get(host.name)
            if state is None:
                continue
            for action, script in state.scripts.items():
                report = state.validation.get(action)
                scripts.setdefault(script.sha256, {
                    **script.model_dump(mode="json"),
                    "findings": [] if report is None else [
                        f.model_dump(mode="json") for f in report.findings]})
            plans[name] = {
                "method": state.strategy.method if state.strategy else None,
                "facts": state.facts.summary() if state.facts else None,
                "scripts": {a: s.sha256 for a, s in state.scripts.items()},
                "notes": list(state.notes)}
        return {"plans": plans, "scripts": scripts}


# -- the rollout --------------------------------------------------------------------


@dataclass
class _Tracking:
    """Which host a workflow runs on, and each workflow's first error type."""

    by_spec: dict[str, HostResult]
    first_error: dict[str, str] = field(default_factory=dict)


class Rollout:
    """Runs one workflow per host of ``hosts`` through ``agent``, batch by batch.

    ``on_update`` is called (synchronously) whenever a host's status or stage changes:
    live progress subscribes there.
    """

    def __init__(
        self,
        agent: WorkflowAgent,
        hosts: Sequence[Host],
        options: RolloutOptions | None = None,
        *,
        on_update: Callable[[HostResult], None] | None = None,
        fleet_id: str | None = None,
    ) -> None:
        if not hosts:
            raise InvalidInputError("no inventory host to roll out to",
                                    hint="Check the inventory and the --limit pattern.")
        self.agent = agent
        self.hosts = list(hosts)
        self.options = options or RolloutOptions()
        self.on_update = on_update
        self.fleet_id = fleet_id or str(uuid.uuid4())
        specs: dict[str, str] = {}
        for host in self.hosts:
            spec = target_spec(host)
            if spec in specs:
                raise InvalidInputError(
                    f"inventory hosts {specs[spec]!r} and {host.name!r} are both {spec}",
                    hint="Give each host its own ansible_host/ansible_port, or --limit to one.",
                )
            specs[spec] = host.name
        sizes = plan_batches(len(self.hosts), canary=self.options.canary,
                             serial=self.options.serial)
        self.results: list[HostResult] = []
        for number, size in enumerate(sizes, start=1):
            for host in self.hosts[len(self.results):len(self.results) + size]:
                self.results.append(HostResult(host.name, target_spec(host), number))
        self._tracking = _Tracking({r.target: r for r in self.results})
        self._forks = asyncio.Semaphore(self.options.forks)
        self._plans: dict[str, WorkflowState] = {}
        agent.container.bus.subscribe(STAGE_EVENT, self._on_stage)

    def _update(self, result: HostResult) -> None:
        if self.on_update is not None:
            self.on_update(result)

    async def _on_stage(self, message: Message) -> None:
        event: StageEvent = message.payload
        state = event.state
        result = self._tracking.by_spec.get(state.target)
        if result is None or state.fleet_id != self.fleet_id:
            return
        if event.record.status == "failed" and state.error is not None:
            self._tracking.first_error.setdefault(state.workflow_id, state.error.type)
        if state.action != "rollback":
            result.workflow_id = state.workflow_id
            result.stage = event.record.name
            result.changed = result.changed or event.record.name == "execute"
        self._update(result)

    async def run(
        self,
        action: Action,
        integration: str,
        params: Mapping[str, Any] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> RolloutReport:
        """Run ``action`` of ``integration`` on every host; the report says how it went."""
        if action not in FLEET_ACTIONS:
            raise InvalidInputError(f"a fleet rollout runs {', '.join(FLEET_ACTIONS)}, "
                                    f"not {action}")
        began = time.monotonic()
        batches: dict[int, list[HostResult]] = {}
        for result in self.results:
            batches.setdefault(result.batch, []).append(result)
        report = RolloutReport(
            self.fleet_id, action, integration, self.options, self.results,
            [[r.name for r in batch] for batch in batches.values()], plans=self._plans,
        )
        done: list[HostResult] = []
        for number, batch in batches.items():
            await asyncio.gather(*(self._host(r, action, integration, params or {},
                                              environ or {}) for r in batch))
            done.extend(batch)
            reason = self._stop_reason(number, len(batches), batch)
            if reason is None:
                continue
            report.stopped = reason
            for later in self.results[len(done):]:
                later.status, later.error = "skipped", f"not started: {reason}"
                self._update(later)
            if action == "install":
                undo = done if self.options.rollback_all else batch
                await asyncio.gather(*(self._roll_back(r, integration, reason)
                                       for r in undo if r.status == "succeeded"))
            break
        report.duration = time.monotonic() - began
        return report

    def _stop_reason(self, number: int, total: int, batch: list[HostResult]) -> str | None:
        """Why the rollout stops after batch ``number``, or None to go on."""
        failed = sum(1 for r in batch if r.status == "failed")
        reachable = sum(1 for r in batch if r.status != "unreachable")
        which = "the canary batch" if number == 1 and self.options.canary else f"batch {number}"
        later = ("" if number == total else
                 f"; batch{'es' if total - number > 1 else ''} "
                 f"{', '.join(str(n) for n in range(number + 1, total + 1))} not started")
        if crossed(failed, reachable, self.options.max_fail):
            share = 100 * failed / reachable
            return (f"{which} of {total}: {failed} of {reachable} reachable host(s) failed "
                    f"({share:.0f}% > --max-fail {self.options.max_fail:g}%){later}")
        if reachable == 0:
            return f"{which} of {total}: no host of it was reachable{later}"
        return None

    async def _host(
        self, result: HostResult, action: Action, integration: str,
        params: Mapping[str, Any], environ: Mapping[str, str],
    ) -> None:
        """Run the host's workflow (within ``forks``) and record how it ended."""
        async with self._forks:
            result.status, result.started = "running", time.monotonic()
            result.stage = "started"
            self._update(result)
            request = WorkflowRequest(action=action, integration=integration,
                                      target=result.target, params=params, environ=environ,
                                      fleet_id=self.fleet_id)
            try:
                state = await self.agent.run(request)
            except (OSError, asyncssh.Error) as exc:
                # A connection dropped somewhere its error was not converted: the host is
                # gone either way; the coordinator already recorded the workflow as failed.
                log.warning("%s: %s escaped the workflow", result.name, type(exc).__name__,
                            exc_info=True)
                result.status, result.exit_code = "unreachable", TargetUnreachableError.exit_code
                result.error = f"connection lost: {exc}" + (_HALF_MADE if result.changed else "")
            else:
                self._finish(result, state)
                if action == "plan":
                    self._plans[result.name] = state
            result.duration = time.monotonic() - result.started
            self._update(result)

    def _finish(self, result: HostResult, state: WorkflowState) -> None:
        result.workflow_id = state.workflow_id
        result.exit_code = state.exit_code
        result.changed = any(s.name == "execute" for s in state.stages)
        if state.status == "succeeded":
            result.status = "succeeded"
            return
        error = state.error
        first = self._tracking.first_error.get(state.workflow_id)
        unreachable = _UNREACHABLE in (first, error.type if error else None)
        result.status = "unreachable" if unreachable else "failed"
        result.error = error.message if error else state.status
        result.hint = error.hint if error else None
        result.rolled_back = state.rollback is not None and state.rollback.ok
        if unreachable and result.changed and not result.rolled_back:
            result.error += _HALF_MADE

    async def _roll_back(self, result: HostResult, integration: str, reason: str) -> None:
        """Undo a succeeded install of a stopped rollout (a ``rollback`` workflow)."""
        assert result.workflow_id is not None
        async with self._forks:
            result.stage = "rollback"
            self._update(result)
            request = WorkflowRequest(action="rollback", integration=integration,
                                      target=result.target, rollback_of=result.workflow_id,
                                      strategy="staged", fleet_id=self.fleet_id)
            state = await self.agent.run(request)
            result.rollback_workflow_id = state.workflow_id
            if state.status == "succeeded":
                result.rolled_back = True
                result.error = f"rolled back: {reason}"
            else:
                result.rollback_error = state.error.message if state.error else state.status
            self._update(result)
