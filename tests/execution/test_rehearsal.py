"""Rehearsals for real: namespaces, overlays, apt and daemons, no mocks.

The sandbox tests need root and the cached root file system (see ``tests/conftest.py``);
the local ones overlay this very host, so they also need root and a tmpfs ``/dev/shm``.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import socket
import stat
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

import pytest

from helpers import free_port, host_pids_with
from workflow_agent.errors import TargetError
from workflow_agent.execution.changes import BOOKKEEPING, ChangeSet, read_changes
from workflow_agent.execution.local import LocalTarget
from workflow_agent.execution.rehearsal import (
    Process,
    Rehearsal,
    rehearse,
    supports_rehearsal,
)
from workflow_agent.execution.sandbox import SandboxTarget
from workflow_agent.execution.target import OutputCallback, RunResult, Target
from workflow_agent.secrets import MASK, Redactor
from workflow_agent.verification.snapshot import (
    DEFAULT_IGNORE,
    Snapshot,
    SnapshotDiff,
    diff,
    ignore_regex,
    take_snapshot,
)

pytestmark = pytest.mark.sandbox
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

NODE_EXPORTER = """set -e
apt-get install -y --no-install-recommends -o Dpkg::Options::=--force-confdef \\
  -o Dpkg::Options::=--force-confold prometheus-node-exporter
