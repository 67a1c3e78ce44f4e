"""What the providers behind a vendor's SDK (``openai_compat``, ``anthropic``, ``gemini``) share.

``SDKProvider`` holds the settings every one of them takes, imports nothing itself (each
provider imports its SDK in ``_connect``, through ``import_sdk``, so a missing one names
its extra), sends one request timed, converts the SDK's errors to ``LLMProviderError``
subclasses at the boundary (``raise ... from``), and turns token counts into ``Usage``.
What each API calls things (roles, fields, its error classes) stays in its own module.
"""

from __future__ import annotations

import importlib
import time
from abc import abstractmethod
from collections.abc import Awaitable, Mapping
from typing import Any, TypeVar

from workflow_agent.llm.errors import (
    LLMConnectionError,
    LLMProviderError,
    LLMRequestError,
    LLMTimeoutError,
    MissingExtraError,
)
from workflow_agent.llm.http_status import error_for_status
from workflow_agent.llm.provider import Completion, LLMProvider, Pricing, Usage

T = TypeVar("T")

#: Sent when no key is configured: local servers (Ollama, llama.cpp) ignore the key, but
#: the SDKs refuse to start without one. A server that does want a key answers 401.
NO_KEY = "no-key-configured"


def import_sdk(module: str, *, kind: str, extra: str, package: str | None = None) -> Any:
    """Import an SDK's ``module``; when it is not installed, ``MissingExtraError`` for
    the ``kind`` of provider, naming the ``package`` (default: the module) and the extra."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(kind, package or module, extra) from exc


class SDKProvider(LLMProvider):
    """A model behind a vendor's SDK: the settings, one timed request, errors, usage.

    ``api_key`` is the key's value, read from the environment by whoever builds this;
    ``api_key_env`` is only that variable's name, used in error messages. Subclasses
    import their SDK and make its client in ``_connect``, and set ``_sdk_errors`` there:
    the SDK's error classes that ``_convert`` turns into ``LLMProviderError`` subclasses.
    """

    _sdk_errors: tuple[type[BaseException], ...]

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
        self.model = model
        self.base_url = base_url
        self.timeout = timeout
        self.pricing = pricing
        self.api_key_env = api_key_env
        self._connect(api_key or NO_KEY)

    @abstractmethod
    def _connect(self, api_key: str) -> None:
        """Import the SDK (``import_sdk``), make its client and set ``_sdk_errors``."""

    @abstractmethod
    def _convert(self, exc: BaseException, where: str) -> LLMProviderError:
        """The ``LLMProviderError`` for one of ``_sdk_errors``, raised at ``where``."""

    async def _send(self, request: Awaitable[T], where: str) -> tuple[T, float]:
        """Await one request to ``where``: its answer and the seconds it took. The SDK's
        errors become ``LLMProviderError`` subclasses; anything else passes through."""
        started = time.monotonic()
        try:
            answer = await request
        except self._sdk_errors as exc:
            raise self._convert(exc, where) from exc
        return answer, time.monotonic() - started

    def _timed_out(self, where: str) -> LLMProviderError:
        return LLMTimeoutError(self.label, f"no answer from {where} in time")

    def _unreachable(self, where: str, exc: BaseException) -> LLMProviderError:
        return LLMConnectionError(self.label, f"cannot connect to {where}: {exc}")

    def _refused(
        self, status: int, message: str, headers: Mapping[str, str] | None
    ) -> LLMProviderError:
        return error_for_status(
            self.label, status, message, headers=headers, api_key_env=self.api_key_env
        )

    def _unreadable(self, exc: BaseException) -> LLMProviderError:
        return LLMRequestError(self.label, f"unreadable answer: {exc}")

    def _completion(
        self,
        text: str,
        finish_reason: str | None,
        prompt_tokens: int,
        completion_tokens: int,
        latency: float,
    ) -> Completion:
        """The answer and its ``Usage``, with the cost when prices are configured."""
        return Completion(
            text=text,
            finish_reason=finish_reason,
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


class StainlessProvider(SDKProvider):
    """An ``SDKProvider`` whose SDK Stainless generates (``openai``, ``anthropic``): both
    have the same error classes, in ``_sdk`` (the imported module), converted alike."""

    _sdk: Any

    def _convert(self, exc: BaseException, where: str) -> LLMProviderError:
        sdk = self._sdk
        if isinstance(exc, sdk.APITimeoutError):
            return self._timed_out(where)
        if isinstance(exc, sdk.APIConnectionError):
            return self._unreachable(where, exc)
        if isinstance(exc, sdk.APIStatusError):
            return self._refused(exc.status_code, str(exc.message), dict(exc.response.headers))
        # Any other ``APIError``, e.g. a body that is not a completion.
        return self._unreadable(exc)
