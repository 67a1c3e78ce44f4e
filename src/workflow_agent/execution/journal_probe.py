"""What the change journal reads from the target: before the script, as it ends, and
after an undo. The journal's files, store and index are ``journal``'s.

``prepare`` saves, from ONE run on the target (``run_parts``; or read ahead with the
facts, ``Before``, when nothing may wait in between), what undoing the
workflow needs: a snapshot of the journal's paths (``pre.json``), the backup of every
file the script may modify or delete (``backup.tar``: the predicted paths, plus every
file and link under ``/etc`` in the watched paths, selected and archived by ``tar`` on
the target and streamed back base64, so it works on any target that can run a script),
and the processes running; then the ``executing`` phase.

``run_observed`` runs the script and, in the same run (``run_then_parts``), the
snapshot and process list that ``observed`` compares with the saved ones: one entry per
change actually made is appended (phase ``executed``). The script's processes carry the
run marker (``RUN_MARKER``) in their environment; the wrapper and the probes do not.
When the probes' part failed or is garbled, or the run ended before the script did,
``observe`` reads the target in a run of its own instead: compared with the saved
snapshot, what it sees is still what the script changed (``recover`` relies on the same
for a crashed run).

``read_state`` reads the snapshot and the processes in one run, for a rollback's check.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import io
import logging
import os
import tarfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from workflow_agent.errors import ExecutionFailedError
from workflow_agent.execution.journal import Entry, Header, Journal, JournalState, ProcessInfo
from workflow_agent.execution.target import (
    OutputCallback,
    RunResult,
    Target,
    quote,
    run_parts,
)
from workflow_agent.verification.snapshot import (
    DEFAULT_HASH_LIMIT,
    FileEntry,
    FileType,
    Snapshot,
    SnapshotProbe,
    decode,
    diff,
)

log = logging.getLogger(__name__)

_SHELLS = frozenset({"bash", "sh", "dash", "zsh", "ksh", "mksh", "ash", "busybox"})

#: Configuration lives here: every file and link under it in the watched paths is saved.
CONFIG_ROOT = "/etc/"

#: How long reading the target after the script may take.
OBSERVE_TIMEOUT = 600.0

#: How old a read made ahead (``Before``) may be when the journal is prepared.
AHEAD_MAX_AGE = 10.0

#: Hides secrets in a process's command line before it is written to the journal.
Mask = Callable[[ProcessInfo], ProcessInfo]


def _unmasked(process: ProcessInfo) -> ProcessInfo:
    return process


# Selects what backup_paths will expect, on the target itself (the configuration files
# walked as the snapshot walks them, the predicted paths that exist), and streams their
# tar. --no-recursion: a directory in the list stands for its own mode and owner only.
_BACKUP = r"""set -o pipefail
export LC_ALL=C
{walk}{{
  (( ${{#paths[@]}} )) && walk \( -type f -o -type l \) -print0
  for p in {predicted}; do
    if [ -e "$p" ] || [ -L "$p" ]; then printf '%s\0' "$p"; fi
  done
}} | sort -zu | tar --create --file - --no-recursion --null --files-from - \
  --absolute-names --numeric-owner --xattrs --acls --format=posix | base64 -w 4096
"""

#: The environment variable every journaled script runs with: the processes it starts
#: (and that do not clear their environment) can be told apart from everything else.
RUN_MARKER = "WORKFLOW_AGENT_RUN"

# Bash builtins only inside the loop (a busy host has hundreds of processes; a fork each
# would cost a second). Per process: pid, start time, uid, gid, unit, marked, argc, argv;
# then one `find` prints every process's exe and cwd link. NUL-separated throughout.
# Kernel threads (empty cmdline) and the run's own processes are left out: the run's
# shell ($$: run_parts' or run_then_parts' wrapper), the subshell this part runs in and
# their children (the other parts, and the wrapper's guard). The script run_then_parts
# ran before has ended by then; what it left running is not the wrapper's child.
_PROCESSES = r"""set -o pipefail
marker=%(marker)s
self=$$ part=$BASHPID
{
links=()
for d in /proc/[0-9]*; do
  pid=${d#/proc/}
  [ "$pid" = "$self" ] && continue
  args=(); mapfile -d '' args < "$d/cmdline" 2>/dev/null || continue
  (( ${#args[@]} )) || continue
  read -r stat < "$d/stat" 2>/dev/null || continue
  read -r -a f <<< "${stat##*) }"
  [ "${f[1]}" = "$self" ] || [ "${f[1]}" = "$part" ] && continue
  uid="" gid=""
  while read -r key value _; do
    case $key in Uid:) uid=$value ;; Gid:) gid=$value; break ;; esac
  done < "$d/status" 2>/dev/null
  unit="" cg=""
  read -r cg < "$d/cgroup" 2>/dev/null
  case $cg in 0::*.service) unit=${cg##*/} ;; esac
  marked=0
  if [ -n "$marker" ]; then
    envs=(); mapfile -d '' envs < "$d/environ" 2>/dev/null
    for e in "${envs[@]}"; do [ "$e" = "$marker" ] && { marked=1; break; }; done
  fi
  links+=("$d/exe" "$d/cwd")
  printf 'P\0%%s\0%%s\0%%s\0%%s\0%%s\0%%s\0%%s\0%%s\0%%s\0' "$pid" "${f[19]}" "$uid" \
    "$gid" "$unit" "$marked" "${f[1]}" "${f[3]}" "${#args[@]}"
  printf '%%s\0' "${args[@]}"
done
printf 'L\0'
(( ${#links[@]} )) && find "${links[@]}" -maxdepth 0 -printf '%%p\0%%l\0' 2>/dev/null
printf 'END\0'
} | base64 -w 4096
"""


def backup_paths(pre: Snapshot, predicted: Iterable[str]) -> list[str]:
    """What to save before the change: the predicted paths and the configuration files."""
    chosen = set(predicted)
    chosen.update(path for path, entry in pre.files.items()
                  if path.startswith(CONFIG_ROOT) and entry.type in ("f", "l"))
    return sorted(chosen)


def _backup_script(probe: SnapshotProbe, predicted: Sequence[str]) -> str:
    """The script saving ``backup_paths(pre, predicted)`` for the ``pre`` that ``probe``
    takes, as a tar, base64 on stdout."""
    return _BACKUP.format(walk=probe.walk(CONFIG_ROOT),
                          predicted=" ".join(quote(p) for p in predicted) or "''")


def _saved(result: RunResult, pre: Snapshot, predicted: Sequence[str], where: str
           ) -> tuple[bytes | None, list[Entry]]:
    """The tar ``_backup_script`` printed (None when it holds nothing) and one entry per
    saved path, with its state read from the archive itself."""
    failed = f"could not save the files the install will change on {where}: "
    if not result.ok:
        raise ExecutionFailedError(failed + " ".join(result.stderr.split())[-400:],
                                   hint="Nothing was changed on the target.")
    try:
        data = base64.b64decode("".join(result.stdout.split()))
        with tarfile.open(fileobj=io.BytesIO(data)) as archive:
            entries = [Entry(id=number, kind="file", op="modified",
                             name="/" + member.name.lstrip("/"),
                             before=_tar_entry(archive, member), backup=True)
                       for number, member in enumerate(archive.getmembers(), 1)]
    except (binascii.Error, tarfile.TarError) as exc:
        raise ExecutionFailedError(failed + f"the archive is garbled ({exc})",
                                   hint="Nothing was changed on the target.") from exc
    # Both lists were made in one run, a moment apart: a path the snapshot listed and
    # the tar lacks was deleted meanwhile, and can't be saved; sockets tar skips. A path
    # the tar holds and the snapshot lacks was created meanwhile: saved once too many.
    saved = {entry.name for entry in entries}
    missing = [path for path in backup_paths(pre, predicted)
               if path in pre.files and pre.files[path].type != "s" and path not in saved]
    if missing:
        raise ExecutionFailedError(
            failed + f"{', '.join(missing[:5])} vanished while being saved",
            hint="Nothing was changed on the target. Something else is changing it: "
            "try again once it is done.")
    return (data if entries else None), entries


def _processes_script(marker: str = "") -> str:
    """The script listing the processes on a target (kernel threads left out), flagging
    those whose environment holds ``marker`` (``NAME=VALUE``); base64 on stdout."""
    return _PROCESSES % {"marker": quote(marker)}


def _parse_processes(result: RunResult, where: str) -> list[ProcessInfo]:
    """The processes ``result`` (of ``_processes_script``, run on ``where``) lists."""
    if result.exit_code != 0:
        raise ExecutionFailedError(f"could not list the processes on {where}: "
                                   + " ".join(result.stderr.split())[-300:])
    fields = decode(result.stdout)
    records: list[list[str]] = []
    i = 0
    while i < len(fields) and fields[i] == "P":
        argc = int(fields[i + 9])
        records.append(fields[i + 1 : i + 10 + argc])
        i += 10 + argc
    if fields[i : i + 1] != ["L"] or "END" not in fields[i:]:
        raise ExecutionFailedError(f"the process list from {where} is garbled")
    end = fields.index("END", i)
    links = dict(zip(fields[i + 1 : end : 2], fields[i + 2 : end : 2], strict=False))
    found: list[ProcessInfo] = []
    for pid, start, uid, gid, unit, marked, ppid, session, _argc, *argv in records:
        if not (uid.isdigit() and gid.isdigit()):
            continue  # exited while it was read
        found.append(ProcessInfo(
            pid=int(pid), start=start, uid=int(uid), gid=int(gid),
            exe=links.get(f"/proc/{pid}/exe", ""), cwd=links.get(f"/proc/{pid}/cwd") or "/",
            argv=argv, unit=unit or None, marked=marked == "1",
            daemon=ppid in ("0", "1") or session == pid or bool(unit),
        ))
    return found


@dataclass(frozen=True)
class Before:
    """What ``prepare`` reads, read ahead in a run that had to be made anyway (the
    facts'): the results of ``before_parts(paths, ignore, predicted)``, and when."""

    paths: tuple[str, ...]
    ignore: tuple[str, ...]
    predicted: tuple[str, ...]
    results: tuple[RunResult, ...]
    read_at: float = field(default_factory=time.monotonic)


def before_parts(paths: Sequence[str], ignore: Sequence[str],
                 predicted: Sequence[str] = ()) -> list[str]:
    """The read-only scripts whose results ``prepare`` saves: the snapshot, the backup,
    the processes."""
    probe = SnapshotProbe.of(paths, ignore)
    return [probe.script, _backup_script(probe, predicted), _processes_script()]


async def prepare(
    target: Target, journal: Journal, predicted: Sequence[str] = (), mask: Mask = _unmasked,
    ahead: Before | None = None,
) -> list[Entry]:
    """Save what undoing ``journal``'s workflow needs, from one run on ``target``: the
    snapshot, the backups (``backup_paths``), the processes (``mask`` hides secrets in
    their command lines); then the ``executing`` phase. Returns the saved entries.

    ``ahead``: the same read, made earlier under the workflow's lock; used instead of a
    run when it covers exactly this journal and is at most ``AHEAD_MAX_AGE`` old (a
    prompt that waited for a person makes it stale: the target is read again)."""
    header = journal.header
    probe = SnapshotProbe.of(header.paths, header.ignore)
    if (ahead is not None and time.monotonic() - ahead.read_at <= AHEAD_MAX_AGE
            and (ahead.paths, ahead.ignore, ahead.predicted)
            == (tuple(header.paths), tuple(header.ignore), tuple(predicted))):
        listed, saving, running = ahead.results
    else:
        listed, saving, running = await run_parts(
            target, before_parts(header.paths, header.ignore, predicted))
    pre = probe.parse(listed, target.identity)
    backup, saved = _saved(saving, pre, predicted, target.identity)
    before = [mask(p) for p in _parse_processes(running, target.identity)]
    await asyncio.to_thread(journal.record_prepared, pre, backup, saved, before)
    return saved


async def run_observed(
    target: Target, journal: Journal, script: str, workflow_id: str, *,
    env: Mapping[str, str] | None = None, timeout: float = 600.0,
    on_output: OutputCallback | None = None, mask: Mask = _unmasked,
    probes: Sequence[str] = (),
) -> tuple[RunResult, list[RunResult]]:
    """Run ``script`` on ``target`` as ``target.run`` would (``env``, ``timeout``, its
    output alone to ``on_output`` and in the result), its processes marked with the run
    marker, then append what it changed (phase ``executed``), read in the same run, or
    in one of its own (``observe``) when that part of the run failed. Returns the
    script's result and those of the read-only ``probes``, run after the observation in
    the same run; ``mask`` hides secrets in the command lines of processes."""
    state = await asyncio.to_thread(journal.read)
    probe = SnapshotProbe.of(state.header.paths, state.header.ignore)
    marker = f"{RUN_MARKER}={workflow_id}"
    result, (listed, running, *probed) = await target.run_then_parts(
        script, [probe.script, _processes_script(marker), *probes], env=env,
        timeout=timeout, parts_timeout=OBSERVE_TIMEOUT, on_output=on_output, marker=marker)
    try:
        post, after = _read(probe, listed, running, target.identity)
    except ExecutionFailedError as exc:
        log.warning("reading what the script changed on %s again: %s", target.identity, exc)
        await observe(target, journal, workflow_id, mask)
    else:
        await asyncio.to_thread(_record, journal, state, post, [mask(p) for p in after])
    return result, probed


async def observe(
    target: Target, journal: Journal, workflow_id: str, mask: Mask = _unmasked,
) -> list[Entry]:
    """Append what the script of ``journal``'s workflow changed (phase ``executed``),
    from one run on ``target``; ``mask`` hides secrets in the command lines of
    processes before they are written."""
    state = await asyncio.to_thread(journal.read)
    probe = SnapshotProbe.of(state.header.paths, state.header.ignore)
    listed, running = await run_parts(
        target, [probe.script, _processes_script(f"{RUN_MARKER}={workflow_id}")],
        timeout=OBSERVE_TIMEOUT)
    post, after = _read(probe, listed, running, target.identity)
    return await asyncio.to_thread(_record, journal, state, post, [mask(p) for p in after])


async def read_state(target: Target, header: Header) -> tuple[Snapshot, list[ProcessInfo]]:
    """The snapshot of ``header``'s paths and the processes on ``target``, in one run."""
    probe = SnapshotProbe.of(header.paths, header.ignore)
    listed, running = await run_parts(target, [probe.script, _processes_script()])
    return _read(probe, listed, running, target.identity)


def _read(probe: SnapshotProbe, listed: RunResult, running: RunResult, where: str
          ) -> tuple[Snapshot, list[ProcessInfo]]:
    """The snapshot and the processes the probes printed; ``ExecutionFailedError`` when
    either failed or is garbled."""
    try:
        return probe.parse(listed, where), _parse_processes(running, where)
    except binascii.Error as exc:  # base64 cut short, or mixed with other output
        raise ExecutionFailedError(f"the state read from {where} is garbled ({exc})") from exc


def _record(journal: Journal, state: JournalState, post: Snapshot,
            after: Sequence[ProcessInfo]) -> list[Entry]:
    """Append what changed from the saved state to ``post`` and ``after``, then the
    ``executed`` phase. Blocks on the disk: async code runs it in a thread."""
    entries = observed(journal.pre_snapshot(), post, state.entries[: state.saved],
                       state.processes, after, first_id=len(state.entries) + 1)
    journal.record_observed(entries)
    return entries


def observed(
    pre: Snapshot,
    post: Snapshot,
    saved: Sequence[Entry],
    before: Sequence[ProcessInfo],
    after: Sequence[ProcessInfo],
    *,
    first_id: int,
) -> list[Entry]:
    """The changes actually made, as entries to append after the saved ones.

    A new process counts as started by the script when it carries the run marker or its
    program is a file the script created; an old process that is gone counts as stopped
    by it when the script started the same program again (a restart). Anything else
    coming and going on a busy host is none of the journal's business.
    """
    change = diff(pre, post)
    backed = {entry.name for entry in saved}
    entries: list[Entry] = []

    def add(**fields: Any) -> None:
        entries.append(Entry(id=first_id + len(entries), **fields))

    for path, entry in sorted(change.added.items()):
        add(kind="file", op="created", name=path, after=entry)
    for path, modified in sorted(change.modified.items()):
        op = "modified" if modified.content else "metadata"
        # Mode and owner can always be put back; bytes only from a backup.
        add(kind="file", op=op, name=path, before=modified.before, after=modified.after,
            backup=path in backed, restorable=path in backed or op == "metadata")
    for path, entry in sorted(change.removed.items()):
        add(kind="file", op="deleted", name=path, before=entry, backup=path in backed,
            restorable=path in backed or entry.type == "d")
    for kind in ("user", "group"):
        for name in sorted(getattr(change, f"{kind}s_added")):
            add(kind=kind, op="added", name=name)
        for name, line in sorted(getattr(change, f"{kind}s_removed").items()):
            add(kind=kind, op="removed", name=name, line_before=line)
        for name, (old, _new) in sorted(getattr(change, f"{kind}s_changed").items()):
            add(kind=kind, op="changed", name=name, line_before=old)
    for name, version in sorted(change.packages_added.items()):
        add(kind="package", op="added", name=name, version_after=version)
    for name, version in sorted(change.packages_removed.items()):
        add(kind="package", op="removed", name=name, version_before=version)
    for name, (old, new) in sorted(change.packages_changed.items()):
        add(kind="package", op="changed", name=name, version_before=old, version_after=new)
    was = {p.key for p in before}
    started = [p for p in after if p.key not in was and (p.marked or p.exe in change.added)]
    # A restart: a detached service gone, and the script started the same program, as
    # the same user, detached again. Shells never count: an unrelated login ending
    # while the script runs must not be "restarted" by a rollback.
    restarted = {(p.exe, p.uid) for p in started
                 if p.daemon and os.path.basename(p.exe) not in _SHELLS}
    still = {p.key for p in after}
    for process in before:
        if process.key not in still and process.daemon and (process.exe, process.uid) in restarted:
            add(kind="process", op="stopped", name=process.describe(), process=process)
    for process in started:
        add(kind="process", op="started", name=process.describe(), process=process)
    return entries


def _tar_entry(archive: tarfile.TarFile, member: tarfile.TarInfo) -> FileEntry:
    """The ``FileEntry`` of a saved path, as the snapshot would have recorded it."""
    kind: FileType = ("d" if member.isdir() else "l" if member.issym()
                      else "f" if member.isfile() else "c")
    sha256 = mtime = None
    if member.isfile():
        if member.size < DEFAULT_HASH_LIMIT:
            handle = archive.extractfile(member)
            assert handle is not None
            sha256 = hashlib.sha256(handle.read()).hexdigest()
        else:
            mtime = _mtime(member)
    return FileEntry.model_construct(
        type=kind, mode=member.mode & 0o7777, uid=member.uid, gid=member.gid,
        size=member.size, sha256=sha256, mtime=mtime,
        target=member.linkname if member.issym() else None,
    )


def _mtime(member: tarfile.TarInfo) -> str:
    """The modification time as ``find -printf %T@`` prints it (pax keeps nanoseconds)."""
    exact = member.pax_headers.get("mtime")
    if exact is None:
        return f"{int(member.mtime)}.0000000000"
    seconds, _, fraction = exact.partition(".")
    return f"{seconds}.{fraction.ljust(10, '0')[:10]}"
