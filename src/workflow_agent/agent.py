"""``WorkflowAgent``: the main controller. Wires the agents onto the bus and runs workflows."""

from __future__ import annotations

from workflow_agent.agents.builder import ScriptBuilderAgent
from workflow_agent.agents.coordinator import Confirm, Coordinator, WorkflowRequest
from workflow_agent.agents.execution import ExecutionAgent
from workflow_agent.agents.generator import ScriptGeneratorAgent
from workflow_agent.agents.improvement import ImprovementAgent
from workflow_agent.agents.knowledge import KnowledgeAgent
from workflow_agent.agents.recorder import HistoryRecorder
from workflow_agent.agents.recovery import RecoveryAgent
from workflow_agent.agents.verification import VerificationAgent
from workflow_agent.container import Container
from workflow_agent.facts import PackageListings
from workflow_agent.state import WorkflowState


class WorkflowAgent:
    """Runs workflows with the services of one ``Container``."""

    def __init__(self, container: Container) -> None:
        self.container = container
        bus = container.bus
        HistoryRecorder(container.history_writer).attach(bus)
        KnowledgeAgent(container.registry, container.config.knowledge_database,
                       settings=container.config.knowledge).attach(bus)
        ScriptBuilderAgent(container.config.cache_dir).attach(bus)
        ScriptGeneratorAgent(container.config, lambda: container.llm,
                             container.llm_configured).attach(bus)
        ExecutionAgent(container.pool, container.redactor,
                       PackageListings(container.config.cache_dir / "packages")).attach(bus)
        VerificationAgent(container.pool).attach(bus)
        RecoveryAgent(container.pool).attach(bus)
        ImprovementAgent(container.pool, container.history_writer, lambda: container.history,
                         lambda: container.llm if container.llm_configured else None,
                         learned=None if container.config.history_url
                         else container.config.data_dir / "learned").attach(bus)
        self.coordinator = Coordinator(
            bus, container.pool, container.config, container.redactor, lambda: container.history
        )

    async def run(self, request: WorkflowRequest, confirm: Confirm | None = None) -> WorkflowState:
        """Run one workflow to its end; the returned state says how it ended."""
        return await self.coordinator.run(request, confirm)
