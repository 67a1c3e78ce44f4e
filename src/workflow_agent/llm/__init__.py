"""The LLM service: providers behind one ``LLMProvider`` class, and the service around them.

Nothing here imports an SDK: each provider module imports its own when a provider is
built, and a missing one raises ``MissingExtraError`` naming the extra to install.

    from workflow_agent.llm import CompletionSettings, Message, build_llm_service

    service = build_llm_service(config.llm, environ=os.environ, redactor=redactor,
                                cache=history_store, usage=history_writer)
    answer = await service.complete([Message.user("...")], workflow_id=wid,
                                    purpose="generate")

Tests (here and in every part that uses an LLM) drive the real service with
``ScriptedProvider``: ``LLMService(ScriptedProvider([...]), redactor=Redactor())``.
"""

from __future__ import annotations

from workflow_agent.llm.build import build_chain, build_llm_service, build_provider
from workflow_agent.llm.errors import (
    LLMAuthenticationError,
    LLMConnectionError,
    LLMError,
    LLMNotConfiguredError,
    LLMOutputInvalidError,
    LLMProviderError,
    LLMRateLimitError,
    LLMRequestError,
    LLMServerError,
    LLMTimeoutError,
    LLMUnavailableError,
    MissingExtraError,
)
from workflow_agent.llm.provider import (
    Completion,
    CompletionSettings,
    LLMProvider,
    Message,
    Pricing,
    Usage,
)
from workflow_agent.llm.scripted import ScriptedCall, ScriptedProvider, ScriptExhaustedError
from workflow_agent.llm.service import (
    LLMService,
    ResponseCache,
    Structured,
    UsageRecorder,
    cache_key,
)
from workflow_agent.llm.wrappers import FallbackProvider, RetryingProvider, TimeoutProvider

__all__ = [
    "Completion",
    "CompletionSettings",
    "FallbackProvider",
    "LLMAuthenticationError",
    "LLMConnectionError",
    "LLMError",
    "LLMNotConfiguredError",
    "LLMOutputInvalidError",
    "LLMProvider",
    "LLMProviderError",
    "LLMRateLimitError",
    "LLMRequestError",
    "LLMServerError",
    "LLMService",
    "LLMTimeoutError",
    "LLMUnavailableError",
    "Message",
    "MissingExtraError",
    "Pricing",
    "ResponseCache",
    "RetryingProvider",
    "ScriptExhaustedError",
    "ScriptedCall",
    "ScriptedProvider",
    "Structured",
    "TimeoutProvider",
    "Usage",
    "UsageRecorder",
    "build_chain",
    "build_llm_service",
    "build_provider",
    "cache_key",
]
