"""Open targets by workflow, shared by the agents that work on the same workflow."""

from __future__ import annotations

from collections.abc import Callable

from workflow_agent.execution.target import Target


class TargetPool:
    """Opens each workflow's target once and closes it when the workflow ends."""

    def __init__(self, factory: Callable[[str], Target]) -> None:
        self._factory = factory
        self._open: dict[str, Target] = {}
        self._owned: set[str] = set()

    async def open(self, workflow_id: str, spec: str) -> Target:
        """Build and open the target named by ``spec`` for ``workflow_id``."""
        target = self._factory(spec)
        await target.open()
        self._open[workflow_id] = target
        self._owned.add(workflow_id)
        return target

    def adopt(self, workflow_id: str, target: Target) -> None:
        """Use an already open ``target`` for ``workflow_id`` (closing stays with the owner)."""
        self._open[workflow_id] = target

    def get(self, workflow_id: str) -> Target:
        """The open target of ``workflow_id``."""
        return self._open[workflow_id]

    async def release(self, workflow_id: str) -> None:
        """Forget ``workflow_id``'s target, closing it if this pool opened it."""
        target = self._open.pop(workflow_id, None)
        if target is not None and workflow_id in self._owned:
            self._owned.discard(workflow_id)
            await target.close()
