"""The sandbox's file systems on the host: the cached Debian root and scratch layers.

The root file system is built once per machine with ``mmdebstrap`` and kept in two forms
under ``<cache_dir>/rootfs/``:

* ``<suite>-<variant>.tar``: the tarball mmdebstrap produced (kept so a deleted or
  damaged tree can be re-extracted without the network);
* ``<suite>-<variant>/``: the extracted tree, which sandboxes use as the read-only lower
  layer of an overlay. Nothing ever writes into it after it is renamed into place.

A cache built with extra packages (``include``, e.g. systemd for the systemd sandbox) is
a separate entry, ``<suite>-<variant>-<flavor>``, so the plain tree stays as it is.

Builds are serialised with an ``fcntl`` lock, so two processes asking at once build once:
the second waits for the lock and then finds the finished tree.

Each open sandbox also gets a private *scratch* directory (``make_scratch``) holding its
overlay upper layer; it must be on a file system overlayfs accepts as an upper layer.
Each systemd sandbox (``nspawn.py``) also gets cgroups of its own, swept the same way.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from workflow_agent.errors import SandboxToolingMissingError, TargetError

#: The hostname written into every extracted tree (mmdebstrap copies the host's).
SANDBOX_HOSTNAME = "workflow-agent-sandbox"

#: How long a build may take before it is considered hung (measured: ~15 s).
_BUILD_TIMEOUT = 1800.0

#: How many lines of mmdebstrap/tar output to put in an error message.
_TAIL_LINES = 25

#: Name prefix of sandbox scratch directories (the sweep below looks for it).
SCRATCH_PREFIX = "workflow-agent-sandbox-"

#: File systems that cannot hold an overlay upper directory (no xattrs / d_type, or
#: overlay-on-overlay, which the kernel refuses).
_BAD_UPPER_FS = {"overlay", "aufs", "nfs", "nfs4", "cifs", "smb3", "9p", "ecryptfs"}

#: A leftover cgroup younger than this may belong to a systemd sandbox being started.
_STALE_CGROUP_AGE = 60.0

#: Overlay mount options are comma separated and lowerdir is colon separated.
_BAD_PATH_CHARS = set(",:\\\n")


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/workflow-agent``, or ``~/.cache/workflow-agent`` when unset."""
    base = os.environ.get("XDG_CACHE_HOME")
    root = Path(base) if base else Path.home() / ".cache"
    return root / "workflow-agent"


def _tail(text: str, lines: int = _TAIL_LINES) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _require_root(action: str) -> None:
    if os.geteuid() != 0:
        raise TargetError(
            f"{action} needs root",
            hint="The sandbox target uses mount and PID namespaces, overlay mounts and a "
            "Debian root file system owned by root: run workflow-agent as root "
            "(for example with sudo).",
        )


