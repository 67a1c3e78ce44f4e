"""Small helpers several test modules share (importable: pytest's pythonpath has tests/)."""

from __future__ import annotations

import asyncio
import os
import random
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from workflow_agent.execution.target import RunResult, Target


def run_sh(target: Target, script: str, **kwargs: Any) -> RunResult:
    """Run ``script`` on ``target`` from synchronous test code."""
    return asyncio.run(target.run(script, **kwargs))


def install_tiny_package(target: Target, name: str, version: str = "1.0") -> None:
    """Build an empty Debian package ``name`` on ``target`` and install it with dpkg: a
    real change of the package database, with no network."""
    built = run_sh(target, f"""set -e
d=$(mktemp -d); mkdir "$d/DEBIAN"
cat > "$d/DEBIAN/control" <<'EOF'
Package: {name}
Version: {version}
Architecture: all
Maintainer: Tests <tests@example.org>
Description: an empty package the tests install
EOF
dpkg-deb -b "$d" "$d.deb" >/dev/null && dpkg -i "$d.deb" >/dev/null && rm -rf -- "$d" "$d.deb"
""")
    assert built.ok, built.stderr


def host_pids_with(needle: bytes, what: str = "cmdline") -> list[int]:
    """Host PIDs whose /proc/PID/<what> (cmdline or environ) contains ``needle``."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            data = Path(entry.path, what).read_bytes()
        except OSError:  # the process exited while we looked
            continue
        if needle in data:
            found.append(int(entry.name))
    return found


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` passes; its last answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def unique_sleep() -> str:
    """A sleep duration no other process on the host is using: our process marker."""
    return f"9{secrets.randbelow(10**8):08d}"


def free_port() -> int:
    """A loopback TCP port nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def free_low_port() -> int:
    """A TCP port nothing listens on now (sandboxes share this host's network), in
    20000-32767: zabbix_agentd refuses a ListenPort above 32767."""
    for port in random.sample(range(20000, 32768), 200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free TCP port in 20000-32767")


def run_cli(
    home: Path, *args: str, env: Mapping[str, str] | None = None, timeout: float = 900
) -> subprocess.CompletedProcess[str]:
    """The real command line in a fresh process with a bare environment (``cli_env``)."""
    return subprocess.run([sys.executable, "-m", "workflow_agent", *args],
                          env=cli_env(home, env), capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=timeout)


def cli_env(home: Path, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """A bare environment for the command line: ``PATH``, ``LANG``, ``HOME`` at ``home``
    with the data and cache directories under it, and ``env``."""
    return {
        "PATH": os.environ["PATH"], "HOME": str(home), "LANG": "C.UTF-8",
        "WORKFLOW_AGENT_DATA_DIR": str(home / "data"),
        "WORKFLOW_AGENT_CACHE_DIR": str(home / "cache"), **(env or {}),
    }


def metrics(address: str, port: int = 9100) -> str:
    """The Prometheus exposition an exporter at ``address:port`` serves (from this machine)."""
    with urllib.request.urlopen(f"http://{address}:{port}/metrics", timeout=10) as response:
        body: str = response.read().decode()
        return body


def plugin(tmp_path: Path, name: str, install: str) -> Path:
    """A one-method integration whose install script is ``install`` (watching /etc and
    /opt), in a plugin folder of its own: the folder to pass as ``plugin_dirs``."""
    folder = tmp_path / "plugins" / name
    (folder / "templates").mkdir(parents=True)
    (folder / "templates" / "install.sh.j2").write_text(install)
    (folder / "definition.yaml").write_text(yaml.safe_dump({
        "name": name, "version": "1", "description": "test integration",
        "platforms": [{"os_family": "debian"}],
        "methods": [{"name": "script", "templates": {"install": "install.sh.j2"}}],
        "uninstall": {"watch": ["/etc", "/opt"]},
    }))
    return tmp_path / "plugins"
