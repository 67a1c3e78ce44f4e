"""HTTP GET from the target itself, with nothing but bash ``/dev/tcp`` and coreutils.

The request is HTTP/1.0 so the server closes the connection after the response and
``head -c`` sees end of file; the response travels back base64-encoded so binary bodies
and long lines arrive intact. Plain http only: bash cannot speak TLS.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from workflow_agent.execution.target import probe_output

if TYPE_CHECKING:
    from workflow_agent.execution.target import Target

MAX_BODY = 4 * 1024 * 1024
"""Bytes of a response read at most (status line and headers included)."""


@dataclass(frozen=True)
class HttpResponse:
    """A parsed HTTP response as fetched from the target."""

    status: int
    headers: dict[str, str]
    body: bytes
    truncated: bool

    @property
    def text(self) -> str:
        """The body decoded as UTF-8 (undecodable bytes replaced)."""
        return self.body.decode("utf-8", "replace")


@dataclass(frozen=True)
class HttpFailure:
    """Why no response was had; ``permanent`` when trying again cannot help."""

    detail: str
    permanent: bool = False


def _dechunk(body: bytes) -> bytes:
    out, pos = bytearray(), 0
    while True:
        end = body.find(b"\r\n", pos)
        if end < 0:
            return bytes(out)  # truncated: keep what arrived
        size = int(body[pos:end].split(b";")[0].strip() or b"0", 16)
        if size == 0:
            return bytes(out)
        out += body[end + 2 : end + 2 + size]
        pos = end + 2 + size + 2


def parse_http_response(raw: bytes, *, truncated: bool = False) -> HttpResponse:
    """Parse a raw HTTP/1.x response; ``ValueError`` when it is not one."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        head, sep, body = raw.partition(b"\n\n")
    lines = head.decode("latin-1").splitlines()
    match = re.match(r"HTTP/\d(?:\.\d)?\s+(\d{3})", lines[0] if lines else "")
    if not match:
        raise ValueError(f"not an HTTP response (starts {raw[:40]!r})")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = _dechunk(body)  # servers should not chunk for HTTP/1.0, but some do
    return HttpResponse(int(match.group(1)), headers, body, truncated)


def check_url(url: str) -> str:
    """``url`` unchanged if it is an http(s) URL a check can use; ``ValueError`` if not."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected an http:// URL with a host, got {url!r}")
    if parts.username is not None or re.search(r"[\s\x00-\x1f]", url):
        raise ValueError(f"URL must not contain credentials, spaces or control characters: {url!r}")
    _ = parts.port  # raises ValueError for a port that is not a number in range
    return url


async def http_get(
    target: Target, url: str, *, timeout: float, accept: str = "*/*"
) -> HttpResponse | HttpFailure:
    """GET ``url`` from ``target`` itself over bash ``/dev/tcp``."""
    parts = urlsplit(url)
    if parts.scheme != "http":
        return HttpFailure(
            f"{parts.scheme}:// is not supported by this check: it fetches with bash /dev/tcp,"
            " which speaks plain http only",
            permanent=True,
        )
    host = parts.hostname or ""
    port = parts.port or 80
    host_header = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        host_header += f":{port}"
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    # A printf format for bash: the values go in as separate shell-quoted arguments.
    request = r"GET %s HTTP/1.0\r\nHost: %s\r\nAccept: %s\r\nUser-Agent: workflow-agent\r\n\r\n"
    script = f"""set -o pipefail
exec 3<>/dev/tcp/{shlex.quote(host)}/{port} || exit 7
printf '{request}' {shlex.quote(path)} {shlex.quote(host_header)} {shlex.quote(accept)} >&3
head -c {MAX_BODY} <&3 | base64
"""
    result = await target.run(script, timeout=timeout)
    if result.exit_code == 7 and not result.timed_out:
        # bash says e.g. "bash: connect: Connection refused": keep the reason.
        reason = (result.stderr.strip().splitlines() or ["connection failed"])[-1]
        return HttpFailure(f"cannot connect to {host}:{port}: {reason.rsplit(': ', 1)[-1]}")
    if result.timed_out:
        return HttpFailure(f"GET {url} timed out after {result.duration:.1f}s")
    if result.exit_code != 0:
        message = " ".join(result.stderr.split())[-300:] or f"exit {result.exit_code}"
        return HttpFailure(f"GET {url} failed on the target: {message}")
    raw = probe_output(result)
    if not raw:
        return HttpFailure(f"{host}:{port} closed the connection without a response")
    try:
        return parse_http_response(raw, truncated=len(raw) >= MAX_BODY)
    except ValueError as exc:
        return HttpFailure(f"GET {url}: {exc}")
