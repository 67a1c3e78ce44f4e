"""Fetching over real HTTP (local server), proxies, limits, and reading files."""

from __future__ import annotations

import gzip
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from doc_server import DocServer
from workflow_agent.errors import KnowledgeError
from workflow_agent.knowledge.fetch import HTML, MARKDOWN, TEXT, FetchLimits, load, read_file

PAGE = "<html><body><h1>Foo exporter</h1><p>Listens on port 9256.</p></body></html>"


def test_fetches_html_markdown_and_text_with_their_types(doc_server: DocServer) -> None:
    html = load(doc_server.route("/a.html", PAGE, "text/html; charset=utf-8"))
    assert (html.content_type, html.text) == (HTML, PAGE)
    assert html.source == doc_server.url + "/a.html"
    assert load(doc_server.route("/b", "# T", "text/markdown")).content_type == MARKDOWN
    # Raw Markdown files are commonly served as text/plain: the suffix decides.
    assert load(doc_server.route("/README.md", "# T", "text/plain")).content_type == MARKDOWN
    assert load(doc_server.route("/c.txt", "T", "text/plain")).content_type == TEXT
    latin = load(doc_server.route("/l", "café".encode("latin-1"), "text/plain; charset=latin-1"))
    assert latin.text == "café"


@pytest.mark.parametrize("media_type", ["application/pdf", "image/png", "application/json"])
def test_refuses_other_content_types(doc_server: DocServer, media_type: str) -> None:
    url = doc_server.route("/x", b"%PDF-1.4", media_type)
    with pytest.raises(KnowledgeError, match=f"is {media_type}, not documentation") as caught:
        load(url)
    assert caught.value.hint and "text/html" in caught.value.hint


def test_http_errors_are_explained(doc_server: DocServer) -> None:
    with pytest.raises(KnowledgeError, match="HTTP 404"):
        load(doc_server.url + "/missing")
    with pytest.raises(KnowledgeError, match="only http and https"):
        load("ftp://example.org/doc.txt")


@pytest.mark.parametrize("stream", [False, True], ids=["content-length", "streamed"])
def test_size_limit_is_enforced(doc_server: DocServer, stream: bool) -> None:
    url = doc_server.route("/big", "x" * 300_000, "text/plain", stream=stream)
    with pytest.raises(KnowledgeError, match="larger than the 100,000 byte limit") as caught:
        load(url, FetchLimits(max_bytes=100_000))
    assert caught.value.hint and "max_document_bytes" in caught.value.hint
    assert load(url, FetchLimits(max_bytes=300_000)).text == "x" * 300_000


def test_timeout(doc_server: DocServer) -> None:
    url = doc_server.route("/slow", PAGE, "text/html", delay=1.5)
    with pytest.raises(KnowledgeError, match=r"timed out after 0\.3 s") as caught:
        load(url, FetchLimits(timeout=0.3))
    assert caught.value.hint and "fetch_timeout" in caught.value.hint


def test_connection_refused(doc_server: DocServer) -> None:
    import socket

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    with pytest.raises(KnowledgeError, match="cannot connect") as caught:
        load(f"http://127.0.0.1:{port}/doc", FetchLimits(timeout=2))
    assert caught.value.hint and "NO_PROXY" in caught.value.hint


class _Proxy:
    """A plain HTTP forward proxy stand-in: answers every request itself and records it."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                proxy.seen.append(self.path)  # a proxy sees the absolute URL
                body = b"# Via the proxy\n\nport 9999\n"
                self.send_response(200)
                self.send_header("Content-Type", "text/markdown")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def proxy() -> Iterator[_Proxy]:
    running = _Proxy()
    yield running
    running.httpd.shutdown()
    running.httpd.server_close()


def test_proxy_from_the_environment_is_used(
    proxy: _Proxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    # This host does not exist: only a proxy can answer for it.
    document = load("http://docs.example.invalid/install.md")
    assert document.text.startswith("# Via the proxy")
    assert proxy.seen == ["http://docs.example.invalid/install.md"]


def test_no_proxy_reaches_loopback_directly(
    proxy: _Proxy, doc_server: DocServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = doc_server.route("/direct.html", PAGE)
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    assert load(url).text.startswith("# Via the proxy")  # without NO_PROXY: proxied
    assert len(proxy.seen) == 1
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    assert load(url).text == PAGE
    assert len(proxy.seen) == 1 and doc_server.requests == ["/direct.html"]


def test_reads_files_by_suffix_and_content(tmp_path: Path) -> None:
    (tmp_path / "a.md").write_text("# A")
    (tmp_path / "page").write_text("<!DOCTYPE html><html><body>x</body></html>")
    (tmp_path / "notes").write_text("plain")
    (tmp_path / "tool.8.gz").write_bytes(gzip.compress(b".TH TOOL 8\n.SH NAME\ntool\n"))
    limits = FetchLimits()
    assert read_file(tmp_path / "a.md", limits).content_type == MARKDOWN
    assert read_file(tmp_path / "page", limits).content_type == HTML
    assert read_file(tmp_path / "notes", limits).content_type == TEXT
    man = load(str(tmp_path / "tool.8.gz"))
    assert (man.content_type, man.text) == (TEXT, ".TH TOOL 8\n.SH NAME\ntool\n")
    assert man.source == str((tmp_path / "tool.8.gz").resolve())


def test_unreadable_files_are_explained(tmp_path: Path) -> None:
    (tmp_path / "binary").write_bytes(b"\x7fELF\x00\x00\x01")
    (tmp_path / "broken.gz").write_bytes(b"not gzip at all")
    (tmp_path / "big.txt").write_text("y" * 2000)
    cases = [
        (tmp_path / "absent.md", "no such file"),
        (tmp_path, "is a directory"),
        (tmp_path / "binary", "not a text document"),
        (tmp_path / "broken.gz", "not a valid gzip file"),
    ]
    for path, message in cases:
        with pytest.raises(KnowledgeError, match=message) as caught:
            load(str(path))
        assert caught.value.hint or message == "not a valid gzip file"
    with pytest.raises(KnowledgeError, match="larger than"):
        load(str(tmp_path / "big.txt"), FetchLimits(max_bytes=1000))
