"""The sandbox target, for real: namespaces, overlay, apt and daemons, no mocks.

Needs root and the cached root file system (see ``tests/conftest.py``); the first run on
a machine builds it (~15 s, needs the Debian archive).
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import os
import shutil
import socket
import tarfile
import threading
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from helpers import free_port, host_pids_with, run_sh, unique_sleep
from workflow_agent.errors import SandboxToolingMissingError, TargetError, TargetUnreachableError
from workflow_agent.execution.rootfs import SANDBOX_HOSTNAME, SCRATCH_PREFIX, RootfsCache
from workflow_agent.execution.sandbox import SandboxTarget

pytestmark = pytest.mark.sandbox

Factory = Callable[..., SandboxTarget]
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_stdout_stderr_and_exit_code_come_back(sandbox: SandboxTarget) -> None:
    seen: list[tuple[str, str]] = []
    result = asyncio.run(
        sandbox.run(
            "echo out; echo err >&2; hostname; exit 7",
            on_output=lambda stream, line: seen.append((stream, line)),
        )
    )
    assert result.exit_code == 7 and not result.timed_out and not result.ok
    assert result.stdout == f"out\n{SANDBOX_HOSTNAME}\n"
    assert result.stderr == "err\n"
    assert ("stdout", "out") in seen and ("stderr", "err") in seen
    assert run_sh(sandbox, "true").ok
    assert sandbox.identity.startswith("sandbox:workflow-agent-sandbox-")
    assert asyncio.run(sandbox.get("/etc/hostname")) == f"{SANDBOX_HOSTNAME}\n".encode()


def test_changes_never_touch_the_cached_rootfs(
    sandbox_factory: Factory, sandbox_rootfs: Path
) -> None:
    passwd, version = sandbox_rootfs / "etc/passwd", sandbox_rootfs / "etc/debian_version"
    before = sha256(passwd), sha256(version)
    first = sandbox_factory()
    script = (
        "set -e\n"
        "echo 'intruder:x:4242:4242::/:/bin/false' >> /etc/passwd\n"
        "rm /etc/debian_version\n"
        "mkdir -p /usr/local/wa && echo new > /usr/local/wa/file\n"
    )
    assert run_sh(first, script).ok
    assert b"intruder" in asyncio.run(first.get("/etc/passwd"))
    with pytest.raises(FileNotFoundError):
        asyncio.run(first.get("/etc/debian_version"))
    assert (sha256(passwd), sha256(version)) == before
    assert not (sandbox_rootfs / "usr/local/wa").exists()
    # A second sandbox starts from the pristine tree.
    second = sandbox_factory()
    assert b"intruder" not in asyncio.run(second.get("/etc/passwd"))
    assert asyncio.run(second.get("/etc/debian_version")) == version.read_bytes()


def test_daemon_outlives_its_run_and_dies_with_close(sandbox_factory: Factory) -> None:
    target = sandbox_factory()
    marker = unique_sleep()
    needle = f"sleep\0{marker}".encode()
    started = run_sh(
        target,
        "start-stop-daemon --start --background --make-pidfile --pidfile /run/sleeper.pid "
        f"--exec /usr/bin/sleep -- {marker}",
    )
    assert started.ok, started.stderr
    assert run_sh(target, "kill -0 $(cat /run/sleeper.pid) && echo alive").stdout == "alive\n"
    assert len(host_pids_with(needle)) == 1
    holder, scratch = target.holder_pid, target.scratch_path
    assert holder is not None and scratch is not None and scratch.is_dir()

    asyncio.run(target.close())
    assert host_pids_with(needle) == []
    assert not Path(f"/proc/{holder}").exists()
    assert host_pids_with(str(scratch).encode()) == []  # unshare and holder both gone
    assert not scratch.exists()
    asyncio.run(target.close())  # idempotent
    with pytest.raises(TargetError):
        run_sh(target, "true")


def test_apt_install_and_run_node_exporter(sandbox: SandboxTarget) -> None:
    port = free_port()
    install = f"""set -e
