"""The script builder agent: choose a method, render its scripts, validate them."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workflow_agent.bus import Message, MessageBus
from workflow_agent.facts import Facts
from workflow_agent.integrations.params import ResolvedParams
from workflow_agent.integrations.registry import Integration
from workflow_agent.scripting.render import RenderedScript, render_script
from workflow_agent.scripting.validate import ValidationReport, validate_script
from workflow_agent.strategy import StrategyDecision, select_method

STRATEGY = "strategy.select"
GENERATE = "script.generate"
VALIDATE = "script.validate"


@dataclass(frozen=True)
class StrategyRequest:
    """Choose how to install ``integration`` on a target with ``facts``."""

    integration: Integration
    facts: Facts


@dataclass(frozen=True)
class GenerateRequest:
    """Render ``actions``' scripts of ``integration`` with ``method`` for ``facts``."""

    integration: Integration
    method: str
    facts: Facts
    params: ResolvedParams
    actions: tuple[str, ...]
    #: Extra template variables (uninstall: what to remove).
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ValidateRequest:
    """Validate ``scripts``; ``secret_env`` names variables that must not reach argv."""

    scripts: Mapping[str, RenderedScript]
    secret_env: tuple[str, ...] = ()


class ScriptBuilderAgent:
    """Answers ``strategy.select``, ``script.generate`` and ``script.validate``."""

    def __init__(self, cache_dir: Path | None) -> None:
        self.cache_dir = cache_dir

    def attach(self, bus: MessageBus) -> None:
        """Serve this agent's topics on ``bus``."""
        bus.serve(STRATEGY, self._strategy)
        bus.serve(GENERATE, self._generate)
        bus.serve(VALIDATE, self._validate)

    async def _strategy(self, message: Message) -> StrategyDecision:
        request: StrategyRequest = message.payload
        return select_method(request.integration.definition, request.facts)

    async def _generate(self, message: Message) -> dict[str, RenderedScript]:
        request: GenerateRequest = message.payload
        definition = request.integration.definition
        method = next(m for m in definition.methods if m.name == request.method)
        scripts: dict[str, RenderedScript] = {}
        for action in request.actions:
            script = render_script(
                request.integration, method, action, request.facts, request.params, request.extra
            )
            if script is not None:
                scripts[action] = script
        return scripts

    async def _validate(self, message: Message) -> dict[str, ValidationReport]:
        request: ValidateRequest = message.payload

        def run() -> dict[str, ValidationReport]:
            return {
                action: validate_script(
                    script.text,
                    name=f"{action} ({script.template})",
                    secret_env=request.secret_env,
                    cache_dir=self.cache_dir,
                )
                for action, script in request.scripts.items()
            }

        # bash -n and shellcheck are subprocesses: keep the event loop free meanwhile.
        return await asyncio.to_thread(run)
