"""Snapshots of a target's files, packages, users and groups: the uninstall proof.

Take a snapshot before installing, another after uninstalling; an empty ``diff`` proves
nothing was left behind. A snapshot is one bash script on the target (``find``,
``sha256sum``, ``dpkg-query``, ``/etc/passwd`` and ``/etc/group``); its output travels
NUL-separated and base64-encoded, so file names with spaces, newlines or bytes that are
not UTF-8 arrive intact (such bytes are decoded with ``surrogateescape``).

Ignore patterns are globs on the full path where ``*`` and ``?`` stay within one path
component and ``**`` crosses them; a path is ignored when it or any directory above it
matches, so ``/var/cache/*`` ignores the whole tree under ``/var/cache`` (but not the
directory itself). ``*`` does not cross ``/`` on purpose: ``/etc/*-`` must ignore the
``/etc/passwd-`` backups without hiding a leftover ``/etc/foo/bar-``.
"""

from __future__ import annotations

import functools
import posixpath
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, cast, get_args

from pydantic import BaseModel, ConfigDict, Field

from workflow_agent.errors import ExecutionFailedError, InvalidInputError
from workflow_agent.execution.target import probe_output, quote
from workflow_agent.facts import packages_script

if TYPE_CHECKING:
    from workflow_agent.execution.target import RunResult, Target

DEFAULT_IGNORE: tuple[str, ...] = (
    "/var/lib/dpkg/**",
    "/var/lib/apt/**",
    "/var/cache/**",
    "/var/log/**",
    "/etc/ld.so.cache",
    "/etc/*-",
    "/etc/.pwd.lock",
    "/tmp/**",
    "/run/**",
    "/proc/**",
    "/sys/**",
    "/dev/**",
)
"""Bookkeeping that package managers and the system touch on every run."""

DEFAULT_MAX_FILES = 200_000
#: Files this size or larger are compared by size and modification time, not content:
#: hashing a host's large binaries would make every first install seconds slower.
DEFAULT_HASH_LIMIT = 1024 * 1024

FileType = Literal["f", "d", "l", "b", "c", "p", "s", "D"]
_FILE_TYPES = frozenset(get_args(FileType))


class FileEntry(BaseModel):
    """One file system entry. ``type`` is find's ``%y`` letter: f(ile), d(ir), l(ink), ...

    ``sha256`` is set for regular files under the hash limit (``None`` if unreadable),
    ``mtime`` for larger ones instead, ``target`` for links.
    ``size`` of directories is recorded but never compared: ext4 directories don't shrink.
    """

    model_config = ConfigDict(frozen=True)

    type: FileType
    mode: int
    uid: int
    gid: int
    size: int
    sha256: str | None = None
    mtime: str | None = None
    target: str | None = None

    @property
    def kind(self) -> str:
        """``file``, ``dir``, ``link`` or the find letter for other types."""
        return {"f": "file", "d": "dir", "l": "link"}.get(self.type, self.type)


class Snapshot(BaseModel):
    """Files under the snapshot paths, the package set, users and groups (JSON round-trips)."""

    files: dict[str, FileEntry] = Field(default_factory=dict)
    packages: dict[str, str] = Field(default_factory=dict)
    config_files_remaining: list[str] = Field(default_factory=list)
    users: dict[str, str] = Field(default_factory=dict)
    groups: dict[str, str] = Field(default_factory=dict)
    warnings: list[str] = Field(default_factory=list)
    """What find/sha256sum could not read (entries may be missing or lack a hash)."""
    packages_stamp: str | None = None
    """The package database's files when the packages were listed (``facts``' ``#db``
    line): a later listing while they still have it would list the same packages."""
    stamps: dict[str, str] = Field(default_factory=dict)
    """Per regular file: ``inode:ctime:mtime:size``. A file that still has its stamp has
    its content (a write changes the ctime, a replacement the inode): a later snapshot
    (``SnapshotProbe.since``) takes its hash from here instead of hashing it again."""


class FileChange(BaseModel):
    """A path present in both snapshots whose entry differs."""

    model_config = ConfigDict(frozen=True)

    before: FileEntry
    after: FileEntry
    content: bool
    """Bytes, link target or file type changed."""
    metadata: list[str]
    """Mode and owner changes, e.g. ``["mode 0644 -> 0600", "owner 0:0 -> 100:101"]``."""


