"""Behaviour around a provider, by wrapping it: a time limit, retries, a fallback chain.

Each wrapper is itself an ``LLMProvider``, so they compose::

    FallbackProvider([RetryingProvider(TimeoutProvider(primary)),
                      RetryingProvider(TimeoutProvider(local))])

``build.build_chain`` assembles exactly that from the configuration.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

from workflow_agent.llm.errors import (
    LLMProviderError,
    LLMRateLimitError,
    LLMTimeoutError,
    LLMUnavailableError,
)
from workflow_agent.llm.provider import Completion, CompletionSettings, LLMProvider, Message

log = logging.getLogger(__name__)

Sleep = Callable[[float], Awaitable[None]]


class _Wrapper(LLMProvider):
    """A provider that delegates to ``inner`` and answers to its name and model."""

    def __init__(self, inner: LLMProvider) -> None:
        self.inner = inner
        self.name = inner.name
        self.model = inner.model
        self.timeout = inner.timeout

    async def aclose(self) -> None:
        """Close the wrapped provider."""
        await self.inner.aclose()


class TimeoutProvider(_Wrapper):
    """Bounds every attempt by the settings' timeout (else the provider's), whatever the
    SDK does: an SDK's own timeout covers one read, not the whole answer."""

    async def complete(
        self, messages: Sequence[Message], settings: CompletionSettings
    ) -> Completion:
        """The inner provider's answer, or ``LLMTimeoutError`` when it takes too long."""
        limit = settings.timeout or self.inner.timeout
        try:
            async with asyncio.timeout(limit):
                return await self.inner.complete(messages, settings)
        except TimeoutError as exc:
            raise LLMTimeoutError(self.label, f"no answer within {limit:g} s") from exc


class RetryingProvider(_Wrapper):
    """Retries retryable failures (timeouts, 429, 5xx, lost connections) with exponential
    backoff: ``base_delay`` doubled per retry, at most ``max_delay``.

    A 429's ``Retry-After`` is honoured when it is within ``max_delay``; a longer one is
    not waited for, the error goes up at once so a fallback provider can answer instead.
    """

    def __init__(
        self,
        inner: LLMProvider,
        *,
        max_retries: int = 2,
        base_delay: float = 0.5,
        max_delay: float = 30.0,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        super().__init__(inner)
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, not {max_retries}")
        self.max_retries = max_retries
        self.base_delay = base_delay
        self.max_delay = max_delay
        self._sleep = sleep

    async def complete(
        self, messages: Sequence[Message], settings: CompletionSettings
    ) -> Completion:
        """The inner provider's answer, after up to ``max_retries`` retries."""
        attempt = 0
        while True:
            try:
                return await self.inner.complete(messages, settings)
            except LLMProviderError as exc:
                if not exc.retryable or attempt >= self.max_retries:
                    raise
                delay = self._delay(exc, attempt)
                if delay is None:
                    raise
                attempt += 1
                log.warning(
                    "%s failed (%s); retry %d of %d in %.1f s",
                    self.label, exc.message, attempt, self.max_retries, delay,
                )
                await self._sleep(delay)

    def _delay(self, exc: LLMProviderError, attempt: int) -> float | None:
        """Seconds to wait before the next try; ``None``: the server wants too long."""
        if isinstance(exc, LLMRateLimitError) and exc.retry_after is not None:
            return exc.retry_after if exc.retry_after <= self.max_delay else None
        return float(min(self.base_delay * 2**attempt, self.max_delay))


class FallbackProvider(LLMProvider):
    """Tries each provider in order until one answers.

    Any provider failure moves on to the next; when all fail, ``LLMUnavailableError``
    lists every failure. Errors that are not ``LLMProviderError`` (bugs, cancellation)
    are not caught.
    """

    name = "fallback"

    def __init__(self, providers: Sequence[LLMProvider]) -> None:
        if not providers:
            raise ValueError("FallbackProvider needs at least one provider")
        self.providers = list(providers)
        self.model = ",".join(p.label for p in self.providers)
        self.timeout = max(p.timeout for p in self.providers)

    async def complete(
        self, messages: Sequence[Message], settings: CompletionSettings
    ) -> Completion:
        """The first answer from the providers, in order."""
        failures: list[LLMProviderError] = []
        for number, provider in enumerate(self.providers):
            try:
                return await provider.complete(messages, settings)
            except LLMProviderError as exc:
                failures.append(exc)
                if number + 1 < len(self.providers):
                    log.warning(
                        "%s failed (%s); falling back to %s",
                        provider.label, exc.message, self.providers[number + 1].label,
                    )
        raise LLMUnavailableError(failures)

    async def aclose(self) -> None:
        """Close every provider of the chain."""
        for provider in self.providers:
            await provider.aclose()


def chain_members(provider: LLMProvider) -> list[LLMProvider]:
    """The providers that may answer for ``provider``, in the order they are tried."""
    if isinstance(provider, FallbackProvider):
        return list(provider.providers)
    return [provider]
