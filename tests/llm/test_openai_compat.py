"""The OpenAI-compatible provider and the service around it, against a real HTTP server
on loopback speaking the chat-completions wire format."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from llm_server import LLMServer, Reply, openai_error, openai_reply
from workflow_agent.config import LLMProviderSettings, LLMSettings
from workflow_agent.llm import (
    Completion,
    CompletionSettings,
    LLMAuthenticationError,
    LLMConnectionError,
    LLMOutputInvalidError,
    LLMRateLimitError,
    LLMRequestError,
    LLMServerError,
    LLMService,
    LLMTimeoutError,
    LLMUnavailableError,
    Message,
    RetryingProvider,
    Structured,
    TimeoutProvider,
    UsageRecorder,
    build_llm_service,
)
from workflow_agent.llm.openai_compat import OpenAICompatibleProvider
from workflow_agent.secrets import MASK, Redactor
from workflow_agent.storage.history import HistoryStore
from workflow_agent.storage.spool import HistorySpool

QUESTION = [Message.system("You write shell scripts."), Message.user("Install foo.")]


def provider(url: str, **overrides: object) -> LLMProviderSettings:
    """Settings for an OpenAI-compatible provider at ``url`` (the server's root)."""
    values: dict[str, object] = {"kind": "openai", "model": "m", "base_url": f"{url}/v1",
                                 "max_retries": 0, "timeout": 5.0}
    values.update(overrides)
    return LLMProviderSettings.model_validate(values)


def service(
    *providers: LLMProviderSettings,
    store: HistoryStore | None = None,
    usage: UsageRecorder | None = None,
    redactor: Redactor | None = None,
    environ: dict[str, str] | None = None,
    cache: bool = True,
) -> LLMService:
    return build_llm_service(
        LLMSettings(providers=list(providers), cache=cache),
        environ=environ or {},
        redactor=redactor if redactor is not None else Redactor(),
        cache=store,
        usage=usage if usage is not None else store,
    )


def complete(llm: LLMService, messages: list[Message] = QUESTION, **kwargs: Any) -> Completion:
    async def run() -> Completion:
        try:
            return await llm.complete(messages, **kwargs)
        finally:
            await llm.aclose()

    return asyncio.run(run())


def test_completion_text_and_usage_from_the_wire(llm_server: LLMServer) -> None:
    llm_server.reply(openai_reply("apt-get install -y foo", prompt_tokens=120,
                                  completion_tokens=30))
    settings = provider(llm_server.url, api_key_env="LOCAL_LLM_KEY",
                        prompt_cost_per_mtok=2.0, completion_cost_per_mtok=10.0)
    llm = service(settings, environ={"LOCAL_LLM_KEY": "sk-local-123456"})
    answer = complete(llm, settings=CompletionSettings(temperature=0.2, max_tokens=99))

    assert answer.text == "apt-get install -y foo"
    usage = answer.usage
    assert (usage.provider, usage.model) == ("openai", "m")
    assert (usage.prompt_tokens, usage.completion_tokens) == (120, 30)
    assert usage.cost == pytest.approx((120 * 2.0 + 30 * 10.0) / 1e6)
    assert usage.latency > 0 and not usage.cached
    [request] = llm_server.requests
    assert request.path == "/v1/chat/completions"
    assert request.headers["authorization"] == "Bearer sk-local-123456"
    body = request.json
    assert body["model"] == "m"
    assert body["messages"] == [
        {"role": "system", "content": "You write shell scripts."},
        {"role": "user", "content": "Install foo."},
    ]
    assert (body["temperature"], body["max_tokens"]) == (0.2, 99)
    assert "response_format" not in body


def test_a_local_server_is_never_sent_the_cloud_key(llm_server: LLMServer) -> None:
    llm_server.reply(openai_reply("ok"))
    llm = service(provider(llm_server.url), environ={"OPENAI_API_KEY": "sk-real-cloud-key"})
    complete(llm)
    assert "sk-real-cloud-key" not in llm_server.requests[0].headers["authorization"]


def test_the_official_service_needs_its_key_variable() -> None:
    from workflow_agent.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="OPENAI_API_KEY is not set"):
        service(LLMProviderSettings(kind="openai", model="gpt-4o-mini"), environ={})


