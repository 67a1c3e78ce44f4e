"""Google's Gemini API through the official ``google-genai`` SDK (extra ``gemini``).

The SDK is imported when a provider is built. System messages become the request's
``system_instruction``; the assistant role is called ``model`` there. The SDK's own
retries (including its implicit ones on connection errors) are turned off: retrying is
``RetryingProvider``'s job.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

from workflow_agent.llm.errors import LLMProviderError
from workflow_agent.llm.provider import Completion, CompletionSettings, Message
from workflow_agent.llm.sdk import SDKProvider, import_sdk

#: The official service, named in messages; other servers are named by ``base_url``.
GEMINI_HOST = "generativelanguage.googleapis.com"


def _transport_errors() -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
    """(timeout, connection) error classes of the HTTP libraries the SDK may use: older
    releases use httpx, newer ones httpx2; both let some errors through unconverted."""
    timeouts: list[type[BaseException]] = [TimeoutError]
    transport: list[type[BaseException]] = [OSError]
    for name in ("httpx", "httpx2"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        timeouts.append(module.TimeoutException)
        transport.append(module.TransportError)
    return tuple(timeouts), tuple(transport)


class GeminiProvider(SDKProvider):
    """A Gemini model behind the Gemini Developer API (or a server speaking it)."""

    name = "gemini"

    def _connect(self, api_key: str) -> None:
        genai = import_sdk("google.genai", kind="gemini", extra="gemini", package="google-genai")
        self._errors = importlib.import_module("google.genai.errors")
        self._types = importlib.import_module("google.genai.types")
        self._timeouts, self._transport = _transport_errors()
        # ValueError: the SDK's parsing of a malformed body.
        self._sdk_errors = (self._errors.APIError, *self._timeouts, *self._transport, ValueError)
        options: dict[str, Any] = {"retry_options": self._types.HttpRetryOptions(attempts=1)}
        if self.base_url:
            options["base_url"] = self.base_url
        self._client = genai.Client(
            api_key=api_key, http_options=self._types.HttpOptions(**options)
        )

    def _convert(self, exc: BaseException, where: str) -> LLMProviderError:
        if isinstance(exc, self._errors.APIError):
            headers = getattr(exc.response, "headers", None)
            return self._refused(
                int(exc.code or 0),
                str(exc.message or exc),
                dict(headers) if headers is not None else None,
            )
        if isinstance(exc, self._timeouts):
            return self._timed_out(where)
        if isinstance(exc, self._transport):
            return self._unreachable(where, exc)
        return self._unreadable(exc)

    async def complete(
        self, messages: Sequence[Message], settings: CompletionSettings
    ) -> Completion:
        """One ``generateContent`` call; SDK errors become ``LLMProviderError`` subclasses."""
        types = self._types
        system = "\n\n".join(m.content for m in messages if m.role == "system")
        contents = [
            types.Content(
                role="model" if m.role == "assistant" else "user",
                parts=[types.Part(text=m.content)],
            )
            for m in messages
            if m.role != "system"
        ]
        config = types.GenerateContentConfig(
            system_instruction=system or None,
            temperature=settings.temperature,
            max_output_tokens=settings.max_tokens,
            response_mime_type="application/json" if settings.response_format == "json" else None,
            # The SDK wants whole milliseconds.
            http_options=types.HttpOptions(
                timeout=int((settings.timeout or self.timeout) * 1000),
                retry_options=types.HttpRetryOptions(attempts=1),
            ),
        )
        response, latency = await self._send(
            self._client.aio.models.generate_content(
                model=self.model, contents=contents, config=config
            ),
            self.base_url or GEMINI_HOST,
        )
        meta = response.usage_metadata
        prompt_tokens = (meta.prompt_token_count or 0) if meta else 0
        # Thinking tokens are billed as output too.
        completion_tokens = (
            (meta.candidates_token_count or 0) + (meta.thoughts_token_count or 0) if meta else 0
        )
        candidates = response.candidates or []
        finish = candidates[0].finish_reason if candidates else None
        return self._completion(
            response.text or "",
            str(finish.value) if finish is not None else None,
            prompt_tokens,
            completion_tokens,
            latency,
        )

    async def aclose(self) -> None:
        """Close the SDK's HTTP connections."""
        await self._client.aio.aclose()