class SnapshotDiff(BaseModel):
    """What changed from one snapshot to another."""

    added: dict[str, FileEntry] = Field(default_factory=dict)
    removed: dict[str, FileEntry] = Field(default_factory=dict)
    modified: dict[str, FileChange] = Field(default_factory=dict)
    packages_added: dict[str, str] = Field(default_factory=dict)
    packages_removed: dict[str, str] = Field(default_factory=dict)
    packages_changed: dict[str, tuple[str, str]] = Field(default_factory=dict)
    config_files_remaining_added: list[str] = Field(default_factory=list)
    users_added: dict[str, str] = Field(default_factory=dict)
    users_removed: dict[str, str] = Field(default_factory=dict)
    users_changed: dict[str, tuple[str, str]] = Field(default_factory=dict)
    groups_added: dict[str, str] = Field(default_factory=dict)
    groups_removed: dict[str, str] = Field(default_factory=dict)
    groups_changed: dict[str, tuple[str, str]] = Field(default_factory=dict)

    @property
    def is_empty(self) -> bool:
        """True when nothing changed."""
        return not any(getattr(self, name) for name in type(self).model_fields)

    def lines(self) -> list[str]:
        """Human-readable changes: ``+`` added, ``-`` removed, ``~`` changed."""
        out = [f"+ {path} ({entry.kind})" for path, entry in sorted(self.added.items())]
        out += [f"- {path} ({entry.kind})" for path, entry in sorted(self.removed.items())]
        for path, change in sorted(self.modified.items()):
            what = (["content"] if change.content else []) + change.metadata
            out.append(f"~ {path} ({', '.join(what)})")
        out += [f"+ package {n} {v}" for n, v in sorted(self.packages_added.items())]
        out += [f"- package {n} {v}" for n, v in sorted(self.packages_removed.items())]
        out += [f"~ package {n} {a} -> {b}" for n, (a, b) in sorted(self.packages_changed.items())]
        out += [f"+ package {n} config files remain (removed, not purged)"
                for n in sorted(self.config_files_remaining_added)]
        for kind in ("user", "group"):
            out += [f"+ {kind} {n}" for n in sorted(getattr(self, f"{kind}s_added"))]
            out += [f"- {kind} {n}" for n in sorted(getattr(self, f"{kind}s_removed"))]
            out += [f"~ {kind} {n}" for n in sorted(getattr(self, f"{kind}s_changed"))]
        return out


@functools.lru_cache(maxsize=1024)  # each probe converts the same few dozen patterns
def _glob_regex(pattern: str) -> str:
    # The same text is a Python regex and a POSIX ERE for find -regex: only escapes and
    # constructs both engines read alike.
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        char = pattern[i]
        if char in "*?":
            out.append("[^/]*" if char == "*" else "[^/]")
        else:
            out.append("\\" + char if char in ".^$+(){}|[]\\" else char)
        i += 1
    return "".join(out)


def ignore_regex(patterns: Sequence[str]) -> str | None:
    """One regex matching every path ignored by ``patterns`` (or under one); ``None`` if none."""
    if not patterns:
        return None
    return "(" + "|".join(_glob_regex(p) for p in patterns) + ")(/.*)?"


def _normalize(path: str) -> str:
    if not path.startswith("/"):
        raise InvalidInputError(f"snapshot paths must be absolute, got {path!r}")
    return "/" + posixpath.normpath(path).lstrip("/")


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _literal(path: str) -> str:
    # A literal path as a regex both engines read alike (see _glob_regex).
    return "".join("\\" + c if c in ".^$+(){}|[]\\*?" else c for c in path)


_WALK = """paths=()
for p in {paths}; do
  if [ -e "$p" ] || [ -L "$p" ]; then paths+=("$p"); fi
done
prune=({prune})
walk() {{ find "${{paths[@]}}" -xdev -regextype posix-extended "${{prune[@]}}" "$@"; }}
"""

#: Marks the output of ``_BODY``; bump it when the layout changes.
_FORMAT = "wa-snapshot-3"
#: Fields per entry of the listing walk.
_FIELDS = 9

