"""The systemd sandbox target, for real: systemd-nspawn boots systemd, no mocks.

Needs root, systemd-nspawn (Debian package systemd-container) and the cached systemd root
file system; the first run on a machine builds it (~20 s, needs the Debian archive). A
boot takes ~0.3 s here, so every test gets its own container.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import host_pids_with, run_sh, unique_sleep, wait_until
from workflow_agent.errors import SandboxToolingMissingError, TargetError, TargetUnreachableError
from workflow_agent.execution.nspawn import NSPAWN_PREFIX, NspawnTarget, systemd_rootfs_cache
from workflow_agent.execution.rootfs import (
    SANDBOX_HOSTNAME,
    RootfsCache,
    cgroup_parents,
)

pytestmark = pytest.mark.sandbox

Factory = Callable[..., NspawnTarget]


@pytest.fixture
def factory(systemd_rootfs: Path) -> Iterator[Factory]:
    """Boot containers on demand; every one booted is closed when the test ends."""
    opened: list[NspawnTarget] = []

    def boot(**kwargs: Any) -> NspawnTarget:
        target = NspawnTarget(kwargs.pop("rootfs", systemd_rootfs), **kwargs)
        opened.append(target)
        asyncio.run(target.open())
        return target

    yield boot
    for target in opened:
        asyncio.run(target.close())  # idempotent


@pytest.fixture
def booted(factory: Factory) -> NspawnTarget:
    return factory()


def mounted_anywhere(path: Path) -> bool:
    """True when some process on the host sees a mount at or under ``path``."""
    needle = f" {path}".encode()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if needle in Path(entry.path, "mountinfo").read_bytes():
                    return True
            except OSError:
                continue
    return False


def assert_nothing_left(leader: int, scratch: Path, cgroups: list[Path]) -> None:
    assert wait_until(lambda: not Path(f"/proc/{leader}").exists()), "the container lives"
    assert host_pids_with(str(scratch).encode()) == []  # unshare, holder, nspawn
    assert not mounted_anywhere(scratch)
    assert not scratch.exists()
    assert cgroups and not any(cgroup.exists() for cgroup in cgroups)


def test_boots_systemd_and_runs_scripts(booted: NspawnTarget) -> None:
    seen: list[tuple[str, str]] = []
    result = asyncio.run(booted.run(
        "echo out; echo err >&2; hostname; cat /proc/1/comm; exit 7",
        on_output=lambda stream, line: seen.append((stream, line)),
    ))
    assert result.exit_code == 7 and not result.timed_out
    assert result.stdout == f"out\n{SANDBOX_HOSTNAME}\nsystemd\n"
    assert result.stderr == "err\n"
    assert ("stdout", "out") in seen and ("stderr", "err") in seen
    assert booted.system_state in ("running", "degraded")
    assert run_sh(booted, "systemctl is-system-running").stdout.strip() == booted.system_state
    assert run_sh(booted, "systemd-detect-virt --container").stdout == "systemd-nspawn\n"
    assert booted.identity.startswith(f"systemd-sandbox:{NSPAWN_PREFIX}")
    assert booted.kind == "systemd-sandbox"


def test_facts_say_systemd(booted: NspawnTarget) -> None:
    facts = asyncio.run(booted.facts())
    assert facts.init_system == "systemd"
    assert (facts.distro, facts.distro_codename, facts.package_manager) == (
        "debian", "bookworm", "apt")
    assert facts.is_root and "systemd" in facts.installed_packages


def test_systemctl_starts_a_unit_inside_the_container(booted: NspawnTarget) -> None:
    marker = unique_sleep()
    unit = f"[Unit]\nDescription=sleeper\n[Service]\nExecStart=/usr/bin/sleep {marker}\n"
    asyncio.run(booted.put("/etc/systemd/system/wa-sleeper.service", unit.encode()))
    started = run_sh(booted, "systemctl daemon-reload && systemctl start wa-sleeper\n"
                         "systemctl is-active wa-sleeper\n"
                         "systemctl show -p MainPID --value wa-sleeper\n")
    assert started.ok, started.stderr
    active, inner_pid = started.stdout.split()
    assert active == "active" and int(inner_pid) > 1
    (host_pid,) = host_pids_with(f"sleep\0{marker}".encode())
    # Started by the container's systemd, in the container's cgroup tree on the host.
    cgroup = Path(f"/proc/{host_pid}/cgroup").read_text()
    assert f"/{booted.cgroups[0].name}/payload/system.slice/wa-sleeper.service" in cgroup
    # It outlives the run that started it, and stops when asked.
    assert run_sh(booted, "systemctl is-active wa-sleeper").stdout == "active\n"
    assert run_sh(booted, "systemctl stop wa-sleeper").ok
    assert wait_until(lambda: not host_pids_with(f"sleep\0{marker}".encode()))
    assert run_sh(booted, "systemctl start wa-sleeper").ok


def test_changes_never_touch_the_cached_rootfs(factory: Factory, systemd_rootfs: Path) -> None:
    passwd = systemd_rootfs / "etc/passwd"
    before = hashlib.sha256(passwd.read_bytes()).hexdigest()
    first = factory()
    assert run_sh(first, "echo 'intruder:x:4242:4242::/:/bin/false' >> /etc/passwd\n"
                     "mkdir -p /usr/local/wa && echo new > /usr/local/wa/file\n").ok
    assert b"intruder" in asyncio.run(first.get("/etc/passwd"))
    assert hashlib.sha256(passwd.read_bytes()).hexdigest() == before
    assert not (systemd_rootfs / "usr/local/wa").exists()
    assert not list(systemd_rootfs.parent.glob(".#*"))  # no nspawn image lock files
    second = factory()
    assert b"intruder" not in asyncio.run(second.get("/etc/passwd"))


def test_close_leaves_nothing_behind(factory: Factory) -> None:
    target = factory()
    marker = unique_sleep()
    # A unit systemd runs and a process a script left behind: both must die.
    assert run_sh(target, f"systemd-run --unit=wa-left /usr/bin/sleep {marker}\n"
                      f"setsid sleep {marker} >/dev/null 2>&1 < /dev/null &\n").ok
    assert wait_until(lambda: len(host_pids_with(f"sleep\0{marker}".encode())) == 2)
    leader, scratch, cgroups = target.leader_pid, target.scratch_path, target.cgroups
    assert leader is not None and scratch is not None and scratch.is_dir()
    assert all(cgroup.is_dir() for cgroup in cgroups)

    began = time.monotonic()
    asyncio.run(target.close())
    assert time.monotonic() - began < 10
    assert host_pids_with(f"sleep\0{marker}".encode()) == []
    assert_nothing_left(leader, scratch, cgroups)
    # nspawn wrote below it only in the holder's private tmpfs; the host's stays empty.
    assert list(Path("/run/systemd/nspawn").iterdir()) == []
    asyncio.run(target.close())  # idempotent
    with pytest.raises(TargetError):
        run_sh(target, "true")


def test_a_container_that_powers_off_is_reported_and_cleaned(factory: Factory) -> None:
    target = factory()
    leader, scratch, cgroups = target.leader_pid, target.scratch_path, target.cgroups
    assert leader is not None and scratch is not None
    run_sh(target, "systemctl poweroff --no-block")
    assert wait_until(lambda: not Path(f"/proc/{leader}").exists())

    def stopped() -> bool:
        try:
            run_sh(target, "true")
        except TargetUnreachableError as error:
            return "has stopped" in error.message
        return False

    assert wait_until(stopped)
    asyncio.run(target.close())
    assert_nothing_left(leader, scratch, cgroups)


def test_a_killed_owner_takes_the_container_along(
    systemd_rootfs: Path, factory: Factory, tmp_path: Path
) -> None:
    """SIGKILL the Python process that opened the container: the container dies at once,
    its cgroups go; the scratch directory is swept by the next open."""
    marker = unique_sleep()
    program = f"""
