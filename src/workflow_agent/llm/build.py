"""Building the LLM service from the ``llm`` section of the configuration.

API keys come from the environment only: the caller passes the environment in (the
container passes ``os.environ``), each key read is registered with the ``Redactor`` at
once, and only the variable's name ever appears in messages.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from workflow_agent.config import LLMProviderSettings, LLMSettings
from workflow_agent.errors import ConfigurationError
from workflow_agent.llm.errors import LLMNotConfiguredError
from workflow_agent.llm.provider import LLMProvider, Pricing
from workflow_agent.llm.service import LLMService, ResponseCache, UsageRecorder
from workflow_agent.llm.wrappers import FallbackProvider, RetryingProvider, TimeoutProvider
from workflow_agent.secrets import Redactor

if TYPE_CHECKING:
    from workflow_agent.llm.anthropic import AnthropicProvider
    from workflow_agent.llm.gemini import GeminiProvider
    from workflow_agent.llm.openai_compat import OpenAICompatibleProvider

#: The variable holding the key of each official service, when ``api_key_env`` is unset.
DEFAULT_KEY_ENV = {
    "openai": "OPENAI_API_KEY",
    "anthropic": "ANTHROPIC_API_KEY",
    "gemini": "GEMINI_API_KEY",
}


def build_provider(
    settings: LLMProviderSettings,
    *,
    environ: Mapping[str, str],
    redactor: Redactor,
    position: int = 0,
) -> LLMProvider:
    """The bare provider for one ``llm.providers`` entry (its SDK imported now).

    Raises ``MissingExtraError`` when the SDK is not installed, and
    ``ConfigurationError`` when the official service's key variable is unset.
    """
    key_env = settings.api_key_env
    if key_env is None and settings.base_url is None:
        key_env = DEFAULT_KEY_ENV[settings.kind]
    api_key = environ.get(key_env) if key_env else None
    if key_env and not api_key and settings.base_url is None:
        raise ConfigurationError(
            f"the {settings.kind} provider llm.providers[{position}] needs an API key, "
            f"but the environment variable {key_env} is not set",
            hint=f"export {key_env}=... (or name another variable in api_key_env).",
        )
    if api_key:
        redactor.add([api_key])
    pricing = None
    if settings.prompt_cost_per_mtok is not None and settings.completion_cost_per_mtok is not None:
        pricing = Pricing(settings.prompt_cost_per_mtok, settings.completion_cost_per_mtok)
    # Each module imports its SDK; importing the module is what "using" a kind means.
    kind: type[OpenAICompatibleProvider | AnthropicProvider | GeminiProvider]
    if settings.kind == "openai":
        from workflow_agent.llm.openai_compat import OpenAICompatibleProvider as kind
    elif settings.kind == "anthropic":
        from workflow_agent.llm.anthropic import AnthropicProvider as kind
    else:
        from workflow_agent.llm.gemini import GeminiProvider as kind
    return kind(
        settings.model,
        base_url=settings.base_url,
        api_key=api_key,
        api_key_env=key_env,
        timeout=settings.timeout,
        pricing=pricing,
    )


def build_chain(
    llm: LLMSettings, *, environ: Mapping[str, str], redactor: Redactor
) -> FallbackProvider:
    """Every configured provider, each with its time limit and retries, in a fallback
    chain. Raises ``LLMNotConfiguredError`` when none is configured."""
    if not llm.providers:
        raise LLMNotConfiguredError()
    members: list[LLMProvider] = []
    for position, settings in enumerate(llm.providers):
        provider = build_provider(settings, environ=environ, redactor=redactor,
                                  position=position)
        members.append(
            RetryingProvider(TimeoutProvider(provider), max_retries=settings.max_retries)
        )
    return FallbackProvider(members)


def build_llm_service(
    llm: LLMSettings,
    *,
    environ: Mapping[str, str],
    redactor: Redactor,
    cache: ResponseCache | None = None,
    usage: UsageRecorder | None = None,
    needed_for: str | None = None,
) -> LLMService:
    """The ``LLMService`` the configuration describes.

    ``cache`` is used only when ``llm.cache`` is on (pass the opened ``HistoryStore``);
    ``usage`` receives one row per call (the run's ``HistorySpool``, or the store).
    ``needed_for`` names the feature in the "no LLM configured" error.
    """
    if not llm.providers:
        raise LLMNotConfiguredError(needed_for)
    return LLMService(
        build_chain(llm, environ=environ, redactor=redactor),
        redactor=redactor,
        cache=cache if llm.cache else None,
        usage=usage,
    )
