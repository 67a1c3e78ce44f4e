"""What a script changed, read from the upper directory of the overlay it ran on.

The upper directory holds exactly what was written on top of the lower layers: walking it
(a few thousand entries after a package install) beats snapshotting a system twice.

* an entry with nothing at its path below (the *before* view) was **created**;
* an entry that exists below was **modified** when its type, bytes or link target differ,
  **metadata** when only mode or owner differ, and is no change at all when identical
  (a file opened for writing is copied up even if nothing was written);
* a whiteout (character device 0/0) is **deleted**, and so is everything below a
  directory it hides; an opaque directory (xattr ``trusted.overlay.opaque``), or any
  directory under one, hides whatever the lower layers held there and it did not;
* directories copied up only because something inside them changed are not changes.

Package-manager bookkeeping (``BOOKKEEPING``) is counted, not listed: the package lines
come from comparing ``/var/lib/dpkg/status`` before and after instead. Every diff line,
command line and apt source line passes ``Redactor.redact``.
"""

from __future__ import annotations

import difflib
import filecmp
import os
import re
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO, Literal

from pydantic import BaseModel, ConfigDict, Field

from workflow_agent.secrets import Redactor
from workflow_agent.verification.snapshot import ignore_regex

#: Counted, not listed: state that apt, dpkg and the system rewrite on every run.
BOOKKEEPING: tuple[str, ...] = (
    "/var/lib/apt/**", "/var/cache/**", "/var/log/**", "/var/lib/dpkg/**",
    "/etc/ld.so.cache", "/etc/*-", "/etc/.pwd.lock", "/tmp/**", "/run/**",
)
#: Where apt sources and signing keys live.
REPOSITORIES: tuple[str, ...] = (
    "/etc/apt/sources.list", "/etc/apt/sources.list.d/**", "/etc/apt/keyrings/**",
    "/etc/apt/trusted.gpg", "/etc/apt/trusted.gpg.d/**", "/usr/share/keyrings/**",
)
#: Text files up to this size (each side) get a unified diff.
DIFF_LIMIT = 256 * 1024
#: Diffs stop after this much text, so installing a thousand text files stays cheap.
DIFF_BUDGET = 8 * 1024 * 1024

ChangeKind = Literal["created", "modified", "deleted", "metadata"]
EntryType = Literal["file", "dir", "link", "other"]

_BOOKKEEPING = re.compile(ignore_regex(BOOKKEEPING) or "", re.DOTALL)
_REPOSITORIES = re.compile(ignore_regex(REPOSITORIES) or "", re.DOTALL)
_SYSTEMD_LINK = re.compile(r"/etc/systemd/system/([^/]+)\.(?:wants|requires)/([^/]+)")
_UNIT = re.compile(r"(?:/usr/lib|/lib|/etc)/systemd/system/([^/]+\.(?:service|socket|timer))")
_RC_LINK = re.compile(r"/etc/rc([0-6S])\.d/S\d\d(.+)")
_URL_CREDENTIALS = re.compile(r"(\w+://)[^/@\s]+@")
_MARKS = {"created": "+", "deleted": "-", "modified": "~", "metadata": "~"}
_TYPES: dict[int, EntryType] = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "link"}


class FileChange(BaseModel):
    """One path the script created, modified, deleted or re-permissioned."""

    model_config = ConfigDict(frozen=True)

    path: str
    kind: ChangeKind
    type: EntryType
    diff: str | None = None
    """Unified diff (secrets masked) for text files up to ``DIFF_LIMIT``, else None."""
    detail: str = ""
    """E.g. ``"mode 0644 -> 0600"``, ``"owner 0:0 -> 100:101"``, ``"binary, 13.8 MB"``."""


