"""Google's Gemini API through the official ``google-genai`` SDK (extra ``gemini``).

The SDK is imported when a provider is built. System messages become the request's
``system_instruction``; the assistant role is called ``model`` there. The SDK's own
retries (including its implicit ones on connection errors) are turned off: retrying is
``RetryingProvider``'s job.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Sequence
from typing import Any

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

_NO_KEY = "no-key-configured"


def _import_genai() -> tuple[Any, Any, Any]:
    try:
        from google import genai
        from google.genai import errors, types
    except ImportError as exc:
        raise MissingExtraError("gemini", "google-genai", "gemini") from exc
    return genai, errors, types


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


class GeminiProvider(LLMProvider):
    """A Gemini model behind the Gemini Developer API (or a server speaking it).

    ``api_key`` is the key's value, read from the environment by whoever builds this;
    ``api_key_env`` is only that variable's name, used in error messages.
    """

    name = "gemini"

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
        genai, self._errors, self._types = _import_genai()
        self._timeouts, self._transport = _transport_errors()
        self.model = model
        self.base_url = base_url
        self.timeout = timeout
        self.pricing = pricing
        self.api_key_env = api_key_env
        options: dict[str, Any] = {"retry_options": self._types.HttpRetryOptions(attempts=1)}
        if base_url:
            options["base_url"] = base_url
        self._client = genai.Client(
            api_key=api_key or _NO_KEY, http_options=self._types.HttpOptions(**options)
        )

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
        where = self.base_url or "generativelanguage.googleapis.com"
        started = time.monotonic()
        try:
            response = await self._client.aio.models.generate_content(
                model=self.model, contents=contents, config=config
            )
        except self._errors.APIError as exc:
            headers = getattr(exc.response, "headers", None)
            raise error_for_status(
                self.label,
                int(exc.code or 0),
                str(exc.message or exc),
                headers=dict(headers) if headers is not None else None,
                api_key_env=self.api_key_env,
            ) from exc
        except self._timeouts as exc:
            raise LLMTimeoutError(self.label, f"no answer from {where} in time") from exc
        except self._transport as exc:
            raise LLMConnectionError(self.label, f"cannot connect to {where}: {exc}") from exc
        except ValueError as exc:  # the SDK's parsing of a malformed body
            raise LLMRequestError(self.label, f"unreadable answer: {exc}") from exc
        latency = time.monotonic() - started
        meta = response.usage_metadata
        prompt_tokens = (meta.prompt_token_count or 0) if meta else 0
        # Thinking tokens are billed as output too.
        completion_tokens = (
            (meta.candidates_token_count or 0) + (meta.thoughts_token_count or 0) if meta else 0
        )
        candidates = response.candidates or []
        finish = candidates[0].finish_reason if candidates else None
        return Completion(
            text=response.text or "",
            finish_reason=str(finish.value) if finish is not None else None,
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
        await self._client.aio.aclose()
