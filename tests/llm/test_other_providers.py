"""Anthropic and Gemini providers: their wire format against a local server (both SDKs
take a base URL), and the error each gives when its SDK is not installed."""

from __future__ import annotations

import asyncio
import sys

import pytest

from llm_server import LLMServer, Reply, anthropic_reply, gemini_reply
from workflow_agent.config import LLMProviderSettings, LLMSettings
from workflow_agent.errors import ConfigurationError
from workflow_agent.llm import (
    Completion,
    CompletionSettings,
    LLMAuthenticationError,
    LLMRateLimitError,
    LLMServerError,
    LLMService,
    LLMTimeoutError,
    LLMUnavailableError,
    Message,
    MissingExtraError,
    build_llm_service,
)
from workflow_agent.secrets import Redactor

QUESTION = [
    Message.system("Be brief."),
    Message.user("Which port does node_exporter use?"),
    Message.assistant("9100."),
    Message.user("And the service name?"),
]


def build(kind: str, url: str, **extra: object) -> LLMService:
    settings = LLMProviderSettings.model_validate(
        {"kind": kind, "model": "test-model", "base_url": url, "api_key_env": "TEST_KEY",
         "max_retries": 0, **extra})
    return build_llm_service(LLMSettings(providers=[settings]),
                             environ={"TEST_KEY": "key-for-tests-42"}, redactor=Redactor())


def ask(llm: LLMService, settings: CompletionSettings | None = None) -> Completion:
    async def run() -> Completion:
        try:
            return await llm.complete(QUESTION, settings)
        finally:
            await llm.aclose()

    return asyncio.run(run())


def test_anthropic_wire_format(llm_server: LLMServer) -> None:
    llm_server.reply(anthropic_reply("prometheus-node-exporter", input_tokens=40,
                                     output_tokens=4))
    answer = ask(build("anthropic", llm_server.url, prompt_cost_per_mtok=3,
                       completion_cost_per_mtok=15),
                 CompletionSettings(max_tokens=64))
    assert answer.text == "prometheus-node-exporter"
    assert (answer.usage.provider, answer.usage.prompt_tokens,
            answer.usage.completion_tokens) == ("anthropic", 40, 4)
    assert answer.usage.cost == pytest.approx((40 * 3 + 4 * 15) / 1e6)
    [request] = llm_server.requests
    assert request.path == "/v1/messages"
    # Older SDKs send x-api-key, newer ones a bearer token: either way, this key.
    sent = request.headers.get("x-api-key") or request.headers["authorization"]
    assert sent.removeprefix("Bearer ") == "key-for-tests-42"
    body = request.json
    assert body["system"] == "Be brief."
    assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]
    assert (body["model"], body["max_tokens"]) == ("test-model", 64)


def test_anthropic_errors(llm_server: LLMServer) -> None:
    llm_server.reply(
        Reply(429, {"type": "error", "error": {"type": "rate_limit_error", "message": "slow"}},
              headers={"retry-after": "7"}),
        Reply(529, {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}),
        Reply(401, {"type": "error", "error": {"type": "authentication_error",
                                              "message": "invalid x-api-key"}}),
    )
    kinds = []
    for _ in range(3):
        with pytest.raises(LLMUnavailableError) as caught:
            ask(build("anthropic", llm_server.url))
        kinds.append(caught.value.failures[0])
    assert isinstance(kinds[0], LLMRateLimitError) and kinds[0].retry_after == 7
    assert isinstance(kinds[1], LLMServerError)
    assert isinstance(kinds[2], LLMAuthenticationError) and "TEST_KEY" in (kinds[2].hint or "")


def test_gemini_wire_format(llm_server: LLMServer) -> None:
    llm_server.reply(gemini_reply('{"service": "node_exporter"}', prompt_tokens=30,
                                  candidates_tokens=6))
    answer = ask(build("gemini", llm_server.url),
                 CompletionSettings(temperature=0.1, max_tokens=32, response_format="json"))
    assert answer.text == '{"service": "node_exporter"}'
    assert (answer.usage.provider, answer.usage.prompt_tokens,
            answer.usage.completion_tokens) == ("gemini", 30, 6)
    [request] = llm_server.requests
    assert request.path.endswith("/models/test-model:generateContent")
    assert request.headers["x-goog-api-key"] == "key-for-tests-42"
    body = request.json
    assert body["systemInstruction"]["parts"] == [{"text": "Be brief."}]
    assert [c["role"] for c in body["contents"]] == ["user", "model", "user"]
    config = body["generationConfig"]
    assert (config["temperature"], config["maxOutputTokens"], config["responseMimeType"]) == (
        0.1, 32, "application/json")


def test_gemini_errors(llm_server: LLMServer) -> None:
    llm_server.reply(
        Reply(503, {"error": {"code": 503, "message": "overloaded", "status": "UNAVAILABLE"}}),
        Reply(429, {"error": {"code": 429, "message": "quota", "status": "RESOURCE_EXHAUSTED"}},
              headers={"Retry-After": "3"}),
    )
    with pytest.raises(LLMUnavailableError) as caught:
        ask(build("gemini", llm_server.url))
    assert isinstance(caught.value.failures[0], LLMServerError)
    with pytest.raises(LLMUnavailableError) as caught:
        ask(build("gemini", llm_server.url))
    failure = caught.value.failures[0]
    assert isinstance(failure, LLMRateLimitError) and failure.retry_after == 3
    assert len(llm_server.requests) == 2  # the SDK's own retries are off


@pytest.mark.parametrize(
    ("kind", "hidden", "extra"),
    [("openai", "openai", "openai"), ("anthropic", "anthropic", "anthropic"),
     ("gemini", "google.genai", "gemini")],
)
def test_a_missing_sdk_names_the_extra_to_install(
    kind: str, hidden: str, extra: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # None in sys.modules is how Python itself marks a module as not importable.
    monkeypatch.setitem(sys.modules, hidden, None)
    with pytest.raises(MissingExtraError) as caught:
        build(kind, "http://127.0.0.1:9")
    assert isinstance(caught.value, ConfigurationError)  # exit code 2, like other setup errors
    assert f"pip install 'workflow-agent[{extra}]'" in (caught.value.hint or "")
    assert kind in caught.value.message


@pytest.mark.parametrize("kind", ["anthropic", "gemini"])
def test_a_slow_server_times_out(kind: str, llm_server: LLMServer) -> None:
    llm_server.reply(Reply(delay=30, body={}))
    with pytest.raises(LLMUnavailableError) as caught:
        ask(build(kind, llm_server.url, timeout=0.5))
    assert isinstance(caught.value.failures[0], LLMTimeoutError)
