"""The verification agent: does the integration work, and did uninstall leave anything?

Every run is a round trip: the verify script runs with the first attempt of the checks
that are scripts (``run_then_parts``), or an install's script did (the request's
``first``), then ``run_checks`` retries what still fails, one run per attempt for
those checks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from workflow_agent.bus import Message, MessageBus
from workflow_agent.execution.pool import TargetPool
from workflow_agent.execution.target import RunResult
from workflow_agent.scripting.render import RenderedScript
from workflow_agent.verification.checks import (
    Check,
    CheckResult,
    batched_scripts,
    run_checks,
)
from workflow_agent.verification.snapshot import (
    DEFAULT_IGNORE,
    Snapshot,
    diff,
    remove_empty_dirs_created,
    take_snapshot,
)

VERIFY = "verify.run"
LEFTOVERS = "verify.leftovers"


@dataclass(frozen=True)
class VerifyRequest:
    """Run the verify script (if any), then the typed checks, on the workflow's target."""

    workflow_id: str
    checks: Sequence[Check]
    timeout: float
    script: RenderedScript | None = None
    script_timeout: float = 60.0
    env: Mapping[str, str] = field(default_factory=dict)
    #: The first attempt of the script checks (``batched_scripts``), already read.
    first: Sequence[RunResult] | None = None


@dataclass(frozen=True)
class VerifyReply:
    """Check results and the verify script's run."""

    checks: list[CheckResult]
    script_result: RunResult | None


@dataclass(frozen=True)
class LeftoversRequest:
    """Compare the target with its pre-install baseline."""

    workflow_id: str
    baseline: Snapshot
    paths: Sequence[str]
    ignore: Sequence[str]
    #: Remove empty directories the install created (a purge-level uninstall).
    purge: bool


@dataclass(frozen=True)
class LeftoversReply:
    """What is still different from the baseline, and what was cleaned up."""

    leftovers: list[str]
    removed_dirs: list[str]


class VerificationAgent:
    """Answers ``verify.run`` and ``verify.leftovers``."""

    def __init__(self, pool: TargetPool) -> None:
        self.pool = pool

    def attach(self, bus: MessageBus) -> None:
        """Serve this agent's topics on ``bus``."""
        bus.serve(VERIFY, self._verify)
        bus.serve(LEFTOVERS, self._leftovers)

    async def _verify(self, message: Message) -> VerifyReply:
        request: VerifyRequest = message.payload
        target = self.pool.get(request.workflow_id)
        checks = list(request.checks)
        script_result, first = None, request.first
        if request.script is not None:
            script_result, first = await target.run_then_parts(
                request.script.text, batched_scripts(checks), env=request.env,
                timeout=request.script_timeout, parts_timeout=max(request.timeout, 5.0))
        results = await run_checks(target, checks, timeout=request.timeout, first=first)
        return VerifyReply(results, script_result)

    async def _leftovers(self, message: Message) -> LeftoversReply:
        request: LeftoversRequest = message.payload
        target = self.pool.get(request.workflow_id)
        ignore = [*DEFAULT_IGNORE, *request.ignore]
        # Files that kept their stamp since the baseline keep its hashes (not read again).
        after = await take_snapshot(target, paths=request.paths, ignore=ignore,
                                    since=request.baseline)
        changes = diff(request.baseline, after)
        removed: list[str] = []
        if request.purge and not changes.is_empty:
            removed = await remove_empty_dirs_created(target, changes)
            if removed:
                after = await take_snapshot(target, paths=request.paths, ignore=ignore,
                                            since=request.baseline)
                changes = diff(request.baseline, after)
        return LeftoversReply(changes.lines(), removed)