install -d -o prometheus -g prometheus /run/prometheus /var/log/prometheus
echo 'ARGS="--web.listen-address=127.0.0.1:{port}"' > /etc/default/prometheus-node-exporter
/etc/init.d/prometheus-node-exporter start
"""
#: Paths neither the rehearsal nor the snapshot compares one by one.
UNLISTED = re.compile(ignore_regex((*DEFAULT_IGNORE, *BOOKKEEPING)) or "", re.DOTALL)


def snapshot(target: Target) -> Snapshot:
    return asyncio.run(take_snapshot(target, paths=["/"]))


def run_rehearsal(target: Target, script: str, **kwargs: object) -> Rehearsal:
    return asyncio.run(rehearse(target, script, **kwargs))  # type: ignore[arg-type]


def by_path(changes: ChangeSet) -> dict[str, str]:
    return {change.path: change.kind for change in changes.files}


Copies = list[tuple[Path, int]]


@pytest.fixture
def copies(monkeypatch: pytest.MonkeyPatch) -> Copies:
    """``(scratch dir, holder PID)`` of every rehearsal copy the test opens."""
    opened: Copies = []
    original = SandboxTarget.open

    async def recording_open(self: SandboxTarget) -> None:
        await original(self)
        if (self.name or "").startswith("rehearsal-of-"):
            assert self.scratch_path is not None and self.holder_pid is not None
            opened.append((self.scratch_path, self.holder_pid))

    monkeypatch.setattr(SandboxTarget, "open", recording_open)
    return opened


def assert_gone(copies: Copies) -> None:
    """Nothing of the copies is left: no directory, mount (in any namespace) or process."""
    assert copies, "no rehearsal copy was opened"
    for scratch, _holder in copies:
        assert not scratch.exists()
        assert host_pids_with(str(scratch).encode()) == []  # unshare and the holder
        mounted = []
        for entry in os.scandir("/proc"):
            try:
                if entry.name.isdigit() and str(scratch) in Path(entry.path,
                                                                 "mountinfo").read_text():
                    mounted.append(entry.name)
            except OSError:  # exited while we looked
                continue
        assert mounted == [], f"{scratch} is still mounted in the namespaces of {mounted}"
        findmnt = subprocess.run(["findmnt", "-rn", "-o", "TARGET"], capture_output=True,
                                 text=True, check=True)
        assert str(scratch) not in findmnt.stdout


def test_rehearsing_the_node_exporter_install_leaves_the_sandbox_untouched(
    sandbox: SandboxTarget, copies: Copies
) -> None:
    # An operator's own config already in the sandbox (its upper layer, not the rootfs).
    asyncio.run(sandbox.put("/etc/default/prometheus-node-exporter", b"# mine\nARGS=\"\"\n"))
    before = snapshot(sandbox)
    port = free_port()
    seen: list[tuple[str, str]] = []
    rehearsal = run_rehearsal(sandbox, NODE_EXPORTER.format(port=port), timeout=300,
                              on_output=lambda stream, line: seen.append((stream, line)))
    assert rehearsal.result.ok, rehearsal.result.stdout + rehearsal.result.stderr
    assert any("prometheus-node-exporter" in line for _, line in seen)  # streamed
    changes = rehearsal.changes
    assert "prometheus-node-exporter" in changes.packages_added
    assert changes.users_added == ["prometheus"] and "prometheus" in changes.groups_added
    files = {change.path: change for change in changes.files}
    binary = files["/usr/bin/prometheus-node-exporter"]
    assert (binary.kind, binary.type, binary.diff) == ("created", "file", None)
    assert binary.detail.startswith("binary, ")
    config = files["/etc/default/prometheus-node-exporter"]
    assert config.kind == "modified" and config.diff is not None
    assert '-ARGS=""' in config.diff and "-# mine" in config.diff
    assert f'+ARGS="--web.listen-address=127.0.0.1:{port}"' in config.diff
    started = [s for s in changes.services if s.startswith("started prometheus-node-exporter")]
    assert started and f"127.0.0.1:{port}" in started[0], changes.services
    assert "enabled prometheus-node-exporter.service (systemd, multi-user.target)" in (
        changes.services)
    assert "installed init script /etc/init.d/prometheus-node-exporter" in changes.services
    assert changes.bookkeeping > 0 and not any(p.startswith("/var/lib/dpkg/") for p in files)
    assert "+ package prometheus-node-exporter" in "\n".join(changes.lines())
    assert rehearsal.upper_bytes > 13_000_000  # at least the binary

    # The real sandbox: unchanged, package absent, and the daemon died with the copy.
    assert diff(before, snapshot(sandbox)).is_empty
    query = asyncio.run(sandbox.run("dpkg-query -W prometheus-node-exporter"))
    assert query.exit_code != 0 and "no packages found" in query.stderr
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port)):
        pass
    assert_gone(copies)


def test_the_prediction_matches_the_real_run(sandbox: SandboxTarget) -> None:
    script = NODE_EXPORTER.format(port=free_port())
    before = snapshot(sandbox)
    predicted = run_rehearsal(sandbox, script, timeout=300).changes
    real = asyncio.run(sandbox.run(script, timeout=300))
    assert real.ok, real.stdout + real.stderr
    observed: SnapshotDiff = diff(before, snapshot(sandbox))

    kinds = {"created": "added", "deleted": "removed", "modified": "modified",
             "metadata": "modified"}
    prediction = {path: kinds[kind] for path, kind in by_path(predicted).items()
                  if not UNLISTED.fullmatch(path)}
    reality = {path: kind for kind in ("added", "removed", "modified")
               for path in getattr(observed, kind) if not UNLISTED.fullmatch(path)}
    assert prediction == reality
    assert len(prediction) > 30  # the comparison compared something
    assert predicted.packages_added == observed.packages_added
    assert not predicted.packages_removed and not observed.packages_removed
    assert predicted.users_added == sorted(observed.users_added)
    assert predicted.groups_added == sorted(observed.groups_added)


def test_the_copy_sees_the_sandbox_as_it_is_now(sandbox: SandboxTarget) -> None:
    prepared = asyncio.run(sandbox.run(
        "set -e; printf 'one\\ntwo\\n' > /etc/wa-state; rm /etc/issue.net\n"
        "mkdir /opt/wa-dir; touch /opt/wa-dir/a /opt/wa-dir/b; chmod 600 /etc/issue"))
    assert prepared.ok, prepared.stderr
    before = snapshot(sandbox)
    script = """set -e
cat /etc/wa-state
[ -e /etc/issue.net ] || echo "issue.net is gone"
echo three >> /etc/wa-state
rm -r /opt/wa-dir; mkdir /opt/wa-dir; touch /opt/wa-dir/b
chmod 640 /etc/issue
touch /etc/hostname
"""
    rehearsal = run_rehearsal(sandbox, script)
    assert rehearsal.result.stdout == "one\ntwo\nissue.net is gone\n"
    assert by_path(rehearsal.changes) == {
        "/etc/wa-state": "modified",
        "/opt/wa-dir/a": "deleted",  # b was recreated empty: no change
        "/etc/issue": "metadata",  # relative to the sandbox's 0600, not the rootfs' 0644
    }
    files = {change.path: change for change in rehearsal.changes.files}
    assert files["/etc/issue"].detail == "mode 0600 -> 0640"
    assert files["/etc/wa-state"].diff is not None and "+three" in files["/etc/wa-state"].diff
    assert diff(before, snapshot(sandbox)).is_empty


@needs_root
def test_rehearsing_on_this_host_changes_nothing(sandbox_rootfs: Path, copies: Copies) -> None:
    base = "/etc/workflow-agent-rehearsal-test"
    created, edited = Path(f"{base}.conf"), Path(f"{base}-edited.conf")
    removed = Path(f"{base}-removed.conf")
    token = f"wa-secret-{secrets.token_hex(8)}"
    script = f"""set -e
