"""The change journal's process list (``_processes_body``, parsed by
``_parse_processes``), on this host via LocalTarget: what it reads must be what /proc
holds, read here in Python."""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from workflow_agent.errors import ExecutionFailedError
from workflow_agent.execution.journal import ProcessInfo
from workflow_agent.execution.journal_probe import (
    RUN_MARKER,
    UNIT_LINES,
    Sections,
    _parse_processes,
    _processes_body,
)
from workflow_agent.execution.local import LocalTarget
from workflow_agent.execution.target import RunResult, run_parts

# An argument with a colon, a newline, a byte that is not UTF-8, and an empty one.
ODD_ARGS = ["a:b", "c\nd: e", os.fsdecode(b"\xff-\xfe"), ""]


def from_proc(pid: int, marker: str = "") -> ProcessInfo | None:
    """What /proc says of ``pid`` (None for a kernel thread, or when it is gone), as the
    listing is meant to read it."""
    proc = Path(f"/proc/{pid}")
    try:
        cmdline = (proc / "cmdline").read_bytes()
        stat = (proc / "stat").read_bytes()
        status = (proc / "status").read_text()
        cgroups = (proc / "cgroup").read_text().splitlines()
    except OSError:
        return None
    if not cmdline:
        return None
    args = cmdline[:-1] if cmdline.endswith(b"\0") else cmdline
    ids = {line.split()[0]: int(line.split()[1]) for line in status.splitlines()
           if line.startswith(("Uid:", "Gid:"))}
    fields = stat.rpartition(b") ")[2].split()
    # The unit: from systemd's own hierarchy (cgroup v1, hybrid), else the unified one.
    paths = {line.split(":", 2)[1]: line.split(":", 2)[2] for line in cgroups
             if line.count(":") >= 2 and line.split(":", 2)[1] in ("", "name=systemd")}
    name = (paths.get("name=systemd") or paths.get("") or "").rpartition("/")[2]
    unit = name if name.endswith(".service") else None
    try:
        marked = bool(marker) and marker.encode() in (proc / "environ").read_bytes().split(b"\0")
    except OSError:
        marked = False

    def link(name: str) -> str:
        try:
            return os.readlink(proc / name)
        except OSError:
            return ""

    return ProcessInfo(
        pid=pid, start=fields[19].decode(), uid=ids["Uid:"], gid=ids["Gid:"],
        exe=link("exe"), cwd=link("cwd") or "/",
        argv=[arg.decode("utf-8", "surrogateescape") for arg in args.split(b"\0")],
        unit=unit, marked=marked,
        daemon=fields[1] in (b"0", b"1") or int(fields[3]) == pid or unit is not None,
    )


def everything(marker: str = "") -> dict[int, ProcessInfo]:
    """Every process /proc lists, read in Python."""
    found = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (info := from_proc(int(name), marker)) is not None:
            found[info.pid] = info
    return found


def listing(marker: str = "", before: str = "") -> tuple[RunResult, list[ProcessInfo]]:
    """The listing's result (a section run as a part, after ``before`` in the same
    section) and the processes it lists."""
    read = Sections(before + _processes_body(marker))
    [part] = asyncio.run(run_parts(LocalTarget(), [read.script]))
    [result] = read.split(part)
    return result, _parse_processes(result, "here")


@pytest.fixture
def odd(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes], subprocess.Popen[bytes]]]:
    """A marker, and two processes: a detached Python (its own session) with odd
    arguments and the marker in its environment, started in a directory whose name
    holds a colon and a newline; and a copy of sleep whose name (so its comm) holds
    ") " and a newline, its environment holding the marker only as part of others."""
    marker = f"{RUN_MARKER}={secrets.token_hex(8)}"
    cwd = tmp_path / "work:dir\nx"
    cwd.mkdir()
    sleeper = tmp_path / "s) 1\n2) R 3"
    shutil.copy(shutil.which("sleep") or "/bin/sleep", sleeper)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    detached = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(600)", *ODD_ARGS],
        cwd=cwd, env={**env, RUN_MARKER: marker.partition("=")[2]}, start_new_session=True)
    attached = subprocess.Popen(
        [sleeper, "600"], cwd=cwd,
        env={**env, RUN_MARKER: marker.partition("=")[2] + "x", "OTHER": marker})
    try:
        yield marker, detached, attached
    finally:
        for process in (detached, attached):
            process.kill()
            process.wait()


