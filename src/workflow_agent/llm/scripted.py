"""``ScriptedProvider``: a deterministic model for tests, behind the real ``LLMProvider``.

It ships in the library (like pydantic-ai's ``TestModel``/``FunctionModel``) so that the
tests of every part that uses an LLM (generation, failure analysis) drive the real
service with known answers::

    model = ScriptedProvider(['{"install": "apt-get install -y foo"}'])
    model = ScriptedProvider(lambda messages, settings: "echo " + messages[-1].content)

Answers are taken in order from the list (a string, a ``Completion``, or an exception
instance to raise), or computed by the function. Every call is recorded in ``calls``,
so a test can assert what the model was sent (e.g. that a secret was redacted).
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeAlias

from workflow_agent.llm.provider import (
    Completion,
    CompletionSettings,
    LLMProvider,
    Message,
    Usage,
)

Answer: TypeAlias = str | Completion | BaseException
AnswerFunction: TypeAlias = Callable[
    [list[Message], CompletionSettings], Answer | Awaitable[Answer]
]


class ScriptExhaustedError(AssertionError):
    """The scripted model was asked more often than it has answers: a test bug."""


@dataclass(frozen=True)
class ScriptedCall:
    """What one call to the scripted model received."""

    messages: list[Message]
    settings: CompletionSettings


class ScriptedProvider(LLMProvider):
    """Answers from a list, or from a function of the messages; records every call.

    Token counts are words (whitespace-separated), so tests can assert usage exactly.
    """

    def __init__(
        self,
        answers: Iterable[Answer] | AnswerFunction,
        *,
        name: str = "scripted",
        model: str = "scripted",
        timeout: float = 60.0,
    ) -> None:
        self.name = name
        self.model = model
        self.timeout = timeout
        self._function: AnswerFunction | None = None
        self._answers: list[Answer] = []
        if callable(answers):
            self._function = answers
        else:
            self._answers = list(answers)
        self.calls: list[ScriptedCall] = []

    @property
    def remaining(self) -> int:
        """Listed answers not yet given (0 for a function)."""
        return len(self._answers)

    async def complete(
        self, messages: Sequence[Message], settings: CompletionSettings
    ) -> Completion:
        """The next scripted answer for these messages."""
        received = list(messages)
        self.calls.append(ScriptedCall(received, settings))
        if self._function is not None:
            answer = self._function(received, settings)
            if inspect.isawaitable(answer):
                answer = await answer
        elif self._answers:
            answer = self._answers.pop(0)
        else:
            raise ScriptExhaustedError(
                f"{self.label} was called {len(self.calls)} times but has no answer left"
            )
        if isinstance(answer, BaseException):
            raise answer
        if isinstance(answer, Completion):
            return answer
        return Completion(
            text=answer,
            finish_reason="stop",
            usage=Usage(
                provider=self.name,
                model=self.model,
                prompt_tokens=sum(len(m.content.split()) for m in received),
                completion_tokens=len(answer.split()),
            ),
        )
