"""Checks against real processes, sockets and HTTP servers on this host, via LocalTarget."""

from __future__ import annotations

import asyncio
import math
import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
from pydantic import TypeAdapter

from helpers import free_port
from workflow_agent.execution.local import LocalTarget
from workflow_agent.execution.sandbox import SandboxTarget
from workflow_agent.execution.target import RunResult
from workflow_agent.verification.checks import (
    CheckResult,
    CheckSpec,
    CheckSpecError,
    FileContains,
    HttpEndpoint,
    PackageInstalled,
    PortListening,
    ProcessRunning,
    PrometheusMetrics,
    _decode_proc_address,
    parse_check,
    parse_exposition,
    run_checks,
)
from workflow_agent.verification.http import parse_http_response

EXPOSITION = r"""# HELP http_requests_total The total number of HTTP requests.
# TYPE http_requests_total counter
http_requests_total{method="post",code="200"} 1027 1395066363000
http_requests_total{method="post",code="400"}    3 1395066363000

# Escaping in label values:
msdos_file_access_time_seconds{path="C:\\DIR\\F.TXT",error="Cannot find:\n\"F.TXT\""} 1.458e9
weird{a="x,y=}",b="q\"r",} NaN
metric_without_timestamp_and_labels 12.47
something_weird{problem="division by zero"} +Inf -3982045

# HELP http_request_duration_seconds A histogram of the request duration.
# TYPE http_request_duration_seconds histogram
http_request_duration_seconds_bucket{le="0.05"} 24054
http_request_duration_seconds_bucket{le="+Inf"} 144320
http_request_duration_seconds_sum 53423
http_request_duration_seconds_count 144320
# HELP rpc_duration_seconds A summary of the RPC duration in seconds.
# TYPE rpc_duration_seconds summary
rpc_duration_seconds{quantile="0.5"} 4773
rpc_duration_seconds{quantile="0.99"} 76656
rpc_duration_seconds_sum 1.7560473e+07
rpc_duration_seconds_count 2693
# TYPE empty_histogram histogram
jobs_count 7
"""

ROUTES: dict[str, tuple[int, bytes]] = {
    "/": (200, b"hello from the test server\n"),
    "/metrics": (200, EXPOSITION.encode()),
    "/long": (200, b"x" * 200_000 + b" needle"),  # one 200 kB line: over asyncio's 64 KiB
    "/broken-metrics": (200, b'foo{a="b} 1\n'),
}


class _Handler(BaseHTTPRequestHandler):
    requests: ClassVar[list[tuple[str, str | None]]] = []

    def do_GET(self) -> None:
        self.requests.append((self.requestline, self.headers.get("Host")))
        status, body = ROUTES.get(self.path, (404, b"not found\n"))
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Keep the test output clean."""


@contextmanager
def http_server(port: int = 0, delay: float = 0.0) -> Iterator[int]:
    """Serve ROUTES on 127.0.0.1 in a thread, starting after ``delay`` seconds."""
    holder: list[ThreadingHTTPServer] = []
    ready = threading.Event()

    def serve() -> None:
        time.sleep(delay)
        server = ThreadingHTTPServer(("127.0.0.1", port), _Handler)
        holder.append(server)
        ready.set()
        server.serve_forever(poll_interval=0.05)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    if not delay:
        ready.wait(5)
    try:
        yield holder[0].server_address[1] if not delay else port
    finally:
        ready.wait(delay + 5)
        holder[0].shutdown()
        holder[0].server_close()
        thread.join(5)


@pytest.fixture()
def server_port() -> Iterator[int]:
    with http_server() as port:
        yield port


def run(check: CheckSpec) -> CheckResult:
    return asyncio.run(check.run(LocalTarget()))


# -- package / process / port / file ------------------------------------------------------


def test_package_installed_real_and_missing() -> None:
    ok = run(PackageInstalled(package="bash"))
    assert ok.passed and ok.name == "package bash installed" and ok.type == "package_installed"
    assert ok.detail.startswith("bash ") and ok.attempts == 1
    missing = run(PackageInstalled(package="wa-no-such-package"))
    assert not missing.passed
    assert "not installed" in missing.detail and "no packages found" in missing.detail


@pytest.mark.parametrize("long_name", [False, True])
def test_process_running_finds_a_uniquely_named_sleep(tmp_path: Path, long_name: bool) -> None:
    # Long names exceed comm's 15 bytes: found through argv[0]. Short names are found
    # through comm even when argv[0] says something else.
    name = f"wa-sleep-{uuid.uuid4().hex[:20 if long_name else 6]}"
    binary = tmp_path / name
    shutil.copy("/bin/sleep", binary)
    argv = [str(binary), "30"] if long_name else ["something-else", "30"]
    proc = subprocess.Popen(argv, executable=binary)
    try:
        result = run(ProcessRunning(name=name))
        assert result.passed, result.detail
        assert result.detail == f"running as pid {proc.pid}"
    finally:
        proc.kill()
        proc.wait()
    gone = run(ProcessRunning(name=name))
    assert not gone.passed
    assert gone.detail.startswith(f"no process named {name!r} among ")


def test_process_running_ignores_its_own_scan() -> None:
    # The probe runs in bash; "bash" matches other shells, never only the probe itself.
    result = run(ProcessRunning(name="wa-nonexistent"))
    assert not result.passed


def test_port_listening(server_port: int) -> None:
    ok = run(PortListening(port=server_port))
    assert ok.passed and ok.detail.startswith(f"listening on 127.0.0.1:{server_port} (pid ")
    assert ok.name == f"port {server_port} listening"
    assert run(PortListening(port=server_port, host="127.0.0.1")).passed
    elsewhere = run(PortListening(port=server_port, host="10.1.2.3"))
    assert not elsewhere.passed
    assert elsewhere.detail == f"listening only on 127.0.0.1:{server_port}, not 10.1.2.3"


def test_port_listening_ipv6_wildcard_serves_ipv4() -> None:
    with socket.socket(socket.AF_INET6) as sock:
        sock.bind(("::", 0))
        sock.listen()
        port = sock.getsockname()[1]
        result = run(PortListening(port=port, host="127.0.0.1"))
    assert result.passed and result.detail == f"listening on [::]:{port} (pid {os.getpid()})"


@pytest.mark.sandbox
def test_port_held_outside_the_target_does_not_count(sandbox: SandboxTarget) -> None:
    """A sandbox sharing the host network sees the host's sockets; they prove nothing."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        result = asyncio.run(PortListening(port=port).run(sandbox))
    assert not result.passed
    assert "no process on this target owns the socket" in result.detail


