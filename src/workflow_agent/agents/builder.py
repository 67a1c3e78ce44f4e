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
from workflow_agent.scripting.validate import Script, ValidationReport, validate_scripts
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
        self._batches = _Batches(cache_dir)

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
        scripts = [Script(script.text, f"{action} ({script.template})", request.secret_env)
                   for action, script in request.scripts.items()]
        return dict(zip(request.scripts, await self._batches.validate(scripts), strict=True))


class _Batches:
    """Validation requests, one batch at a time: the requests that arrive while a batch
    runs go together in the next one (a fleet asks once per host, nearly at once), in a
    worker thread so bash -n and shellcheck leave the event loop free."""

    def __init__(self, cache_dir: Path | None) -> None:
        self.cache_dir = cache_dir
        self.waiting: list[tuple[list[Script], asyncio.Future[list[ValidationReport]]]] = []
        self.running: asyncio.Task[None] | None = None

    async def validate(self, scripts: list[Script]) -> list[ValidationReport]:
        """The reports of ``scripts``, in order."""
        future: asyncio.Future[list[ValidationReport]] = (
            asyncio.get_running_loop().create_future())
        self.waiting.append((scripts, future))
        if self.running is None:
            self.running = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            while self.waiting:
                batch, self.waiting = self.waiting, []
                flat = [script for scripts, _ in batch for script in scripts]
                try:
                    reports = await asyncio.to_thread(validate_scripts, flat,
                                                      cache_dir=self.cache_dir)
                except Exception as exc:  # noqa: BLE001 - each waiter gets it, as from its own call
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for scripts, future in batch:
                    mine, reports = reports[:len(scripts)], reports[len(scripts):]
                    if not future.done():  # its workflow may have been cancelled
                        future.set_result(mine)
        finally:
            self.running = None
