"""Fixtures of the knowledge tests (helpers in ``tests/doc_server.py``).

``debian_docs``   Debian's monitoring packages' documentation, fetched at test time.
``doc_server``    a real HTTP server on 127.0.0.1; ``doc_server.route(...)`` serves a page.
``no_proxy_env``  (automatic) no proxy variables unless a test sets them.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from doc_server import DebianDocs, DocServer, ensure_debian_docs, start_server


@pytest.fixture(scope="session")
def debian_docs() -> DebianDocs:
    """Debian's packages, downloaded and extracted once per machine."""
    docs = ensure_debian_docs()
    if isinstance(docs, str):
        pytest.skip(docs)
    return docs


@pytest.fixture
def doc_server() -> Iterator[DocServer]:
    """A documentation server on 127.0.0.1, stopped after the test."""
    state, httpd = start_server()
    yield state
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests start without proxy variables; the proxy tests set their own."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy",
                 "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