def test_a_refused_request_is_not_retried(llm_server: LLMServer) -> None:
    llm_server.reply(openai_error(404, "model 'm' not found, try pulling it first"))
    llm = service(provider(llm_server.url, max_retries=3))
    with pytest.raises(LLMUnavailableError) as caught:
        complete(llm)
    [failure] = caught.value.failures
    assert isinstance(failure, LLMRequestError)
    assert "404" in failure.message and "not found" in failure.message
    assert len(llm_server.requests) == 1


def test_a_refused_key_names_the_variable_never_the_key(llm_server: LLMServer) -> None:
    key = "sk-wrong-key-987654"
    # Real servers quote part of the key back; the message must not pass it on.
    llm_server.reply(openai_error(401, f"Incorrect API key provided: {key}"))
    llm = service(provider(llm_server.url, api_key_env="MY_LLM_KEY"),
                  environ={"MY_LLM_KEY": key})
    with pytest.raises(LLMUnavailableError) as caught:
        complete(llm)
    [failure] = caught.value.failures
    assert isinstance(failure, LLMAuthenticationError)
    assert "MY_LLM_KEY" in (failure.hint or "")
    assert key not in str(caught.value) + (failure.hint or "") + (caught.value.hint or "")


def test_a_server_that_does_not_answer_in_time_times_out(llm_server: LLMServer) -> None:
    llm_server.reply(Reply(delay=30, body={}))
    llm = service(provider(llm_server.url, timeout=0.5))
    started = time.monotonic()
    with pytest.raises(LLMUnavailableError) as caught:
        complete(llm)
    assert isinstance(caught.value.failures[0], LLMTimeoutError)
    assert time.monotonic() - started < 5


def test_rate_limit_waits_as_told_then_succeeds(llm_server: LLMServer) -> None:
    llm_server.reply(openai_error(429, "slow down", {"Retry-After": "2"}), openai_reply("done"))
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    async def run() -> str:
        inner = OpenAICompatibleProvider("m", base_url=f"{llm_server.url}/v1", timeout=5)
        retrying = RetryingProvider(TimeoutProvider(inner), max_retries=2, sleep=sleep)
        try:
            return (await retrying.complete(QUESTION, CompletionSettings())).text
        finally:
            await retrying.aclose()

    assert asyncio.run(run()) == "done"
    assert slept == [2.0]  # the server's Retry-After, not our own backoff
    assert len(llm_server.requests) == 2


def test_rate_limit_for_too_long_is_not_waited_for(llm_server: LLMServer) -> None:
    llm_server.reply(openai_error(429, "quota", {"Retry-After": "3600"}))
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    async def run() -> None:
        inner = OpenAICompatibleProvider("m", base_url=f"{llm_server.url}/v1", timeout=5)
        retrying = RetryingProvider(inner, max_retries=5, max_delay=30, sleep=sleep)
        try:
            await retrying.complete(QUESTION, CompletionSettings())
        finally:
            await retrying.aclose()

    with pytest.raises(LLMRateLimitError) as caught:
        asyncio.run(run())
    assert caught.value.retry_after == 3600
    assert slept == [] and len(llm_server.requests) == 1


def test_server_errors_are_retried_with_backoff_end_to_end(llm_server: LLMServer) -> None:
    llm_server.reply(openai_error(503, "loading model"), openai_error(500, "oops"),
                     openai_reply("third time lucky"))
    # Real sleeping: 0.5 s then 1 s of backoff.
    llm = service(provider(llm_server.url, max_retries=2))
    started = time.monotonic()
    assert complete(llm).text == "third time lucky"
    assert time.monotonic() - started >= 1.4
    assert len(llm_server.requests) == 3


