"""The OpenAI chat-completions API: OpenAI itself, Ollama, llama.cpp's server, vLLM, ...

Uses the official ``openai`` SDK (extra ``openai``), imported when a provider is built.
The SDK's own retries are off: retrying is ``RetryingProvider``'s job, and two layers of
retries would multiply the waiting.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from workflow_agent.llm.errors import (
    LLMConnectionError,
    LLMRequestError,
    LLMTimeoutError,
    MissingExtraError,
)
from workflow_agent.llm.http_status import error_for_status
from workflow_agent.llm.provider import (
    Completion,
    CompletionSettings,
    LLMProvider,
    Message,
    Pricing,
    Usage,
)

if TYPE_CHECKING:
    import openai

#: Where the official service lives; other servers are named by ``base_url``.
OPENAI_BASE_URL = "https://api.openai.com/v1"

#: Sent when no key is configured: local servers (Ollama, llama.cpp) ignore the key, but
#: the SDK refuses to start without one. A server that does want a key answers 401.
_NO_KEY = "no-key-configured"


def _import_openai() -> Any:
    try:
        import openai
    except ImportError as exc:
        raise MissingExtraError("openai", "openai", "openai") from exc
    return openai


class OpenAICompatibleProvider(LLMProvider):
    """A model behind an OpenAI-compatible ``/chat/completions`` endpoint.

    ``api_key`` is the key's value, read from the environment by whoever builds this;
    ``api_key_env`` is only that variable's name, used in error messages.
    """

    name = "openai"

    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        api_key_env: str | None = None,
        timeout: float = 60.0,
        pricing: Pricing | None = None,
    ) -> None:
        sdk = _import_openai()
        self.model = model
        self.base_url = base_url or OPENAI_BASE_URL
        self.timeout = timeout
        self.pricing = pricing
        self.api_key_env = api_key_env
        self._sdk = sdk
        self._client: openai.AsyncOpenAI = sdk.AsyncOpenAI(
            api_key=api_key or _NO_KEY,
            base_url=self.base_url,
            timeout=timeout,
            max_retries=0,
        )
        # OpenAI's newer models refuse ``max_tokens``; the servers that copy its API
        # (Ollama, llama.cpp, vLLM) all understand it, not all the newer name.
        self._max_tokens_field = "max_completion_tokens" if base_url is None else "max_tokens"

    async def complete(
        self, messages: Sequence[Message], settings: CompletionSettings
    ) -> Completion:
        """One chat completion; SDK errors become ``LLMProviderError`` subclasses."""
        sdk = self._sdk
        request: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": m.role, "content": m.content} for m in messages],
            "temperature": settings.temperature,
            self._max_tokens_field: settings.max_tokens,
            "timeout": settings.timeout or self.timeout,
        }
        if settings.response_format == "json":
            request["response_format"] = {"type": "json_object"}
        started = time.monotonic()
        try:
            response = await self._client.chat.completions.create(**request)
        except sdk.APITimeoutError as exc:
            raise LLMTimeoutError(self.label, f"no answer from {self.base_url} in time") from exc
        except sdk.APIConnectionError as exc:
            raise LLMConnectionError(
                self.label, f"cannot connect to {self.base_url}: {exc}"
            ) from exc
        except sdk.APIStatusError as exc:
            raise error_for_status(
                self.label,
                exc.status_code,
                str(exc.message),
                headers=dict(exc.response.headers),
                api_key_env=self.api_key_env,
            ) from exc
        except sdk.APIError as exc:  # e.g. a body that is not a completion
            raise LLMRequestError(self.label, f"unreadable answer: {exc}") from exc
        latency = time.monotonic() - started
        if not response.choices:
            raise LLMRequestError(self.label, "the answer has no choices")
        choice = response.choices[0]
        usage = response.usage
        prompt_tokens = usage.prompt_tokens if usage else 0
        completion_tokens = usage.completion_tokens if usage else 0
        return Completion(
            text=choice.message.content or "",
            finish_reason=choice.finish_reason,
            usage=Usage(
                provider=self.name,
                model=self.model,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                latency=latency,
                cost=self.pricing.cost(prompt_tokens, completion_tokens)
                if self.pricing
                else None,
            ),
        )

    async def aclose(self) -> None:
        """Close the SDK's HTTP connections."""
        await self._client.close()