apt-get install -y --no-install-recommends prometheus-node-exporter
mkdir -p /run/prometheus /var/log/prometheus
chown prometheus: /run/prometheus /var/log/prometheus
echo 'ARGS="--web.listen-address=127.0.0.1:{port}"' > /etc/default/prometheus-node-exporter
/etc/init.d/prometheus-node-exporter start
"""
    installed = run_sh(sandbox, install, timeout=300)
    assert installed.ok, installed.stdout + installed.stderr
    fetch = f"""
for i in $(seq 100); do
  if {{ exec 3<>/dev/tcp/127.0.0.1/{port}; }} 2>/dev/null; then break; fi
  sleep 0.1
done
printf 'GET /metrics HTTP/1.0\\r\\n\\r\\n' >&3
cat <&3
"""
    metrics = run_sh(sandbox, fetch, timeout=60)  # a later run: the daemon kept running
    assert metrics.stdout.startswith("HTTP/1.0 200 OK")
    assert "node_exporter_build_info" in metrics.stdout
    # Network "host" shares the host's stack: the port is reachable from the host too.
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert b"node_cpu_seconds_total" in response.read()

    asyncio.run(sandbox.close())
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port)):
        pass


def test_network_none_has_loopback_but_no_archive(
    sandbox_factory: Factory, sandbox: SandboxTarget
) -> None:
    archive = socket.getaddrinfo("deb.debian.org", 80, socket.AF_INET)[0][4][0]
    probe = (
        f"if {{ exec 3<>/dev/tcp/{archive}/80; }} 2>/dev/null; "
        "then echo reached; else echo unreachable; fi"
    )
    assert run_sh(sandbox, probe, timeout=30).stdout == "reached\n"  # positive control

    isolated = sandbox_factory(network="none")
    assert run_sh(isolated, probe, timeout=30).stdout == "unreachable\n"
    assert run_sh(isolated, "ls /sys/class/net").stdout == "lo\n"
    apt = run_sh(
        isolated,
        "apt-get -o Acquire::Retries=0 install -y --no-install-recommends hello",
        timeout=120,
    )
    assert apt.exit_code != 0 and "Failed to fetch" in apt.stdout + apt.stderr
    # Loopback works, on a port that may well be busy on the host: own network stack.
    loopback = run_sh(
        isolated,
        """perl -MIO::Socket::INET -e '
  $s = IO::Socket::INET->new(LocalAddr => "127.0.0.1:9100", Listen => 1, ReuseAddr => 1)
    or die "listen: $!";
  $c = $s->accept; print $c "pong\\n"; close $c' &
for i in $(seq 100); do
  if { exec 3<>/dev/tcp/127.0.0.1/9100; } 2>/dev/null; then break; fi
  sleep 0.05