def test_the_listing_is_what_proc_holds(
    odd: tuple[str, subprocess.Popen[bytes], subprocess.Popen[bytes]]
) -> None:
    marker, detached, attached = odd
    seen = everything(marker)
    _, listed = listing(marker)
    after = everything(marker)
    by_pid = {p.pid: p for p in listed}
    assert len(by_pid) == len(listed)

    mine = by_pid[detached.pid]
    assert mine == from_proc(detached.pid, marker)
    assert mine.argv == [sys.executable, "-c", "import time; time.sleep(600)", *ODD_ARGS]
    assert mine.argv[-2].encode("utf-8", "surrogateescape") == b"\xff-\xfe"
    assert mine.marked and mine.daemon
    assert mine.cwd.endswith("/work:dir\nx")
    assert mine.exe == os.path.realpath(sys.executable)
    assert (mine.uid, mine.gid) == (os.getuid(), os.getgid())

    other = by_pid[attached.pid]
    assert other == from_proc(attached.pid, marker)
    assert other.argv[1:] == ["600"] and other.exe.endswith("/s) 1\n2) R 3")
    assert not other.marked
    # Not detached: the test's child, in the test's session (unless the test runs in
    # a systemd service: then it is in its unit, and counts as detached).
    assert other.daemon == (other.unit is not None)
    assert other.start == Path(f"/proc/{attached.pid}/stat").read_bytes().rpartition(
        b") ")[2].split()[19].decode()

    # Every process that was there throughout, unchanged, is listed as /proc has it;
    # nothing else is listed but what came or went meanwhile (not the run's own).
    stable = {pid: info for pid, info in seen.items() if after.get(pid) == info}
    assert len(stable) > 2
    assert {pid: by_pid.get(pid) for pid in stable} == stable
    assert os.getpid() in by_pid  # the run's shell's parent is no part of the run


def test_the_runs_own_processes_are_not_listed() -> None:
    child = "sleep 30 </dev/null >/dev/null 2>&1 &\n" 'echo "$$ $BASHPID $!" >&2\n'
    result, listed = listing(before=child)
    shell, part, sleeping = (int(pid) for pid in result.stderr.split())
    try:
        pids = {p.pid for p in listed}
        assert shell not in pids and part not in pids and sleeping not in pids
        assert os.getpid() in pids
        assert from_proc(sleeping) is not None  # it was running: left out, not missed
    finally:
        os.kill(sleeping, signal.SIGKILL)


def test_what_the_script_left_running_is_listed_and_marked() -> None:
    marker = f"{RUN_MARKER}={secrets.token_hex(8)}"
    script = "sleep 600 </dev/null >/dev/null 2>&1 &\necho $!\n"
    read = Sections(_processes_body(marker))
    result, [part] = asyncio.run(LocalTarget().run_then_parts(
        script, [read.script], marker=marker, timeout=30))
    left = int(result.stdout)
    try:
        listed = _parse_processes(*read.split(part), "here")
        # The wrapper, its guard and the part are not marked; the script has ended.
        assert [p.pid for p in listed if p.marked] == [left]
        assert [p.argv for p in listed if p.pid == left] == [["sleep", "600"]]
    finally:
        os.kill(left, signal.SIGKILL)


# -- what the client parses ------------------------------------------------------------------


def encoded(raw: bytes) -> str:
    return base64.encodebytes(raw).decode()


def stat(pid: int, ppid: int, session: int, comm: bytes = b"x") -> bytes:
    rest = [b"S", ppid, pid, session, *range(4, 19), 4242, *range(20, 30)]
    return b"%d (%s) " % (pid, comm) + b" ".join(b"%d" % f if isinstance(f, int) else f
                                                  for f in rest) + b"\n"


def output(cgroups: dict[int, list[bytes]]) -> bytes:
    """A listing with the run's shell 10, this part 11, its sections' subshell 12, and
    the processes 20 to 25."""
    parts = [b"S", b"10", b"11", b"12"]
    comms = {20: b"a) b\nc) S 1 2", 21: b"d", 22: b"e", 23: b"f", 24: b"g", 25: b"h"}
    for pid, args in ((10, [b"bash"]), (11, [b"bash"]), (12, [b"bash"]),
                      (20, [b"x:y", b"z\n:w", b"\xff", b""]), (21, [b"d"]), (22, [b"e"]),
                      (23, [b"f"]), (24, [b"g"]), (25, [b"h"])):
        parts += [b"%d/cmdline:%s" % (pid, arg) for arg in args]
    parents = {10: 1, 11: 10, 12: 11, 20: 5, 21: 11, 22: 10, 23: 5, 24: 5, 25: 12}
    parts += [b"%d/stat:" % pid + stat(pid, parent, 5, comms.get(pid, b"bash"))
              for pid, parent in parents.items()]
    lines = b"".join(b"%d/status:Uid:\t%d\t0\t0\t0\n%d/status:Gid:\t%d\t0\t0\t0\n"
                     % (pid, pid, pid, pid + 1) for pid in parents)
    lines += b"".join(b"%d/cgroup:%s\n" % (pid, line)
                      for pid, found in cgroups.items() for line in found)
    parts += [b"U", lines, b"M", b"24/environ", b"L"]
    for pid in parents:
        parts += [b"%d/exe" % pid, b"/usr/bin/p%d" % pid, b"%d/cwd" % pid, b"/srv/:\n"]
    return b"\0".join([*parts, b"END", b""])


