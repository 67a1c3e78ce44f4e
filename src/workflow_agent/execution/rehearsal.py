"""Rehearsal: run a script on a throw-away copy-on-write copy of a target, report the changes.

The "dry run that tells the truth": the script really runs (apt really installs, daemons
really start), but every write lands in the upper directory of an overlay that is thrown
away afterwards, and that upper directory *is* the list of changes (``changes.py``).

The copy is a ``SandboxTarget`` (its own mount, PID, UTS and IPC namespaces; a holder
process as PID 1; entered with ``nsenter`` + ``chroot``), built on:

* a **sandbox**: lower layers = the sandbox's own upper directory on top of its root file
  system, so the copy sees the sandbox's files as they are now; the sandbox is never
  written (its upper directory is only read, as a lower layer). The copy does *not* see
  the sandbox's running processes nor its ``/tmp`` and ``/run``, which are tmpfs.
* **this host** (a ``LocalTarget``): lower layer = ``/``, upper and work directories on
  ``/dev/shm`` (a tmpfs: overlayfs refuses an upper directory inside its lower layer, so
  it must be another file system; it costs RAM). Only the root file system is overlaid:
  other mounted file systems (``/boot``, a separate ``/home`` or ``/var``...) appear as
  their empty mount points, and ``/tmp``, ``/run`` and ``/dev/shm`` are fresh tmpfs (so
  host daemons' sockets under ``/run`` are out of reach, and systemd looks not running).
  The *before* state of a changed path is read from the real host, so a file written
  below such a mount point is compared with the real one there.

The script runs exactly like ``Target.run``: bash, a clean ``script_env`` environment,
the timeout kills its process group. Afterwards the processes still alive in the copy's
PID namespace are listed (they are the services it started), killed, the upper directory
is read, and the copy is destroyed: nothing stays mounted or running.

Limits: the network is the host's (apt must reach the archive), so whatever a script
does over the network (API calls, database clients, firewall rules, routes, interfaces)
is real; so are the host kernel's clock and modules, and devices under ``/dev``.
``/proc/sys`` and ``/proc/sysrq-trigger`` are made read-only in the copy, so setting
sysctls fails there instead of changing the host. ``systemctl start`` fails (no systemd
inside); package scripts fall back to init scripts where a package ships one. Writes to
``/tmp``, ``/run`` and ``/dev/shm`` are not reported (tmpfs, not the overlay). Extended
attributes (e.g. file capabilities) and timestamps are not compared.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from workflow_agent.errors import TargetError
from workflow_agent.execution.changes import ChangeSet, read_changes
from workflow_agent.execution.local import LocalTarget
from workflow_agent.execution.rootfs import fs_type
from workflow_agent.execution.sandbox import SandboxTarget
from workflow_agent.execution.target import OutputCallback, RunResult, Target
from workflow_agent.secrets import Redactor

#: Where a rehearsal of this host keeps its overlay upper directory (must be a tmpfs).
LOCAL_SCRATCH = Path("/dev/shm")

#: How long killed processes may take to disappear before the upper directory is read.
_SETTLE_TIMEOUT = 5.0

# Bind-mounted read-only onto themselves: writes there would change the host's kernel.
# `mount -n`: libmount must not record anything in a utab.
_PROTECT_KERNEL = """set -e
for p in /proc/sys /proc/sysrq-trigger; do
  [ -e "$p" ] || continue
  mount -n --bind "$p" "$p"
  mount -n -o remount,bind,ro "$p"
done
"""

# kill -1 in a PID namespace signals every process in it except PID 1 and the caller;
# outside one it would signal every process on the host, hence the check first.
_KILL_ALL = """[ "$(readlink /proc/self/ns/pid)" = {namespace} ] || exit 90
kill -KILL -1 2>/dev/null
exit 0
"""


@dataclass(frozen=True)
class Rehearsal:
    """What rehearsing a script produced: its run, and what it would change."""

    result: RunResult
    changes: ChangeSet
    upper_bytes: int = 0
    """Disk (or, for this host, RAM) the copy's upper directory used."""
    duration: float = 0.0
    """Wall time of the whole rehearsal: setting up, the script, reading the changes."""


@dataclass(frozen=True)
class Process:
    """A process still running when the script ended (PID as seen inside the copy)."""

    pid: int
    argv: tuple[str, ...]
    name: str

    def describe(self, redactor: Redactor) -> str:
        """``started NAME (pid N, COMMAND LINE)``, the command line masked and shortened."""
        command = " ".join(self.argv) or f"[{self.name}]"
        if len(command) > 160:
            command = command[:157] + "..."
        name = os.path.basename(self.argv[0]) if self.argv else self.name
        return f"started {name} (pid {self.pid}, {redactor.redact(command)})"


def disk_usage(path: str) -> int:
    """Bytes allocated to the files under ``path`` (like ``du -s``)."""
    total = 0
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except FileNotFoundError:
                continue  # removed while we walked
    return total


def supports_rehearsal(target: Target) -> bool:
    """True for targets ``rehearse`` can copy: this host and sandboxes (both need root)."""
    return isinstance(target, LocalTarget | SandboxTarget)