def test_port_with_nothing_listening_fails_clearly() -> None:
    port = free_port()
    result = run(PortListening(port=port))
    assert not result.passed and result.detail == f"nothing is listening on TCP port {port}"


def test_proc_net_addresses_decode_for_both_byte_orders() -> None:
    assert str(_decode_proc_address("0100007F", little_endian=True)) == "127.0.0.1"
    assert str(_decode_proc_address("7F000001", little_endian=False)) == "127.0.0.1"
    assert str(_decode_proc_address("00000000000000000000000001000000", True)) == "::1"
    assert str(_decode_proc_address("00000000000000000000000000000001", False)) == "::1"


def test_file_contains(tmp_path: Path) -> None:
    path = tmp_path / "config file.yml"
    path.write_text("listen: 0.0.0.0:9100\nlevel: info\n")
    assert run(FileContains(path=str(path), text="level: info")).passed
    assert run(FileContains(path=str(path), regex=r"^listen: .*:9100$")).passed
    assert run(FileContains(path=str(path))).detail.endswith("bytes checked")
    no = run(FileContains(path=str(path), text="debug"))
    assert not no.passed and no.detail == "does not contain 'debug'"
    assert run(FileContains(path=str(tmp_path / "absent"))).detail == "does not exist"
    assert run(FileContains(path=str(tmp_path))).detail == "not a regular file"


# -- HTTP and metrics -------------------------------------------------------------------


def test_http_endpoint_status_and_body(server_port: int) -> None:
    base = f"http://127.0.0.1:{server_port}"
    ok = run(HttpEndpoint(url=f"{base}/", contains="hello"))
    assert ok.passed and ok.detail == "HTTP 200, 27 bytes"
    assert _Handler.requests[-1] == ("GET / HTTP/1.0", f"127.0.0.1:{server_port}")
    assert run(HttpEndpoint(url=f"{base}/nope", status=404)).passed
    wrong = run(HttpEndpoint(url=f"{base}/nope"))
    assert not wrong.passed and wrong.detail.startswith("HTTP 404 (expected 200)")
    lacks = run(HttpEndpoint(url=f"{base}/", contains="goodbye"))
    assert not lacks.passed and "lacks 'goodbye'" in lacks.detail
    # A body that is one very long line still arrives whole (base64 in short lines).
    assert run(HttpEndpoint(url=f"{base}/long", contains="needle")).passed


def test_http_endpoint_nothing_listening_and_https() -> None:
    port = free_port()
    refused = run(HttpEndpoint(url=f"http://127.0.0.1:{port}/"))
    assert not refused.passed
    assert refused.detail == f"cannot connect to 127.0.0.1:{port}: Connection refused"
    https = asyncio.run(run_checks(LocalTarget(), [HttpEndpoint(url="https://127.0.0.1/")]))
    assert not https[0].passed and https[0].attempts == 1  # retrying cannot help
    assert "https:// is not supported by this check" in https[0].detail


