"""Anthropic's Messages API through the official ``anthropic`` SDK (extra ``anthropic``).

The SDK is imported when a provider is built. System messages go into the request's
``system`` field (the API has no system role); the current API takes no temperature
and has no JSON mode, so ``response_format`` relies on the prompt alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from workflow_agent.llm.provider import Completion, CompletionSettings, Message
from workflow_agent.llm.sdk import StainlessProvider, import_sdk

if TYPE_CHECKING:
    import anthropic

#: The official service; other servers are named by ``base_url``.
ANTHROPIC_BASE_URL = "https://api.anthropic.com"


class AnthropicProvider(StainlessProvider):
    """A Claude model behind Anthropic's Messages API (or a server speaking it)."""

    name = "anthropic"

    def _connect(self, api_key: str) -> None:
        self._sdk = sdk = import_sdk("anthropic", kind="anthropic", extra="anthropic")
        self._sdk_errors = (sdk.APIError,)
        self._client: anthropic.AsyncAnthropic = sdk.AsyncAnthropic(
            api_key=api_key,
            # Explicit, so the SDK does not pick up ANTHROPIC_BASE_URL on its own.
            base_url=self.base_url or ANTHROPIC_BASE_URL,
            timeout=self.timeout,
            max_retries=0,
        )

    async def complete(
        self, messages: Sequence[Message], settings: CompletionSettings
    ) -> Completion:
        """One Messages API call; SDK errors become ``LLMProviderError`` subclasses."""
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
        response, latency = await self._send(
            self._client.messages.create(**request), self.base_url or ANTHROPIC_BASE_URL
        )
        text = "".join(
            block.text for block in response.content if getattr(block, "type", "") == "text"
        )
        return self._completion(
            text,
            response.stop_reason,
            response.usage.input_tokens,
            response.usage.output_tokens,
            latency,
        )

    async def aclose(self) -> None:
        """Close the SDK's HTTP connections."""
        await self._client.close()
