"""Fixtures of the knowledge tests (helpers in ``tests/doc_server.py``).

``debian_docs``   Debian's monitoring packages' documentation, fetched at test time.
``doc_server``    a real HTTP server on 127.0.0.1; ``doc_server.route(...)`` serves a page.
``no_proxy_env``  (automatic) no proxy variables unless a test sets them.
"""

from __future__ import annotations

import pytest

# The shared fixtures: imported here, pytest finds them in this module.
from doc_server import DebianDocs, doc_server, ensure_debian_docs, no_proxy_env

__all__ = ["debian_docs", "doc_server", "no_proxy_env"]


@pytest.fixture(scope="session")
def debian_docs() -> DebianDocs:
    """Debian's packages, downloaded and extracted once per machine."""
    docs = ensure_debian_docs()
    if isinstance(docs, str):
        pytest.skip(docs)
    return docs
