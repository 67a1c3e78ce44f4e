"""Errors of the LLM service, a branch of ``workflow_agent.errors``' tree.

    WorkflowAgentError
    ├── ConfigurationError (InvalidInputError, exit 2)
    │   ├── LLMNotConfiguredError       no provider configured, yet something needs one
    │   └── MissingExtraError           the provider's SDK is not installed
    └── LLMError                        an LLM call failed                       (exit 1)
        ├── LLMProviderError            one provider's attempt failed; ``retryable`` says
        │   │                           whether trying again may help
        │   ├── LLMTimeoutError         no answer in time                   (retryable)
        │   ├── LLMConnectionError      cannot connect                      (retryable)
        │   ├── LLMRateLimitError       429; ``retry_after`` seconds if sent (retryable)
        │   ├── LLMServerError          5xx                                  (retryable)
        │   ├── LLMAuthenticationError  401/403; names the env var, never the key
        │   └── LLMRequestError         any other refusal, or an unreadable answer
        ├── LLMUnavailableError         every provider of the fallback chain failed
        └── LLMOutputInvalidError       structured output still invalid after retries

SDK errors are converted at each provider's boundary (``raise ... from exc``). Messages
never contain an API key, and prompts are redacted before they are sent, so a server's
error text that quotes the prompt cannot carry a secret either.
"""

from __future__ import annotations

from collections.abc import Sequence

from workflow_agent.errors import ConfigurationError, WorkflowAgentError


class LLMNotConfiguredError(ConfigurationError):
    """Something needs an LLM, but no provider is configured."""

    def __init__(self, needed_for: str | None = None) -> None:
        what = f"{needed_for} needs an LLM" if needed_for else "an LLM is needed"
        super().__init__(
            f"no LLM configured: {what}",
            hint="Add a provider under llm.providers in the configuration file, e.g.\n"
            "  llm:\n    providers:\n"
            "      - {kind: openai, model: llama3.2, base_url: 'http://127.0.0.1:11434/v1'}\n"
            "(kind: openai | anthropic | gemini; api_key_env names the variable holding "
            "the key), or set WORKFLOW_AGENT_LLM__PROVIDERS to the same list as JSON. "
            "See docs/llm.md.",
        )


class MissingExtraError(ConfigurationError):
    """The SDK a configured provider needs is not installed; names the extra."""

    def __init__(self, kind: str, module: str, extra: str) -> None:
        super().__init__(
            f"the {kind} LLM provider needs the Python package {module!r}, "
            "which is not installed",
            hint=f"Install it with: pip install 'workflow-agent[{extra}]'",
        )
        self.kind = kind
        self.extra = extra


class LLMError(WorkflowAgentError):
    """An LLM call failed."""


class LLMProviderError(LLMError):
    """One provider's attempt failed.

    ``provider`` is the provider's ``name:model`` label; ``retryable`` tells the retry
    wrapper whether the same request may succeed later.
    """

    retryable = False

    def __init__(self, provider: str, message: str, *, hint: str | None = None) -> None:
        super().__init__(f"{provider}: {message}", hint=hint)
        self.provider = provider


class LLMTimeoutError(LLMProviderError):
    """The provider did not answer in time."""

    retryable = True


class LLMConnectionError(LLMProviderError):
    """The provider's server could not be reached."""

    retryable = True


class LLMRateLimitError(LLMProviderError):
    """The provider refused for now (429); ``retry_after`` is its advice in seconds."""

    retryable = True

    def __init__(
        self, provider: str, message: str, *, retry_after: float | None = None
    ) -> None:
        super().__init__(
            provider, message, hint="Wait, or lower the request rate / raise your quota."
        )
        self.retry_after = retry_after


class LLMServerError(LLMProviderError):
    """The provider's server failed (5xx)."""

    retryable = True


class LLMAuthenticationError(LLMProviderError):
    """The provider refused the API key (or there was none). Names the variable only."""

    def __init__(self, provider: str, message: str, *, api_key_env: str | None) -> None:
        if api_key_env:
            hint = (
                f"Check the API key in the environment variable {api_key_env} "
                "(llm.providers[].api_key_env names it)."
            )
        else:
            hint = "Set llm.providers[].api_key_env to the variable holding the API key."
        super().__init__(provider, message, hint=hint)
        self.api_key_env = api_key_env


class LLMRequestError(LLMProviderError):
    """The provider refused the request (unknown model, bad parameter, ...) or answered
    with something that is not a completion. Trying again would not help."""


class LLMUnavailableError(LLMError):
    """Every provider of the fallback chain failed; ``failures`` holds each one's error."""

    def __init__(self, failures: Sequence[LLMProviderError]) -> None:
        lines = "; ".join(failure.message for failure in failures) or "no provider tried"
        super().__init__(
            f"no LLM provider answered: {lines}",
            hint="Check that the servers in llm.providers are reachable and the API keys "
            "valid; a fallback provider can be added to the list.",
        )
        self.failures = list(failures)


class LLMOutputInvalidError(LLMError):
    """The model's structured answer stayed invalid after every allowed retry."""

    def __init__(self, attempts: int, problems: str) -> None:
        super().__init__(
            f"the LLM's answer was not valid after {attempts} attempts: {problems}",
            hint="Try a more capable model, or give it more context.",
        )
        self.attempts = attempts
        self.problems = problems