class RootfsCache:
    """Builds (once) and hands out an extracted Debian root file system.

    ``ensure()`` is cheap when the tree already exists; otherwise it builds the tarball
    with ``mmdebstrap`` (unless a previous build left one) and extracts it.
    """

    def __init__(
        self,
        cache_dir: Path,
        *,
        suite: str = "bookworm",
        variant: str = "minbase",
        mirror: str = "http://deb.debian.org/debian",
        include: Sequence[str] = (),
        flavor: str = "",
    ) -> None:
        """``include``: packages added to the variant's (mmdebstrap ``--include``).
        ``flavor`` names that set in the cache entry; it defaults to the package names
        joined by ``+``. A flavor must change whenever its package list does: an existing
        tree is never rebuilt."""
        self.cache_dir = Path(cache_dir)
        self.suite = suite
        self.variant = variant
        self.mirror = mirror
        self.include = tuple(include)
        bad = [p for p in self.include if not re.fullmatch(r"[a-z0-9][a-z0-9+.-]*", p)]
        if bad:
            raise ValueError(f"not Debian package names: {bad}")
        self.flavor = flavor or "+".join(sorted(set(self.include)))
        if self.flavor and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9+._-]*", self.flavor):
            raise ValueError(f"flavor must be a plain file name part, not {self.flavor!r}")

    @property
    def name(self) -> str:
        """``<suite>-<variant>[-<flavor>]``: the stem of the tarball and the tree."""
        base = f"{self.suite}-{self.variant}"
        return f"{base}-{self.flavor}" if self.flavor else base

    @property
    def root_dir(self) -> Path:
        """Where the extracted tree lives once built."""
        return self.cache_dir / "rootfs" / self.name

    @property
    def tarball(self) -> Path:
        """Where the mmdebstrap tarball is kept."""
        return self.cache_dir / "rootfs" / f"{self.name}.tar"

    def ensure(self) -> Path:
        """Return the extracted root directory, building or extracting it if needed."""
        # The rename into place is atomic, so an existing directory is a complete one.
        if self.root_dir.is_dir():
            return self.root_dir
        _require_root("building the sandbox root file system")
        self.root_dir.parent.mkdir(parents=True, exist_ok=True)
        with self._locked():
            if self.root_dir.is_dir():  # another process built it while we waited
                return self.root_dir
            self._remove_leftovers()
            if not self.tarball.is_file():
                self._build_tarball()
            self._extract()
        return self.root_dir

    @contextmanager
    def _locked(self) -> Iterator[None]:
        lock_path = self.root_dir.parent / f".{self.name}.lock"
        with open(lock_path, "a+b") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def _remove_leftovers(self) -> None:
        """Remove what a build that crashed half-way left behind (we hold the lock)."""
        for stale in self.root_dir.parent.glob(f".{self.name}.*"):
            if stale.name.endswith(".lock"):
                continue
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale)
            else:
                stale.unlink()

    def _build_tarball(self) -> None:
        mmdebstrap = shutil.which("mmdebstrap")
        if mmdebstrap is None:
            raise SandboxToolingMissingError("mmdebstrap", "mmdebstrap")
        # A dot-prefixed partial name, so a crash never leaves something that looks done;
        # --format is explicit because mmdebstrap otherwise guesses from the extension.
        partial = self.root_dir.parent / f".{self.name}.partial.tar"
        argv = [
            mmdebstrap,
            f"--variant={self.variant}",
            *([f"--include={','.join(self.include)}"] if self.include else []),
            "--format=tar",
            # Keep the package lists: apt-get install then works without apt-get update.
            "--skip=cleanup/apt/lists",
            self.suite,
            str(partial),
            self.mirror,
        ]
        try:
            proc = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
                timeout=_BUILD_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            partial.unlink(missing_ok=True)
            raise TargetError(
                f"mmdebstrap did not finish within {_BUILD_TIMEOUT:.0f} s",
                hint=f"Check that {self.mirror} is reachable.",
            ) from exc
        if proc.returncode != 0:
            partial.unlink(missing_ok=True)
            raise TargetError(
                f"building the sandbox root file system failed (mmdebstrap exit "
                f"{proc.returncode}):\n{_tail(proc.stdout)}",
                hint=f"Check that {self.mirror} is reachable and suite {self.suite!r} exists.",
            )
        partial.rename(self.tarball)

    @staticmethod
    def _personalise(etc: Path) -> None:
        """Replace what mmdebstrap copied from the build host with sandbox values."""
        files = {
            "hostname": SANDBOX_HOSTNAME + "\n",
            # The sandbox bind-mounts the host's resolv.conf at run time (network
            # "host"); the copy taken at build time would be stale, so keep it empty.
            "resolv.conf": "",
            # minbase has no /etc/hosts; without one "localhost" goes to DNS.
            "hosts": f"127.0.0.1\tlocalhost\n127.0.1.1\t{SANDBOX_HOSTNAME}\n"
            "::1\tlocalhost ip6-localhost ip6-loopback\n",
        }
        for name, text in files.items():
            path = etc / name
            path.unlink(missing_ok=True)  # never write through a symlink
            path.write_text(text, encoding="utf-8")
            path.chmod(0o644)

    def _extract(self) -> None:
        tmp = Path(tempfile.mkdtemp(prefix=f".{self.name}.tmp-", dir=self.root_dir.parent))
        try:
            # GNU tar as root keeps owners, modes, device nodes and xattrs (capabilities
            # on e.g. ping); Python's tarfile would not restore the xattrs.
            proc = subprocess.run(
                [
                    "tar",
                    "--extract",
                    "--file",
                    str(self.tarball),
                    "--directory",
                    str(tmp),
                    "--numeric-owner",
                    "--same-permissions",
                    "--xattrs",
                    "--xattrs-include=*",
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
                check=False,
            )
            if proc.returncode != 0:
                raise TargetError(
                    f"extracting {self.tarball} failed:\n{_tail(proc.stdout)}",
                    hint=f"Delete {self.tarball} to have it rebuilt.",
                )
            self._personalise(tmp / "etc")
            tmp.chmod(0o755)  # mkdtemp made it 0700; it becomes the sandbox's "/"
            os.rename(tmp, self.root_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def check_overlay_path(path: Path, what: str) -> None:
    """Refuse paths that cannot be written into overlayfs mount options."""
    if _BAD_PATH_CHARS & set(str(path)):
        raise TargetError(
            f"the sandbox {what} {path} contains a character overlayfs cannot take (, : \\)",
            hint="Use a directory whose path has no commas, colons or backslashes.",
        )


def fs_type(path: Path) -> str:
    """The type of the file system ``path`` lives on, from /proc/self/mountinfo."""
    resolved = str(path.resolve())
    best, best_type = "", "unknown"
    with open("/proc/self/mountinfo", encoding="utf-8") as handle:
        for line in handle:
            fields = line.split()
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[4])  # \040
            fstype = fields[fields.index("-") + 1]
            inside = resolved == point or resolved.startswith(point.rstrip("/") + "/")
            if inside and len(point) >= len(best):
                best, best_type = point, fstype
    return best_type


@dataclass
class Scratch:
    """One sandbox's private host directory, marked in use by a lock held on ``lock_fd``.

    Layout: ``upper/`` and ``work/`` (overlay), ``merged/`` (mount point), ``exchange/``.
    """

    path: Path
    lock_fd: int

    def remove(self) -> None:
        """Delete the directory and release the lock."""
        shutil.rmtree(self.path, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.close(self.lock_fd)


def make_scratch(name: str, base: Path | None = None) -> Scratch:
    """Create the scratch directory ``<base>/<name>``, base defaulting to /var/tmp or /tmp.

    Stale scratch directories left by processes that were SIGKILLed are removed first.
    """
    bases = [base] if base else [Path("/var/tmp"), Path("/tmp")]
    problems = []
    for candidate in bases:
        fstype = fs_type(candidate)
        if fstype in _BAD_UPPER_FS or fstype.startswith("fuse"):
            problems.append(f"{candidate} is on {fstype}")
            continue
        _sweep_stale(candidate)
        path = candidate / name
        check_overlay_path(path, "scratch directory")
        path.mkdir(mode=0o700)
        scratch = Scratch(path, os.open(path / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC))
        try:
            fcntl.flock(scratch.lock_fd, fcntl.LOCK_EX)
            os.write(scratch.lock_fd, f"{os.getpid()}\n".encode())  # non-empty: set up
            for sub in ("upper", "work", "merged", "exchange"):
                (path / sub).mkdir(mode=0o700)
            (path / "upper").chmod(0o755)  # becomes the mode of "/" inside
        except BaseException:
            scratch.remove()
            raise
        return scratch
    raise TargetError(
        "no scratch directory can hold the sandbox's overlay upper layer ("
        + "; ".join(problems)
        + ")",
        hint="Pass a scratch directory on ext4, xfs, btrfs or tmpfs.",
    )


def _sweep_stale(base: Path) -> None:
    """Remove scratch directories whose owner died without cleaning up (e.g. SIGKILL).

    The owner holds an exclusive flock on ``lock`` while alive, and its sandbox's
    processes die with it (the holder watches a pipe from it), so a lock nobody holds
    marks a stale directory. An empty lock file means its owner is between creating and
    locking it: left alone.
    """
    for entry in base.glob(SCRATCH_PREFIX + "*"):
        with contextlib.suppress(OSError):
            info = entry.lstat()
            if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
                continue  # only our own real directories in a world-writable /var/tmp
            fd = os.open(entry / "lock", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError: alive
                if os.fstat(fd).st_size > 0:
                    shutil.rmtree(entry, ignore_errors=True)
            finally:
                os.close(fd)


# -- cgroups (the systemd sandbox's) ------------------------------------------------


def cgroup_parents() -> list[Path]:
    """Our own cgroup in each hierarchy systemd uses: name=systemd (v1) and/or v2."""
    mounts: dict[str, tuple[str, str]] = {}  # "0" (v2) / "name=systemd" -> (root, point)
    with open("/proc/self/mountinfo", encoding="utf-8") as info:
        for line in info:
            fields = line.split()
            fstype, options = fields[fields.index("-") + 1], fields[fields.index("-") + 3]
            if fstype == "cgroup2" or (fstype == "cgroup" and "name=systemd" in options):
                mounts.setdefault("0" if fstype == "cgroup2" else "name=systemd",
                                  (fields[3], fields[4]))
    parents = []
    with open("/proc/self/cgroup", encoding="utf-8") as own:
        for line in own:
            hierarchy, controllers, path = line.rstrip("\n").split(":", 2)
            root, point = mounts.get(controllers or hierarchy, ("", ""))
            if point:  # paths are relative to the cgroup namespace, mounted at its root
                inside = path[len(root):] if root != "/" and path.startswith(root) else path
                parents.append(Path(point) / inside.lstrip("/"))
    return parents


def clear_cgroups(cgroups: list[str], reap: bool = False) -> bool:
    """Kill whatever runs in ``cgroups`` and remove them, deepest first. False if some
    are still there after ~10 s. ``reap``: also reap our children (the holder only).

    Part of the holder's source too, so stdlib only, imported here.
    """
    import contextlib
    import os
    import signal
    import time

    for _ in range(200):
        trees = [top for cgroup in cgroups for top, _, _ in os.walk(cgroup, topdown=False)]
        for top in trees:
            try:  # cgroup v2 kills a whole subtree at once, without racing PID reuse
                with open(os.path.join(top, "cgroup.kill"), "w", encoding="ascii") as kill:
                    kill.write("1")
            except OSError:
                with contextlib.suppress(OSError, ValueError), \
                        open(os.path.join(top, "cgroup.procs"), "rb") as procs:
                    for pid in procs.read().split():
                        os.kill(int(pid), signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            while reap and os.waitpid(-1, os.WNOHANG)[0]:
                pass
        for top in trees:
            with contextlib.suppress(OSError):
                os.rmdir(top)
        if not any(os.path.exists(cgroup) for cgroup in cgroups):
            return True
        time.sleep(0.05)
    return False


def sweep_stale_cgroups(parents: list[Path], prefix: str) -> None:
    """Remove our cgroups whose systemd-nspawn is gone (its owner was SIGKILLed, say):
    a live one has nspawn in the cgroup itself (starting) or in ``supervisor/``. Young
    ones are left alone: their holder may not have moved nspawn in yet."""
    for entry in (entry for parent in parents for entry in parent.glob(prefix + "*")):
        with contextlib.suppress(OSError):
            if time.time() - entry.stat().st_mtime < _STALE_CGROUP_AGE:
                continue
            nspawn = [entry, *(Path(top) for top, _, _ in os.walk(entry / "supervisor"))]
            if not any((cgroup / "cgroup.procs").read_text().split() for cgroup in nspawn):
                clear_cgroups([str(entry)])
