"""Parsing real documentation (Debian's, served over HTTP) and messy pages built here."""

from __future__ import annotations

from doc_server import DebianDocs, DocServer
from workflow_agent.knowledge.extract import DocumentKnowledge, split_commands
from workflow_agent.knowledge.fetch import load
from workflow_agent.knowledge.parse import parse, parse_text


def fetched(server: DocServer, path: str, body: str, content_type: str) -> DocumentKnowledge:
    return parse(load(server.route(path, body, content_type)))


def config(knowledge: DocumentKnowledge) -> dict[str, tuple[str, ...]]:
    return {c.path: c.keys for c in knowledge.config_files}


# -- real documentation -----------------------------------------------------------------------

def test_node_exporter_readme_as_markdown(doc_server: DocServer, debian_docs: DebianDocs) -> None:
    k = fetched(doc_server, "/node_exporter/README.md",
                debian_docs.doc("prometheus-node-exporter/README.md.gz"), "text/markdown")
    assert k.title == "Node exporter"
    assert k.ports[0] == 9100
    shell = k.commands_by_language()["shell"]
    docker = next(c for c in shell if c.command.startswith("docker run"))
    assert docker.purpose == "install" and "--pid=\"host\"" in docker.command
    assert docker.section == "Installation and Usage > Docker"
    assert "git clone https://github.com/prometheus/node_exporter.git" in [c.command for c in shell]
    assert "Go compiler" in k.prerequisites
    assert {"Linux", "FreeBSD"} <= set(k.platforms)
    assert "Installation and Usage > Docker" in k.sections
    # Badge images are not text: no passage holds their alt text.
    assert not any("CircleCI" in p.text for p in k.passages)


def test_node_exporter_man_page_as_groff_html(doc_server: DocServer,
                                              debian_docs: DebianDocs) -> None:
    html = debian_docs.man("man1/prometheus-node-exporter.1", "html")
    k = fetched(doc_server, "/prometheus-node-exporter.1.html", html, "text/html")
    assert k.title == "prometheus-node-exporter - Prometheus exporter for machine metrics"
    assert 9100 in k.ports
    assert "OPTIONS" in k.sections
    assert any("--web.listen-address=:9100" in p.text for p in k.passages)


def test_zabbix_agent_man_page_and_readme(doc_server: DocServer, debian_docs: DebianDocs) -> None:
    html = debian_docs.man("man8/zabbix_agentd.8", "html")
    man = fetched(doc_server, "/zabbix_agentd.8.html", html, "text/html")
    assert man.title == "zabbix_agentd - Zabbix agent daemon"
    assert "/etc/zabbix/zabbix_agentd.conf" in config(man)
    assert man.sections[:4] == ("NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS")
    readme = fetched(doc_server, "/zabbix/README.Debian",
                     debian_docs.doc("zabbix-agent/README.Debian"), "text/plain")
    # "Server=10.20.30.40,..." is an example for the file the sentence before names.
    assert config(readme)["/etc/zabbix/zabbix-agentd.conf"] == ("Server",)
    assert "IPv6 confusion" in readme.sections


def test_munin_node_conf_as_html_text_and_roff(doc_server: DocServer,
                                               debian_docs: DebianDocs) -> None:
    forms = {
        "html": fetched(doc_server, "/munin-node.conf.5.html",
                        debian_docs.man("man5/munin-node.conf.5", "html"), "text/html"),
        "man text": fetched(doc_server, "/munin-node.conf.5.txt",
                            debian_docs.man("man5/munin-node.conf.5", "utf8"), "text/plain"),
        "roff file": parse(load(str(debian_docs.man_path("man5/munin-node.conf.5")))),
    }
    for form, k in forms.items():
        assert k.title == "munin-node.conf - Munin-node configuration file", form
        assert k.ports == (4949,), form
        keys = config(k)["munin-node.conf"]
        assert {"log_level", "port", "host", "user"} <= set(keys), form
        assert "EXAMPLE" in k.sections, form