async def rehearse(
    target: Target,
    script: str,
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = 600,
    redactor: Redactor | None = None,
    on_output: OutputCallback | None = None,
) -> Rehearsal:
    """Run ``script`` on a copy-on-write copy of ``target``; report what it changed.

    ``target`` itself is never changed. A failing or timed-out script still yields the
    changes it made up to then, with its ``RunResult``. ``TargetError`` when the target
    cannot be copied (not a local or sandbox target, not open, not root).
    """
    started = time.monotonic()
    copy, lower = _copy_of(target)
    await copy.open()
    try:
        scratch, holder = copy.scratch_path, copy.holder_pid
        assert scratch is not None and holder is not None  # open() succeeded
        await _prepare(copy, target)
        result = await copy.run(script, env=env, timeout=timeout, on_output=on_output)
        inside = f"/proc/{holder}/root{scratch}/merged/proc"
        processes = await _settled_processes(inside)
        if processes:
            await _stop_all(copy, inside, holder)
        upper = str(scratch / "upper")
        running = [process.describe(redactor or Redactor()) for process in processes]
        changes = await asyncio.to_thread(
            read_changes, upper, lower, running=running, redactor=redactor
        )
        used = await asyncio.to_thread(disk_usage, upper)
    finally:
        await copy.close()
    return Rehearsal(result=result, changes=changes, upper_bytes=used,
                     duration=time.monotonic() - started)


def _copy_of(target: Target) -> tuple[SandboxTarget, str]:
    """The (unopened) copy of ``target`` and the host path prefix of its before view."""
    if isinstance(target, SandboxTarget):
        scratch, holder = target.scratch_path, target.holder_pid
        if scratch is None or holder is None:
            raise TargetError(
                f"{target.identity} is not open", hint="Rehearse on an opened sandbox."
            )
        copy = SandboxTarget(
            target.rootfs,
            network=target.network,
            scratch_dir=target.scratch_dir,
            name=f"rehearsal-of-{target.identity.removeprefix('sandbox:')}",
            layers=[scratch / "upper", *target.layers],
            hostname=target.hostname,
            bind_resolv_conf=target.bind_resolv_conf,
        )
        # The sandbox's own view through its holder: its overlay, seen from the host.
        return copy, f"/proc/{holder}/root{scratch}/merged"
    if isinstance(target, LocalTarget):
        if fs_type(LOCAL_SCRATCH) != "tmpfs":
            raise TargetError(
                f"rehearsing on this host needs {LOCAL_SCRATCH} to be a tmpfs "
                f"(it is {fs_type(LOCAL_SCRATCH)})",
                hint="overlayfs needs the upper directory on a file system other than /.",
            )
        copy = SandboxTarget(
            Path("/"),
            network="host",
            scratch_dir=LOCAL_SCRATCH,
            name="rehearsal-of-local",
            hostname=None,
            # The host's own file is already in the lower layer (a symlink is seeded).
            bind_resolv_conf=False,
        )
        return copy, ""
    raise TargetError(
        f"rehearsal is not supported on {target.kind} targets",
        hint="Rehearse on the local or a sandbox target.",
    )


async def _prepare(copy: SandboxTarget, target: Target) -> None:
    """Make the kernel's settings read-only; give the copy of this host its DNS config."""
    protected = await copy.run(_PROTECT_KERNEL, timeout=60)
    if not protected.ok:
        raise TargetError(
            f"could not make /proc/sys read-only in the rehearsal copy: {protected.stderr}",
            hint="The copy would share the host kernel's settings; refusing to run.",
        )
    resolv = "/etc/resolv.conf"
    if isinstance(target, LocalTarget) and os.path.islink(resolv):
        # E.g. systemd-resolved: a link into /run, which is a fresh tmpfs in the copy.
        # The file goes to that tmpfs, not the overlay: it is not a change.
        real = os.path.realpath(resolv)
        if real.startswith("/run/") and os.path.isfile(real):
            await copy.put(real, Path(real).read_bytes())


async def _settled_processes(proc: str) -> list[Process]:
    """The copy's processes once they stop changing: a daemon launcher the script ran
    (start-stop-daemon --background, setsid ...) may still be between fork and exec."""
    found = await asyncio.to_thread(_processes, proc)
    for _ in range(10):
        await asyncio.sleep(0.1)
        again = await asyncio.to_thread(_processes, proc)
        if again == found:
            break
        found = again
    return found


def _processes(proc: str) -> list[Process]:
    """Processes alive in the copy (from its own /proc), other than the holder."""
    found = []
    with os.scandir(proc) as scan:
        pids = sorted(int(entry.name) for entry in scan if entry.name.isdigit())
    for pid in pids:
        if pid == 1:
            continue
        try:
            state = Path(f"{proc}/{pid}/stat").read_text().rpartition(")")[2].split()[0]
            argv = Path(f"{proc}/{pid}/cmdline").read_bytes().split(b"\0")
            name = Path(f"{proc}/{pid}/comm").read_text().strip()
        except (FileNotFoundError, ProcessLookupError):
            continue  # exited while we looked
        if state in ("Z", "X"):
            continue  # dead, waiting for the holder to reap it
        words = tuple(word.decode(errors="replace") for word in argv if word)
        found.append(Process(pid=pid, argv=words, name=name))
    return found


async def _stop_all(copy: SandboxTarget, proc: str, holder: int) -> None:
    """Kill every process of the copy but its holder, so the upper directory holds still."""
    namespace = os.readlink(f"/proc/{holder}/ns/pid")
    if namespace == os.readlink("/proc/self/ns/pid"):
        raise TargetError("the rehearsal copy has no PID namespace of its own")
    killed = await copy.run(_KILL_ALL.format(namespace=shlex.quote(namespace)), timeout=60)
    if killed.exit_code == 90:
        raise TargetError("refusing to kill processes outside the rehearsal copy")
    deadline = time.monotonic() + _SETTLE_TIMEOUT
    while time.monotonic() < deadline:
        remaining = await asyncio.to_thread(_processes, proc)
        if not remaining:
            return
        await asyncio.sleep(0.02)