@pytest.mark.parametrize("failing", ["server error", "closed port"])
def test_fallback_to_the_next_provider(
    failing: str, llm_server: LLMServer, closed_port_url: str, store: HistoryStore
) -> None:
    broken = LLMServer()
    broken.start()
    try:
        if failing == "server error":
            broken.reply(openai_error(500, "boom"), openai_error(502, "boom"))
            first = provider(broken.url, model="big", max_retries=1)
        else:
            first = LLMProviderSettings(kind="openai", model="big", base_url=closed_port_url,
                                        max_retries=0)
        llm_server.reply(openai_reply("from the fallback"))
        llm = service(first, provider(llm_server.url, model="small"), store=store)
        answer = complete(llm, workflow_id="w-1", purpose="generate")
    finally:
        broken.stop()
    assert answer.text == "from the fallback"
    assert answer.usage.model == "small"
    if failing == "server error":
        assert len(broken.requests) == 2  # tried, retried once, then fell back
    [row] = store.list_llm_usage(workflow_id="w-1")
    assert (row.provider, row.model, row.status, row.purpose) == (
        "openai", "small", "ok", "generate")


def test_every_provider_failing_is_reported_and_recorded(
    llm_server: LLMServer, closed_port_url: str, store: HistoryStore
) -> None:
    llm_server.reply(openai_error(500, "down"))
    llm = service(
        LLMProviderSettings(kind="openai", model="a", base_url=closed_port_url, max_retries=0),
        provider(llm_server.url, model="b"),
        store=store,
    )
    with pytest.raises(LLMUnavailableError) as caught:
        complete(llm, workflow_id="w-2")
    assert [type(f) for f in caught.value.failures] == [LLMConnectionError, LLMServerError]
    assert "openai:a" in str(caught.value) and "openai:b" in str(caught.value)
    [row] = store.list_llm_usage(workflow_id="w-2")
    assert row.status == "failed" and "no LLM provider answered" in (row.error or "")


def test_an_identical_call_is_answered_from_the_cache(
    llm_server: LLMServer, store: HistoryStore, tmp_path: Path
) -> None:
    llm_server.reply(openai_reply("cached answer", prompt_tokens=50, completion_tokens=5),
                     openai_reply("other answer"))
    first = complete(service(provider(llm_server.url), store=store), workflow_id="w")
    again = complete(service(provider(llm_server.url), store=store), workflow_id="w")
    assert again.text == "cached answer" and again.usage.cached
    assert len(llm_server.requests) == 1
    assert again.cache_key == first.cache_key
    # Anything that changes the answer is a different question.
    other = complete(service(provider(llm_server.url), store=store),
                     settings=CompletionSettings(temperature=0.7))
    assert other.text == "other answer"
    assert len(llm_server.requests) == 2
    rows = store.list_llm_usage(workflow_id="w")
    assert [(r.status, r.prompt_tokens, r.cost) for r in rows] == [
        ("ok", 50, None), ("cached", 0, 0.0)]
    # The cache lives in the history database: another process (store) sees it.
    with HistoryStore.for_path(tmp_path / "history.db") as reopened:
        reused = complete(service(provider(llm_server.url), store=reopened))
    assert reused.text == "cached answer"
    assert len(llm_server.requests) == 2


def test_cache_off_always_asks(llm_server: LLMServer, store: HistoryStore) -> None:
    llm_server.reply(openai_reply("one"), openai_reply("two"))
    for expected in ("one", "two"):
        llm = service(provider(llm_server.url), store=store, cache=False)
        assert complete(llm).text == expected


def test_usage_goes_through_the_spool_into_the_history(
    llm_server: LLMServer, store: HistoryStore, tmp_path: Path
) -> None:
    spool = HistorySpool(tmp_path / "spool", store.redactor)
    spool.start_workflow(workflow_id="w-run", action="install", integration="x",
                         target="local", params={})
    llm_server.reply(openai_reply("a", prompt_tokens=3, completion_tokens=4),
                     openai_reply("b", prompt_tokens=5, completion_tokens=6))
    llm = service(provider(llm_server.url), usage=spool, cache=False)
    complete(llm, workflow_id="w-run", purpose="generate")
    complete(service(provider(llm_server.url), usage=spool, cache=False),
             purpose="knowledge")  # a call that serves no workflow
    rows = store.list_llm_usage()
    assert sorted((r.workflow_id or "", r.purpose, r.prompt_tokens, r.completion_tokens)
                  for r in rows) == [("", "knowledge", 5, 6), ("w-run", "generate", 3, 4)]
    assert all(r.latency > 0 for r in rows)
    assert not list((tmp_path / "spool").glob("llm-usage-*"))  # ingested files are gone
    store.ingest()
    assert len(store.list_llm_usage()) == 2  # and nothing is applied twice


