"""Get a documentation page: over HTTP(S) with httpx, or from a file.

Only text documentation is accepted (HTML, Markdown, plain text, man pages, gzip-compressed
files as Debian ships them); everything else is refused before it is read whole. Sizes are
enforced while the body streams in, so a huge or endless response costs at most the limit.
httpx errors become ``KnowledgeError`` here, with a hint; nothing above sees httpx.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import re
import zlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from workflow_agent.errors import KnowledgeError

if TYPE_CHECKING:
    from workflow_agent.config import KnowledgeSettings

HTML = "text/html"
MARKDOWN = "text/markdown"
TEXT = "text/plain"

#: Media types accepted from servers, and what each is parsed as.
ACCEPTED_MEDIA_TYPES = {
    "text/html": HTML,
    "application/xhtml+xml": HTML,
    "text/markdown": MARKDOWN,
    "text/x-markdown": MARKDOWN,
    "text/plain": TEXT,
    "text/troff": TEXT,
}
_SUFFIX_TYPES = {
    ".html": HTML, ".htm": HTML, ".xhtml": HTML,
    ".md": MARKDOWN, ".markdown": MARKDOWN, ".mdown": MARKDOWN,
    ".txt": TEXT, ".text": TEXT,
}
_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?([\w.:-]+)""", re.IGNORECASE)
_PROXY_HINT = ("HTTPS_PROXY / HTTP_PROXY name the proxy; hosts in NO_PROXY are reached "
               "directly.")


@dataclass(frozen=True)
class FetchLimits:
    """How long a fetch may take and how much it may read."""

    #: Seconds for connecting and for each read (not the whole transfer).
    timeout: float = 20.0
    #: Largest accepted document, in bytes after decompression.
    max_bytes: int = 5 * 1024 * 1024

    @classmethod
    def from_settings(cls, settings: KnowledgeSettings) -> FetchLimits:
        """The limits configured in ``WorkflowConfiguration.knowledge``."""
        return cls(timeout=settings.fetch_timeout, max_bytes=settings.max_document_bytes)


@dataclass(frozen=True)
class Document:
    """A fetched or read documentation page, as text, with where and when it came from."""

    #: The URL (after redirects) or the absolute file path.
    source: str
    #: ``text/html``, ``text/markdown`` or ``text/plain``: decides the parser.
    content_type: str
    text: str
    retrieved_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def content_hash(self) -> str:
        """SHA-256 of the text: the same page fetched twice is stored once."""
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


def is_url(source: str) -> bool:
    """Whether ``source`` names something to fetch rather than a local file."""
    return re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", source) is not None and \
        not source.startswith("file://")


def load(source: str, limits: FetchLimits | None = None) -> Document:
    """Fetch ``source`` if it is a URL, else read it as a file."""
    limits = limits or FetchLimits()
    if is_url(source):
        return fetch_url(source, limits)
    return read_file(Path(source.removeprefix("file://")).expanduser(), limits)


def fetch_url(url: str, limits: FetchLimits) -> Document:
    """GET ``url`` with httpx, honouring the proxy environment (HTTPS_PROXY, NO_PROXY).

    Refuses error statuses, media types that are not text documentation, and bodies over
    ``limits.max_bytes`` (checked against Content-Length first, then while streaming).
    """
    scheme = urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):
        raise KnowledgeError(f"cannot fetch {url}: only http and https URLs are supported",
                             hint="Download it yourself and pass the file path.")
    import httpx  # only `knowledge add URL` pays for importing httpx

    from workflow_agent import __version__

    headers = {"User-Agent": f"workflow-agent/{__version__}",
               "Accept": "text/html, text/markdown, text/plain;q=0.9"}
    try:
        # trust_env: proxies and NO_PROXY come from the environment, as users expect.
        with httpx.Client(trust_env=True, timeout=httpx.Timeout(limits.timeout),
                          follow_redirects=True, headers=headers) as client, \
                client.stream("GET", url) as response:
            if response.status_code >= 400:
                raise KnowledgeError(
                    f"{url}: the server answered HTTP {response.status_code} "
                    f"{response.reason_phrase}",
                    hint="Check the URL in a browser; a page behind a login cannot be fetched.",
                )
            media_type, charset = _split_content_type(response.headers.get("content-type"))
            content_type = _accept(media_type, url)
            declared = response.headers.get("content-length")
            if declared and declared.isdigit() and response.headers.get(
                    "content-encoding", "identity") == "identity" and \
                    int(declared) > limits.max_bytes:
                raise _too_large(url, limits)
            body = bytearray()
            # iter_bytes yields decoded (decompressed) bytes: the limit also stops gzip bombs.
            for chunk in response.iter_bytes():
                body += chunk
                if len(body) > limits.max_bytes:
                    raise _too_large(url, limits)
            final_url = str(response.url)
    except httpx.TimeoutException as exc:
        raise KnowledgeError(
            f"fetching {url} timed out after {limits.timeout:g} s ({type(exc).__name__})",
            hint="The server (or the proxy) is slow or unreachable. Raise "
            "knowledge.fetch_timeout (WORKFLOW_AGENT_KNOWLEDGE__FETCH_TIMEOUT). " + _PROXY_HINT,
        ) from exc
    except httpx.ProxyError as exc:
        raise KnowledgeError(f"the proxy refused or failed fetching {url}: {exc}",
                             hint="Check the proxy. " + _PROXY_HINT) from exc
    except httpx.ConnectError as exc:
        raise KnowledgeError(f"cannot connect to fetch {url}: {exc}",
                             hint="Check the URL and the network. " + _PROXY_HINT) from exc
    except httpx.TooManyRedirects as exc:
        raise KnowledgeError(f"{url} redirects too many times",
                             hint="Open it in a browser and use the final address.") from exc
    except (httpx.InvalidURL, httpx.UnsupportedProtocol) as exc:
        raise KnowledgeError(f"{url} is not a valid URL: {exc}",
                             hint="Give an http(s):// URL or a file path.") from exc
    except httpx.HTTPError as exc:
        raise KnowledgeError(f"fetching {url} failed: {exc}",
                             hint="Try again; if it persists, check the server. " + _PROXY_HINT
                             ) from exc
    data = bytes(body)
    return Document(final_url, content_type, _decode(data, charset, content_type))


