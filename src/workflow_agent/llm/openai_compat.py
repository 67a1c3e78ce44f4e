"""The OpenAI chat-completions API: OpenAI itself, Ollama, llama.cpp's server, vLLM, ...

Uses the official ``openai`` SDK (extra ``openai``), imported when a provider is built.
The SDK's own retries are off: retrying is ``RetryingProvider``'s job, and two layers of
retries would multiply the waiting.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from workflow_agent.llm.errors import LLMRequestError
from workflow_agent.llm.provider import Completion, CompletionSettings, Message
from workflow_agent.llm.sdk import StainlessProvider, import_sdk

if TYPE_CHECKING:
    import openai

#: Where the official service lives; other servers are named by ``base_url``.
OPENAI_BASE_URL = "https://api.openai.com/v1"


class OpenAICompatibleProvider(StainlessProvider):
    """A model behind an OpenAI-compatible ``/chat/completions`` endpoint."""

    name = "openai"

    def _connect(self, api_key: str) -> None:
        self._sdk = sdk = import_sdk("openai", kind="openai", extra="openai")
        self._sdk_errors = (sdk.APIError,)
        # OpenAI's newer models refuse ``max_tokens``; the servers that copy its API
        # (Ollama, llama.cpp, vLLM) all understand it, not all the newer name.
        self._max_tokens_field = (
            "max_completion_tokens" if self.base_url is None else "max_tokens"
        )
        self._client: openai.AsyncOpenAI = sdk.AsyncOpenAI(
            api_key=api_key,
            # Explicit, so the SDK does not pick up OPENAI_BASE_URL on its own.
            base_url=self.base_url or OPENAI_BASE_URL,
            timeout=self.timeout,
            max_retries=0,
        )

    async def complete(
        self, messages: Sequence[Message], settings: CompletionSettings
    ) -> Completion:
        """One chat completion; SDK errors become ``LLMProviderError`` subclasses."""
        request: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": m.role, "content": m.content} for m in messages],
            "temperature": settings.temperature,
            self._max_tokens_field: settings.max_tokens,
            "timeout": settings.timeout or self.timeout,
        }
        if settings.response_format == "json":
            request["response_format"] = {"type": "json_object"}
        response, latency = await self._send(
            self._client.chat.completions.create(**request), self.base_url or OPENAI_BASE_URL
        )
        if not response.choices:
            raise LLMRequestError(self.label, "the answer has no choices")
        choice = response.choices[0]
        usage = response.usage
        return self._completion(
            choice.message.content or "",
            choice.finish_reason,
            usage.prompt_tokens if usage else 0,
            usage.completion_tokens if usage else 0,
            latency,
        )

    async def aclose(self) -> None:
        """Close the SDK's HTTP connections."""
        await self._client.close()