def test_prometheus_metrics(server_port: int) -> None:
    url = f"http://127.0.0.1:{server_port}/metrics"
    names = ["http_requests_total", "http_request_duration_seconds", "rpc_duration_seconds_sum"]
    ok = run(PrometheusMetrics(url=url, metrics=names))
    assert ok.passed, ok.detail
    assert ok.detail == "all 3 metrics present; 15 samples in 9 families"
    missing = run(PrometheusMetrics(url=url, metrics=["node_cpu_seconds_total", "jobs_count",
                                                      "empty_histogram"]))
    assert not missing.passed
    assert missing.detail == (
        "missing node_cpu_seconds_total, empty_histogram; 15 samples in 9 families"
    )
    few = run(PrometheusMetrics(url=url, metrics=["http_requests_total"], min_samples=3))
    assert few.detail.startswith("missing http_requests_total (2 samples)")
    broken = run(PrometheusMetrics(url=f"http://127.0.0.1:{server_port}/broken-metrics",
                                   metrics=["foo"]))
    assert not broken.passed and broken.detail.startswith("invalid exposition format: line 1")


def test_run_checks_waits_for_a_late_server() -> None:
    port = free_port()
    checks: list[CheckSpec] = [
        PortListening(port=port),
        HttpEndpoint(url=f"http://127.0.0.1:{port}/"),
        PrometheusMetrics(url=f"http://127.0.0.1:{port}/metrics", metrics=["jobs_count"]),
        PackageInstalled(package="bash"),
    ]
    with http_server(port, delay=1.0):
        started = time.monotonic()
        results = asyncio.run(run_checks(LocalTarget(), checks, timeout=10, interval=0.2))
        elapsed = time.monotonic() - started
    assert [r.passed for r in results] == [True] * 4, [r.detail for r in results]
    assert all(r.attempts > 1 for r in results[:3]) and results[3].attempts == 1
    assert 0.9 < elapsed < 5
    assert results[0].duration > 0.9


def test_run_checks_gives_up_at_the_deadline() -> None:
    port = free_port()
    started = time.monotonic()
    [result] = asyncio.run(run_checks(LocalTarget(), [PortListening(port=port)],
                                      timeout=1.0, interval=0.2))
    assert not result.passed and result.attempts >= 3
    assert 0.6 < time.monotonic() - started < 3  # stops once another try would overrun


# -- parsing specs ----------------------------------------------------------------------


def test_parse_check_builds_each_type() -> None:
    check = parse_check({"type": "port_listening", "port": 9100})
    assert check == PortListening(port=9100)
    # Templated values arrive as strings; integers in strings are accepted.
    assert parse_check({"type": "port_listening", "port": "9100"}) == PortListening(port=9100)
    metrics = parse_check({"type": "prometheus_metrics", "url": "http://localhost:9100/metrics",
                           "metrics": ["node_load1"]})
    assert isinstance(metrics, PrometheusMetrics) and metrics.min_samples == 1
    adapter: TypeAdapter[CheckSpec] = TypeAdapter(CheckSpec)
    assert adapter.validate_json(adapter.dump_json(metrics)) == metrics


@pytest.mark.parametrize(
    ("data", "message", "field"),
    [
        ({"type": "port_open", "port": 1}, "unknown check type 'port_open'; expected one of:",
         "type"),
        ({"port": 1}, "check has no 'type'", "type"),
        ({"type": "port_listening"}, "missing required field 'port'", "port"),
        ({"type": "port_listening", "port": 70000}, "field 'port': Input should be less", "port"),
        ({"type": "port_listening", "port": True}, "expected an integer, got a boolean", "port"),
        ({"type": "port_listening", "port": 1, "prot": 2}, "unknown field 'prot'", "prot"),
        ({"type": "port_listening", "port": 1, "host": "localhost"},
         "host must be an IP address", "host"),
        ({"type": "http_endpoint", "url": "ftp://x/"}, "expected an http:// URL", "url"),
        ({"type": "file_contains", "path": "/x", "regex": "("},
         "not a valid regular expression '('", "regex"),
        ({"type": "prometheus_metrics", "url": "http://x/", "metrics": []},
         "field 'metrics': List should have at least 1 item", "metrics"),
    ],
)
def test_parse_check_errors_are_clear(data: dict[str, object], message: str, field: str) -> None:
    with pytest.raises(CheckSpecError) as info:
        parse_check(data)
    assert message in str(info.value)
    assert info.value.field == field
    assert isinstance(info.value, ValueError)


def test_checks_are_frozen() -> None:
    check = PortListening(port=1)
    with pytest.raises(ValueError, match="frozen"):
        check.port = 2  # type: ignore[misc]


# -- the exposition parser --------------------------------------------------------------


