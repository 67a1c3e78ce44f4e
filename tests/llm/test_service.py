"""The service driven by the scripted model (as the other parts' tests will drive it),
its configuration, and its records on PostgreSQL."""

from __future__ import annotations

import asyncio
import json

import pytest
from pydantic import BaseModel

from storage.test_history import postgres_server, postgres_url  # noqa: F401  (fixtures)
from workflow_agent.config import LLMSettings, load_configuration
from workflow_agent.errors import ConfigurationError
from workflow_agent.llm import (
    CompletionSettings,
    FallbackProvider,
    LLMNotConfiguredError,
    LLMServerError,
    LLMService,
    Message,
    ScriptedProvider,
    ScriptExhaustedError,
    build_llm_service,
)
from workflow_agent.secrets import MASK, Redactor
from workflow_agent.storage.history import HistoryStore


class Plan(BaseModel):
    """A structured answer for these tests."""

    steps: list[str]


def test_scripted_model_answers_in_order_and_records_what_it_got() -> None:
    model = ScriptedProvider(["first", "second"])
    llm = LLMService(model, redactor=Redactor(["hunter2-secret"]))

    async def run() -> list[str]:
        one = await llm.complete([Message.user("token hunter2-secret")])
        two = await llm.complete([Message.user("again")], CompletionSettings(max_tokens=5))
        return [one.text, two.text]

    assert asyncio.run(run()) == ["first", "second"]
    assert [c.messages[0].content for c in model.calls] == [f"token {MASK}", "again"]
    assert model.calls[1].settings.max_tokens == 5
    with pytest.raises(ScriptExhaustedError):
        asyncio.run(llm.complete([Message.user("third")]))


def test_scripted_function_and_structured_output() -> None:
    def answer(messages: list[Message], settings: CompletionSettings) -> str:
        assert settings.response_format == "json"
        if len(messages) < 4:
            return '{"steps": "not a list"}'
        return json.dumps({"steps": ["apt-get update", "apt-get install -y foo"]})

    model = ScriptedProvider(answer)
    result = asyncio.run(LLMService(model, redactor=Redactor()).complete_structured(
        [Message.system("plan"), Message.user("install foo")], Plan))
    assert result.output.steps == ["apt-get update", "apt-get install -y foo"]
    assert result.attempts == 2
    assert "steps: Input should be a valid array" in model.calls[1].messages[-1].content


def test_fallback_over_scripted_models_and_usage_in_the_store(tmp_path: object) -> None:
    broken = ScriptedProvider([LLMServerError("scripted:a", "server error (500)")], model="a")
    working = ScriptedProvider(["hello there"], model="b")
    with HistoryStore(f"sqlite:///{tmp_path}/h.db") as store:
        llm = LLMService(FallbackProvider([broken, working]), redactor=Redactor(),
                         cache=store, usage=store)
        answer = asyncio.run(llm.complete([Message.user("say hello")], workflow_id="w"))
        again = asyncio.run(llm.complete([Message.user("say hello")], workflow_id="w"))
        rows = store.list_llm_usage(workflow_id="w")
    assert answer.text == again.text == "hello there" and again.usage.cached
    assert [(r.model, r.status, r.prompt_tokens, r.completion_tokens) for r in rows] == [
        ("b", "ok", 2, 2), ("b", "cached", 0, 0)]


def test_no_provider_configured_is_a_clear_error() -> None:
    with pytest.raises(LLMNotConfiguredError) as caught:
        build_llm_service(LLMSettings(), environ={}, redactor=Redactor(),
                          needed_for="install --from-docs")
    assert "install --from-docs needs an LLM" in caught.value.message
    assert "llm.providers" in (caught.value.hint or "")
    assert isinstance(caught.value, ConfigurationError)


def test_providers_from_the_environment_and_key_names_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WORKFLOW_AGENT_LLM__PROVIDERS", json.dumps([
        {"kind": "openai", "model": "llama3.2", "base_url": "http://127.0.0.1:11434/v1"},
        {"kind": "anthropic", "model": "claude-x", "api_key_env": "ANTHROPIC_KEY"},
    ]))
    monkeypatch.setenv("WORKFLOW_AGENT_LLM__ALLOW_UNATTENDED", "true")
    config = load_configuration()
    assert [(p.kind, p.model) for p in config.llm.providers] == [
        ("openai", "llama3.2"), ("anthropic", "claude-x")]
    assert config.llm.allow_unattended and config.llm.cache
    # The key itself where its variable's name belongs is refused.
    monkeypatch.setenv("WORKFLOW_AGENT_LLM__PROVIDERS", json.dumps([
        {"kind": "openai", "model": "m", "api_key_env": "sk-proj-abc123"}]))
    with pytest.raises(ConfigurationError, match="api_key_env"):
        load_configuration()


def test_llm_records_on_postgresql(postgres_url: str) -> None:  # noqa: F811
    with HistoryStore(postgres_url) as store:
        store.cache_llm_response(key="k" * 64, provider="openai", model="m", content="one",
                                 prompt_tokens=1, completion_tokens=2)
        # Two runs caching the same question: the later answer wins, no error.
        store.cache_llm_response(key="k" * 64, provider="openai", model="m", content="two",
                                 prompt_tokens=3, completion_tokens=4)
        entry = store.cached_llm_response(["x" * 64, "k" * 64])
        assert entry is not None and (entry.content, entry.prompt_tokens) == ("two", 3)
        store.forget_llm_response("k" * 64)
        assert store.cached_llm_response(["k" * 64]) is None
        store.record_llm_usage(workflow_id=None, purpose="p", provider="openai", model="m",
                               status="ok", prompt_tokens=5, completion_tokens=6,
                               latency=0.25, cost=0.001)
        [row] = store.list_llm_usage()
        assert (row.workflow_id, row.latency, row.cost) == (None, 0.25, 0.001)
        assert row.created_at.tzinfo is not None
