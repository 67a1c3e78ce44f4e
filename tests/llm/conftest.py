"""Fixtures of the LLM tests: a scripted LLM server, a closed port, a history store."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from llm_server import LLMServer
from workflow_agent.secrets import Redactor
from workflow_agent.storage.history import HistoryStore


@pytest.fixture
def llm_server() -> Iterator[LLMServer]:
    """A scripted LLM server on loopback for this test."""
    server = LLMServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def closed_port_url() -> str:
    """A loopback URL where nothing listens (connection refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[HistoryStore]:
    """An opened SQLite history store with a spool folder, sharing ``redactor``."""
    history = HistoryStore.for_path(tmp_path / "history.db", redactor=Redactor(),
                                    spool_dir=tmp_path / "spool")
    history.open()
    yield history
    history.close()


@pytest.fixture(autouse=True)
def _no_proxy_for_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    """The SDKs honour proxy variables; the servers here are on loopback."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
