"""``LLMService``: the one way the rest of workflow-agent talks to a model.

Around a provider (usually a fallback chain of retrying providers, see ``build.py``) it
adds, in this order:

1. **redaction**: every message passes through the ``Redactor`` before anything else
   sees it, so secrets reach neither the provider, nor the cache, nor logs;
2. **the response cache**: keyed by a SHA-256 of (provider, model, redacted messages,
   settings); a cached answer from any provider of the chain is used before any call;
3. **usage metrics**: one row per call (tokens, seconds, cost, cache hit or failure),
   tagged with the workflow it served.

``complete_structured`` asks for JSON validated by a pydantic model and sends the
validation errors back to the model a bounded number of times.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Generic, Protocol, TypeVar

from pydantic import BaseModel, ValidationError

from workflow_agent.llm.errors import LLMError, LLMOutputInvalidError
from workflow_agent.llm.provider import (
    Completion,
    CompletionSettings,
    LLMProvider,
    Message,
    Usage,
)
from workflow_agent.llm.wrappers import chain_members
from workflow_agent.secrets import Redactor
from workflow_agent.storage.records import LLMCacheEntry

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)

#: Bump when the key's recipe changes, so old entries are simply never hit again.
_CACHE_KEY_VERSION = 1

#: Most validation problems quoted back to the model (and in the final error).
_MAX_PROBLEMS = 10


class UsageRecorder(Protocol):
    """Where usage rows go: ``HistorySpool`` during a run, or ``HistoryStore``."""

    def record_llm_usage(
        self,
        *,
        workflow_id: str | None,
        purpose: str,
        provider: str,
        model: str,
        status: str,
        prompt_tokens: int,
        completion_tokens: int,
        latency: float,
        cost: float | None,
        error: str | None = None,
    ) -> None:
        """Record one LLM call."""


class ResponseCache(Protocol):
    """Answers kept by key: ``HistoryStore`` implements it."""

    def cached_llm_response(self, keys: Sequence[str]) -> LLMCacheEntry | None:
        """The entry of the first of ``keys`` that has one."""

    def cache_llm_response(
        self,
        *,
        key: str,
        provider: str,
        model: str,
        content: str,
        prompt_tokens: int,
        completion_tokens: int,
    ) -> None:
        """Keep (or replace) the answer under ``key``."""

    def forget_llm_response(self, key: str) -> None:
        """Drop the answer under ``key``, if any."""


@dataclass(frozen=True)
class Structured(Generic[M]):
    """A validated structured answer, the completion it came from, and the attempts it
    took (1 when the first answer was valid)."""

    output: M
    completion: Completion
    attempts: int


def cache_key(
    provider: str, model: str, messages: Sequence[Message], settings: CompletionSettings
) -> str:
    """The cache key (hex SHA-256) of asking ``provider``'s ``model`` these messages.

    The timeout is left out: it changes how long we wait, not the answer.
    """
    material = {
        "v": _CACHE_KEY_VERSION,
        "provider": provider,
        "model": model,
        "messages": [[m.role, m.content] for m in messages],
        "temperature": settings.temperature,
        "max_tokens": settings.max_tokens,
        "response_format": settings.response_format,
    }
    encoded = json.dumps(material, sort_keys=True, ensure_ascii=False).encode()
    return hashlib.sha256(encoded).hexdigest()


class LLMService:
    """Redaction, caching and usage metrics around a provider (or a fallback chain).

    ``cache`` ``None`` turns caching off; ``usage`` ``None`` records nothing. The
    ``redactor`` is used as it is at each call, so secrets registered later count too.
    """

    def __init__(
        self,
        provider: LLMProvider,
        *,
        redactor: Redactor,
        cache: ResponseCache | None = None,
        usage: UsageRecorder | None = None,
    ) -> None:
        self.provider = provider
        self.redactor = redactor
        self.cache = cache
        self.usage = usage

    async def complete(
        self,
        messages: Sequence[Message],
        settings: CompletionSettings | None = None,
        *,
        workflow_id: str | None = None,
        purpose: str = "completion",
    ) -> Completion:
        """The model's answer to ``messages`` (secrets redacted first).

        ``purpose`` says what the call was for in the usage metrics (e.g. ``generate``,
        ``failure-analysis``). Raises ``LLMUnavailableError`` when no provider answered.
        """
        settings = settings or CompletionSettings()
        redacted = [Message(m.role, self.redactor.redact(m.content)) for m in messages]
        members = chain_members(self.provider)
        keys = {
            (member.name, member.model): cache_key(member.name, member.model, redacted, settings)
            for member in members
        }
        started = time.monotonic()
        if self.cache is not None:
            entry = self.cache.cached_llm_response(list(keys.values()))
            if entry is not None:
                return self._cache_hit(entry, started, workflow_id, purpose)
        try:
            completion = await self.provider.complete(redacted, settings)
        except LLMError as exc:
            first = members[0]
            self._record(
                workflow_id, purpose, first.name, first.model, "failed", started,
                error=exc.message,
            )
            raise
        key = keys.get((completion.usage.provider, completion.usage.model))
        text = self.redactor.redact(completion.text)
        if self.cache is not None and key is not None:
            self.cache.cache_llm_response(
                key=key,
                provider=completion.usage.provider,
                model=completion.usage.model,
                content=text,
                prompt_tokens=completion.usage.prompt_tokens,
                completion_tokens=completion.usage.completion_tokens,
            )
        usage = completion.usage
        self._record(
            workflow_id, purpose, usage.provider, usage.model, "ok", started,
            prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
            cost=usage.cost,
        )
        return replace(completion, text=text, cache_key=key)

    async def complete_structured(
        self,
        messages: Sequence[Message],
        output_type: type[M],
        settings: CompletionSettings | None = None,
        *,
        workflow_id: str | None = None,
        purpose: str = "structured",
        max_attempts: int = 3,
    ) -> Structured[M]:
        """An answer validated as ``output_type``, asked for as JSON.

        The JSON schema is added to the instructions; an answer that does not validate
        is sent back with the validation errors, at most ``max_attempts`` answers in
        all, then ``LLMOutputInvalidError``. Invalid answers are dropped from the cache
        so that they are not replayed next time.
        """
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, not {max_attempts}")
        settings = replace(settings or CompletionSettings(), response_format="json")
        schema = json.dumps(output_type.model_json_schema(), ensure_ascii=False)
        instruction = Message.system(
            "Answer with one JSON object and nothing else: no prose, no code fences. "
            f"It must validate against this JSON schema:\n{schema}"
        )
        conversation = _with_instruction(messages, instruction)
        problems = ""
        first_key: str | None = None
        for attempt in range(1, max_attempts + 1):
            completion = await self.complete(
                conversation, settings, workflow_id=workflow_id, purpose=purpose
            )
            if first_key is None:
                first_key = completion.cache_key
            try:
                output = output_type.model_validate_json(_json_text(completion.text))
            except ValidationError as exc:
                problems = _describe(exc)
                if self.cache is not None and completion.cache_key is not None:
                    self.cache.forget_llm_response(completion.cache_key)
                log.warning(
                    "%s: answer %d of at most %d is not a valid %s",
                    completion.usage.provider, attempt, max_attempts, output_type.__name__,
                )
                conversation = [
                    *conversation,
                    Message.assistant(completion.text),
                    Message.user(
                        f"That answer is not valid:\n{problems}\n"
                        "Answer again with only the corrected JSON object."
                    ),
                ]
                continue
            if attempt > 1 and self.cache is not None and first_key is not None:
                # Next time the same question gets the valid answer straight away,
                # instead of paying for the same repairs again.
                usage = completion.usage
                self.cache.cache_llm_response(
                    key=first_key, provider=usage.provider, model=usage.model,
                    content=completion.text, prompt_tokens=usage.prompt_tokens,
                    completion_tokens=usage.completion_tokens,
                )
            return Structured(output=output, completion=completion, attempts=attempt)
        raise LLMOutputInvalidError(max_attempts, problems)

    async def aclose(self) -> None:
        """Close the provider's connections."""
        await self.provider.aclose()

    def _cache_hit(
        self, entry: LLMCacheEntry, started: float, workflow_id: str | None, purpose: str
    ) -> Completion:
        self._record(workflow_id, purpose, entry.provider, entry.model, "cached", started,
                     cost=0.0)
        return Completion(
            text=entry.content,
            finish_reason="stop",
            cache_key=entry.key,
            usage=Usage(
                provider=entry.provider,
                model=entry.model,
                latency=time.monotonic() - started,
                cost=0.0,
                cached=True,
            ),
        )

    def _record(
        self,
        workflow_id: str | None,
        purpose: str,
        provider: str,
        model: str,
        status: str,
        started: float,
        *,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        cost: float | None = None,
        error: str | None = None,
    ) -> None:
        if self.usage is None:
            return
        # The latency recorded is what the workflow waited: retries and fallbacks included.
        self.usage.record_llm_usage(
            workflow_id=workflow_id,
            purpose=purpose,
            provider=provider,
            model=model,
            status=status,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            latency=time.monotonic() - started,
            cost=cost,
            error=None if error is None else self.redactor.redact(error),
        )


def _with_instruction(messages: Sequence[Message], instruction: Message) -> list[Message]:
    """``messages`` with ``instruction`` after the leading system messages."""
    split = 0
    while split < len(messages) and messages[split].role == "system":
        split += 1
    return [*messages[:split], instruction, *messages[split:]]


def _json_text(text: str) -> str:
    """The JSON in an answer, without the code fence some models put around it anyway."""
    stripped = text.strip()
    if stripped.startswith("```"):
        first_newline = stripped.find("\n")
        body = stripped[first_newline + 1 :] if first_newline != -1 else ""
        if body.rstrip().endswith("```"):
            body = body.rstrip()[:-3]
        return body.strip()
    return stripped


def _describe(exc: ValidationError) -> str:
    """Validation errors as lines a model (and a person) can act on."""
    lines = []
    for error in exc.errors(include_url=False)[:_MAX_PROBLEMS]:
        where = ".".join(str(part) for part in error["loc"]) or "(the whole answer)"
        lines.append(f"- {where}: {error['msg']}")
    hidden = exc.error_count() - _MAX_PROBLEMS
    if hidden > 0:
        lines.append(f"- ... and {hidden} more")
    return "\n".join(lines)