def test_munin_node_man_text_and_readme(doc_server: DocServer, debian_docs: DebianDocs) -> None:
    text = debian_docs.man("man1/munin-node.1p", "utf8")
    assert "\b" in text  # `man` output with overstrike bold, as a user would save it
    k = fetched(doc_server, "/munin-node.txt", text, "text/plain")
    assert k.title.startswith("munin-node - A daemon to gather information")
    assert "/etc/munin/munin-node.conf" in config(k)
    assert "FILES" in k.sections and not any("\b" in p.text for p in k.passages)
    readme = fetched(doc_server, "/munin/README.Debian",
                     debian_docs.doc("munin-node/README.Debian"), "text/plain")
    assert "munin-node" in readme.services  # "systemctl edit munin-node"
    assert readme.title == "Debian-specific information regarding the Munin node"


# -- messy pages --------------------------------------------------------------------------------

MESSY_HTML = """<!DOCTYPE html>
<html><head><title>Foo exporter | Example Docs</title>
<script>var tracking = "apt-get install spyware";</script></head>
<body>
<header class="site-header"><a href="/">Example Docs</a> <input type="search"></header>
<div id="cookie-banner">We use cookies. <button>Accept</button></div>
<nav class="sidebar"><ul><li><a href="/a">Getting started</a></li>
  <li><pre>apt-get install wrong-package</pre></li><li>port 7777</li></ul></nav>
<main>
<article>
<h1>Foo exporter</h1>
<div class="toc"><a href="#install">Install</a> <a href="#verify">Verify</a></div>
<p>The <code>foo_exporter</code> listens on port 9256 by default and serves
   <code>/metrics</code>.</p>
<h2 id="prereq">Prerequisites</h2>
<ul><li>A 64-bit Linux host</li><li>Python 3.9 or newer</li></ul>
<h2 id="install">Installation</h2>
<div class="tabs" role="tablist">
  <button role="tab" id="tab-deb">Debian / Ubuntu</button>
  <button role="tab" id="tab-rhel">RHEL / Rocky Linux</button>
</div>
<div role="tabpanel" aria-labelledby="tab-deb">
<pre><code class="language-console">$ sudo apt-get update
Hit:1 http://deb.debian.org/debian bookworm InRelease
Reading package lists... Done
$ sudo apt-get install -y foo-exporter
Setting up foo-exporter (1.2.0-1) ...
</code></pre></div>
<div role="tabpanel" aria-labelledby="tab-rhel">
<pre><code class="language-console">[root@rocky ~]# dnf install -y foo-exporter
Complete!
</code></pre></div>
<h2>Configuration</h2>
<p>Edit <code>/etc/foo/foo.yml</code>:</p>
<div class="highlight-yaml"><pre>listen_address: ":9256"
collectors:
  - cpu
log_level: info</pre></div>
<p>Then restart it: <code>systemctl restart foo-exporter</code>.</p>
<h2 id="verify">Verify</h2>
<pre>root@host:~# systemctl status foo-exporter
● foo-exporter.service - Foo exporter
     Active: active (running) since Tue 2024-01-02 10:00:00 UTC
root@host:~# curl -s http://localhost:9256/metrics | head -n 2
# HELP foo_up Whether foo is up.
foo_up 1
</pre>
</article>
</main>
<footer class="site-footer">© Example. Status page on port 8443.</footer>
</body></html>
"""


def test_messy_html_page(doc_server: DocServer) -> None:
    k = fetched(doc_server, "/docs/foo.html", MESSY_HTML, "text/html; charset=utf-8")
    assert k.title == "Foo exporter"
    everything = " ".join(p.text for p in k.passages)
    for chrome in ("wrong-package", "7777", "cookies", "8443", "spyware", "Getting started"):
        assert chrome not in everything, chrome
    assert k.ports == (9256,)
    assert k.prerequisites == ("A 64-bit Linux host", "Python 3.9 or newer")
    commands = [(c.platform, c.command, c.purpose) for c in k.install_commands]
    assert commands == [
        ("Debian / Ubuntu", "sudo apt-get update", "install"),
        ("Debian / Ubuntu", "sudo apt-get install -y foo-exporter", "install"),
        ("RHEL / Rocky Linux", "dnf install -y foo-exporter", "install"),
    ]
    first = k.commands[0]
    assert first.output.splitlines() == ["Hit:1 http://deb.debian.org/debian bookworm InRelease",
                                         "Reading package lists... Done"]
    assert k.platforms[:3] == ("Debian", "Ubuntu", "RHEL")
    assert config(k)["/etc/foo/foo.yml"] == ("listen_address", "collectors", "log_level")
    assert k.services == ("foo-exporter",)
    status = next(c for c in k.commands if c.command == "systemctl status foo-exporter")
    assert status.purpose == "verify" and "Active: active (running)" in status.output
    assert "curl -s http://localhost:9256/metrics | head -n 2" in k.verification
    assert "systemctl status foo-exporter" in k.verification
    assert k.sections == ("Prerequisites", "Installation", "Configuration", "Verify")


