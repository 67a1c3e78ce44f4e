"""What the change journal reads from the target: before the script, as it ends, and
after an undo. The journal's files, store and index are ``journal``'s.

``prepare`` saves, from ONE run on the target (or read ahead with the facts,
``Before``, when nothing may wait in between), what undoing the
workflow needs: a snapshot of the journal's paths (``pre.json``), the backup of every
file the script may modify or delete (``backup.tar``: the predicted paths, plus every
file and link under ``/etc`` in the watched paths, selected and archived by ``tar`` on
the target and streamed back base64, so it works on any target that can run a script),
and the processes running; then the ``executing`` phase. The probes of one read are
``Sections`` of one script: one base64 stream.

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
import functools
import hashlib
import io
import logging
import os
import secrets
import tarfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from workflow_agent.errors import ExecutionFailedError, InvalidInputError
from workflow_agent.execution.journal import Entry, Header, Journal, JournalState, ProcessInfo
from workflow_agent.execution.target import (
    OutputCallback,
    RunResult,
    Target,
    cut_frames,
    framed_results,
    probe_output,
    quote,
)
from workflow_agent.verification.snapshot import (
    DEFAULT_HASH_LIMIT,
    FileEntry,
    FileType,
    Snapshot,
    SnapshotProbe,
    add_packages,
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
# --blocking-factor=1: 512-byte records, not 10 KiB ones (a small backup was mostly
# padding: 14 KB of base64 for one file).
_BACKUP = r"""{walk}{{
  (( ${{#paths[@]}} )) && walk \( -type f -o -type l \) -print0
  for p in {predicted}; do
    if [ -e "$p" ] || [ -L "$p" ]; then printf '%s\0' "$p"; fi
  done
}} | sort -zu | tar --create --file - --no-recursion --null --files-from - \
  --absolute-names --numeric-owner --xattrs --acls --format=posix --blocking-factor=1"""

#: The environment variable every journaled script runs with: the processes it starts
#: (and that do not clear their environment) can be told apart from everything else.
RUN_MARKER = "WORKFLOW_AGENT_RUN"

#: The lines of /proc/PID/status and /proc/PID/cgroup the process list reads (ERE).
UNIT_LINES = r"^(Uid|Gid):|^0::|^[0-9]+:name=systemd:"

# A fixed handful of programs read every process at once (2 to 3 greps and a find,
# whatever the number of processes); the client parses (``_parse_processes``). Bash
# builtins on /proc files cost about a millisecond per process, a fork per process as
# much. The pids are globbed once, relative to /proc (shorter arguments), before any of
# the programs starts: none of them is listed. Sections, NUL-separated:
#   S, $self, $part (set by ``Sections``' script: $$ and $BASHPID), $BASHPID: the run's
#     shell (run_parts' or run_then_parts' wrapper, or the script's own), the subshell
#     the part runs in, and the sections' subshell. The client leaves out the shell, and
#     the children of all three (the other parts, the wrapper's guard, base64, what a
#     section before ran). The script
#     run_then_parts ran before has ended by then; what it left running is not the
#     wrapper's child.
#   a record per argument of every cmdline (a kernel thread's, empty, prints none) and
#     one per whole stat: "PID/cmdline:" or "PID/stat:", then the bytes. A file name
#     holds no colon; a comm may hold anything but NUL: the client splits the stat after
#     the last ") ".
#   U, then one field of lines, no NUL in it: "PID/status:Uid:..." and "PID/status:Gid:..."
#     (the real ids first; no other line of status matches) and the cgroup lines naming
#     a process's systemd unit (``UNIT_LINES``): "PID/cgroup:0::PATH" (the unified
#     hierarchy: cgroup v2, and hybrid hosts) and "PID/cgroup:N:name=systemd:PATH"
#     (systemd's own hierarchy on cgroup v1 and hybrid hosts), at most two per file (-m 2).
#   M, then "PID/environ" for every environment holding the marker (NAME=VALUE), when
#     one is given: environments themselves never leave the host.
#   L, then "PID/exe", its target, "PID/cwd", its target, for every pid; then END.
# Processes come and go, and other users' environments are unreadable: errors are
# dropped (grep exits 2 on them, find 1), but a program that could not run fails the
# section, and the client checks that the part's subshell's own files were read.
_PROCESSES = r"""marker=%(marker)s
cd /proc && pids=([0-9]*) || exit
ran() { local s=$?; (( s <= 2 )) || { echo "$1 failed (exit status $s)" >&2; exit 1; }; }
{
printf 'S\0%%s\0%%s\0%%s\0' "$self" "$part" "$BASHPID"
grep -a -z -H -e '' -- "${pids[@]/%%//cmdline}" "${pids[@]/%%//stat}" 2>/dev/null
ran grep
printf 'U\0'
grep -a -H -m 2 -E -e %(lines)s -- "${pids[@]/%%//status}" \
  "${pids[@]/%%//cgroup}" 2>/dev/null
ran grep
printf '\0M\0'
if [ -n "$marker" ]; then
  grep -a -z -Z -l -x -F -e "$marker" -- "${pids[@]/%%//environ}" 2>/dev/null
  ran grep
fi
printf 'L\0'
find "${pids[@]/%%//exe}" "${pids[@]/%%//cwd}" -maxdepth 0 -printf '%%p\0%%l\0' 2>/dev/null
ran find
printf 'END\0'
}"""


def backup_paths(pre: Snapshot, predicted: Iterable[str]) -> list[str]:
    """What to save before the change: the predicted paths and the configuration files."""
    chosen = set(predicted)
    chosen.update(path for path, entry in pre.files.items()
                  if path.startswith(CONFIG_ROOT) and entry.type in ("f", "l"))
    return sorted(chosen)


def _backup_body(probe: SnapshotProbe, predicted: Sequence[str]) -> str:
    """The section saving ``backup_paths(pre, predicted)`` for the ``pre`` that ``probe``
    takes: a tar."""
    return _BACKUP.format(walk=probe.walk(CONFIG_ROOT),
                          predicted=" ".join(quote(p) for p in predicted) or "''")


def _saved(result: RunResult, pre: Snapshot, predicted: Sequence[str], where: str
           ) -> tuple[bytes | None, list[Entry]]:
    """The tar ``_backup_body`` printed (None when it holds nothing) and one entry per
    saved path, with its state read from the archive itself."""
    failed = f"could not save the files the install will change on {where}: "
    if not result.ok:
        raise ExecutionFailedError(failed + " ".join(result.stderr.split())[-400:],
                                   hint="Nothing was changed on the target.")
    try:
        data = probe_output(result)
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


def _processes_body(marker: str = "") -> str:
    """The section listing the processes on a target (kernel threads left out), flagging
    those whose environment holds ``marker`` (``NAME=VALUE``); the last of its
    ``Sections`` (it changes directory, and may exit).
    ``ValueError`` for a marker holding a newline: grep would take it for two."""
    if "\n" in marker:
        raise ValueError(f"a run marker holds a newline: {marker!r}")
    return _PROCESSES % {"marker": quote(marker), "lines": quote(UNIT_LINES)}


def _unit(cgroups: list[str]) -> str | None:
    """The systemd service a process runs in, from its ``UNIT_LINES`` of cgroup:
    systemd's own hierarchy first (on a hybrid host the unified one may say only "/")."""
    unified = legacy = ""
    for line in cgroups:
        number, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if number == "0":
            unified = path
        elif controllers == "name=systemd":
            legacy = path
    name = (legacy or unified).rpartition("/")[2]
    return name if name.endswith(".service") else None


def _parse_processes(result: RunResult, where: str) -> list[ProcessInfo]:
    """The processes ``result`` (of ``_processes_body``, run on ``where``) lists."""
    if result.exit_code != 0:
        raise ExecutionFailedError(f"could not list the processes on {where}: "
                                   + " ".join(result.stderr.split())[-300:])
    garbled = ExecutionFailedError(f"the process list from {where} is garbled")
    try:
        fields = decode(result)
    except binascii.Error as exc:  # base64 cut short, or mixed with other output
        raise garbled from exc
    # S and three pids, records up to U, one field of lines, M, names up to L, pairs up to
    # END: the last field but the empty one after its NUL. No record holds a marker:
    # each starts with "PID/", and a link's path ("PID/exe") comes first in its pair.
    try:
        if fields[0] != "S" or fields[-2:] != ["END", ""]:
            raise ValueError
        shell, part, sections = fields[1:4]
        u = fields.index("U", 4)
        if fields[u + 2] != "M":
            raise ValueError
        m = fields.index("L", u + 3)
        pairs = fields[m + 1 : -2]
        if len(pairs) % 2:
            raise ValueError
    except (ValueError, IndexError):
        raise garbled from None
    argvs: dict[str, list[str]] = {}  # in the order listed: the glob's
    stats: dict[str, list[str]] = {}
    for record in fields[3:u]:
        name, _, value = record.partition(":")  # a file name holds no colon
        pid, _, kind = name.partition("/")
        if kind == "cmdline":
            argvs.setdefault(pid, []).append(value)
        elif kind == "stat":  # the fields after the comm, whatever the comm holds
            stats[pid] = value.rpartition(") ")[2].split()
    ids: dict[str, dict[str, str]] = {}
    cgroups: dict[str, list[str]] = {}
    for line in fields[u + 1].split("\n"):
        name, _, value = line.partition(":")
        pid, _, kind = name.partition("/")
        if kind == "status" and len(words := value.split()) > 1:
            ids.setdefault(pid, {})[words[0]] = words[1]  # the real uid or gid first
        elif kind == "cgroup":
            cgroups.setdefault(pid, []).append(value.strip(" \t"))
    marked = {name.partition("/")[0] for name in fields[u + 3 : m]}
    links = dict(zip(pairs[::2], pairs[1::2], strict=True))
    if not (part in argvs and part in stats and "Gid:" in ids.get(part, {})):
        # This part's subshell lived throughout: a grep that read nothing at all (it
        # exits 2 then, as when a process exits) must not pass for an empty host.
        raise ExecutionFailedError(f"could not list the processes on {where}: "
                                   f"grep read nothing of /proc/{part}, its own")
    found: list[ProcessInfo] = []
    for pid, argv in argvs.items():
        stat = stats.get(pid, [])
        uid, gid = ids.get(pid, {}).get("Uid:", ""), ids.get(pid, {}).get("Gid:", "")
        if pid == shell or len(stat) < 20 or not (uid.isdigit() and gid.isdigit()):
            continue  # the run's shell, or exited while it was read
        ppid, session, start = stat[1], stat[3], stat[19]
        if ppid in (shell, part, sections):
            continue  # the run's own
        unit = _unit(cgroups.get(pid, []))
        found.append(ProcessInfo(
            pid=int(pid), start=start, uid=int(uid), gid=int(gid),
            exe=links.get(f"{pid}/exe", ""), cwd=links.get(f"{pid}/cwd") or "/",
            argv=argv, unit=unit, marked=pid in marked,
            daemon=ppid in ("0", "1") or session == pid or bool(unit),
        ))
    return found


# The sections run one after the other in one subshell whose output is one base64
# stream: each section's output, then "<RS>wa-section-NONCE STATUS<NUL>" (NONCE random
# per script: no file can hold it); on stderr a frame line after each, as run_parts'.
_SECTIONS = r"""set -o pipefail
export LC_ALL=C
self=$$ part=$BASHPID
{{
{sections}}} </dev/null | base64 -w 4096
"""
_SECTION = r"""{body}
printf '\036wa-section-{nonce} %d\0' "$?"
printf %s $'\n\036wa-section-{nonce}\n' >&2
"""


class Sections:
    """Several of these read-only probes (a snapshot's body, the backup's, the
    processes') as ONE script: run alone or as a part, it costs a host one subshell and
    one base64 in all, where each probe run as a part of its own costs both (1.4 ms of
    CPU on a lab host). ``split`` hands each section its own result: its exit status,
    its stderr, and what it printed as bytes (``RunResult.data``)."""

    def __init__(self, *bodies: str) -> None:
        self.bodies = bodies
        self.nonce = secrets.token_hex(8)

    @property
    def script(self) -> str:
        """The script running the sections."""
        return _SECTIONS.format(sections="".join(
            _SECTION.format(body=body, nonce=self.nonce) for body in self.bodies))

    def split(self, result: RunResult) -> list[RunResult]:
        """One result per section of ``result`` (a run of ``script``). A section the run
        never finished (it was killed, or a section before exited) gets the run's exit
        status (or -1) and what was decoded of it."""
        raw = _decoded("".join(result.stdout.split()))
        count = len(self.bodies)
        outputs, fields = cut_frames(raw, f"\x1ewa-section-{self.nonce} ".encode(), b"\0",
                                     count)
        stderrs, _ = cut_frames(result.stderr, f"\n\x1ewa-section-{self.nonce}", "\n", count)
        return framed_results(result, outputs, [int(f) for f in fields], stderrs, count)


def _decoded(text: str) -> bytes:
    """Base64 ``text`` decoded; cut short, what its whole groups of four hold; garbled,
    nothing (each section then reads as incomplete)."""
    for candidate in (text, text[: len(text) // 4 * 4]):
        try:
            return base64.b64decode(candidate)
        except binascii.Error:
            continue
    return b""


def _state(probe: SnapshotProbe, marker: str = "") -> Sections:
    """The snapshot ``probe`` takes and the processes (``marker``: as ``_processes_body``)."""
    return Sections(probe.body, _processes_body(marker))


@dataclass(frozen=True)
class Before:
    """What ``prepare`` reads, read ahead in a run that had to be made anyway (the
    facts'): ``read`` (of ``before_read(paths, ignore, predicted, ..., since=since)``)
    and its ``result``, and when. ``packages``: the package listing of that run, when the
    snapshot left it out."""

    paths: tuple[str, ...]
    ignore: tuple[str, ...]
    predicted: tuple[str, ...]
    read: Sections
    result: RunResult
    packages: str | None = None
    read_at: float = field(default_factory=time.monotonic)
    since: Snapshot | None = None

    @functools.cached_property
    def parts(self) -> list[RunResult]:
        """``read.split(result)``, decoded once for the baseline and ``prepare`` both."""
        return self.read.split(self.result)

    def snapshot(self, where: str) -> Snapshot | None:
        """The snapshot this read holds (no packages), None when it is not usable."""
        try:
            return SnapshotProbe.of(self.paths, self.ignore, since=self.since).parse(
                self.parts[0], where)
        except (ExecutionFailedError, InvalidInputError):
            return None


def before_read(paths: Sequence[str], ignore: Sequence[str],
                predicted: Sequence[str] = (), *, packages: bool = True,
                since: Snapshot | None = None) -> Sections:
    """The read-only probes whose results ``prepare`` saves: the snapshot (without the
    package listing unless ``packages``; ``since``: as ``SnapshotProbe.since``), the
    backup, the processes."""
    probe = SnapshotProbe.of(paths, ignore, packages=packages, since=since)
    return Sections(probe.body, _backup_body(probe, predicted), _processes_body())


async def prepare(
    target: Target, journal: Journal, predicted: Sequence[str] = (), mask: Mask = _unmasked,
    ahead: Before | None = None, *, since: Snapshot | None = None,
) -> list[Entry]:
    """Save what undoing ``journal``'s workflow needs, from one run on ``target``: the
    snapshot, the backups (``backup_paths``), the processes (``mask`` hides secrets in
    their command lines); then the ``executing`` phase. Returns the saved entries.

    ``ahead``: the same read, made earlier under the workflow's lock; used instead of a
    run when it covers exactly this journal and is at most ``AHEAD_MAX_AGE`` old (a
    prompt that waited for a person makes it stale: the target is read again, hashing
    only the files that changed since ``since``, a snapshot taken earlier)."""
    header = journal.header
    if (ahead is not None and time.monotonic() - ahead.read_at <= AHEAD_MAX_AGE
            and (ahead.paths, ahead.ignore, ahead.predicted)
            == (tuple(header.paths), tuple(header.ignore), tuple(predicted))):
        # Parsed with the snapshot its script left the unchanged files' hashes to.
        (listed, saving, running), packages, since = ahead.parts, ahead.packages, ahead.since
    else:
        read = before_read(header.paths, header.ignore, predicted, since=since)
        result, packages = await target.run(read.script, timeout=OBSERVE_TIMEOUT), None
        listed, saving, running = read.split(result)
    pre = SnapshotProbe.of(header.paths, header.ignore, since=since).parse(
        listed, target.identity)
    if packages is not None:
        add_packages(packages, pre)
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
    state, pre = await asyncio.to_thread(_saved_state, journal)
    probe = SnapshotProbe.of(state.header.paths, state.header.ignore, since=pre)
    marker = f"{RUN_MARKER}={workflow_id}"
    read = _state(probe, marker)
    result, (state_read, *probed) = await target.run_then_parts(
        script, [read.script, *probes], env=env,
        timeout=timeout, parts_timeout=OBSERVE_TIMEOUT, on_output=on_output, marker=marker)
    listed, running = read.split(state_read)
    try:
        post, after = _read(probe, listed, running, target.identity)
    except ExecutionFailedError as exc:
        log.warning("reading what the script changed on %s again: %s", target.identity, exc)
        await observe(target, journal, workflow_id, mask)
    else:
        await asyncio.to_thread(_record, journal, state, pre, post, [mask(p) for p in after])
    return result, probed


async def observe(
    target: Target, journal: Journal, workflow_id: str, mask: Mask = _unmasked,
) -> list[Entry]:
    """Append what the script of ``journal``'s workflow changed (phase ``executed``),
    from one run on ``target``; ``mask`` hides secrets in the command lines of
    processes before they are written."""
    state, pre = await asyncio.to_thread(_saved_state, journal)
    probe = SnapshotProbe.of(state.header.paths, state.header.ignore, since=pre)
    read = _state(probe, f"{RUN_MARKER}={workflow_id}")
    listed, running = read.split(await target.run(read.script, timeout=OBSERVE_TIMEOUT))
    post, after = _read(probe, listed, running, target.identity)
    return await asyncio.to_thread(_record, journal, state, pre, post,
                                   [mask(p) for p in after])


def _saved_state(journal: Journal) -> tuple[JournalState, Snapshot]:
    """The journal's state and the snapshot it saved before the change."""
    return journal.read(), journal.pre_snapshot()


async def read_state(target: Target, header: Header, since: Snapshot | None = None
                     ) -> tuple[Snapshot, list[ProcessInfo]]:
    """The snapshot of ``header``'s paths and the processes on ``target``, in one run;
    ``since``: as ``SnapshotProbe.since``."""
    probe = SnapshotProbe.of(header.paths, header.ignore, since=since)
    read = _state(probe)
    listed, running = read.split(await target.run(read.script, timeout=OBSERVE_TIMEOUT))
    return _read(probe, listed, running, target.identity)


def _read(probe: SnapshotProbe, listed: RunResult, running: RunResult, where: str
          ) -> tuple[Snapshot, list[ProcessInfo]]:
    """The snapshot and the processes the probes printed; ``ExecutionFailedError`` when
    either failed or is garbled."""
    try:
        return probe.parse(listed, where), _parse_processes(running, where)
    except binascii.Error as exc:  # base64 cut short, or mixed with other output
        raise ExecutionFailedError(f"the state read from {where} is garbled ({exc})") from exc


def _record(journal: Journal, state: JournalState, pre: Snapshot, post: Snapshot,
            after: Sequence[ProcessInfo]) -> list[Entry]:
    """Append what changed from the saved state (``pre``, ``state``) to ``post`` and
    ``after``, then the ``executed`` phase. Blocks on the disk: async code runs it in a
    thread."""
    entries = observed(pre, post, state.entries[: state.saved],
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
