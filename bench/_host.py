"""The local host's prometheus-node-exporter: what state it is in, and putting it back.

Benchmarks that install or uninstall the exporter on this host record a ``HostState``
first and call ``restore`` at the end, whatever happened in between.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from _agent import BENCH, NODE_EXPORTER
from _timing import run

INSTALL_SH = str(BENCH / "baselines" / "node_exporter_install.sh")
UNINSTALL_SH = str(BENCH / "baselines" / "node_exporter_uninstall.sh")
DEFAULTS = Path("/etc/default/prometheus-node-exporter")
INIT = f"/etc/init.d/{NODE_EXPORTER}"
DIRS = ("/var/lib/prometheus", "/var/log/prometheus", "/run/prometheus")


def package_installed() -> bool:
    result = subprocess.run(["dpkg-query", "-W", "-f", "${Status}", NODE_EXPORTER],
                            capture_output=True, text=True, check=False)
    return result.stdout.strip() == "install ok installed"


def daemon_running() -> bool:
    if not os.access(INIT, os.X_OK):
        return False
    return subprocess.run([INIT, "status"], capture_output=True, check=False).returncode == 0


def daemon_pid() -> str | None:
    """The pid in the init script's pid file, if there is one."""
    pid_file = Path("/run/prometheus/prometheus-node-exporter.pid")
    return pid_file.read_text().strip() if pid_file.exists() else None


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


@dataclass(frozen=True)
class HostState:
    """What of the exporter is on this host."""

    installed: bool
    running: bool
    defaults: bytes | None
    user: bool
    group: bool
    dirs: tuple[str, ...]

    @classmethod
    def now(cls) -> HostState:
        return cls(
            installed=package_installed(),
            running=daemon_running(),
            defaults=DEFAULTS.read_bytes() if DEFAULTS.exists() else None,
            user=_user_exists("prometheus"),
            group=_group_exists("prometheus"),
            dirs=tuple(d for d in DIRS if os.path.exists(d)),
        )

    @property
    def clean(self) -> bool:
        """Nothing of the exporter is here (the state a first install starts from)."""
        return not (self.installed or self.defaults is not None or self.user or self.group
                    or self.dirs)

    def describe(self) -> str:
        parts = [
            "installed" if self.installed else "not installed",
            "running" if self.running else "not running",
            "defaults file" if self.defaults is not None else "no defaults file",
            "user prometheus" if self.user else "no user prometheus",
            "group prometheus" if self.group else "no group prometheus",
            f"dirs {', '.join(self.dirs)}" if self.dirs else "no prometheus dirs",
        ]
        return "; ".join(parts)


def announce(what: str, start: HostState) -> None:
    """Say loudly that this benchmark changes the local host, and how it will be restored."""
    bar = "!" * 78
    print(bar)
    print(f"!! THIS BENCHMARK CHANGES THIS HOST: {what}")
    print(f"!! starting state of {NODE_EXPORTER}: {start.describe()}")
    print("!! it puts that state back at the end (also on failure or Ctrl-C).")
    print(bar, flush=True)


def ensure_running_install() -> None:
    """Install and start the exporter (untimed set-up), with the hand-written script."""
    run(["bash", INSTALL_SH])


def purge() -> None:
    """Stop and purge the exporter; remove its user, group and directories."""
    run(["bash", UNINSTALL_SH])


def restore(start: HostState) -> None:
    """Put the exporter back the way ``start`` found it, as far as these scripts know it."""
    if not start.installed:
        if os.access(INIT, os.X_OK):
            run(["install", "-d", "/run/prometheus"])
            run([INIT, "stop"], check=False)
        if package_installed():
            run(["apt-get", "purge", "-y", "-qq", NODE_EXPORTER])
        if not start.user and _user_exists("prometheus"):
            run(["userdel", "prometheus"])
        if not start.group and _group_exists("prometheus"):
            run(["groupdel", "prometheus"])
        for path in set(DIRS) - set(start.dirs):
            shutil.rmtree(path, ignore_errors=True)
        if start.defaults is None:
            DEFAULTS.unlink(missing_ok=True)
    else:
        if not package_installed() or not daemon_running():
            ensure_running_install()
        if start.defaults is not None and DEFAULTS.read_bytes() != start.defaults:
            DEFAULTS.write_bytes(start.defaults)
            run([INIT, "restart"])
        if not start.running:
            run([INIT, "stop"])
    end = HostState.now()
    if end == start:
        print(f"host restored: {end.describe()}")
    else:
        print(f"WARNING: host NOT as found.\n  start: {start.describe()}\n  now:   "
              f"{end.describe()}")