def read_file(path: Path, limits: FetchLimits) -> Document:
    """Read a documentation file; ``.gz`` files (man pages, Debian docs) are decompressed."""
    try:
        with path.open("rb") as handle:
            raw = handle.read(limits.max_bytes + 1)
    except FileNotFoundError as exc:
        raise KnowledgeError(f"{path}: no such file",
                             hint="Check the path, or give an http(s):// URL.") from exc
    except IsADirectoryError as exc:
        raise KnowledgeError(f"{path} is a directory",
                             hint="Add the documentation files in it one at a time.") from exc
    except PermissionError as exc:
        raise KnowledgeError(f"cannot read {path}: permission denied",
                             hint="Run as a user who can read it, or copy it somewhere "
                             "readable.") from exc
    except OSError as exc:
        raise KnowledgeError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if len(raw) > limits.max_bytes:
        raise _too_large(str(path), limits)
    name = PurePosixPath(path.name)
    if name.suffix == ".gz":
        raw = _gunzip(raw, path, limits)
        name = PurePosixPath(name.stem)
    if b"\x00" in raw[:8192]:
        raise KnowledgeError(f"{path} is not a text document (it holds binary data)",
                             hint="Give an HTML, Markdown, plain text or man page file.")
    content_type = _SUFFIX_TYPES.get(name.suffix.lower())
    if content_type is None:
        content_type = HTML if _looks_like_html(raw) else TEXT
    return Document(str(path.resolve()), content_type, _decode(raw, None, content_type))


def _gunzip(raw: bytes, path: Path, limits: FetchLimits) -> bytes:
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(raw)) as unzipped:
            data = unzipped.read(limits.max_bytes + 1)
    except (OSError, EOFError, zlib.error) as exc:
        raise KnowledgeError(f"{path} is not a valid gzip file: {exc}") from exc
    if len(data) > limits.max_bytes:
        raise _too_large(str(path), limits)
    return data


def _too_large(where: str, limits: FetchLimits) -> KnowledgeError:
    return KnowledgeError(
        f"{where} is larger than the {limits.max_bytes:,} byte limit for a document",
        hint="Raise knowledge.max_document_bytes (WORKFLOW_AGENT_KNOWLEDGE__MAX_DOCUMENT_BYTES) "
        "if this page really is documentation.",
    )


def _split_content_type(header: str | None) -> tuple[str, str | None]:
    if not header:
        return "", None
    media_type, _, params = header.partition(";")
    charset = None
    for param in params.split(";"):
        key, _, value = param.partition("=")
        if key.strip().lower() == "charset":
            charset = value.strip().strip('"') or None
    return media_type.strip().lower(), charset


def _accept(media_type: str, url: str) -> str:
    """The parser for this media type, or an error naming what was served."""
    suffix = PurePosixPath(urlsplit(url).path).suffix.lower()
    if not media_type:
        # No Content-Type at all: the URL's suffix is the only honest guess.
        if suffix in _SUFFIX_TYPES:
            return _SUFFIX_TYPES[suffix]
        raise KnowledgeError(f"{url} was served without a content type",
                             hint="Download it and pass the file path instead.")
    content_type = ACCEPTED_MEDIA_TYPES.get(media_type)
    if content_type is None:
        raise KnowledgeError(
            f"{url} is {media_type}, not documentation this can read",
            hint="Give a page served as text/html, text/markdown or text/plain; for a PDF "
            "or an archive, extract the text first and pass the file.",
        )
    if content_type == TEXT and suffix in (".md", ".markdown"):
        return MARKDOWN  # raw Markdown files are commonly served as text/plain
    return content_type


def _looks_like_html(raw: bytes) -> bool:
    head = raw[:4096].lstrip().lower()
    return head.startswith((b"<!doctype html", b"<html", b"<!--")) and b"<html" in head


def _decode(data: bytes, charset: str | None, content_type: str) -> str:
    if charset is None and content_type == HTML:
        found = _META_CHARSET.search(data[:2048])
        charset = found.group(1).decode("ascii") if found else None
    if data.startswith(b"\xef\xbb\xbf"):
        data, charset = data[3:], "utf-8"
    try:
        return data.decode(charset or "utf-8", errors="replace")
    except LookupError:
        # An unknown charset name: UTF-8 with replacement beats refusing the page.
        return data.decode("utf-8", errors="replace")