def test_parse_exposition_families_labels_and_values() -> None:
    families = parse_exposition(EXPOSITION)
    assert list(families) == [
        "http_requests_total", "http_request_duration_seconds", "rpc_duration_seconds",
        "empty_histogram", "msdos_file_access_time_seconds", "weird",
        "metric_without_timestamp_and_labels", "something_weird", "jobs_count",
    ]
    requests = families["http_requests_total"]
    assert [(s.labels, s.value, s.timestamp) for s in requests] == [
        ({"method": "post", "code": "200"}, 1027.0, 1395066363000.0),
        ({"method": "post", "code": "400"}, 3.0, 1395066363000.0),
    ]
    [msdos] = families["msdos_file_access_time_seconds"]
    assert msdos.labels == {"path": "C:\\DIR\\F.TXT", "error": 'Cannot find:\n"F.TXT"'}
    [weird] = families["weird"]
    assert weird.labels == {"a": "x,y=}", "b": 'q"r'} and math.isnan(weird.value)
    [inf] = families["something_weird"]
    assert inf.value == math.inf and inf.timestamp == -3982045
    histogram = families["http_request_duration_seconds"]
    assert [s.name for s in histogram] == ["http_request_duration_seconds_bucket"] * 2 + [
        "http_request_duration_seconds_sum", "http_request_duration_seconds_count"]
    assert histogram[1].labels == {"le": "+Inf"}
    summary = families["rpc_duration_seconds"]
    assert len(summary) == 4 and summary[2].value == 1.7560473e07
    assert families["empty_histogram"] == []
    assert "jobs_count" in families  # no TYPE for "jobs": its own family


def test_parse_exposition_edge_cases() -> None:
    text = (
        '  spaced_metric { a = "1" , b="2" }   -1.5e-3  \r\n'
        '{"my.dotted.metric", env="prod"} 1\n'
        '# TYPE "quoted.counter" counter\n'
        '"quoted.counter_total" 1\n'  # not valid: quoted names live inside braces
    )
    with pytest.raises(ValueError, match="line 4"):
        parse_exposition(text)
    families = parse_exposition(text.rsplit("\n", 2)[0])
    assert families["spaced_metric"][0].labels == {"a": "1", "b": "2"}
    assert families["spaced_metric"][0].value == -0.0015
    assert families["my.dotted.metric"][0].labels == {"env": "prod"}
    assert families["quoted.counter"] == []
    counter = parse_exposition("# TYPE jobs counter\njobs_total 3\njobs_created 1.7e9\n")
    assert [s.name for s in counter["jobs"]] == ["jobs_total", "jobs_created"]
    assert parse_exposition("# just a comment\n# EOF\n") == {}


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('foo{a="b} 1', "malformed labels"),
        ("foo{a=b} 1", "malformed labels"),
        ('foo{a="1",a="2"} 1', "duplicate label 'a'"),
        ("foo", "missing value"),
        ("foo one", "invalid value 'one'"),
        ("foo 1 2 3", "unexpected '3'"),
        ("foo 1_000", "invalid value"),
        ("# TYPE foo blah", "unknown metric type 'blah'"),
        ('{a="b"} 1', "missing metric name"),
        ('foo{"x"} 1', "label 'x' has no value"),
    ],
)
def test_parse_exposition_rejects_malformed_lines(line: str, problem: str) -> None:
    with pytest.raises(ValueError, match="line 2: ") as info:
        parse_exposition("ok_metric 1\n" + line + "\n")
    assert problem in str(info.value)


def test_parse_http_response_chunked_and_garbage() -> None:
    raw = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
    response = parse_http_response(raw)
    assert response.status == 200 and response.body == b"hello world"
    with pytest.raises(ValueError, match="not an HTTP response"):
        parse_http_response(b"SSH-2.0-OpenSSH_9.2\r\n")


def test_script_checks_share_one_run_per_attempt(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "app.conf"
    config.write_text(f"port={port}\n")
    target = LocalTarget()
    runs: list[str] = []
    real = target.run

    async def counted(script: str, **kwargs: Any) -> RunResult:
        runs.append(script)
        return await real(script, **kwargs)

    target.run = counted  # type: ignore[method-assign]
    checks: list[CheckSpec] = [PortListening(port=port),
                               FileContains(path=str(config), text=f"port={port}")]
    with http_server(port, delay=1.0):
        listening, contains = asyncio.run(run_checks(target, checks, timeout=10,
                                                     interval=0.2))
    assert listening.passed and contains.passed, (listening.detail, contains.detail)
    # Both in the first run; the port alone in the others, once per attempt.
    assert listening.attempts > 1 and contains.attempts == 1
    assert len(runs) == listening.attempts
    assert str(config) in runs[0] and all(str(config) not in script for script in runs[1:])
