"""The sandbox target: a throw-away Debian system in Linux namespaces on this host.

Layout of one sandbox (all under a private scratch directory on the host)::

    upper/ work/   overlay upper and work directories: every change the sandbox makes
    merged/        the overlay mount point (mounted only inside the sandbox's namespace)
    exchange/      bind-mounted at /run/workflow-agent inside: scripts and file transfers
    holder.py      the holder program (see below); holder.log: its stderr
    lock           held while the sandbox is open, so stale directories can be swept

``open()`` starts a *holder*: ``unshare --mount --pid --uts --ipc [--net] --fork`` runs a
small Python program as PID 1 of a new PID namespace. It mounts the overlay (lower layer:
the cached root file system from ``RootfsCache``, never written), a fresh ``/proc``,
``/dev``, ``/sys``, tmpfs ``/tmp`` and ``/run``, the host's resolv.conf, then reaps
orphans until told to stop. Daemons a script starts are reparented to it and so keep
running between ``run`` calls. Each ``run`` enters the namespaces with ``nsenter`` and
``chroot``s into the overlay. ``close()`` SIGKILLs the holder: the kernel then kills every
process in the PID namespace, and the mount namespace (overlay included) disappears with
the last of them. The host is never changed, apart from the scratch directory.

Network "host" shares the host's network stack (ports a daemon binds are host ports);
"none" gives the sandbox its own network namespace with only ``lo``, brought up.
Rehearsals (``rehearsal.py``) reuse this for throw-away copies of a sandbox or the host.
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
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from workflow_agent.errors import TargetError, TargetUnreachableError
from workflow_agent.execution.entered import EXCHANGE_INSIDE as EXCHANGE_INSIDE
from workflow_agent.execution.entered import EnteredTarget, which
from workflow_agent.execution.rootfs import (
    SANDBOX_HOSTNAME,
    SCRATCH_PREFIX,
    Scratch,
    check_overlay_path,
    make_scratch,
)
from workflow_agent.execution.target import BASE_ENV

#: How long the holder may take to mount everything (measured: ~30 ms).
_READY_TIMEOUT = 15.0


def _holder_main(argv: list[str]) -> None:
    """PID 1 of the sandbox. Runs in a separate ``python -I -S``: stdlib imports only.

    It is written out as source text (``inspect.getsource``) to the scratch directory, so
    it is type-checked and linted here yet starts in ~20 ms instead of importing the
    package. Errors go to stderr (the host's holder.log) and exit non-zero.
    """
    import ctypes
    import fcntl
    import os
    import signal
    import socket
    import struct
    import sys

    rootfs, upper, work, merged, exchange, network, resolv, hostname, lifeline = argv
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
    rdonly, nosuid, nodev, noexec, remount, bind, rec = 1, 2, 4, 8, 32, 4096, 16384

    def mount(src: str, dst: str, fstype: str | None, flags: int, data: str = "") -> None:
        target = merged + dst
        kind = fstype.encode() if fstype else None
        ok = libc.mount(src.encode(), target.encode(), kind, flags, data.encode())
        if ok != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"mounting {fstype or 'bind'} {src} on {target}")

    # If unshare dies (SIGKILLed with its group, say), take the namespace down with it.
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    mount("overlay", "", "overlay", 0, f"lowerdir={rootfs},upperdir={upper},workdir={work}")
    mount("proc", "/proc", "proc", nosuid | nodev | noexec)  # shows this PID namespace
    mount("/dev", "/dev", None, bind | rec)
    mount("tmpfs", "/dev/shm", "tmpfs", nosuid | nodev, "mode=1777")  # not the host's
    try:
        # A fresh sysfs shows this network namespace's interfaces (just lo for "none").
        mount("sysfs", "/sys", "sysfs", rdonly | nosuid | nodev | noexec)
    except OSError:
        mount("/sys", "/sys", None, bind | rec)
        mount("/sys", "/sys", None, remount | bind | rdonly)
    # apt's _apt user needs a world-writable sticky /tmp.
    mount("tmpfs", "/tmp", "tmpfs", nosuid | nodev, "mode=1777")
    mount("tmpfs", "/run", "tmpfs", nosuid | nodev, "mode=755")
    os.mkdir(merged + "/run/lock", 0o1777)
    os.chmod(merged + "/run/lock", 0o1777)  # mkdir's mode is cut by the umask
    os.mkdir(merged + "/run/workflow-agent", 0o700)
    mount(exchange, "/run/workflow-agent", None, bind)
    if network == "host" and resolv:
        dest = merged + "/etc/resolv.conf"
        if os.path.islink(dest) or not os.path.isfile(dest):
            # mount(2) follows symlinks, which resolve against the host's root here.
            if os.path.lexists(dest):
                os.unlink(dest)
            os.close(os.open(dest, os.O_WRONLY | os.O_CREAT, 0o644))  # the mount point
        mount(resolv, "/etc/resolv.conf", None, bind)
        mount(resolv, "/etc/resolv.conf", None, remount | bind | rdonly)
    if network == "none":
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            ifreq = fcntl.ioctl(sock, 0x8913, struct.pack("16sH22x", b"lo", 0))  # GIFFLAGS
            flags = struct.unpack("16sH22x", ifreq)[1] | 1  # IFF_UP
            fcntl.ioctl(sock, 0x8914, struct.pack("16sH22x", b"lo", flags))  # SIFFLAGS
    name = hostname.encode()  # empty: keep the name the UTS namespace was copied with
    if name and libc.sethostname(name, len(name)) != 0:  # our own UTS namespace
        raise OSError(ctypes.get_errno(), "sethostname")

    def reap(signum: int, frame: object) -> None:
        # Orphaned daemons are reparented to PID 1; reap them so no zombies pile up.
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return

    signal.signal(signal.SIGCHLD, reap)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # PID 1 ignores signals it has no handler for; let a plain `kill` stop the sandbox.
    signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(0))
    with open("/proc/self/status", encoding="ascii") as status:  # host /proc: host PIDs
        host_pid = next(ln.split()[1] for ln in status if ln.startswith("NSpid:"))
    sys.stdout.write(f"ready {host_pid}\n")
    sys.stdout.flush()
    devnull = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    # The host holds the write end; EOF means it closed the sandbox or died.
    while os.read(int(lifeline), 1):
        pass
    os._exit(0)


def _holder_source() -> str:
    return inspect.getsource(_holder_main) + "import sys\n_holder_main(sys.argv[1:])\n"


@dataclass
class _Running:
    """Everything one open sandbox owns; torn down by ``_teardown`` exactly once."""

    scratch: Scratch
    proc: subprocess.Popen[bytes]
    lifeline: int
    holder_pid: int = 0
    pidfd: int = -1
    enter_flags: list[str] = field(default_factory=list)

    @property
    def merged(self) -> Path:
        return self.scratch.path / "merged"

    @property
    def exchange(self) -> Path:
        return self.scratch.path / "exchange"


def _teardown(state: _Running) -> None:
    """Kill the holder (so the whole namespace), reap unshare, remove the scratch dir.

    Synchronous on purpose: it also runs from ``weakref.finalize`` at interpreter exit.
    """
    with contextlib.suppress(OSError):
        os.close(state.lifeline)  # the holder exits on EOF even if the kill below fails
    if state.pidfd >= 0:
        # A pidfd cannot hit a recycled PID. SIGKILL, not SIGTERM: it cannot be caught,
        # and the kernel then kills the whole PID namespace. (unshare ignores SIGTERM.)
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(state.pidfd, signal.SIGKILL)
        os.close(state.pidfd)
    try:
        # The kernel reaps every process of the namespace before the holder's parent
        # (unshare) sees it exit, so once unshare is gone nothing of the sandbox runs.
        state.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        state.proc.kill()
        state.proc.wait()
    state.scratch.remove()


class SandboxTarget(EnteredTarget[_Running]):
    """A disposable Debian system on this host, built on a cached root file system.

    Needs root, ``unshare`` and ``nsenter`` (util-linux). Changes land in an overlay that
    is thrown away on ``close()``; the cached root file system is never modified.
    """

    kind = "sandbox"
    path_noun = "sandbox"
    stopped_reason = "its holder process exited"
    stopped_hint = "Something killed the sandbox; open a new one."

    def __init__(
        self,
        rootfs: Path,
        *,
        network: Literal["host", "none"] = "host",
        scratch_dir: Path | None = None,
        name: str | None = None,
        layers: Sequence[Path] = (),
        hostname: str | None = SANDBOX_HOSTNAME,
        bind_resolv_conf: bool = True,
    ) -> None:
        """``layers``: read-only directories stacked above ``rootfs``, topmost first (a
        rehearsal stacks a sandbox's upper dir). ``hostname`` None keeps the host's;
        ``bind_resolv_conf`` False keeps the root file system's resolv.conf."""
        super().__init__(name, f"{SCRATCH_PREFIX}{uuid.uuid4().hex[:12]}")
        if network not in ("host", "none"):
            raise ValueError(f"network must be 'host' or 'none', not {network!r}")
        self.rootfs = Path(rootfs)
        self.network = network
        self.scratch_dir = scratch_dir
        self.layers = tuple(Path(layer) for layer in layers)
        self.hostname = hostname
        self.bind_resolv_conf = bind_resolv_conf

    @property
    def holder_pid(self) -> int | None:
        """Host PID of the namespace's PID 1 while open (for diagnostics and tests)."""
        return self._state.holder_pid if self._state else None

    # -- lifecycle -------------------------------------------------------------------

    async def open(self) -> None:
        """Start the holder and mount the sandbox; a no-op when already open."""
        if self._state is not None:
            return
        if os.geteuid() != 0:
            raise TargetError(
                "the sandbox target needs root",
                hint="It uses mount and PID namespaces and overlay mounts: run as root.",
            )
        needs = {"unshare": "util-linux", "nsenter": "util-linux", "chroot": "coreutils"}
        self._tools = {tool: which(tool, package) for tool, package in needs.items()}
        if not (self.rootfs / "usr" / "bin" / "bash").is_file():
            raise TargetError(
                f"{self.rootfs} is not an extracted root file system",
                hint="Pass the directory returned by RootfsCache.ensure().",
            )
        check_overlay_path(self.rootfs, "root file system")
        for layer in self.layers:
            check_overlay_path(layer, "layer")
            if not layer.is_dir():
                raise TargetError(f"the sandbox layer {layer} is not a directory")
        scratch = make_scratch(self._dir_name, self.scratch_dir)
        starting = asyncio.ensure_future(asyncio.to_thread(self._start_holder, scratch))
        try:
            state = await asyncio.shield(starting)
        except asyncio.CancelledError:
            # The thread cannot be interrupted: let it finish, then undo what it did.
            with contextlib.suppress(TargetError):
                await asyncio.to_thread(_teardown, await starting)
            raise
        self._opened(state, _teardown)

    def _start_holder(self, scratch: Scratch) -> _Running:
        read_end, write_end = os.pipe()  # both close-on-exec; read_end is passed below
        bind = self.bind_resolv_conf and os.path.exists("/etc/resolv.conf")
        resolv = "/etc/resolv.conf" if bind else ""
        namespaces = ["--mount", "--pid", "--uts", "--ipc"]
        if self.network == "none":
            namespaces.append("--net")
        unshare = [self._tools["unshare"], *namespaces, "--fork", "--propagation", "private"]
        layers = [str(scratch.path / sub) for sub in ("upper", "work", "merged", "exchange")]
        lower = ":".join(str(layer) for layer in (*self.layers, self.rootfs))  # top first
        holder_args = [lower, *layers, self.network, resolv, self.hostname or ""]
        # A file rather than -c: `ps` then shows a short, recognisable command line.
        program = scratch.path / "holder.py"
        program.write_text(_holder_source(), encoding="utf-8")
        python = [sys.executable, "-I", "-S", str(program)]
        log = scratch.path / "holder.log"
        try:
            with open(log, "wb") as log_handle:
                proc = subprocess.Popen(
                    [*unshare, "--", *python, *holder_args, str(read_end)],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=log_handle,
                    pass_fds=(read_end,),
                    # Own session: a Ctrl-C on the terminal must not reach the holder;
                    # the Python side tears the sandbox down instead.
                    start_new_session=True,
                    # Not our environment: it may hold secrets the sandbox has no use for.
                    env={"PATH": BASE_ENV["PATH"], "LANG": "C.UTF-8"},
                )
        except BaseException:
            os.close(write_end)
            scratch.remove()
            raise
        finally:
            os.close(read_end)
        state = _Running(scratch=scratch, proc=proc, lifeline=write_end)
        state.enter_flags = namespaces  # nsenter spells them like unshare
        try:
            state.holder_pid = self._await_ready(proc, log)
            state.pidfd = os.pidfd_open(state.holder_pid)
        except BaseException:
            _teardown(state)
            raise
        return state

    @staticmethod
    def _await_ready(proc: subprocess.Popen[bytes], log: Path) -> int:
        """Wait for the holder's ``ready <host pid>`` line; explain any failure."""
        assert proc.stdout is not None
        with proc.stdout, selectors.DefaultSelector() as selector:
            selector.register(proc.stdout, selectors.EVENT_READ)
            if not selector.select(_READY_TIMEOUT):
                raise TargetUnreachableError(
                    f"the sandbox did not start within {_READY_TIMEOUT:.0f} s",
                    hint="Is the host overloaded?",
                )
            # The holder writes the line in one write(), so one readline() gets it all.
            line = proc.stdout.readline()
        word, _, pid = line.decode().strip().partition(" ")
        if word == "ready" and pid.isdigit():
            return int(pid)
        proc.wait()
        # The last line is the reason: the exception raised in the holder, or unshare's.
        lines = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()
        reason = lines[-1] if lines else "no output"
        raise TargetUnreachableError(
            f"the sandbox failed to start (exit {proc.returncode}): {reason}",
            hint="Use a root file system from RootfsCache.ensure(); the kernel must allow "
            "namespaces and overlay mounts (most unprivileged containers do not).",
        )

    # -- running and files -----------------------------------------------------------

    def _enter_argv(self, state: _Running, *inside: str, all_ns: bool = True) -> list[str]:
        flags = state.enter_flags if all_ns else ["--mount"]
        nsenter = [self._tools["nsenter"], f"--target={state.holder_pid}", *flags, "--"]
        return [*nsenter, self._tools["chroot"], str(state.merged), *inside]
