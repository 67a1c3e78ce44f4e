"""A real Docker engine for the docker target tests, started and stopped by the test run.

``docker_engine``  (session) ``dockerd`` started by hand with its own data root, exec
                   root, socket and pid file; no iptables, no bridge (no systemd here).
                   Yields its ``unix://`` URL; stopped, unmounted and removed at the end.
``docker_image``   (session) the cached Debian root file system (``RootfsCache``)
                   imported as an image, once per session: no registry is needed.
``docker_client``  a docker SDK client of that engine, closed after the test.
``container``      a running container from ``docker_image`` (host network, an init,
                   ``sleep infinity``, CAP_SYS_PTRACE), force-removed after the test.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from workflow_agent.execution.rootfs import RootfsCache, default_cache_dir

#: How long dockerd may take to answer (measured here: ~1 s).
_START_TIMEOUT = 60.0

#: What the imported root file system is tagged as.
IMAGE = "workflow-agent/bookworm-minbase:test"


def _mounts_under(root: Path) -> list[str]:
    """Mount points below ``root``, deepest first (mountinfo escapes spaces as \\040)."""
    points = []
    with open("/proc/self/mountinfo", encoding="utf-8") as info:
        for line in info:
            point = line.split()[4].replace("\\040", " ")
            if point == str(root) or point.startswith(f"{root}/"):
                points.append(point)
    return sorted(points, key=len, reverse=True)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM dockerd (it stops its containers and its containerd), SIGKILL if stuck."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
    # Its own session: containerd and shims die with the group if anything lingers.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[str]:
    """A running dockerd of this test run; its engine URL."""
    if os.geteuid() != 0:
        pytest.skip("starting dockerd needs root")
    dockerd = shutil.which("dockerd")
    if dockerd is None:
        pytest.skip("dockerd is not installed (scripts/system-deps.sh --test installs docker.io)")
    # Short: unix socket paths (ours and containerd's under the exec root) max 108 bytes.
    root = Path(tempfile.mkdtemp(prefix="wa-dockerd-"))
    (root / "daemon.json").write_text("{}\n")  # not the host's /etc/docker/daemon.json
    socket_path = root / "docker.sock"
    url = f"unix://{socket_path}"
    log = root / "dockerd.log"
    argv = [
        dockerd,
        f"--data-root={root / 'data'}",
        f"--exec-root={root / 'exec'}",
        f"--host={url}",
        f"--pidfile={root / 'dockerd.pid'}",
        f"--config-file={root / 'daemon.json'}",
        "--iptables=false",
        "--bridge=none",
    ]
    with open(log, "wb") as log_handle:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_handle,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_ready(proc, url, log)
        yield url
    finally:
        _stop(proc)
        # dockerd leaves its default network namespace (and, if killed, more) mounted.
        for point in _mounts_under(root):
            subprocess.run(["umount", "-l", point], check=False, capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def _wait_ready(proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
    import docker

    deadline = time.monotonic() + _START_TIMEOUT
    socket_path = url.removeprefix("unix://")
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
            pytest.fail(f"dockerd exited with {proc.returncode}:\n{tail}")
        if os.path.exists(socket_path):
            client = docker.DockerClient(base_url=url, timeout=5)
            try:
                if client.ping():
                    return
            except docker.errors.DockerException:
                pass
            finally:
                client.close()
        time.sleep(0.1)
    pytest.fail(f"dockerd did not answer within {_START_TIMEOUT:.0f} s (log: {log})")


@pytest.fixture(scope="session")
def docker_image(docker_engine: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The cached Debian root file system as an image of ``docker_engine`` (imported once)."""
    import docker

    cache = RootfsCache(default_cache_dir())
    tree = cache.ensure()
    tarball = cache.tarball
    if not tarball.is_file():  # the tree survives a deleted tarball: pack it again
        tarball = tmp_path_factory.mktemp("rootfs") / "rootfs.tar"
        subprocess.run(["tar", "--create", "--file", str(tarball), "--directory", str(tree),
                        "--numeric-owner", "--xattrs", "."], check=True)
    client = docker.DockerClient(base_url=docker_engine, timeout=300)
    try:
        repository, tag = IMAGE.rsplit(":", 1)
        # A plain tar: `docker import` takes tar, gzip, bzip2 and xz, but not zstd.
        client.api.import_image_from_file(str(tarball), repository=repository, tag=tag)
        client.images.get(IMAGE)  # raises if the import did not produce it
    finally:
        client.close()
    return IMAGE


@pytest.fixture
def docker_client(docker_engine: str) -> Iterator[Any]:
    """An SDK client of the test engine."""
    import docker

    client = docker.DockerClient(base_url=docker_engine)
    yield client
    client.close()


@pytest.fixture
def container(docker_client: Any, docker_image: str) -> Iterator[Any]:
    """A running container (host network, so apt reaches the archive), removed after."""
    created = docker_client.containers.run(
        docker_image, ["sleep", "infinity"], detach=True, init=True, network_mode="host",
        name=f"wa-test-{os.urandom(4).hex()}",
        # Root needs it to see which process owns a port when that runs as another user.
        cap_add=["SYS_PTRACE"],
    )
    yield created
    docker_client.api.remove_container(created.id, force=True, v=True)