# One walk lists the entries (9 fields each, the last "inode:ctime"), cut by head after
# max_files of them and
# the first token of one more: then find dies of SIGPIPE at its next write and a large
# tree is refused without hashing it (a listing small enough to fit in the pipe may have
# been written in full: then its few files are hashed, and it is refused all the same).
# Otherwise a second walk hashes the small regular files ("<64 hex>  <path>" tokens):
# all of them, or (``_HASH_CHANGED``, with an earlier snapshot's stamps) those whose
# stamp changed since, which bash tells apart and xargs hands to sha256sum.
# A tree an earlier snapshot listed (``since``: it held at most max_files entries then)
# that is hashed whole is listed and hashed in ONE walk (``_LIST_AND_HASH``), a find
# less: find flushes what it printed before it starts sha256sum and waits for it, so
# the records never mix (``_listing`` reads them in any order). head then allows a hash
# token per entry too, and cuts a tree grown past max_files at its max_files + 1st entry
# at the latest: at worst as many files were hashed as a tree just within the limit has.
# /etc/passwd and /etc/group are read by builtins, byte for byte (mapfile keeps a last
# line without a newline), to spare a cat each; 2>/dev/null comes first so that a
# missing file's error is silenced too.
_BODY = r"""{walk}slurp() {{
  local text=(); mapfile -d '' text 2>/dev/null < "$1"; printf '%s' "${{text[@]}}"
}}
{{
  printf '{format}\0'
  if (( ${{#paths[@]}} )); then
{walks}
  fi
  printf 'PACKAGES\0'
{packages}  printf '\0PASSWD\0'; slurp /etc/passwd
  printf '\0GROUP\0'; slurp /etc/group
  printf '\0END\0'
}}"""

_LIST = r"walk -printf '%y\0%m\0%U\0%G\0%s\0%T@\0%p\0%l\0%i:%C@\0'"
_LIST_THEN_HASH = """    {list} | head -z -n {limit}
    (( PIPESTATUS[0] == 141 )) || {hashing}"""
_HASH_ALL = "-type f -size -{hash_limit}c -exec sha256sum -z -- {{}} +"
_LIST_AND_HASH = "    {list} \\( {hash_all} \\) | head -z -n {limit}"
_HASH_CHANGED = r"""{{
      declare -A known=({known})
      walk -type f -size -{hash_limit}c -printf '%i:%C@:%T@:%s\0%p\0' |
        while IFS= read -r -d '' stamp && IFS= read -r -d '' path; do
          [[ ${{known[$path]-}} == "$stamp" ]] || printf '%s\0' "$path"
        done | xargs -0 -r sha256sum -z --
    }}"""
#: Below this many bytes of files it would not hash again, a snapshot hashes them all:
#: telling them apart (a bash loop, xargs) costs about as much.
_KNOWN_BYTES = 1024 * 1024
#: Above this many such files, a snapshot hashes them all (its script would name them).
_KNOWN_FILES = 20_000

#: Runs a probe's body alone (``journal_probe.Sections`` runs several in one stream).
_ALONE = "set -o pipefail\nexport LC_ALL=C\n{body} | base64 -w 4096\n"


def add_packages(text: str, snapshot: Snapshot, same: Snapshot | None = None) -> None:
    """Add the packages a package listing (``facts.packages_script``'s output) holds;
    one that says ``#same`` (its database unchanged since ``same`` was listed) holds
    ``same``'s packages."""
    for line in text.splitlines():
        if line.startswith("#db "):
            snapshot.packages_stamp = line[4:] or None
            continue
        if line == "#same":
            if same is None or same.packages_stamp != snapshot.packages_stamp:
                raise ValueError("a package listing left out with no listing to stand for it")
            snapshot.packages.update(same.packages)
            snapshot.config_files_remaining.extend(same.config_files_remaining)
            continue
        status, _, rest = line.partition("\t")
        name, _, version = rest.partition("\t")
        state = status[1:2]  # dpkg: desired, current, error; current n = not installed
        if not name or state in ("", "n"):
            continue
        if state == "c":
            snapshot.config_files_remaining.append(name)
        else:
            # Half-installed, unpacked... packages are present too: keep them, say so.
            snapshot.packages[name] = version if state == "i" else f"{version} [{status.strip()}]"


def _account_lines(text: str) -> dict[str, str]:
    return {line.split(":", 1)[0]: line for line in text.splitlines() if line.strip()}