echo "password=$WA_TOKEN" > {created}
echo "extra = yes" >> {edited}
chmod 600 {edited}
rm {removed}
cat /proc/sys/vm/swappiness > /proc/sys/vm/swappiness || echo "kernel settings are read-only"
"""
    try:
        edited.write_text("# edited by hand\nsetting = 1\n")
        edited.chmod(0o644)
        removed.write_text("obsolete\n")
        state = {p: (p.read_bytes(), stat.S_IMODE(p.stat().st_mode)) for p in (edited, removed)}
        rehearsal = run_rehearsal(LocalTarget(), script, env={"WA_TOKEN": token},
                                  redactor=Redactor([token]))
        assert rehearsal.result.ok, rehearsal.result.stderr
        assert rehearsal.result.stdout == "kernel settings are read-only\n"
        assert "Read-only file system" in rehearsal.result.stderr
        # The host: exactly as before.
        assert not created.exists()
        assert {p: (p.read_bytes(), stat.S_IMODE(p.stat().st_mode)) for p in state} == state
        files = {change.path: change for change in rehearsal.changes.files}
        assert {path: files[path].kind for path in files if path.startswith(base)} == {
            str(created): "created", str(edited): "modified", str(removed): "deleted"}
        new = files[str(created)].diff
        assert new is not None and f"+password={MASK}" in new and token not in new
        changed = files[str(edited)]
        assert changed.diff is not None and "+extra = yes" in changed.diff
        assert "mode 0644 -> 0600" in changed.detail
        assert files[str(removed)].detail == "was 9 B"
        assert_gone(copies)
    finally:
        for path in (created, edited, removed):
            path.unlink(missing_ok=True)


def test_a_failing_script_reports_what_it_did_first(
    sandbox: SandboxTarget, copies: Copies
) -> None:
    rehearsal = run_rehearsal(sandbox, "echo half > /etc/wa-half-done\nexit 3\necho never\n")
    assert rehearsal.result.exit_code == 3 and not rehearsal.result.timed_out
    assert by_path(rehearsal.changes) == {"/etc/wa-half-done": "created"}
    assert_gone(copies)
    with pytest.raises(FileNotFoundError):
        asyncio.run(sandbox.get("/etc/wa-half-done"))


@needs_root
def test_a_timeout_kills_everything_and_keeps_the_changes(
    sandbox_rootfs: Path, copies: Copies
) -> None:
    marker = f"9{secrets.randbelow(10**8):08d}"
    path = Path(f"/etc/workflow-agent-rehearsal-timeout-{marker}")
    script = f"""sleep {marker} >/dev/null 2>&1 &
