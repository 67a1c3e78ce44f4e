"""The systemd sandbox target: a throw-away Debian system *booted* with systemd-nspawn.

The plain sandbox has no init system, so the systemd branch of the templates never runs
there. This target boots the cached systemd root file system (``systemd_rootfs_cache``)
with systemd as PID 1, on this host, sharing its network (daemons bind host ports).

One container's private scratch directory (``rootfs.make_scratch``) holds ``upper/`` and
``work/`` (the overlay's writable layers), ``merged/`` (the container's root),
``exchange/`` (bind-mounted at /run/workflow-agent: scripts and file transfers), and
``holder.py`` with its ``holder.log`` and the console's ``boot.log``.

``open()`` runs a *holder* under ``unshare --mount --propagation private --fork``: it
mounts the overlay (the cached tree is its read-only lower layer), starts ``systemd-nspawn
--boot --register=no --keep-unit`` (no machined or host systemd to register with) and
relays nspawn's notifications, printing ``ready <leader pid>`` on READY=1. ``open()``
then waits for ``systemctl is-system-running --wait`` to say running or degraded. ``run``
enters the container with ``nsenter --all`` (its mount namespace brings its root along).

Everything dies with us: the holder reads a pipe only we write to; on EOF (we closed the
target or died) it SIGKILLs the container's leader, which kills its whole PID namespace.
Holder and nspawn die with their parents (``PR_SET_PDEATHSIG``); the mounts live only in
the holder's mount namespace and vanish with its last process.

Gotchas, measured on Debian 12 (systemd 252) without systemd as the host's PID 1:

* Killing systemd-nspawn does not kill the container: the leader is reparented and runs
  on. So it is killed itself, and the holder is a subreaper so an orphaned leader
  becomes its child (its PID cannot be recycled under us).
* ``--keep-unit`` puts ``supervisor/`` and ``payload/`` cgroups under nspawn's own cgroup
  and never removes them (two containers would share them). So each container gets a
  cgroup of its own in each hierarchy systemd uses (name=systemd v1 and/or v2), removed
  on close; ``open`` sweeps those a killed process left.
* nspawn writes below /run/systemd/nspawn and will not clean it when /run is not a tmpfs:
  the holder mounts a private tmpfs there (and SYSTEMD_NSPAWN_LOCK=0: no image locks).
  Only that empty directory is left on the host, as nspawn itself would leave it.
* ``--console=read-only`` gives a console log; ``--console=pipe`` gives none.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import selectors
import signal
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

from workflow_agent.errors import TargetError, TargetUnreachableError
from workflow_agent.execution.entered import EXCHANGE_INSIDE as EXCHANGE_INSIDE
from workflow_agent.execution.entered import EnteredTarget, which
from workflow_agent.execution.process import run_process
from workflow_agent.execution.rootfs import (
    SCRATCH_PREFIX,
    RootfsCache,
    Scratch,
    cgroup_parents,
    check_overlay_path,
    clear_cgroups,
    make_scratch,
    sweep_stale_cgroups,
)
from workflow_agent.execution.target import BASE_ENV, script_env

#: What the systemd root file system adds to minbase: systemd as /sbin/init, and D-Bus
#: (what most hosts have; logind and e.g. ``hostnamectl`` need it).
SYSTEMD_PACKAGES = ("systemd", "systemd-sysv", "dbus")

#: Names scratch directories and cgroups; starting with the sandbox's scratch prefix, its
#: sweep removes our stale scratch directories too.
NSPAWN_PREFIX = f"{SCRATCH_PREFIX}systemd-"

#: Measured: READY=1 ~0.3 s after start here; slow hosts get plenty more.
DEFAULT_BOOT_TIMEOUT = 60.0


def systemd_rootfs_cache(cache_dir: Path, **kwargs: str) -> RootfsCache:
    """The cache entry this target boots (``<suite>-<variant>-systemd``); ``kwargs`` as
    for ``RootfsCache`` (suite, variant, mirror)."""
    return RootfsCache(cache_dir, include=SYSTEMD_PACKAGES, flavor="systemd", **kwargs)


def _holder_main(argv: list[str]) -> None:
    """The holder. Runs in a separate ``python -I -S``: stdlib imports only.

    Written out as source (``inspect.getsource``), like the sandbox's holder, so it starts
    in ~20 ms yet is type-checked and linted here. Errors go to stderr (holder.log).
    """
    import contextlib
    import ctypes
    import os
    import select
    import signal
    import socket
    import struct
    import subprocess
    import sys

    lower, upper, work, merged, exchange, boot_log, nspawn, machine, lifeline, *cgs = argv
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]

    def mount(src: str, dst: str, fstype: str, flags: int, data: str) -> None:
        if libc.mount(src.encode(), dst.encode(), fstype.encode(), flags, data.encode()):
            raise OSError(ctypes.get_errno(), f"mounting {fstype} on {dst}")

    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with unshare
    libc.prctl(36, 1)  # PR_SET_CHILD_SUBREAPER: an orphaned container leader comes to us
    mount("overlay", merged, "overlay", 0, f"lowerdir={lower},upperdir={upper},workdir={work}")
    # What nspawn leaves below /run/systemd/nspawn goes with this mount namespace. The
    # (empty) mount point stays on the host, as nspawn would leave it: removing it while
    # another container has its tmpfs there would detach that one's.
    os.makedirs("/run/systemd/nspawn", mode=0o755, exist_ok=True)
    mount("tmpfs", "/run/systemd/nspawn", "tmpfs", 2 | 4, "mode=755")  # nosuid, nodev
    # nspawn reports the leader's PID and READY=1 here. Abstract (a path in the scratch
    # directory may not fit sun_path), so anyone may send: only nspawn's messages count,
    # by the sender PID the kernel attaches.
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    sock.bind(f"\0{machine}-{os.getpid()}")

    def in_child() -> None:
        libc.prctl(1, signal.SIGKILL)  # nspawn dies with the holder
        for cgroup in cgs:  # nspawn puts its supervisor/ and payload/ under this one
            with open(os.path.join(cgroup, "cgroup.procs"), "w", encoding="ascii") as procs:
                procs.write("0")

    argv_nspawn = [
        nspawn, f"--directory={merged}", "--boot", f"--machine={machine}",
        "--register=no", "--keep-unit",  # no machined / host systemd to talk to
        "--notify-ready=yes",  # READY=1 once the container's systemd has booted
        "--console=read-only",  # the console goes to boot.log; no input
        "--link-journal=no",  # never touch the host's /var/log/journal
        "--resolv-conf=copy-host",  # the host's network, so the host's resolvers
        f"--bind={exchange}:/run/workflow-agent",
    ]
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
           "NOTIFY_SOCKET": f"@{machine}-{os.getpid()}", "SYSTEMD_NSPAWN_LOCK": "0"}
    with open(boot_log, "ab") as log:
        proc = subprocess.Popen(argv_nspawn, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, env=env, preexec_fn=in_child)
    pidfd, life = os.pidfd_open(proc.pid), int(lifeline)
    leader, ready = 0, False
    # A plain `kill` of the holder tears the container down like EOF does.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with contextlib.suppress(KeyboardInterrupt):
        while True:
            readable = select.select([sock.fileno(), pidfd, life], [], [])[0]
            if pidfd in readable or (life in readable and not os.read(life, 1)):
                break  # nspawn exited, or the host closed the target or died
            if sock.fileno() not in readable:
                continue
            data, ancillary, _, _ = sock.recvmsg(65536, socket.CMSG_SPACE(12))
            creds = [c for _, kind, c in ancillary if kind == socket.SCM_CREDENTIALS]
            if not creds or struct.unpack("i", creds[0][:4])[0] != proc.pid:
                continue  # struct ucred starts with the sender's PID
            lines = data.decode("utf-8", "replace").splitlines()
            leader = next((int(line[20:]) for line in lines
                           if line.startswith("X_NSPAWN_LEADER_PID=")), leader)
            if "READY=1" in lines and leader and not ready:
                ready = True
                os.write(1, f"ready {leader}\n".encode())
                os.dup2(os.open("/dev/null", os.O_RDWR), 1)
    # Killing nspawn would orphan the container; killing its leader (PID 1 of its PID
    # namespace) kills every process in it. Its PID cannot have been recycled: it is the
    # child of nspawn or, nspawn gone, ours (subreaper), until reaped.
    with contextlib.suppress(ProcessLookupError):
        if leader:
            os.kill(leader, signal.SIGKILL)
        else:
            proc.kill()
    code = proc.wait()
    # Then whatever is left in the cgroups (say a leader nspawn had not named yet).
    cleared = clear_cgroups(cgs, reap=True)
    sys.stderr.write(f"systemd-nspawn exited {code}{'' if cleared else '; cgroups remain'}\n")
    os._exit(0 if ready else 1)


def _holder_source() -> str:
    functions = inspect.getsource(clear_cgroups) + inspect.getsource(_holder_main)
    return functions + "import sys\n_holder_main(sys.argv[1:])\n"


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        text = ""
    return "\n".join(text.splitlines()[-lines:]) or "(no output)"


# -- the target ---------------------------------------------------------------------------


@dataclass
class _Running:
    """Everything one open container owns; torn down by ``_teardown`` exactly once."""

    scratch: Scratch
    lifeline: int  # our end of the holder's pipe
    cgroups: list[Path]
    proc: subprocess.Popen[bytes] | None = None
    leader: int = 0
    pidfd: int = -1
    system_state: str = ""

    @property
    def exchange(self) -> Path:
        return self.scratch.path / "exchange"

    def close_lifeline(self) -> None:
        """EOF for the holder: it kills the container and exits."""
        if self.lifeline >= 0:
            with contextlib.suppress(OSError):
                os.close(self.lifeline)
            self.lifeline = -1


def _teardown(state: _Running) -> None:
    """Kill the container, wait for the holder, remove cgroups and the scratch directory.

    Synchronous on purpose: it also runs from ``weakref.finalize`` at interpreter exit.
    """
    if state.pidfd >= 0:
        # Ourselves too, not only through the holder: a pidfd cannot hit a recycled PID,
        # and SIGKILL to a PID namespace's init kills the whole namespace.
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(state.pidfd, signal.SIGKILL)
        os.close(state.pidfd)
        state.pidfd = -1
    state.close_lifeline()
    if state.proc is not None:
        try:
            state.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            state.proc.kill()
            state.proc.wait()
    state.scratch.remove()
    # Normally the holder removed them already.
    if not clear_cgroups([str(cgroup) for cgroup in state.cgroups]):
        raise TargetError(f"processes remain in the cgroups {state.cgroups} after close")


class NspawnTarget(EnteredTarget[_Running]):
    """A disposable Debian system booted with systemd as PID 1, on this host.

    Needs root, ``systemd-nspawn`` (systemd-container), ``unshare`` and ``nsenter``
    (util-linux) and a root file system from ``systemd_rootfs_cache(...).ensure()``.
    Changes land in an overlay thrown away on ``close()``; the cached tree is never
    modified. The container shares the host's network.
    """

    kind = "systemd-sandbox"
    path_noun = "container"
    stopped_reason = "its container exited"
    stopped_hint = "Something powered the container off or killed it; open a new one."

    def __init__(self, rootfs: Path, *, scratch_dir: Path | None = None,
                 name: str | None = None, boot_timeout: float = DEFAULT_BOOT_TIMEOUT) -> None:
        super().__init__(name, f"{NSPAWN_PREFIX}{uuid.uuid4().hex[:12]}")
        self.rootfs = Path(rootfs)
        self.scratch_dir = scratch_dir
        self.boot_timeout = boot_timeout

    @property
    def leader_pid(self) -> int | None:
        """Host PID of the container's systemd while open."""
        return self._state.leader if self._state else None

    @property
    def cgroups(self) -> list[Path]:
        """The host cgroups the container lives in while open (one per hierarchy)."""
        return list(self._state.cgroups) if self._state else []

    @property
    def system_state(self) -> str:
        """What ``systemctl is-system-running`` said once booted: running or degraded."""
        return self._state.system_state if self._state else ""

    # -- lifecycle -------------------------------------------------------------------

    async def open(self) -> None:
        """Boot the container; a no-op when already open."""
        if self._state is not None:
            return
        if os.geteuid() != 0:
            raise TargetError(
                "the systemd sandbox target needs root",
                hint="It uses systemd-nspawn, namespaces and overlay mounts: run as root.",
            )
        needs = {"systemd-nspawn": "systemd-container", "unshare": "util-linux",
                 "nsenter": "util-linux"}
        self._tools = {tool: which(tool, package) for tool, package in needs.items()}
        if not (self.rootfs / "usr/lib/systemd/systemd").is_file():
            raise TargetError(
                f"{self.rootfs} is not a root file system with systemd",
                hint="Pass the directory returned by systemd_rootfs_cache(...).ensure().",
            )
        check_overlay_path(self.rootfs, "root file system")
        parents = cgroup_parents()
        if not parents:
            raise TargetError("no cgroup hierarchy for systemd is mounted on this host",
                              hint="systemd-nspawn needs /sys/fs/cgroup (v2 or name=systemd).")
        sweep_stale_cgroups(parents, NSPAWN_PREFIX)
        scratch = make_scratch(self._dir_name, self.scratch_dir)
        read_end, write_end = os.pipe()  # both close-on-exec; the holder gets read_end
        state = _Running(scratch, write_end, [])
        try:
            for cgroup in (parent / self._dir_name for parent in parents):
                cgroup.mkdir()
                state.cgroups.append(cgroup)
            await self._boot(state, read_end)
        except BaseException:
            await asyncio.shield(asyncio.to_thread(_teardown, state))
            raise
        finally:
            with contextlib.suppress(OSError):
                os.close(read_end)
        self._opened(state, _teardown)

    async def _boot(self, state: _Running, read_end: int) -> None:
        starting = asyncio.ensure_future(asyncio.to_thread(self._start_holder, state, read_end))
        try:
            await asyncio.shield(starting)
        except asyncio.CancelledError:
            # The thread cannot be interrupted, but its wait ends when the holder exits.
            state.close_lifeline()
            with contextlib.suppress(Exception):
                await starting
            raise
        result = await run_process(
            self._enter_argv(state, "systemctl", "is-system-running", "--wait"),
            env=script_env(None), timeout=self.boot_timeout,
        )
        state.system_state = result.stdout.strip()
        if state.system_state not in ("running", "degraded"):
            said = state.system_state or result.stderr.strip() or "nothing"
            raise TargetUnreachableError(
                f"the systemd sandbox did not come up: systemctl is-system-running said "
                f"{said}{' (timed out)' if result.timed_out else ''}; console:\n"
                + _tail(state.scratch.path / "boot.log"),
                hint="See the failed units above; the root file system may be broken.",
            )

    def _start_holder(self, state: _Running, read_end: int) -> None:
        scratch = state.scratch.path
        (scratch / "holder.py").write_text(_holder_source(), encoding="utf-8")
        args = [
            str(self.rootfs), *(str(scratch / sub) for sub in ("upper", "work", "merged")),
            str(state.exchange), str(scratch / "boot.log"), self._tools["systemd-nspawn"],
            self._dir_name, str(read_end), *(str(cgroup) for cgroup in state.cgroups),
        ]
        unshare = [self._tools["unshare"], "--mount", "--propagation", "private", "--fork"]
        python = [sys.executable, "-I", "-S", str(scratch / "holder.py")]
        with open(scratch / "holder.log", "wb") as log:
            state.proc = subprocess.Popen(
                [*unshare, "--", *python, *args], stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=log, pass_fds=(read_end,),
                # Own session: a Ctrl-C on the terminal must not reach the container; the
                # Python side tears it down instead.
                start_new_session=True,
                # Not our environment: it may hold secrets the container has no use for.
                env={"PATH": BASE_ENV["PATH"], "LANG": "C.UTF-8"},
            )
        state.leader = self._await_ready(state)
        state.pidfd = os.pidfd_open(state.leader)

    def _await_ready(self, state: _Running) -> int:
        """Wait for the holder's ``ready <leader pid>`` line; explain any failure."""
        proc = state.proc
        assert proc is not None and proc.stdout is not None
        console = state.scratch.path / "boot.log"
        with proc.stdout, selectors.DefaultSelector() as selector:
            selector.register(proc.stdout, selectors.EVENT_READ)
            if not selector.select(self.boot_timeout):
                raise TargetUnreachableError(
                    f"the systemd sandbox did not boot within {self.boot_timeout:g} s; "
                    f"console:\n{_tail(console)}",
                    hint="Is the host overloaded? Raise boot_timeout, or read the console.",
                )
            line = proc.stdout.readline()  # written in one write(): arrives whole
        word, _, pid = line.decode().strip().partition(" ")
        if word == "ready" and pid.isdigit():
            return int(pid)
        proc.wait()
        raise TargetUnreachableError(
            f"the systemd sandbox failed to boot ({_tail(state.scratch.path / 'holder.log', 1)})"
            f"; console:\n{_tail(console)}",
            hint="Use a root file system from systemd_rootfs_cache(...).ensure(); the "
            "kernel must allow namespaces and overlay mounts.",
        )

    # -- running and files -----------------------------------------------------------

    def _enter_argv(self, state: _Running, *inside: str, all_ns: bool = True) -> list[str]:
        # Entering the mount namespace also moves to its root (nspawn pivoted there), so no
        # chroot. --all: PID, UTS, IPC, cgroup namespaces too (the network is the host's).
        flags = ["--all"] if all_ns else ["--mount"]
        nsenter = self._tools["nsenter"]
        return [nsenter, f"--target={state.leader}", *flags, "--root", "--wd", "--", *inside]