@dataclass(frozen=True)
class SnapshotProbe:
    """One snapshot's script and how to read what it printed: run ``script`` on a
    target (alone, or as a part of ``run_parts``) and hand its result to ``parse``."""

    paths: tuple[str, ...]
    """Normalized, none inside another (it would be listed and counted twice)."""
    ignore: str | None
    """``ignore_regex`` of the ignore patterns."""
    max_files: int = DEFAULT_MAX_FILES
    hash_limit: int = DEFAULT_HASH_LIMIT
    packages: bool = True
    """Whether the script lists the packages; a caller that listed them in the same run
    (the facts do) adds them to the parsed snapshot with ``add_packages`` instead."""
    since: Snapshot | None = field(default=None, compare=False)
    """An earlier snapshot of the same target: its packages stand while the package
    database is as it was then (its ``packages_stamp``: the script then lists none), and
    the hash of each file that still has its stamp (``Snapshot.stamps``)."""

    @classmethod
    def of(
        cls,
        paths: Sequence[str],
        ignore: Sequence[str] = DEFAULT_IGNORE,
        *,
        max_files: int = DEFAULT_MAX_FILES,
        hash_limit: int = DEFAULT_HASH_LIMIT,
        packages: bool = True,
        since: Snapshot | None = None,
    ) -> SnapshotProbe:
        """The probe for ``paths`` (absolute, else ``InvalidInputError``) and ``ignore``."""
        normalized = sorted({_normalize(p) for p in paths})
        folded = tuple(p for p in normalized
                       if not any(_under(p, q) for q in normalized if q != p))
        return cls(folded, ignore_regex(ignore), max_files, hash_limit, packages, since)

    def walk(self, within: str = "/") -> str:
        """Bash defining ``walk FIND-ARGS...``: ``find`` over the part of the snapshot
        paths within ``within`` (those that exist), on the file systems and with the
        ignore patterns the snapshot uses, so it meets exactly the entries the snapshot
        lists there. ``paths`` is the array of start points, empty when none exist."""
        within = _normalize(within)
        above = [p for p in self.paths if p != within and _under(within, p)]
        # Walking from a path above keeps -xdev's view of the tree; everything off the
        # way down to `within` is pruned.
        starts = above or [p for p in self.paths if _under(p, within)]
        prune = [f"-regex {shlex.quote(self.ignore)} -prune -o"] if self.ignore else []
        if above:
            steps = [posixpath.dirname(within)]
            while steps[-1] != above[0] and steps[-1] != "/":
                steps.append(posixpath.dirname(steps[-1]))
            keep = "|".join([*map(_literal, steps), _literal(within) + "(/.*)?"])
            prune.append(f"! -regex {shlex.quote(f'({keep})')} -prune -o")
        return _WALK.format(paths=" ".join(shlex.quote(p) for p in starts) or "''",
                            prune=" ".join(prune))

    @property
    def script(self) -> str:
        """The snapshot script; its output is base64 (``base64 -w 4096``)."""
        return _ALONE.format(body=self.body)

    @property
    def body(self) -> str:
        """What the script runs, its output not encoded yet: a snapshot among other
        probes in one stream (``journal_probe.Sections``)."""
        return _BODY.format(walk=self.walk(), format=_FORMAT, walks=self._walks(),
                            packages=self._packages_script())

    def _walks(self) -> str:
        """The listing walk and the hashing (see ``_BODY``'s comment)."""
        hash_all = _HASH_ALL.format(hash_limit=self.hash_limit)
        hashing = self._hashing()
        if hashing is None and self.since is not None:
            return _LIST_AND_HASH.format(list=_LIST, hash_all=hash_all,
                                         limit=(_FIELDS + 1) * self.max_files + _FIELDS)
        return _LIST_THEN_HASH.format(list=_LIST, limit=_FIELDS * self.max_files + 1,
                                      hashing=hashing or f"walk {hash_all}")

    def _hashing(self) -> str | None:
        """The walk hashing only the files whose stamp changed since ``since``, when
        that spares hashing at least ``_KNOWN_BYTES``; None: hash them all."""
        known: dict[str, str] = {}
        spared = 0
        if self.since is not None:
            for path, stamp in self.since.stamps.items():
                entry = self.since.files.get(path)
                if entry is not None and entry.sha256 is not None:
                    known[path] = stamp
                    spared += entry.size
        if spared < _KNOWN_BYTES or len(known) > _KNOWN_FILES:
            return None
        return _HASH_CHANGED.format(hash_limit=self.hash_limit, known=" ".join(
            f"[{quote(path)}]={shlex.quote(stamp)}" for path, stamp in sorted(known.items())))

    def _packages_script(self) -> str:
        if not self.packages:
            return ""
        return packages_script(self.since.packages_stamp if self.since else None)

    def parse(self, result: RunResult, where: str) -> Snapshot:
        """The snapshot ``result`` (of ``script``, run on ``where``) holds.

        ``InvalidInputError`` when more than ``max_files`` entries would have been
        listed (nothing was hashed then); ``ExecutionFailedError`` when the script
        failed or its output is incomplete.
        """
        if not result.ok:
            reason = "timed out" if result.timed_out else f"exit {result.exit_code}"
            raise ExecutionFailedError(f"snapshot script failed on {where} ({reason}): "
                                       + " ".join(result.stderr.split())[-500:])
        tokens = decode(result)
        if tokens[:1] != [_FORMAT] or tokens[-2:] != ["END", ""]:
            raise ExecutionFailedError(f"snapshot output from {where} is incomplete")
        skip = re.compile(self.ignore, re.DOTALL) if self.ignore else None
        try:
            snapshot = _parse(tokens, skip, result.stderr, self.max_files, self.hash_limit,
                              self.since)
        except (IndexError, ValueError) as exc:
            raise ExecutionFailedError(f"snapshot output from {where} is garbled") from exc
        if snapshot is None:
            raise InvalidInputError(
                f"snapshot of {', '.join(self.paths)} would list more than {self.max_files} "
                "entries",
                hint="Snapshot narrower paths, add ignore patterns, or raise max_files.",
            )
        return snapshot