MESSY_MARKDOWN = """\
[![build](https://ci.example/badge.svg)](https://ci.example)

# Bar agent

The agent listens on `0.0.0.0:10050` (TCP port 10050).

## Install

=== "Debian"

    ```console
    # apt-get install bar-agent
    Reading package lists... Done
    ```

=== "Alpine"

    ```sh
    apk add bar-agent
    rc-update add bar-agent default
    ```

## Configure

```bash
# Write the defaults file
cat > /etc/default/bar-agent <<'EOF'
ARGS="--listen 10050"
LOG_LEVEL=info
EOF
sudo systemctl enable --now bar-agent.service
```

| Setting | Default |
|---------|---------|
| `ListenPort` | 10050 |
"""


def test_messy_markdown_page(doc_server: DocServer) -> None:
    k = fetched(doc_server, "/bar.md", MESSY_MARKDOWN, "text/markdown")
    assert k.title == "Bar agent"
    assert k.ports == (10050,)
    assert [c.command for c in k.commands if c.platform == "Alpine"] == [
        "apk add bar-agent", "rc-update add bar-agent default"]
    debian = next(c for c in k.commands if c.platform == "Debian")
    assert debian.output == "Reading package lists... Done"  # a root prompt, then output
    assert config(k)["/etc/default/bar-agent"] == ("ARGS", "LOG_LEVEL")
    assert set(k.services) == {"bar-agent"}
    assert k.platforms[:2] == ("Debian", "Alpine")
    assert any("ListenPort | 10050" in p.text for p in k.passages)
    assert not any("build" in p.text for p in k.passages)  # the badge


def test_prompts_output_and_comments_are_told_apart() -> None:
    # A script: '#' lines are comments, continuation lines join.
    assert split_commands("# Install it\napt-get install -y \\\n  foo\nsystemctl start foo\n",
                          "shell") == [("apt-get install -y \\\n  foo", ""),
                                       ("systemctl start foo", "")]
    # A session: prompts of several shapes, output kept with its command.
    session = ("user@box:~$ curl -s localhost:9100/metrics\nnode_up 1\n"
               "(venv) $ echo done\ndone\n% uname\nLinux\n")
    assert split_commands(session, "shell") == [
        ("curl -s localhost:9100/metrics", "node_up 1"), ("echo done", "done"),
        ("uname", "Linux")]
    # '# cmd' followed by output is a root prompt, not a comment.
    assert split_commands("# systemctl is-active foo\nactive\n", "shell") == [
        ("systemctl is-active foo", "active")]


def test_plain_text_readme_with_underlines_and_prompts() -> None:
    text = """Baz exporter
============

Install it with:

  $ sudo apt-get install baz-exporter

Then check it:

  $ curl http://127.0.0.1:9300/metrics
  baz_up 1

Configuration
-------------

 BAZ_OPTS=--web.listen-address=:9300
 BAZ_LOG=warn

The options above go in /etc/default/baz-exporter.
"""
    k = parse_text(text, "text/plain", "/tmp/README")
    assert k.title == "Baz exporter"
    assert [(c.command, c.output) for c in k.commands] == [
        ("sudo apt-get install baz-exporter", ""),
        ("curl http://127.0.0.1:9300/metrics", "baz_up 1")]
    assert k.ports == (9300,)
    assert k.verification == ("curl http://127.0.0.1:9300/metrics",)
    assert "/etc/default/baz-exporter" in config(k)