def test_the_client_parses_what_the_host_printed() -> None:
    # 23 on a cgroup v2 host, 24 on a hybrid one (its unified hierarchy says "/"), 20 on
    # a cgroup v1 host outside any service.
    raw = output({23: [b"0::/system.slice/svc.service"],
                  24: [b"1:name=systemd:/system.slice/x.service", b"0::/"],
                  20: [b"1:name=systemd:/user.slice/user-0.slice/session-4.scope"]})
    listed = _parse_processes(RunResult(0, encoded(raw), "", 0.1), "here")
    # The shell (10), children of the shell (11, 22), of the part (12, 21) or of the
    # sections' subshell (25) are left out.
    assert [p.pid for p in listed] == [20, 23, 24]
    first, unit, hybrid = listed
    assert first == ProcessInfo(
        pid=20, start="4242", uid=20, gid=21, exe="/usr/bin/p20", cwd="/srv/:\n",
        argv=["x:y", "z\n:w", "\udcff", ""], unit=None, marked=False, daemon=False)
    assert unit.unit == "svc.service" and unit.daemon  # in a unit: detached
    assert hybrid.unit == "x.service" and hybrid.marked and hybrid.daemon


def test_the_host_side_reads_the_unit_lines_of_every_cgroup_layout(tmp_path: Path) -> None:
    """The grep the listing runs picks, from real-looking status and cgroup files of a
    cgroup v1, a hybrid and a v2 host, the ids and the lines that name the unit."""
    status = "Name:\tx\nUmask:\t0022\nState:\tS\nUid:\t0\t0\t0\t0\nGid:\t5\t5\t5\t5\n"
    layouts = {
        "1": "12:pids:/system.slice/a.service\n2:cpu,cpuacct:/\n"
             "1:name=systemd:/system.slice/a.service\n",
        "2": "13:memory:/system.slice/b.service\n1:name=systemd:/system.slice/b.service\n"
             "0::/system.slice/b.service\n",
        "3": "0::/system.slice/c.service\n",
    }
    for pid, cgroup in layouts.items():
        (tmp_path / pid).mkdir()
        (tmp_path / pid / "status").write_text(status)
        (tmp_path / pid / "cgroup").write_text(cgroup)
    files = [f"{pid}/{name}" for pid in layouts for name in ("status", "cgroup")]
    found = subprocess.run(["grep", "-a", "-H", "-m", "2", "-E", "-e", UNIT_LINES, "--", *files],
                           cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    lines: dict[str, list[str]] = {}
    for line in found.splitlines():
        name, _, value = line.partition(":")
        lines.setdefault(name, []).append(value)
    assert all(lines[f"{pid}/status"] == ["Uid:\t0\t0\t0\t0", "Gid:\t5\t5\t5\t5"]
               for pid in layouts)
    assert lines["1/cgroup"] == ["1:name=systemd:/system.slice/a.service"]
    assert lines["2/cgroup"] == ["1:name=systemd:/system.slice/b.service",
                                 "0::/system.slice/b.service"]
    assert lines["3/cgroup"] == ["0::/system.slice/c.service"]


def test_a_process_not_read_whole_is_left_out() -> None:
    raw = output({})
    # 23 exited between the reads: its status is missing; 24's stat too.
    raw = raw.replace(b"23/status:Uid:\t23\t0\t0\t0\n", b"").replace(b"24/stat:", b"24/gone:")
    listed = _parse_processes(RunResult(0, encoded(raw), "", 0.1), "here")
    assert [p.pid for p in listed] == [20]


@pytest.mark.parametrize("stdout", [
    "not base64 at all!",
    encoded(output({}))[:-20],  # cut short
    encoded(output({}).removesuffix(b"END\0")),
    encoded(output({}).replace(b"\0M\0", b"\0")),
    encoded(output({}).replace(b"\0L\0", b"\0")),
    encoded(output({}).replace(b"\0U\0", b"\0")),
    encoded(output({}).replace(b"S\0", b"", 1)),
    encoded(output({}).replace(b"/usr/bin/p24\0", b"")),  # a link without its target
    "",
])
def test_a_garbled_listing_fails(stdout: str) -> None:
    with pytest.raises(ExecutionFailedError):
        _parse_processes(RunResult(0, stdout, "", 0.1), "here")


def test_a_listing_that_could_not_run_fails() -> None:
    with pytest.raises(ExecutionFailedError, match="could not list"):
        _parse_processes(RunResult(1, "", "base64: broken pipe\n", 0.1), "here")
    # A grep that is not there, or that read nothing at all (it exits 2, as when a
    # process exits while it reads).
    for status in (127, 2):
        with pytest.raises(ExecutionFailedError, match="could not list"):
            listing(before=f"grep() {{ return {status}; }}\n")


def test_a_marker_holding_a_newline_is_refused() -> None:
    # grep -F would take it for two markers, either of them enough.
    with pytest.raises(ValueError):
        _processes_body(f"{RUN_MARKER}=a\nPATH=/usr/bin")