setsid sleep {marker} >/dev/null 2>&1 < /dev/null &
echo before > {path}
echo started
sleep 60
echo never > {path}
"""
    began = time.monotonic()
    rehearsal = run_rehearsal(LocalTarget(), script, timeout=1)
    assert rehearsal.result.timed_out and rehearsal.result.exit_code == 124
    assert rehearsal.result.stdout == "started\n"
    assert time.monotonic() - began < 15
    assert by_path(rehearsal.changes) == {str(path): "created"}
    change = rehearsal.changes.files[0]
    assert change.diff is not None and "+before" in change.diff
    # The daemons that escaped the timeout were reported, then killed with the copy.
    sleepers = [s for s in rehearsal.changes.services if f"sleep {marker}" in s]
    assert len(sleepers) >= 1, rehearsal.changes.services
    assert host_pids_with(f"sleep\0{marker}".encode()) == []
    assert not path.exists()
    assert_gone(copies)


class _Elsewhere(Target):
    kind = "elsewhere"

    @property
    def identity(self) -> str:
        return "elsewhere"

    async def run(self, script: str, *, env: Mapping[str, str] | None = None,
                  timeout: float = 600.0, on_output: OutputCallback | None = None) -> RunResult:
        raise AssertionError("a rehearsal must never run on the target itself")

    async def put(self, path: str, data: bytes, mode: int = 0o644) -> None:
        raise AssertionError("never called")

    async def get(self, path: str) -> bytes:
        raise AssertionError("never called")


def test_which_targets_can_be_rehearsed(sandbox_rootfs: Path) -> None:
    assert supports_rehearsal(LocalTarget())
    assert supports_rehearsal(SandboxTarget(sandbox_rootfs))
    assert not supports_rehearsal(_Elsewhere())
    with pytest.raises(TargetError, match="not supported on elsewhere"):
        run_rehearsal(_Elsewhere(), "true")
    with pytest.raises(TargetError, match="not open"):
        run_rehearsal(SandboxTarget(sandbox_rootfs), "true")


@needs_root
def test_change_rules_on_a_hand_made_upper_dir(tmp_path: Path) -> None:
    """The overlay rules without an overlay: whiteouts, opaque dirs, copy-ups, packages."""
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    status = (
        "Package: dpkg\nStatus: install ok installed\nArchitecture: amd64\nVersion: 1.21\n\n"
        "Package: libc6\nStatus: install ok installed\nArchitecture: amd64\n"
        "Multi-Arch: same\nVersion: 2.36\n\n"
        "Package: old\nStatus: install ok installed\nArchitecture: all\nVersion: 1\n"
    )
    for root in (lower, upper):
        for directory in ("etc/app.d", "var/lib/dpkg", "etc/apt/sources.list.d", "etc/same"):
            (root / directory).mkdir(parents=True)
    (lower / "var/lib/dpkg/status").write_text(status)
    (lower / "etc/passwd").write_text("root:x:0:0::/root:/bin/bash\n")
    (lower / "etc/app.d/kept").write_text("kept\n")
    (lower / "etc/app.d/dropped").write_text("dropped\n")
    (lower / "etc/same/file").write_text("identical\n")
    (lower / "etc/mode").write_text("x\n")
    (lower / "etc/gone").mkdir()
    (lower / "etc/gone/inner").write_text("inner\n")
    # The upper dir: what overlayfs would have written.
    (upper / "var/lib/dpkg/status").write_text(
        status.replace("Package: old", "Package: new").replace("Version: 2.36", "Version: 2.37"))
    (upper / "etc/passwd").write_text("root:x:0:0::/root:/bin/bash\nsvc:x:100:100::/:/bin/false\n")
    (upper / "etc/same/file").write_text("identical\n")  # copied up, never changed
    (upper / "etc/mode").write_text("x\n")
    (upper / "etc/mode").chmod(0o600)
    (upper / "etc/app.d/kept").write_text("kept\n")  # recreated inside an opaque dir
    os.setxattr(upper / "etc/app.d", "trusted.overlay.opaque", b"y")
    os.mknod(upper / "etc/gone", stat.S_IFCHR | 0o600, os.makedev(0, 0))  # whiteout
    (upper / "etc/apt/sources.list.d/x.list").write_text(
        "deb https://user:hunter22@repo.example/debian stable main\n")
    (upper / "var/lib/dpkg/lock").write_text("")
    redactor = Redactor(["hunter22"])
    process = Process(pid=7, argv=("/usr/bin/x", "--pw=hunter22"), name="x")
    changes = read_changes(str(upper), str(lower), redactor=redactor,
                           running=[process.describe(redactor)])
    assert by_path(changes) == {
        "/etc/app.d/dropped": "deleted", "/etc/gone": "deleted", "/etc/gone/inner": "deleted",
        "/etc/mode": "metadata", "/etc/passwd": "modified",
        "/etc/apt/sources.list.d/x.list": "created",
    }
    assert changes.packages_added == {"new": "1"} and changes.packages_removed == {"old": "1"}
    assert changes.packages_changed == {"libc6:amd64": ("2.36", "2.37")}
    assert changes.users_added == ["svc"] and changes.users_removed == []
    assert changes.bookkeeping == 2  # the status file and the lock
    assert changes.services == [f"started x (pid 7, /usr/bin/x --pw={MASK})"]
    assert changes.repositories == [
        "added apt source /etc/apt/sources.list.d/x.list: "
        "deb https://****@repo.example/debian stable main"]
    lines = changes.lines()
    assert "~ /etc/mode (file; mode 0644 -> 0600)" in lines and not changes.is_empty
    (tmp_path / "empty").mkdir()
    assert read_changes(str(tmp_path / "empty"), str(lower)).is_empty