def test_secrets_never_leave(
    llm_server: LLMServer, store: HistoryStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    secret = 'db-Pa55"word\\x'
    redactor = store.redactor
    redactor.add([secret])
    llm_server.reply(openai_error(500, "try again"), openai_reply('{"ok": true}'))
    spool = HistorySpool(tmp_path / "spool", redactor)
    llm = service(provider(llm_server.url, max_retries=1), store=store, usage=spool,
                  redactor=redactor)
    messages = [Message.system(f"The password is {secret}."),
                Message.user(f"Write a script using {secret} via the environment.")]
    with caplog.at_level(logging.DEBUG):
        answer = complete(llm, messages, workflow_id="w")
        store.ingest()
        store.list_llm_usage()
    assert answer.text == '{"ok": true}'
    assert len(llm_server.requests) == 2
    for request in llm_server.requests:
        assert secret.encode() not in request.raw
        assert secret.replace("\\", "\\\\").replace('"', '\\"').encode() not in request.raw
        assert MASK in request.json["messages"][0]["content"]
    database = b"".join(p.read_bytes() for p in tmp_path.glob("history.db*"))
    assert secret.encode() not in database
    assert secret not in caplog.text


class Script(BaseModel):
    """What a structured test answer must look like."""

    install: str
    port: int


def test_structured_output_is_repaired_with_the_validation_errors(
    llm_server: LLMServer, store: HistoryStore
) -> None:
    llm_server.reply(openai_reply("Sure! Here is the script."),
                     openai_reply('{"install": "apt-get install -y foo"}'),
                     openai_reply('```json\n{"install": "apt-get install -y foo", '
                                  '"port": 9100}\n```'))
    llm = service(provider(llm_server.url), store=store)

    async def run() -> Structured[Script]:
        try:
            return await llm.complete_structured(QUESTION, Script, workflow_id="w")
        finally:
            await llm.aclose()

    result = asyncio.run(run())
    assert result.output == Script(install="apt-get install -y foo", port=9100)
    assert result.attempts == 3
    first, second, third = (r.json for r in llm_server.requests)
    assert first["response_format"] == {"type": "json_object"}
    assert '"port"' in first["messages"][1]["content"]  # the schema is in the instructions
    assert "Invalid JSON" in second["messages"][-1]["content"]
    assert "port: Field required" in third["messages"][-1]["content"]
    # The same question next time: the valid answer, straight from the cache.
    again = asyncio.run(run())
    assert again.output == result.output and again.completion.usage.cached
    assert len(llm_server.requests) == 3


def test_structured_output_gives_up_after_the_allowed_attempts(
    llm_server: LLMServer, store: HistoryStore
) -> None:
    llm_server.reply(openai_reply('{"install": 1}'), openai_reply('{"install": 2}'))

    async def run() -> Structured[Script]:
        llm = service(provider(llm_server.url), store=store)
        try:
            return await llm.complete_structured(QUESTION, Script, max_attempts=2)
        finally:
            await llm.aclose()

    with pytest.raises(LLMOutputInvalidError, match="after 2 attempts") as caught:
        asyncio.run(run())
    assert "port" in caught.value.problems
    assert len(llm_server.requests) == 2
    # Invalid answers are not kept: asking again asks the model again.
    llm_server.reply(openai_reply('{"install": "x", "port": 1}'))
    assert asyncio.run(run()).output.port == 1
    assert len(llm_server.requests) == 3
