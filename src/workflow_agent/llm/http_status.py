"""One mapping from a provider's HTTP error status to an ``LLMProviderError``.

Every SDK reports a refused request as a status code, a message and headers; the three
providers hand those here so that a 429 or a 503 means the same thing whichever API
answered.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Mapping

from workflow_agent.llm.errors import (
    LLMAuthenticationError,
    LLMProviderError,
    LLMRateLimitError,
    LLMRequestError,
    LLMServerError,
    LLMTimeoutError,
)

#: Longest server message quoted in an error: enough to say what is wrong, not a page.
_MESSAGE_LIMIT = 300


def retry_after(headers: Mapping[str, str] | None) -> float | None:
    """Seconds the server asked us to wait (``retry-after-ms``, ``retry-after`` as
    seconds or as an HTTP date), ``None`` when it said nothing usable."""
    if not headers:
        return None
    lowered = {key.lower(): value for key, value in headers.items()}
    milliseconds = lowered.get("retry-after-ms")
    if milliseconds is not None:
        try:
            return max(float(milliseconds) / 1000, 0.0)
        except ValueError:
            pass
    value = lowered.get("retry-after")
    if value is None:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


def error_for_status(
    provider: str,
    status: int,
    message: str,
    *,
    headers: Mapping[str, str] | None = None,
    api_key_env: str | None = None,
) -> LLMProviderError:
    """The ``LLMProviderError`` for an HTTP ``status`` answered by ``provider``.

    ``message`` is the server's own explanation; it is shortened, and dropped entirely
    for authentication failures (some servers quote part of the key back).
    """
    detail = " ".join(message.split())[:_MESSAGE_LIMIT]
    if status in (401, 403):
        return LLMAuthenticationError(
            provider, f"the API key was refused ({status})", api_key_env=api_key_env
        )
    if status == 429:
        return LLMRateLimitError(
            provider, f"rate limited (429): {detail}", retry_after=retry_after(headers)
        )
    if status in (408, 504):
        return LLMTimeoutError(provider, f"the server timed out ({status}): {detail}")
    if status >= 500:
        return LLMServerError(provider, f"server error ({status}): {detail}")
    return LLMRequestError(provider, f"request refused ({status}): {detail}")