import asyncio, json, time
from pathlib import Path
from workflow_agent.execution.nspawn import NspawnTarget
target = NspawnTarget(Path({str(systemd_rootfs)!r}), scratch_dir=Path({str(tmp_path)!r}))
asyncio.run(target.open())
assert asyncio.run(target.run("systemd-run --unit=wa-orphan /usr/bin/sleep {marker}")).ok
print(json.dumps({{"leader": target.leader_pid, "scratch": str(target.scratch_path),
                  "cgroups": [str(c) for c in target.cgroups]}}), flush=True)
time.sleep(600)
"""
    owner = subprocess.Popen([sys.executable, "-c", program], stdout=subprocess.PIPE)
    assert owner.stdout is not None
    with owner.stdout:
        try:
            info = json.loads(owner.stdout.readline())
            assert wait_until(lambda: bool(host_pids_with(f"sleep\0{marker}".encode())))
        finally:
            owner.kill()
            owner.wait()
    scratch, cgroups = Path(info["scratch"]), [Path(c) for c in info["cgroups"]]
    assert wait_until(lambda: not Path(f"/proc/{info['leader']}").exists())
    assert wait_until(lambda: not host_pids_with(str(scratch).encode()))
    assert host_pids_with(f"sleep\0{marker}".encode()) == []
    assert not mounted_anywhere(scratch)
    assert wait_until(lambda: not any(cgroup.exists() for cgroup in cgroups))
    assert scratch.is_dir()  # nobody left to remove it, but its lock is free now
    factory(scratch_dir=tmp_path)
    assert not scratch.exists()


def test_stale_cgroups_are_swept(factory: Factory) -> None:
    """An orphaned container (its nspawn gone, say both it and its holder were
    SIGKILLed) is killed and its cgroups removed by the next open."""
    marker = unique_sleep()
    sleeper = subprocess.Popen(["sleep", marker])
    made: list[Path] = []
    try:
        for parent in cgroup_parents():
            stale = parent / f"{NSPAWN_PREFIX}stale-{marker}"
            young = parent / f"{NSPAWN_PREFIX}young-{marker}"
            for cgroup in (stale / "payload", stale / "supervisor", young / "supervisor"):
                cgroup.mkdir(parents=True)
            made += [stale, young]
            (stale / "payload/cgroup.procs").write_text(str(sleeper.pid))
            os.utime(stale, (time.time() - 3600, time.time() - 3600))
        factory()
        assert sleeper.wait(timeout=10) == -9
        assert not any(cgroup.exists() for cgroup in made if "-stale-" in cgroup.name)
        assert all(cgroup.exists() for cgroup in made if "-young-" in cgroup.name)
    finally:
        sleeper.kill()
        sleeper.wait()
        for cgroup in made:
            for sub in ("payload", "supervisor"):
                if (cgroup / sub).exists():
                    (cgroup / sub).rmdir()
            if cgroup.exists():
                cgroup.rmdir()


def test_missing_nspawn_is_reported(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, systemd_rootfs: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on PATH at all
    with pytest.raises(SandboxToolingMissingError) as missing:
        asyncio.run(NspawnTarget(systemd_rootfs).open())
    assert (missing.value.tool, missing.value.package) == ("systemd-nspawn", "systemd-container")


def test_a_root_without_systemd_is_refused(sandbox_rootfs_like: Path) -> None:
    with pytest.raises(TargetError, match="not a root file system with systemd"):
        asyncio.run(NspawnTarget(sandbox_rootfs_like).open())


@pytest.fixture
def sandbox_rootfs_like(tmp_path: Path) -> Path:
    (tmp_path / "usr/bin").mkdir(parents=True)
    (tmp_path / "usr/bin/bash").write_text("")
    return tmp_path


def test_a_failed_boot_shows_nspawn_output_and_leaves_nothing(
    systemd_rootfs: Path, tmp_path: Path
) -> None:
    fake = tmp_path / "not-an-os"
    (fake / "usr/lib/systemd").mkdir(parents=True)
    (fake / "usr/lib/systemd/systemd").write_text("")  # passes the quick check only
    scratch_dir = tmp_path / "scratch"
    scratch_dir.mkdir()
    target = NspawnTarget(fake, scratch_dir=scratch_dir)
    with pytest.raises(TargetUnreachableError, match="os-release") as failed:
        asyncio.run(target.open())
    assert "failed to boot" in failed.value.message
    assert list(scratch_dir.iterdir()) == []
    assert host_pids_with(str(scratch_dir).encode()) == []
    name = target.identity.partition(":")[2]
    assert not any((parent / name).exists() for parent in cgroup_parents())


def test_a_boot_timeout_is_clear_and_leaves_nothing(systemd_rootfs: Path, tmp_path: Path) -> None:
    target = NspawnTarget(systemd_rootfs, scratch_dir=tmp_path, boot_timeout=0.01)
    with pytest.raises(TargetUnreachableError, match="did not boot within"):
        asyncio.run(target.open())
    assert list(tmp_path.iterdir()) == []
    name = target.identity.partition(":")[2]
    assert not any((parent / name).exists() for parent in cgroup_parents())
    assert host_pids_with(str(tmp_path).encode()) == []


def test_a_rootfs_with_packages_is_a_separate_cache_entry(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``include`` reaches mmdebstrap and names its own entry; the plain one is unchanged."""
    if os.geteuid() != 0:
        pytest.skip("building a root file system needs root")
    tools, tree = tmp_path / "bin", tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    tools.mkdir()
    tar = shutil.which("tar")
    assert tar is not None
    (tools / "tar").symlink_to(tar)
    # Records its arguments; writes the tarball (the second-to-last argument).
    (tools / "mmdebstrap").write_text(
        '#!/bin/sh\necho "$*" > "$WA_ARGS"\nwhile [ $# -gt 2 ]; do shift; done\n'
        'exec tar -cf "$1" -C "$WA_TREE" etc\n')
    (tools / "mmdebstrap").chmod(0o755)
    monkeypatch.setenv("PATH", str(tools))
    monkeypatch.setenv("WA_ARGS", str(tmp_path / "args"))
    monkeypatch.setenv("WA_TREE", str(tree))

    cache = systemd_rootfs_cache(tmp_path / "cache")
    assert cache.ensure() == tmp_path / "cache/rootfs/bookworm-minbase-systemd"
    assert (cache.root_dir / "etc/hostname").read_text() == f"{SANDBOX_HOSTNAME}\n"
    args = (tmp_path / "args").read_text().split()
    assert "--include=systemd,systemd-sysv,dbus" in args and "--variant=minbase" in args
    plain = RootfsCache(tmp_path / "cache")
    assert plain.name == "bookworm-minbase" and not plain.root_dir.exists()
    assert RootfsCache(tmp_path, include=["b", "a"]).name == "bookworm-minbase-a+b"
    with pytest.raises(ValueError):
        RootfsCache(tmp_path, include=["systemd;rm"])
