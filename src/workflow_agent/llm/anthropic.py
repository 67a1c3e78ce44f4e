"""Anthropic's Messages API through the official ``anthropic`` SDK (extra ``anthropic``).

The SDK is imported when a provider is built. System messages go into the request's
``system`` field (the API has no system role); the current API takes no temperature
and has no JSON mode, so ``response_format`` relies on the prompt alone.
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
    import anthropic

_NO_KEY = "no-key-configured"

#: The official service; other servers are named by ``base_url``.
ANTHROPIC_BASE_URL = "https://api.anthropic.com"


def _import_anthropic() -> Any:
    try:
        import anthropic
    except ImportError as exc:
        raise MissingExtraError("anthropic", "anthropic", "anthropic") from exc
    return anthropic


class AnthropicProvider(LLMProvider):
    """A Claude model behind Anthropic's Messages API (or a server speaking it).

    ``api_key`` is the key's value, read from the environment by whoever builds this;
    ``api_key_env`` is only that variable's name, used in error messages.
    """

    name = "anthropic"

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
        sdk = _import_anthropic()
        self.model = model
        self.base_url = base_url
        self.timeout = timeout
        self.pricing = pricing
        self.api_key_env = api_key_env
        self._sdk = sdk
        self._client: anthropic.AsyncAnthropic = sdk.AsyncAnthropic(
            api_key=api_key or _NO_KEY,
            # Explicit, so the SDK does not pick up ANTHROPIC_BASE_URL on its own.
            base_url=base_url or ANTHROPIC_BASE_URL,
            timeout=timeout,
            max_retries=0,
        )

    async def complete(
        self, messages: Sequence[Message], settings: CompletionSettings
    ) -> Completion:
        """One Messages API call; SDK errors become ``LLMProviderError`` subclasses."""
        sdk = self._sdk
        system = "\n\n".join(m.content for m in messages if m.role == "system")
        request: dict[str, Any] = {
            "model": self.model,
            "max_tokens": settings.max_tokens,
            "messages": [
                {"role": m.role, "content": m.content} for m in messages if m.role != "system"
            ],
            "timeout": settings.timeout or self.timeout,
        }
        if system:
            request["system"] = system
        where = self.base_url or ANTHROPIC_BASE_URL
        started = time.monotonic()
        try:
            response = await self._client.messages.create(**request)
        except sdk.APITimeoutError as exc:
            raise LLMTimeoutError(self.label, f"no answer from {where} in time") from exc
        except sdk.APIConnectionError as exc:
            raise LLMConnectionError(self.label, f"cannot connect to {where}: {exc}") from exc
        except sdk.APIStatusError as exc:
            raise error_for_status(
                self.label,
                exc.status_code,
                str(exc.message),
                headers=dict(exc.response.headers),
                api_key_env=self.api_key_env,
            ) from exc
        except sdk.APIError as exc:
            raise LLMRequestError(self.label, f"unreadable answer: {exc}") from exc
        latency = time.monotonic() - started
        text = "".join(
            block.text for block in response.content if getattr(block, "type", "") == "text"
        )
        prompt_tokens = response.usage.input_tokens
        completion_tokens = response.usage.output_tokens
        return Completion(
            text=text,
            finish_reason=response.stop_reason,
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