class ChangeSet(BaseModel):
    """Everything a rehearsed script would change on its target."""

    model_config = ConfigDict(frozen=True)

    files: list[FileChange] = Field(default_factory=list)
    """Sorted by path; bookkeeping paths are only counted in ``bookkeeping``."""
    packages_added: dict[str, str] = Field(default_factory=dict)
    packages_removed: dict[str, str] = Field(default_factory=dict)
    packages_changed: dict[str, tuple[str, str]] = Field(default_factory=dict)
    users_added: list[str] = Field(default_factory=list)
    users_removed: list[str] = Field(default_factory=list)
    groups_added: list[str] = Field(default_factory=list)
    groups_removed: list[str] = Field(default_factory=list)
    services: list[str] = Field(default_factory=list)
    repositories: list[str] = Field(default_factory=list)
    bookkeeping: int = 0

    @property
    def is_empty(self) -> bool:
        """True when nothing changed at all, bookkeeping included."""
        return not any(getattr(self, name) for name in type(self).model_fields)

    def lines(self) -> list[str]:
        """One human-readable line per change: ``+`` added, ``-`` removed, ``~`` changed."""
        out = [f"+ package {n} {v}" for n, v in sorted(self.packages_added.items())]
        out += [f"- package {n} {v}" for n, v in sorted(self.packages_removed.items())]
        out += [f"~ package {n} {a} -> {b}" for n, (a, b) in sorted(self.packages_changed.items())]
        for kind in ("user", "group"):
            out += [f"+ {kind} {name}" for name in getattr(self, f"{kind}s_added")]
            out += [f"- {kind} {name}" for name in getattr(self, f"{kind}s_removed")]
        out += [f"* service: {line}" for line in self.services]
        out += [f"* repository: {line}" for line in self.repositories]
        for change in self.files:
            what = change.type + (f"; {change.detail}" if change.detail else "")
            out.append(f"{_MARKS[change.kind]} {change.path} ({what})")
        if self.bookkeeping:
            out.append(f"  ({self.bookkeeping} package-manager bookkeeping paths changed, "
                       "not listed)")
        return out


def read_changes(
    upper: str, lower: str, *, running: Sequence[str] = (), redactor: Redactor | None = None
) -> ChangeSet:
    """The changes recorded in the overlay upper directory ``upper``.

    ``lower`` is a host path prefix under which the *before* state can be read: ``""``
    for this host's root, ``/proc/PID/root/...merged`` for a sandbox's view. Symlinks
    there are never followed (an absolute one would resolve against the host's root).
    ``running`` describes the processes the script left running; they lead ``services``.
    """
    reader = _Reader(upper.rstrip("/"), lower.rstrip("/"), redactor or Redactor())
    reader.walk("", lower_is_dir=True, hidden=False)
    before_pkgs, after_pkgs = (_packages(data) for data in reader.both("/var/lib/dpkg/status"))
    before_users, after_users = (_names(data) for data in reader.both("/etc/passwd"))
    before_groups, after_groups = (_names(data) for data in reader.both("/etc/group"))
    return ChangeSet(
        files=sorted(reader.changes, key=lambda change: change.path),
        packages_added={k: v for k, v in after_pkgs.items() if k not in before_pkgs},
        packages_removed={k: v for k, v in before_pkgs.items() if k not in after_pkgs},
        packages_changed={k: (before_pkgs[k], v) for k, v in after_pkgs.items()
                          if k in before_pkgs and before_pkgs[k] != v},
        users_added=sorted(after_users - before_users),
        users_removed=sorted(before_users - after_users),
        groups_added=sorted(after_groups - before_groups),
        groups_removed=sorted(before_groups - after_groups),
        services=[*running, *reader.service_lines()],
        repositories=sorted(reader.repositories),
        bookkeeping=reader.bookkeeping,
    )


def _type(mode: int) -> EntryType:
    return _TYPES.get(stat.S_IFMT(mode), "other")


def _size(size: int) -> str:
    units = ((10**9, "GB"), (10**6, "MB"), (10**3, "kB"))
    return next((f"{size / scale:.1f} {unit}" for scale, unit in units if size >= scale),
                f"{size} B")


def _created_detail(after: os.stat_result) -> str:
    return f"mode {stat.S_IMODE(after.st_mode):04o}, owner {after.st_uid}:{after.st_gid}"


def _metadata(before: os.stat_result, after: os.stat_result) -> list[str]:
    out = []
    if stat.S_IMODE(before.st_mode) != stat.S_IMODE(after.st_mode):
        out.append(f"mode {stat.S_IMODE(before.st_mode):04o} -> {stat.S_IMODE(after.st_mode):04o}")
    if (before.st_uid, before.st_gid) != (after.st_uid, after.st_gid):
        out.append(f"owner {before.st_uid}:{before.st_gid} -> {after.st_uid}:{after.st_gid}")
    return out


