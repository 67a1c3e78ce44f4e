"""`workflow-agent knowledge add/search/show` as a user runs them: real processes, JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from doc_server import DocServer

PAGE = """<html><body><nav>port 1111</nav><main><h1>Foo exporter</h1>
<h2>Install</h2><pre><code class="language-console">$ sudo apt-get install foo-exporter
Setting up foo-exporter ...</code></pre>
<p>It listens on port 9256; check with <code>curl http://localhost:9256/metrics</code>.</p>
</main></body></html>"""


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """A clean environment with its own data directory (so its own knowledge base)."""
    return {
        **{k: v for k, v in os.environ.items()
           if not k.startswith("WORKFLOW_AGENT_") and "proxy" not in k.lower()},
        "WORKFLOW_AGENT_DATA_DIR": str(tmp_path / "data"),
        "COLUMNS": "200",
    }


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "workflow_agent", "knowledge", *args],
                          env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          timeout=120)


def test_add_search_show(env: dict[str, str], doc_server: DocServer, tmp_path: Path) -> None:
    url = doc_server.route("/foo.html", PAGE)
    added = cli(env, "add", url, "--integration", "foo-exporter", "--output", "json")
    assert added.returncode == 0, added.stderr
    document = json.loads(added.stdout)
    assert (document["source"], document["integration"]) == (url, "foo-exporter")
    assert document["ports"] == [9256] and document["changed"] is True
    assert document["commands"][0]["command"] == "sudo apt-get install foo-exporter"
    assert document["commands"][0]["output"] == "Setting up foo-exporter ..."
    assert (tmp_path / "data" / "knowledge.db").is_file()

    again = cli(env, "add", url, "--integration", "foo-exporter")
    assert again.returncode == 0 and "unchanged" in again.stdout

    found = cli(env, "search", "listens port", "--integration", "foo-exporter", "-o", "json")
    assert found.returncode == 0, found.stderr
    hits = json.loads(found.stdout)
    assert hits[0]["document_id"] == document["id"]
    assert hits[0]["citation"] == f"{url} § Install"
    assert "9256" in hits[0]["text"]
    assert json.loads(cli(env, "search", "listens", "--integration", "other", "-o",
                          "json").stdout) == []

    shown = cli(env, "show", str(document["id"]))
    assert shown.returncode == 0, shown.stderr
    assert "Foo exporter" in shown.stdout and "9256" in shown.stdout
    assert "sudo apt-get install foo-exporter" in shown.stdout
    assert "1111" not in shown.stdout  # the navigation was dropped


def test_errors_have_messages_hints_and_exit_codes(env: dict[str, str],
                                                   doc_server: DocServer) -> None:
    pdf = cli(env, "add", doc_server.route("/manual.pdf", b"%PDF", "application/pdf"))
    assert pdf.returncode == 1
    assert "is application/pdf, not documentation" in pdf.stderr and "hint:" in pdf.stderr
    missing = cli(env, "add", "/nonexistent/README.md")
    assert missing.returncode == 1 and "no such file" in missing.stderr
    # No knowledge base yet: show explains what to do; search finds nothing, creates nothing.
    shown = cli(env, "show", "1")
    assert shown.returncode == 1 and "knowledge add" in shown.stderr
    assert json.loads(cli(env, "search", "anything", "-o", "json").stdout) == []
    assert not Path(env["WORKFLOW_AGENT_DATA_DIR"], "knowledge.db").exists()
    for result in (pdf, missing, shown):
        assert "Traceback" not in result.stderr


def test_file_with_integration_and_text_output(env: dict[str, str], tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# Bar agent\n\n## Run\n\n```sh\nsystemctl enable --now bar-agent\n```\n")
    added = cli(env, "add", str(readme), "-i", "bar-agent")
    assert added.returncode == 0, added.stderr
    assert "added: document 1, Bar agent" in added.stdout
    assert "services ['bar-agent']" in added.stdout
    found = cli(env, "search", "enable")
    assert found.returncode == 0 and f"{readme} § Run" in " ".join(found.stdout.split())