async def take_snapshot(
    target: Target,
    *,
    paths: Sequence[str],
    ignore: Sequence[str] = DEFAULT_IGNORE,
    max_files: int = DEFAULT_MAX_FILES,
    hash_limit: int = DEFAULT_HASH_LIMIT,
    timeout: float = 600.0,
    since: Snapshot | None = None,
) -> Snapshot:
    """Snapshot ``paths`` (not crossing file systems; absent paths skipped), the package
    set, users and groups on ``target``: one run of ``SnapshotProbe.script``.

    ``InvalidInputError`` when more than ``max_files`` entries would be listed (nothing
    is hashed then); ``ExecutionFailedError`` when the script itself fails. ``since``:
    as ``SnapshotProbe.since``.
    """
    probe = SnapshotProbe.of(paths, ignore, max_files=max_files, hash_limit=hash_limit,
                             since=since)
    return probe.parse(await target.run(probe.script, timeout=timeout), target.identity)


def _listing(
    tokens: list[str], max_files: int
) -> tuple[list[list[str]], dict[str, str], int] | None:
    """The walk's entries (``_FIELDS`` each) and hashes (by path), and the index of the
    PACKAGES marker after them; None when the walk had more than ``max_files`` entries.

    A record starts with a one-letter type (an entry) or is one "<64 hex>  <path>" token
    (a hash; sha256sum -z does not escape names): at a record's start neither can be the
    marker.
    """
    entries: list[list[str]] = []
    hashes: dict[str, str] = {}
    i = 1
    while tokens[i] != "PACKAGES":
        token = tokens[i]
        if len(token) == 1:
            if len(entries) == max_files:
                return None  # head cut the walk at this entry
            entries.append(tokens[i : i + _FIELDS])
            i += _FIELDS
        elif len(token) > 66 and token[64:66] == "  ":
            hashes[token[66:]] = token[:64]
            i += 1
        else:
            raise ValueError(f"neither an entry nor a hash: {token[:100]!r}")
    return entries, hashes, i


def _parse(
    tokens: list[str], skip: re.Pattern[str] | None, stderr: str, max_files: int,
    hash_limit: int, since: Snapshot | None = None,
) -> Snapshot | None:
    # Layout: the format marker, the walk's records (see _listing), PACKAGES <text>
    # PASSWD <text> GROUP <text> END. None when the walk had more than max_files entries.
    listing = _listing(tokens, max_files)
    if listing is None:
        return None
    entries, hashes, i = listing
    snapshot = Snapshot(warnings=stderr.splitlines())
    add_packages(tokens[i + 1], snapshot, since)
    if tokens[i + 2] != "PASSWD" or tokens[i + 4] != "GROUP":
        raise ValueError("sections out of order")
    snapshot.users = _account_lines(tokens[i + 3])
    snapshot.groups = _account_lines(tokens[i + 5])
    for kind, mode, uid, gid, size, mtime, path, link, identity in entries:
        if skip is not None and skip.fullmatch(path):  # find pruned these already
            continue
        if kind not in _FILE_TYPES:
            raise ValueError(f"unknown file type {kind!r}")
        regular = kind == "f"
        sha256 = hashes.get(path) if regular else None
        if regular:
            stamp = snapshot.stamps[path] = f"{identity}:{mtime}:{int(size)}"
            if sha256 is None and since is not None and since.stamps.get(path) == stamp:
                sha256 = since.files[path].sha256 if path in since.files else None
        # model_construct: a host snapshot has tens of thousands of entries, and the
        # fields were just parsed and checked here; validating each costs ~0.5 s.
        snapshot.files[path] = FileEntry.model_construct(
            type=cast(FileType, kind), mode=int(mode, 8), uid=int(uid), gid=int(gid),
            size=int(size),
            sha256=sha256,
            mtime=mtime if regular and int(size) >= hash_limit else None,
            target=link if kind == "l" else None,
        )
    return snapshot