def _xattr(path: str, name: str) -> bytes | None:
    try:
        return os.getxattr(path, name, follow_symlinks=False)
    except OSError:  # ENODATA: not set; ENOTSUP: the file system has no xattrs
        return None


def _open(path: str) -> BinaryIO:
    # Never through a symlink: the before view is a prefix of host paths.
    return os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC), "rb")


def _read(path: str, size: int = -1) -> bytes:
    with _open(path) as handle:
        return handle.read(size)


@dataclass
class _Reader:
    """Walks the upper directory once, comparing each entry with the before view."""

    upper: str
    lower: str
    redactor: Redactor
    changes: list[FileChange] = field(default_factory=list)
    bookkeeping: int = 0
    budget: int = DIFF_BUDGET
    repositories: list[str] = field(default_factory=list)
    services: dict[str, str] = field(default_factory=dict)
    runlevels: dict[str, list[str]] = field(default_factory=dict)

    def lstat_before(self, path: str) -> os.stat_result | None:
        try:
            return os.lstat(self.lower + path)
        except (FileNotFoundError, NotADirectoryError):
            return None

    def both(self, path: str) -> tuple[bytes, bytes]:
        """A regular file's bytes before and after (empty when absent)."""
        old = self.lstat_before(path)
        before = _read(self.lower + path) if old and stat.S_ISREG(old.st_mode) else b""
        try:
            new = os.lstat(self.upper + path)
        except (FileNotFoundError, NotADirectoryError):
            return before, before  # not in the upper directory: unchanged
        # A whiteout, or replaced by something that is not a file: no content.
        return before, _read(self.upper + path) if stat.S_ISREG(new.st_mode) else b""

    def walk(self, rel: str, *, lower_is_dir: bool, hidden: bool) -> None:
        """Compare the upper directory ``rel`` (``""`` is ``/``) with the before view.

        ``lower_is_dir``: ``rel`` was a directory before (only then can anything below it
        have existed: a lookup through a former symlink would escape the view).
        ``hidden``: ``rel`` is opaque or under an opaque directory, so whatever was below
        it before and is not in the upper directory is gone.
        """
        with os.scandir(self.upper + rel) as scan:
            entries = sorted(scan, key=lambda entry: entry.name)
        for entry in entries:
            path = f"{rel}/{entry.name}"
            try:
                after = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # a process still running removed it: nothing to report
            before = self.lstat_before(path) if lower_is_dir else None
            was_dir = before is not None and stat.S_ISDIR(before.st_mode)
            if stat.S_ISCHR(after.st_mode) and after.st_rdev == 0:  # whiteout
                if before is not None:
                    self.deleted(path, before)
                continue
            if stat.S_ISDIR(after.st_mode):
                self.directory(path, entry.path, before, after)
                opaque = _xattr(entry.path, "trusted.overlay.opaque") == b"y"
                self.walk(path, lower_is_dir=was_dir, hidden=hidden or opaque)
                continue
            self.entry(path, entry.path, before, after)
            if was_dir:  # a directory replaced by a file or link: its contents are gone
                self.deleted_below(path)
        if hidden and lower_is_dir and rel:
            present = {entry.name for entry in entries}
            with os.scandir(self.lower + rel) as scan:
                gone = sorted((e for e in scan if e.name not in present), key=lambda e: e.name)
            for item in gone:
                self.deleted(f"{rel}/{item.name}", item.stat(follow_symlinks=False))

    def directory(self, path: str, upper: str, before: os.stat_result | None,
                  after: os.stat_result) -> None:
        # Only with redirect_dir=on (not the default): the files it kept are not listed.
        redirect = _xattr(upper, "trusted.overlay.redirect")
        moved = [f"renamed from {redirect.decode(errors='replace')}"] if redirect else []
        if before is None:
            self.record(path, "created", "dir", ", ".join([_created_detail(after), *moved]))
        elif not stat.S_ISDIR(before.st_mode):
            self.record(path, "modified", "dir", ", ".join([f"{_type(before.st_mode)} -> dir",
                                                            *moved]))
        elif (metadata := _metadata(before, after) + moved):
            self.record(path, "metadata", "dir", ", ".join(metadata))

    def entry(self, path: str, upper: str, before: os.stat_result | None,
              after: os.stat_result) -> None:
        """A file, link or other non-directory entry of the upper directory."""
        kind = _type(after.st_mode)
        link = os.readlink(upper) if kind == "link" else None
        if before is None:
            detail, diff = f"-> {link}" if link is not None else _created_detail(after), None
            if kind == "file" and not _BOOKKEEPING.fullmatch(path):
                diff = self.diff(path, None, upper, after)
                detail = f"{_file_detail(upper, after.st_size, diff)}, {detail}"
            self.record(path, "created", kind, detail, diff, link)
            return
        if _BOOKKEEPING.fullmatch(path):
            self.bookkeeping += 1  # copied up means written: not worth comparing bytes
            return
        parts, diff = [], None
        old_kind = _type(before.st_mode)
        if old_kind != kind or stat.S_IFMT(before.st_mode) != stat.S_IFMT(after.st_mode):
            parts.append(f"{old_kind} -> {kind}")
        elif kind == "link":
            old_link = os.readlink(self.lower + path)
            if old_link != link:
                parts.append(f"target {old_link} -> {link}")
        elif kind == "other":
            if before.st_rdev != after.st_rdev:
                parts.append("device number")
        elif _xattr(upper, "trusted.overlay.metacopy") is None and (
            # Both are regular files (lstat said so): following a link cannot happen here.
            before.st_size != after.st_size
            or not filecmp.cmp(self.lower + path, upper, shallow=False)
        ):  # a metacopy upper file has no data of its own: its bytes are the lower's
            diff = self.diff(path, self.lower + path, upper, after, before)
            size = _size(after.st_size)
            if before.st_size != after.st_size:
                size = f"{_size(before.st_size)} -> {size}"
            parts.append("content" if diff is not None else _file_detail(upper, size, None))
        metadata = _metadata(before, after)
        if parts:
            self.record(path, "modified", kind, ", ".join(parts + metadata), diff, link)
        elif metadata:
            self.record(path, "metadata", kind, ", ".join(metadata))

    def deleted(self, path: str, before: os.stat_result, *, below: bool = True) -> None:
        kind = _type(before.st_mode)
        detail, diff, link = "", None, None
        if kind == "file":
            detail = f"was {_size(before.st_size)}"
            if not _BOOKKEEPING.fullmatch(path):
                diff = self.diff(path, self.lower + path, None, before)
        elif kind == "link":
            link = os.readlink(self.lower + path)
            detail = f"was -> {link}"
        self.record(path, "deleted", kind, detail, diff, link)
        if kind == "dir" and below:
            self.deleted_below(path)

    def deleted_below(self, path: str) -> None:
        """Everything under the before directory ``path``, which is gone."""
        for rel, before in _tree(self.lower, path):  # already recursive: not deleted()
            self.deleted(rel, before, below=False)

    def diff(self, path: str, old: str | None, new: str | None,
             *stats: os.stat_result) -> str | None:
        """A unified diff between two files (None: /dev/null), or None if not text."""
        if any(st.st_size > DIFF_LIMIT for st in stats) or self.budget <= 0:
            return None
        old_data = _read(old) if old else b""
        new_data = _read(new) if new else b""
        if b"\0" in old_data or b"\0" in new_data:
            return None
        lines = difflib.unified_diff(
            old_data.decode(errors="replace").splitlines(),
            new_data.decode(errors="replace").splitlines(),
            f"a{path}" if old else "/dev/null", f"b{path}" if new else "/dev/null",
            lineterm="",
        )
        text = "\n".join(self.redactor.redact(line) for line in lines)
        self.budget -= len(text)
        return text

    def record(self, path: str, kind: ChangeKind, type_: EntryType, detail: str,
               diff: str | None = None, link: str | None = None) -> None:
        """List one change (or count it, for bookkeeping) and note what it means."""
        if _BOOKKEEPING.fullmatch(path):
            self.bookkeeping += 1
            return
        self.changes.append(FileChange(path=path, kind=kind, type=type_, diff=diff,
                                       detail=detail))
        if _REPOSITORIES.fullmatch(path):
            self.repository(path, kind, type_)
        self.service(path, kind, type_, link)

    def repository(self, path: str, kind: ChangeKind, type_: EntryType) -> None:
        verb = {"created": "added", "deleted": "removed"}.get(kind, "changed")
        what = "apt source" if path.startswith("/etc/apt/sources.list") else "apt key"
        entries = []
        if what == "apt source" and kind != "deleted" and type_ == "file":
            text = _read(self.upper + path).decode(errors="replace")
            entries = [line.strip() for line in text.splitlines()
                       if line.startswith(("deb", "URIs:", "Suites:", "Components:"))]
        shown = self.redactor.redact(_URL_CREDENTIALS.sub(r"\1****@", "; ".join(entries)))
        self.repositories.append(f"{verb} {what} {path}" + (f": {shown}" if shown else ""))

    def service(self, path: str, kind: ChangeKind, type_: EntryType, link: str | None) -> None:
        """Note service enablement (systemd links, units, init scripts, rc links)."""
        if kind not in ("created", "deleted"):
            return
        added = kind == "created"
        if match := _SYSTEMD_LINK.fullmatch(path):
            verb = "enabled" if added else "disabled"
            self.services[path] = f"{verb} {match[2]} (systemd, {match[1]})"
        elif (match := _UNIT.fullmatch(path)) and type_ == "link" and link == "/dev/null":
            self.services[path] = f"{'masked' if added else 'unmasked'} {match[1]} (systemd)"
        elif match and type_ == "file":
            self.services[path] = f"{'installed' if added else 'removed'} systemd unit {path}"
        elif path.startswith("/etc/init.d/") and path.count("/") == 3 and type_ == "file":
            self.services[path] = f"{'installed' if added else 'removed'} init script {path}"
        elif (match := _RC_LINK.fullmatch(path)) and added:
            self.runlevels.setdefault(match[2], []).append(match[1])

    def service_lines(self) -> list[str]:
        lines = [line for _, line in sorted(self.services.items())]
        return lines + [f"enabled init script {name} (runlevels {' '.join(sorted(levels))})"
                        for name, levels in sorted(self.runlevels.items())]


