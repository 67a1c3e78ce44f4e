"""Facts about a target: what it is, how it installs software, how it runs services.

Gathered by one read-only script run on the target, so every target kind (local,
sandbox, and later ssh and docker) reports facts the same way.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict

from workflow_agent.errors import TargetError, TargetUnreachableError

if TYPE_CHECKING:
    from workflow_agent.execution.target import RunResult, Target

InitSystem = Literal["systemd", "sysv", "none"]

#: How long the facts script may take.
FACTS_TIMEOUT = 60.0

#: The package listing, as the facts and the snapshots print it (``verification.snapshot``
#: reads it too): first ``#db STAMP``, the package database's files as they were before
#: the listing (``find``'s path, inode, size and modification time of each), then one
#: line per package: status, name (dpkg's with ``:arch`` where Multi-Arch needs it; rpm's
#: ``NAME.ARCH``), version (rpm's with its epoch); the facts' listing also says dpkg's
#: architecture first (``#arch``: it changes only with dpkg, and so with the stamp).
#: ``{unless}``: a stamp (quoted) that spares the listing when the database still has it
#: (one ``find`` instead of a ``dpkg-query`` over every package): ``#same`` is printed
#: instead; ``''`` lists always.
_PACKAGES = r"""pm= db=()
if command -v dpkg-query >/dev/null 2>&1; then
  pm=dpkg db=(/var/lib/dpkg/status /var/lib/dpkg/updates)
elif command -v rpm >/dev/null 2>&1; then
  pm=rpm db=(/var/lib/rpm /usr/lib/sysimage/rpm)
fi
stamp=$(find -H "${{db[@]}}" -maxdepth 1 -printf '%p:%i:%s:%T@ ' 2>/dev/null)
printf '#db %s\n' "$stamp"
if [ -n "$stamp" ] && [ "$stamp" = {unless} ]; then echo '#same'
elif [ "$pm" = dpkg ]; then
{arch}  dpkg-query -W -f '${{db:Status-Abbrev}}\t${{binary:Package}}\t${{Version}}\n' 2>/dev/null
elif [ "$pm" = rpm ]; then
  rpm -qa --qf 'ii \t%{{NAME}}.%{{ARCH}}\t%{{EPOCHNUM}}:%{{VERSION}}-%{{RELEASE}}\n' 2>/dev/null
fi
"""


def packages_script(unless: str | None = None, *, arch: bool = False) -> str:
    """The package listing's script; with ``unless`` (a ``#db`` stamp) it prints
    ``#same`` instead of the packages when the database's stamp is still that one;
    ``arch``: dpkg's architecture too (``#arch``)."""
    return _PACKAGES.format(unless=shlex.quote(unless or ""), arch=(
        """  printf '#arch %s\\n' "$(dpkg --print-architecture)"\n""" if arch else ""))


#: Where the package listing starts in the facts' output.
PACKAGES_MARK = "--packages--\n"

# Read-only. Prints "key=value" lines, then "--packages--" and one
# "status<TAB>name<TAB>version" line per package (dpkg's status abbreviation: "ii"
# installed, "rc" removed with only its configuration files left). Bash builtins where
# they do, as a fleet runs this on every host: one program runs (find) while the package
# listing is kept (``facts_script``), three (find, dpkg, dpkg-query) when it is made.
_FACTS = r"""
. /etc/os-release 2>/dev/null || true
echo "distro=${ID:-unknown}"
echo "distro_like=${ID_LIKE:-}"
echo "distro_version=${VERSION_ID:-}"
echo "distro_codename=${VERSION_CODENAME:-}"
k=; read -r k 2>/dev/null < /proc/sys/kernel/osrelease
m=; read -r m 2>/dev/null < /proc/sys/kernel/arch || m=$(uname -m)
echo "kernel=${k:-$(uname -r)}"
echo "machine=$m"
h=; read -r h 2>/dev/null < /etc/hostname
echo "hostname=${h:-$HOSTNAME}"
echo "uid=$EUID"
for pm in apt-get dnf yum zypper apk pacman; do
  if command -v "$pm" >/dev/null 2>&1; then echo "package_manager=$pm"; break; fi
done
if [ -d /run/systemd/system ]; then echo "init=systemd"
elif [ -d /etc/init.d ] && command -v start-stop-daemon >/dev/null 2>&1; then echo "init=sysv"
else echo "init=none"; fi
p=(); mapfile -d "" -n 1 p 2>/dev/null < /proc/1/cmdline
echo "pid1=${p[0]-}"
echo "--packages--"
"""


def facts_script(unless: str | None = None) -> str:
    """The facts script, its package listing spared while the package database still has
    the stamp ``unless`` (as ``packages_script``)."""
    return _FACTS + packages_script(unless, arch=True)


#: The facts script that always lists the packages.
FACTS_SCRIPT = facts_script()


def listing_stamp(listing: str) -> str | None:
    """The stamp of a package listing (its ``#db`` line), None when it has none."""
    first = listing.partition("\n")[0]
    return (first[4:] or None) if first.startswith("#db ") else None


