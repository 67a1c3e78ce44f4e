"""The ``LLMProvider`` seam and the small value objects that cross it.

A provider turns a list of ``Message`` into one ``Completion`` (text + ``Usage``). It does
one attempt and nothing else: retries, fallback, caching, redaction and usage recording
are wrappers (``wrappers.py``) and the service (``service.py``) around it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True)
class Message:
    """One chat message: who says it, and what."""

    role: Role
    content: str

    @classmethod
    def system(cls, content: str) -> Message:
        """A system (instruction) message."""
        return cls("system", content)

    @classmethod
    def user(cls, content: str) -> Message:
        """A user message."""
        return cls("user", content)

    @classmethod
    def assistant(cls, content: str) -> Message:
        """An assistant message (an earlier answer of the model)."""
        return cls("assistant", content)


@dataclass(frozen=True)
class CompletionSettings:
    """How to complete: sampling, length, time allowed and the answer's format.

    ``timeout`` ``None`` means the provider's configured timeout. ``response_format``
    ``"json"`` asks the provider for a JSON object where its API has such a mode (the
    prompt must still say which JSON; ``LLMService.complete_structured`` does).
    """

    temperature: float = 0.0
    max_tokens: int = 2048
    timeout: float | None = None
    response_format: Literal["text", "json"] = "text"


@dataclass(frozen=True)
class Usage:
    """What one completion cost: tokens, seconds, money (when known), and who answered.

    ``cost`` is in US dollars and ``None`` when the provider's prices are not configured.
    ``cached`` is true when the answer came from the response cache (no tokens spent).
    """

    provider: str
    model: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency: float = 0.0
    cost: float | None = None
    cached: bool = False

    @property
    def total_tokens(self) -> int:
        """Prompt and completion tokens together."""
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Completion:
    """A model's answer and what it cost.

    ``cache_key`` is set by ``LLMService`` (the key the answer is, or would be, cached
    under); providers leave it empty.
    """

    text: str
    usage: Usage
    finish_reason: str | None = None
    cache_key: str | None = None


@dataclass(frozen=True)
class Pricing:
    """US dollars per million prompt and completion tokens, for computing ``Usage.cost``."""

    prompt_per_mtok: float
    completion_per_mtok: float

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        """The cost of these tokens in US dollars."""
        return (
            prompt_tokens * self.prompt_per_mtok + completion_tokens * self.completion_per_mtok
        ) / 1_000_000


class LLMProvider(ABC):
    """One model behind one API: a single attempt at a completion.

    ``name`` is the provider kind (``openai``, ``anthropic``, ``gemini``, ``scripted``) and
    ``model`` the model it asks; together they key the response cache. ``timeout`` is
    the default per-attempt time limit when the settings give none.
    Implementations raise ``LLMError`` subclasses (see ``llm/errors.py``) and never
    retry on their own.
    """

    name: str
    model: str
    timeout: float = 60.0

    @abstractmethod
    async def complete(
        self, messages: Sequence[Message], settings: CompletionSettings
    ) -> Completion:
        """Ask the model once; the answer's text and its usage."""

    async def aclose(self) -> None:
        """Release connections; the default has none to release."""

    @property
    def label(self) -> str:
        """``name:model``, for messages and logs."""
        return f"{self.name}:{self.model}"

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.label}>"
