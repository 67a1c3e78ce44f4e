"""Knowledge base: search latency over 10,000 stored passages (target: under 20 ms per
query; median and p95), and documentation parse throughput (pages per second).

In-process timings (``time.perf_counter`` around each call), not whole processes: what is
measured is the work the knowledge agent does inside a run. The passages are generated
(fixed seed) from a vocabulary of monitoring documentation plus random filler words, in
documents of 20 passages, as ``knowledge add`` stores them. The pages parsed are built
here (a messy HTML page, a Markdown README, a man page as text), plus Debian's real
documentation when tests/doc_server.py's cache has it (~/.cache/workflow-agent/test-docs).
"""

from __future__ import annotations

import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from _timing import Series, parse_args, print_table

_TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path[:0] = [str(_TESTS), str(_TESTS / "knowledge")]  # the pages the tests build

from workflow_agent.facts import Facts  # noqa: E402
from workflow_agent.knowledge.fetch import HTML, MARKDOWN, TEXT, Document  # noqa: E402
from workflow_agent.knowledge.parse import parse, parse_text  # noqa: E402
from workflow_agent.knowledge.store import KnowledgeBase  # noqa: E402

TARGET_MS = 20.0
DEFAULT_RUNS = 200
CHANGES_HOST = False
PASSAGES = 10_000
PER_DOCUMENT = 20
VOCABULARY = str.split("""
install configure service port listen metrics exporter agent systemd systemctl
apt-get package repository debian ubuntu rhel collector textfile scrape prometheus zabbix
munin collectd plugin interval hostname firewall tls certificate user group permission
daemon restart enable status verify curl journal log level timeout proxy network address
""")
FACTS = Facts(os_family="debian", distro="debian", distro_version="12", distro_codename="bookworm",
              arch="amd64", package_manager="apt", init_system="systemd")
QUERIES = ["listen port", "systemctl restart service", "install package debian",
           "prometheus scrape interval", "tls certificate", "zabbix agent hostname",
           "textfile collector", "firewall port", "verify metrics curl", "proxy timeout"]


def _passage(rng: random.Random) -> str:
    words = [rng.choice(VOCABULARY) if rng.random() < 0.3 else
             "".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(3, 9)))
             for _ in range(rng.randint(40, 120))]
    return " ".join(words) + "."


def fill(base: KnowledgeBase, rng: random.Random) -> None:
    """Store PASSAGES passages as documents of PER_DOCUMENT Markdown sections each."""
    for number in range(PASSAGES // PER_DOCUMENT):
        sections = "\n\n".join(f"## {rng.choice(VOCABULARY).title()} {n}\n\n{_passage(rng)}"
                               for n in range(PER_DOCUMENT))
        doc = Document(f"https://docs.example/{number}.md", MARKDOWN,
                       f"# Document {number}\n\n{sections}\n")
        base.add(doc, parse(doc), rng.choice(["foo-exporter", "bar-agent", None]))


def search_latency(runs: int) -> list[Series]:
    """Median and p95 of ``search`` and ``passages_for`` over the filled base."""
    rng = random.Random(5)
    with tempfile.TemporaryDirectory() as tmp, KnowledgeBase(Path(tmp) / "kb.db") as base:
        started = time.perf_counter()
        fill(base, rng)
        stored = base._db.execute("SELECT count(*) FROM passages").fetchone()[0]
        print(f"stored {stored} passages in {time.perf_counter() - started:.1f} s")
        series = [Series("search (any integration)", unit="ms", target=TARGET_MS),
                  Series("search --integration", unit="ms", target=TARGET_MS),
                  Series("passages_for (agent)", unit="ms", target=TARGET_MS)]
        calls: list[Callable[[str], object]] = [
                 lambda q: base.search(q, limit=10),
                 lambda q: base.search(q, "foo-exporter", limit=10),
                 lambda q: base.passages_for("foo-exporter", FACTS, limit=5)]
        for call in calls:
            call("warm up")
        for run in range(runs):
            query = QUERIES[run % len(QUERIES)]
            for one, call in zip(series, calls, strict=True):
                start = time.perf_counter()
                call(query)
                one.samples.append((time.perf_counter() - start) * 1000)
        for one in series:
            p95 = statistics.quantiles(one.samples, n=20)[-1]
            one.note = f"p95 {p95:.2f} ms"
        return series


def _pages() -> list[tuple[str, str, str]]:
    """(label, content type, text) of the pages parsed."""
    from test_parse import MESSY_HTML, MESSY_MARKDOWN  # type: ignore[import-not-found]

    pages = [("messy HTML (built)", HTML, MESSY_HTML),
             ("messy Markdown (built)", MARKDOWN, MESSY_MARKDOWN)]
    try:
        from doc_server import ensure_debian_docs  # type: ignore[import-not-found]
    except ImportError:
        return pages
    docs = ensure_debian_docs()
    if isinstance(docs, str):
        print(f"Debian documentation skipped: {docs}")
        return pages
    return [
        *pages,
        ("node_exporter README.md", MARKDOWN, docs.doc("prometheus-node-exporter/README.md.gz")),
        ("zabbix_agentd.8 groff HTML", HTML, docs.man("man8/zabbix_agentd.8", "html")),
        ("munin-node.conf.5 man text", TEXT, docs.man("man5/munin-node.conf.5", "utf8")),
        ("node-exporter.1 groff HTML", HTML, docs.man("man1/prometheus-node-exporter.1", "html")),
        ("collectd.conf.5 groff HTML (600 KB)", HTML, docs.man("man5/collectd.conf.5", "html")),
    ]


def parse_throughput(runs: int) -> list[Series]:
    """Pages per second for each page, parsed ``runs`` times (after one warm-up)."""
    rounds = max(1, runs // 10)
    series = []
    for label, content_type, text in _pages():
        one = Series(f"parse {label}", unit="pages/s",
                     note=f"{len(text) / 1024:.0f} KiB")
        parse_text(text, content_type)
        for _ in range(rounds):
            start = time.perf_counter()
            parse_text(text, content_type)
            one.samples.append(1 / (time.perf_counter() - start))
        series.append(one)
    return series


def main(runs: int) -> None:
    print_table(f"knowledge search: {PASSAGES} passages, {runs} queries each (ms per query)",
                search_latency(runs))
    print_table(f"knowledge parse throughput, {max(1, runs // 10)} rounds per page",
                parse_throughput(runs))


if __name__ == "__main__":
    main(parse_args(__doc__ or "", DEFAULT_RUNS).runs)