done
cat <&3
""",
        timeout=30,
    )
    assert loopback.stdout == "pong\n", loopback.stderr


def test_two_sandboxes_are_isolated(sandbox_factory: Factory) -> None:
    one, two = sandbox_factory(), sandbox_factory(name="second")
    assert one.identity != two.identity and two.identity == "sandbox:second"
    marker = unique_sleep()
    assert run_sh(
        one,
        f"echo one > /etc/which; echo one > /tmp/which; sleep {marker} >/dev/null 2>&1 &",
    ).ok
    assert run_sh(two, "echo two > /etc/which").ok
    assert asyncio.run(one.get("/etc/which")) == b"one\n"
    assert asyncio.run(two.get("/etc/which")) == b"two\n"
    with pytest.raises(FileNotFoundError):
        asyncio.run(two.get("/tmp/which"))
    list_processes = "for f in /proc/[0-9]*/cmdline; do tr '\\0' ' ' < $f; echo; done"
    assert f"sleep {marker}" in run_sh(one, list_processes).stdout
    assert f"sleep {marker}" not in run_sh(two, list_processes).stdout


def test_scratch_on_tmpfs_works(sandbox_factory: Factory) -> None:
    target = sandbox_factory(scratch_dir=Path("/dev/shm"))
    assert target.scratch_path is not None and target.scratch_path.parent == Path("/dev/shm")
    assert run_sh(target, "echo hi > /root/x && cat /root/x").stdout == "hi\n"


@needs_root
def test_missing_tools_are_reported(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, sandbox_rootfs: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on PATH at all
    with pytest.raises(SandboxToolingMissingError) as missing:
        asyncio.run(SandboxTarget(sandbox_rootfs).open())
    assert (missing.value.tool, missing.value.package) == ("unshare", "util-linux")
    with pytest.raises(SandboxToolingMissingError) as missing:
        RootfsCache(tmp_path / "cache").ensure()
    assert (missing.value.tool, missing.value.package) == ("mmdebstrap", "mmdebstrap")


def _tools_dir(tmp_path: Path, mmdebstrap: str | None = None) -> Path:
    tools = tmp_path / "bin"
    tools.mkdir()
    tar = shutil.which("tar")
    assert tar is not None
    (tools / "tar").symlink_to(tar)
    if mmdebstrap is not None:
        (tools / "mmdebstrap").write_text(f"#!/bin/sh\n{mmdebstrap}\n")
        (tools / "mmdebstrap").chmod(0o755)
    return tools


@needs_root
def test_rootfs_cache_extracts_a_kept_tarball_once(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cache = RootfsCache(tmp_path / "cache")
    cache.tarball.parent.mkdir(parents=True)
    with tarfile.open(cache.tarball, "w") as tar:
        for name, text in {"etc/hostname": "buildhost\n", "etc/resolv.conf": "x\n"}.items():
            source = tmp_path / name.replace("/", "_")
            source.write_text(text)
            tar.add(source, arcname=name)
    # No mmdebstrap on PATH: the kept tarball must be reused, not rebuilt.
    monkeypatch.setenv("PATH", str(_tools_dir(tmp_path)))
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(cache.ensure())) for _ in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [cache.root_dir, cache.root_dir]
    assert (cache.root_dir / "etc/hostname").read_text() == f"{SANDBOX_HOSTNAME}\n"
    assert (cache.root_dir / "etc/resolv.conf").read_text() == ""
    leftovers = {p.name for p in cache.root_dir.parent.iterdir()}
    assert leftovers == {cache.root_dir.name, cache.tarball.name, ".bookworm-minbase.lock"}


@needs_root
def test_rootfs_build_failure_shows_mmdebstrap_output(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    tools = _tools_dir(tmp_path, mmdebstrap='echo "E: cannot reach the mirror"; exit 1')
    monkeypatch.setenv("PATH", str(tools))
    cache = RootfsCache(tmp_path / "cache")
    with pytest.raises(TargetError, match="cannot reach the mirror"):
        cache.ensure()
    assert not cache.root_dir.exists() and not cache.tarball.exists()


def test_a_broken_rootfs_fails_clearly_and_leaves_nothing(
    sandbox_rootfs: Path, tmp_path: Path
) -> None:
    fake = tmp_path / "not-a-debian"
    (fake / "usr/bin").mkdir(parents=True)
    (fake / "usr/bin/bash").write_text("")  # passes the quick check; no /proc to mount on
    target = SandboxTarget(fake, scratch_dir=tmp_path)
    with pytest.raises(TargetUnreachableError, match="proc"):
        asyncio.run(target.open())
    assert not list(tmp_path.glob(SCRATCH_PREFIX + "*"))
    assert host_pids_with(str(tmp_path).encode()) == []


def test_stale_scratch_directories_are_swept(sandbox_factory: Factory, tmp_path: Path) -> None:
    def scratch(name: str, lock: bytes | None) -> Path:
        path = tmp_path / f"{SCRATCH_PREFIX}{name}"
        (path / "upper").mkdir(parents=True)
        if lock is not None:
            (path / "lock").write_bytes(lock)
        return path

    stale = scratch("stale", b"12345\n")  # owner SIGKILLed: nobody holds the lock
    starting = scratch("starting", b"")  # owner between creating and locking the file
    unmarked = scratch("unmarked", None)
    alive = scratch("alive", b"1\n")
    with open(alive / "lock", "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        target = sandbox_factory(scratch_dir=tmp_path)
        assert target.scratch_path is not None and target.scratch_path.is_dir()
        assert not stale.exists()
        assert starting.exists() and unmarked.exists() and alive.exists()