class PackageListings:
    """Each target's last package listing, a file per target in ``directory``: a facts
    run (``facts_script(listing_stamp(previous))``) then lists the packages only when
    the target's package database changed since, which spares a host a ``dpkg-query``
    over every package (7 ms of CPU and 24 KB for 700 packages) on every run but the
    first. A listing is nothing secret; a file that is unreadable is no listing."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _file(self, identity: str) -> Path:
        return self.directory / (hashlib.sha256(identity.encode()).hexdigest()[:32] + ".txt")

    def previous(self, identity: str) -> str | None:
        """The listing kept for ``identity``, if any."""
        try:
            listing = self._file(identity).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            return None
        return listing if listing_stamp(listing) else None

    def complete(self, identity: str, output: str, previous: str | None) -> str:
        """``output`` (of a facts run spared by ``previous``'s stamp) with ``previous``
        in place of a listing that says ``#same``; a new listing is kept instead."""
        head, mark, listing = output.partition(PACKAGES_MARK)
        if listing.partition("\n")[2].startswith("#same\n"):
            if previous is None or listing_stamp(previous) != listing_stamp(listing):
                raise TargetError(f"the facts from {identity} left the package listing out "
                                  "with no listing to stand for it", hint="Run again.")
            return head + mark + previous
        if mark and listing_stamp(listing) and listing != previous:
            self._keep(identity, listing)
        return output

    def _keep(self, identity: str, listing: str) -> None:
        """Write ``listing`` whole or not at all (runs on one target may race)."""
        written = None
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=self.directory,
                                             suffix=".part", delete=False) as file:
                written = Path(file.name)
                file.write(listing)
            os.replace(written, self._file(identity))
        except OSError:  # a cache: the next run lists the packages again
            if written is not None:
                written.unlink(missing_ok=True)

_FAMILIES = {
    "debian": "debian",
    "ubuntu": "debian",
    "raspbian": "debian",
    "rhel": "rhel",
    "fedora": "rhel",
    "centos": "rhel",
    "rocky": "rhel",
    "almalinux": "rhel",
    "alpine": "alpine",
    "opensuse": "suse",
    "sles": "suse",
    "arch": "arch",
}

_MACHINE_TO_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "armhf", "i686": "i386"}

_PACKAGE_MANAGERS = {"apt-get": "apt", "dnf": "dnf", "yum": "yum", "zypper": "zypper",
                     "apk": "apk", "pacman": "pacman"}


class Facts(BaseModel):
    """What a target is. Frozen: facts are gathered, never edited."""

    model_config = ConfigDict(frozen=True)

    os_family: str
    distro: str
    distro_version: str
    distro_codename: str = ""
    arch: str
    kernel: str = ""
    hostname: str = ""
    package_manager: str | None = None
    init_system: InitSystem = "none"
    is_root: bool = False
    installed_packages: dict[str, str] = {}
    #: Removed packages whose configuration files are still there (dpkg state "rc").
    config_only_packages: list[str] = []

    def summary(self) -> dict[str, object]:
        """The facts without the package list, for display and templates."""
        return self.model_dump(exclude={"installed_packages", "config_only_packages"})


def packages_listed(output: str) -> str:
    """The package listing (``packages_script``'s output) in the output of ``FACTS_SCRIPT``."""
    return output.partition(PACKAGES_MARK)[2]


def parse_facts(output: str) -> Facts:
    """Parse the output of ``FACTS_SCRIPT``."""
    head, _, packages_text = output.partition(PACKAGES_MARK)
    values: dict[str, str] = {}
    for line in head.splitlines():
        key, sep, value = line.partition("=")
        if sep and key not in values:
            values[key] = value.strip()
    dpkg_arch = next((line[6:] for line in packages_text.splitlines()
                      if line.startswith("#arch ")), None)
    packages: dict[str, str] = {}
    config_only: list[str] = []
    for line in packages_text.splitlines():
        status, _, rest = line.partition("\t")
        name, sep, version = rest.partition("\t")
        if not sep:
            continue
        # Facts name packages plainly: dpkg's "libc6:amd64" is libc6, rpm's "bash.x86_64"
        # bash (at version "1:5.2-1" without its epoch).
        if dpkg_arch is not None:
            name = name.partition(":")[0]
        else:
            name, version = name.rpartition(".")[0] or name, version.partition(":")[2] or version
        if status.startswith("ii"):
            packages[name] = version
        elif status.startswith("rc"):
            config_only.append(name)
    distro = values.get("distro", "unknown")
    family = _FAMILIES.get(distro)
    if family is None:
        likes = values.get("distro_like", "").split()
        family = next((_FAMILIES[like] for like in likes if like in _FAMILIES), "unknown")
    machine = values.get("machine", "")
    init = values.get("init", "none")
    return Facts(
        os_family=family,
        distro=distro,
        distro_version=values.get("distro_version", ""),
        distro_codename=values.get("distro_codename", ""),
        arch=dpkg_arch or _MACHINE_TO_ARCH.get(machine, machine),
        kernel=values.get("kernel", ""),
        hostname=values.get("hostname", ""),
        package_manager=_PACKAGE_MANAGERS.get(values.get("package_manager", "")),
        init_system=init if init in ("systemd", "sysv", "none") else "none",
        is_root=values.get("uid") == "0",
        installed_packages=packages,
        config_only_packages=config_only,
    )


async def gather_facts(target: Target) -> Facts:
    """Run ``FACTS_SCRIPT`` on ``target`` and parse what it prints."""
    return facts_from(await target.run(FACTS_SCRIPT, timeout=FACTS_TIMEOUT), target.identity)


def facts_from(result: RunResult, where: str) -> Facts:
    """The facts a run of ``FACTS_SCRIPT`` on ``where`` printed."""
    if not result.ok:
        raise TargetUnreachableError(
            f"could not gather facts from {where}: exit {result.exit_code}: "
            f"{result.stderr.strip()[-500:]}",
            hint="Check that the target runs bash and that you can run commands on it.",
        )
    return parse_facts(result.stdout)