def _file_detail(path: str, size: int | str, diff: str | None) -> str:
    """``"text, 1.2 kB"``, ``"binary, 13.8 MB"`` or ``"text, 300.0 kB, no diff"``."""
    shown = _size(size) if isinstance(size, int) else size
    if diff is not None:
        return f"text, {shown}"
    return f"binary, {shown}" if b"\0" in _read(path, 8192) else f"text, {shown}, no diff"


def _tree(root: str, path: str) -> Iterator[tuple[str, os.stat_result]]:
    """``(path, lstat)`` of everything under ``root + path``, parents first; one device."""
    top = os.lstat(root + path).st_dev
    with os.scandir(root + path) as scan:
        entries = sorted(scan, key=lambda entry: entry.name)
    for entry in entries:
        info = entry.stat(follow_symlinks=False)
        yield f"{path}/{entry.name}", info
        # Not into other file systems: a rehearsal never sees below mount points anyway.
        if stat.S_ISDIR(info.st_mode) and info.st_dev == top:
            yield from _tree(root, f"{path}/{entry.name}")


def _names(data: bytes) -> set[str]:
    text = data.decode(errors="replace")
    return {line.split(":", 1)[0] for line in text.splitlines() if line.strip()}


def _packages(data: bytes) -> dict[str, str]:
    """Installed packages from a dpkg status file, named like ``${binary:Package}``.

    Not-installed and config-files entries are absent; packages in other unfinished
    states are present, their state after the version: ``1.0-1 [half-configured]``.
    """
    stanzas = []
    for block in re.split(r"\n\s*\n", data.decode(errors="replace")):
        fields = dict(re.findall(r"^([\w-]+):[ \t]*(.*)$", block, re.MULTILINE))
        if "Package" in fields:
            stanzas.append(fields)
    # dpkg itself is always of the native architecture; others need a qualifier when
    # they are foreign, and Multi-Arch: same ones always have one.
    native = next((f.get("Architecture") for f in stanzas if f["Package"] == "dpkg"), None)
    out: dict[str, str] = {}
    for fields in stanzas:
        state = ([*fields.get("Status", "").split(), "", "", ""])[2]
        if state in ("not-installed", "config-files", ""):
            continue
        arch = fields.get("Architecture", "")
        qualified = arch not in ("", "all") and (
            fields.get("Multi-Arch") == "same" or arch != native
        )
        name = f"{fields['Package']}:{arch}" if qualified else fields["Package"]
        version = fields.get("Version", "")
        out[name] = version if state == "installed" else f"{version} [{state}]"
    return out
