"""Real documentation for the knowledge tests: Debian's docs, and a local HTTP server.

``DebianDocs``  the documentation that Debian's monitoring packages ship, obtained with
                ``apt-get download`` + ``dpkg -x`` into ~/.cache/workflow-agent/test-docs
                (once per machine; never committed). Rendered forms are made with groff.
``DocServer``   a real HTTP server on 127.0.0.1 (stdlib ``http.server`` in a thread);
                ``server.route(path, body, content_type, **options)`` serves a page.
``doc_server`` and ``no_proxy_env`` are the fixtures over them that the knowledge and
generation tests share (their conftest.py files import them); ``debian_docs`` is in
``tests/knowledge/conftest.py``.
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

PACKAGES = ("prometheus-node-exporter", "zabbix-agent", "munin-node", "collectd-core")
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "workflow-agent" / \
    "test-docs"


@dataclass
class DebianDocs:
    """The extracted packages' /usr/share, and renderers for their man pages."""

    root: Path

    def doc(self, relative: str) -> str:
        """A file under usr/share/doc, decompressed if it is .gz."""
        path = self.root / "usr/share/doc" / relative
        data = path.read_bytes()
        return (gzip.decompress(data) if path.suffix == ".gz" else data).decode()

    def man_path(self, relative: str) -> Path:
        """The compressed roff source of a man page, e.g. ``man8/zabbix_agentd.8``."""
        return self.root / "usr/share/man" / f"{relative}.gz"

    def man(self, relative: str, device: str) -> str:
        """A man page rendered by groff: device ``html`` or ``utf8`` (as `man` prints it)."""
        roff = gzip.decompress(self.man_path(relative).read_bytes())
        result = subprocess.run(["groff", f"-T{device}", "-man"], input=roff,
                                capture_output=True, check=True)
        return result.stdout.decode()


@dataclass
class Route:
    """What the server answers for one path."""

    body: bytes
    content_type: str | None
    status: int = 200
    #: Seconds to wait before answering (timeouts).
    delay: float = 0.0
    #: Send no Content-Length: the body is streamed and the connection closed.
    stream: bool = False


@dataclass
class DocServer:
    """A real HTTP server on loopback; ``requests`` records every path asked for."""

    url: str
    routes: dict[str, Route] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)

    def route(self, path: str, body: str | bytes, content_type: str | None = "text/html",
              **options: float | bool | int) -> str:
        """Serve ``body`` at ``path``; returns the full URL."""
        data = body.encode() if isinstance(body, str) else body
        self.routes[path] = Route(data, content_type, **options)  # type: ignore[arg-type]
        return self.url + path


def _handler(server: DocServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            server.requests.append(self.path)
            route = server.routes.get(self.path.split("?")[0]) or server.routes.get(self.path)
            if route is None:
                route = Route(b"not found", "text/plain", status=404)
            time.sleep(route.delay)
            try:
                self.send_response(route.status)
                if route.content_type:
                    self.send_header("Content-Type", route.content_type)
                if route.stream:
                    self.send_header("Connection", "close")
                    self.end_headers()
                    for at in range(0, len(route.body), 65536):
                        self.wfile.write(route.body[at:at + 65536])
                    self.close_connection = True
                    return
                self.send_header("Content-Length", str(len(route.body)))
                self.end_headers()
                self.wfile.write(route.body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (size limit, timeout): that is the point

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler




def start_server() -> tuple[DocServer, ThreadingHTTPServer]:
    """A documentation server on 127.0.0.1, serving in a daemon thread."""
    state = DocServer(url="")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    httpd.daemon_threads = True
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return state, httpd


@pytest.fixture
def doc_server() -> Iterator[DocServer]:
    """A documentation server on 127.0.0.1, stopped after the test."""
    state, httpd = start_server()
    yield state
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests start without proxy variables (documentation comes from loopback, never
    through a proxy); the proxy tests set their own."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy",
                 "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)


def ensure_debian_docs() -> DebianDocs | str:
    """The extracted packages (downloaded once per machine), or why they cannot be had."""
    for tool in ("apt-get", "dpkg", "groff"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (scripts/system-deps.sh --test)"
    if subprocess.run(["groff", "-Thtml", "-v"], capture_output=True).returncode != 0:
        return "groff cannot render HTML: install the 'groff' package"
    root = CACHE / "root"
    marker = CACHE / "complete"
    if not marker.is_file():
        debs = CACHE / "debs"
        debs.mkdir(parents=True, exist_ok=True)
        subprocess.run(["apt-get", "download", *PACKAGES], cwd=debs, check=True,
                       capture_output=True)
        for deb in sorted(debs.glob("*.deb")):
            subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
        marker.write_text(" ".join(PACKAGES))
    return DebianDocs(root)