def decode(result: RunResult) -> list[str]:
    """The NUL-separated fields a probe printed in base64 (bytes that are not UTF-8 kept
    as surrogate escapes)."""
    return [part.decode("utf-8", "surrogateescape")
            for part in probe_output(result).split(b"\0")]


def compare(before: FileEntry, after: FileEntry) -> FileChange | None:
    """How one path's entry changed (content and/or metadata), or None if it did not."""
    content = before.type != after.type or (
        (before.sha256, before.size, before.mtime) != (after.sha256, after.size, after.mtime)
        if after.type == "f"
        else before.target != after.target
    )
    metadata = []
    if before.mode != after.mode:
        metadata.append(f"mode {before.mode:04o} -> {after.mode:04o}")
    if (before.uid, before.gid) != (after.uid, after.gid):
        metadata.append(f"owner {before.uid}:{before.gid} -> {after.uid}:{after.gid}")
    if not content and not metadata:
        return None
    return FileChange(before=before, after=after, content=content, metadata=metadata)


def _changed(before: dict[str, str], after: dict[str, str]) -> dict[str, tuple[str, str]]:
    return {k: (before[k], after[k]) for k in before.keys() & after.keys() if before[k] != after[k]}


def diff(before: Snapshot, after: Snapshot) -> SnapshotDiff:
    """What changed from ``before`` to ``after``: files, packages, users and groups."""
    modified = {}
    for path in before.files.keys() & after.files.keys():
        change = compare(before.files[path], after.files[path])
        if change is not None:
            modified[path] = change
    return SnapshotDiff(
        added={p: e for p, e in after.files.items() if p not in before.files},
        removed={p: e for p, e in before.files.items() if p not in after.files},
        modified=modified,
        packages_added={k: v for k, v in after.packages.items() if k not in before.packages},
        packages_removed={k: v for k, v in before.packages.items() if k not in after.packages},
        packages_changed=_changed(before.packages, after.packages),
        config_files_remaining_added=sorted(
            set(after.config_files_remaining) - set(before.config_files_remaining)
        ),
        users_added={k: v for k, v in after.users.items() if k not in before.users},
        users_removed={k: v for k, v in before.users.items() if k not in after.users},
        users_changed=_changed(before.users, after.users),
        groups_added={k: v for k, v in after.groups.items() if k not in before.groups},
        groups_removed={k: v for k, v in before.groups.items() if k not in after.groups},
        groups_changed=_changed(before.groups, after.groups),
    )


async def remove_empty_dirs_created(target: Target, diff: SnapshotDiff) -> list[str]:
    """``rmdir`` (never ``rm -r``) the directories in ``diff.added`` that are now empty,
    deepest first so emptied parents go too; returns the directories removed."""
    dirs = sorted(
        (path for path, entry in diff.added.items() if entry.type == "d"),
        key=lambda path: (-path.count("/"), path),
    )
    if not dirs:
        return []
    # rmdir refuses non-empty directories, and symlinks: exactly the safety wanted.
    script = (
        "set -o pipefail\nfor d in " + " ".join(shlex.quote(d) for d in dirs) + "; do\n"
        '  if rmdir -- "$d" 2>/dev/null; then printf \'%s\\0\' "$d"; fi\n'
        "done | base64 -w 4096\n"
    )
    result = await target.run(script, timeout=120.0)
    if result.exit_code != 0 or result.timed_out:
        raise ExecutionFailedError(f"removing empty directories on {target.identity} failed: "
                                   + " ".join(result.stderr.split())[-500:])
    return [path for path in decode(result) if path]
