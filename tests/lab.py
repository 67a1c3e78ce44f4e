"""A lab of SSH hosts on this machine, for the SSH tests and the fleet benchmarks.

Each host is a ``SandboxTarget`` with ``network="none"``: its own mount, PID, UTS, IPC
and network namespaces, and its own file system (an overlay over the cached Debian root
with openssh-server, sudo and iproute2, ``lab_rootfs_cache``). A veth pair joins its
``eth0`` to a bridge on this host; the bridge has ``.1`` of a private /24, host ``i`` has
``.(10+i)``. Each runs ``sshd`` on port 22 with a host key of its own, accepts the lab's
client key for ``root`` and for ``deploy`` (a sudoer whose password is
``lab.sudo_password``), and logs in to a clean environment (the root file system's own
shell start-up files, not this machine's). There is no default route: the hosts reach
Debian's archive only through apt's proxy setting, a ``socat`` forwarder listening on the
bridge address.

Usage from Python (tests, ``bench/``: add ``tests/`` to ``sys.path``)::

    from lab import SshLab
    with SshLab(10) as lab:                  # or lab = SshLab(10); lab.start() ... lab.stop()
        host = lab.hosts[0]                  # .name, .address, .spec("root")
        target = lab.target(0)               # an SshTarget (not yet open)
        settings = lab.ssh_settings()        # SshSettings: known_hosts + client key
        env = lab.config_env()               # the same as WORKFLOW_AGENT_SSH__* variables

``start``/``stop`` are synchronous (the lab keeps no event-loop state); inside a running
loop use ``await lab.start_async()`` / ``await lab.stop_async()``.

Everything is torn down by ``stop()`` (also at interpreter exit): each host's namespace
dies with its holder process (so do sshd, its daemons, its mounts and the veth pair), the
forwarder's process group is killed, the bridge deleted and the lab's directory removed.
A lab whose process was SIGKILLed is swept by the next lab: its directory's lock is no
longer held, and the directory records its bridge and forwarder.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncssh

from workflow_agent.config import SshSettings
from workflow_agent.execution.rootfs import RootfsCache, default_cache_dir
from workflow_agent.execution.sandbox import SandboxTarget
from workflow_agent.execution.ssh import SshTarget

#: What the lab's root file system adds to minbase.
LAB_PACKAGES = ("openssh-server", "sudo", "iproute2")
#: The non-root user with sudo rights (and a password) on every host.
SUDO_USER = "deploy"
#: The port of the apt forwarder on the bridge address.
PROXY_PORT = 3142
_LAB_PREFIX = "workflow-agent-lab-"

_SSHD_CONFIG = """\
Port 22
ListenAddress 0.0.0.0
HostKey /etc/ssh/lab_host_key
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
# No PAM session: no motd, lastlog or loginuid work per command.
UsePAM no
PrintMotd no
PrintLastLog no
UseDNS no
PidFile /run/sshd.pid
Subsystem sftp internal-sftp
# Fleet benchmarks open many channels and connections at once.
MaxSessions 64
MaxStartups 200:30:400
AllowTcpForwarding yes
"""

# Run once per lab in a throwaway sandbox; its upper layer becomes every host's layer.
_PREPARE = """\
set -e
rm -f /etc/ssh/ssh_host_*
useradd --create-home --shell /bin/bash --groups sudo "$LAB_USER"
printf '%s:%s\\n' "$LAB_USER" "$LAB_PASSWORD" | chpasswd
install -d -m 700 /root/.ssh
printf '%s\\n' "$LAB_AUTHORIZED_KEY" > /root/.ssh/authorized_keys
chmod 600 /root/.ssh/authorized_keys
install -d -m 700 -o "$LAB_USER" -g "$LAB_USER" "/home/$LAB_USER/.ssh"
install -m 600 -o "$LAB_USER" -g "$LAB_USER" /root/.ssh/authorized_keys "/home/$LAB_USER/.ssh/"
printf '%s' "$LAB_SSHD_CONFIG" > /etc/ssh/sshd_config.lab
if [ -n "$LAB_PROXY" ]; then
  printf 'Acquire::http::Proxy "%s";\\n' "$LAB_PROXY" > /etc/apt/apt.conf.d/01lab-proxy
fi
"""

# Run in each host once its veth is in place.
_BOOT = """\
set -e
printf '%s\n' "$LAB_NAME" > /etc/hostname
printf '127.0.1.1\t%s\n' "$LAB_NAME" >> /etc/hosts
ip addr add "$LAB_ADDRESS/24" dev eth0
ip link set eth0 up
printf '%s' "$LAB_HOST_KEY" > /etc/ssh/lab_host_key
chmod 600 /etc/ssh/lab_host_key
install -d -m 755 /run/sshd
/usr/sbin/sshd -f /etc/ssh/sshd_config.lab -E /var/log/sshd-lab.log
"""


def lab_rootfs_cache(cache_dir: Path | None = None) -> RootfsCache:
    """The cached root file system lab hosts start from (``bookworm-minbase-ssh``)."""
    return RootfsCache(cache_dir or default_cache_dir(), include=LAB_PACKAGES, flavor="ssh")


@dataclass
class LabHost:
    """One host of the lab."""

    name: str
    address: str
    sandbox: SandboxTarget
    host_key: asyncssh.SSHKey  # the private key; ``.export_public_key()`` for known_hosts

    def spec(self, user: str = "root") -> str:
        """The ``--target`` for this host."""
        return f"ssh://{user}@{self.address}:22"

    @property
    def holder_pid(self) -> int:
        """Host PID of the namespace's PID 1 (killing it takes the host down)."""
        return self.sandbox.holder_pid or 0


@dataclass
class _Owned:
    """What ``_teardown`` must undo; also recorded in ``state.json`` for the sweep."""

    directory: Path
    lock_fd: int
    bridge: str = ""
    proxy: subprocess.Popen[bytes] | None = None
    sandboxes: list[SandboxTarget] = field(default_factory=list)

    def record(self) -> None:
        state = {"bridge": self.bridge, "proxy_pid": self.proxy.pid if self.proxy else 0}
        (self.directory / "state.json").write_text(json.dumps(state), encoding="utf-8")


class SshLab:
    """``count`` SSH hosts on a private bridge; see the module docstring."""

    def __init__(self, count: int, *, rootfs: Path | None = None, proxy: bool = True,
                 sudo_password: str | None = None) -> None:
        if not 1 <= count <= 200:
            raise ValueError("a lab has 1 to 200 hosts")
        self.count = count
        self.rootfs = rootfs
        self.proxy = proxy
        self.sudo_password = sudo_password or f"lab-{os.urandom(6).hex()}"
        self.hosts: list[LabHost] = []
        self.directory = Path()
        self.bridge_address = ""
        #: The bridge's interface name (``wl<lab id>br``), once started.
        self.bridge = ""
        self.started_in = 0.0
        self._owned: _Owned | None = None
        self._finalizer: weakref.finalize[[_Owned], SshLab] | None = None

    # -- what tests use -------------------------------------------------------------

    @property
    def client_key(self) -> Path:
        """The private key every host accepts for root and ``deploy``."""
        return self.directory / "id_ed25519"

    @property
    def known_hosts(self) -> Path:
        """A known_hosts file with every host's key."""
        return self.directory / "known_hosts"

    def ssh_settings(self, **overrides: Any) -> SshSettings:
        """``SshSettings`` that reach the lab's hosts: its known_hosts and client key."""
        values: dict[str, Any] = {"known_hosts": self.known_hosts,
                                  "client_keys": [self.client_key], "use_agent": False}
        values.update(overrides)
        return SshSettings(**values)

    def config_env(self) -> dict[str, str]:
        """The same settings as ``WORKFLOW_AGENT_SSH__*`` variables, for the CLI."""
        return {
            "WORKFLOW_AGENT_SSH__KNOWN_HOSTS": str(self.known_hosts),
            "WORKFLOW_AGENT_SSH__CLIENT_KEYS": json.dumps([str(self.client_key)]),
            "WORKFLOW_AGENT_SSH__USE_AGENT": "false",
        }

    def target(self, index: int, user: str = "root", **overrides: Any) -> SshTarget:
        """An ``SshTarget`` for host ``index`` (not opened); ``deploy`` gets the password."""
        password = self.sudo_password if user == SUDO_USER else None
        return SshTarget(self.hosts[index].spec(user), self.ssh_settings(**overrides),
                         sudo_password=password)

    # -- lifecycle --------------------------------------------------------------------

    def __enter__(self) -> SshLab:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Bring every host up (synchronous)."""
        asyncio.run(self.start_async())

    def stop(self) -> None:
        """Tear everything down (synchronous, idempotent)."""
        finalizer, self._finalizer, self._owned = self._finalizer, None, None
        detached = finalizer.detach() if finalizer is not None else None
        if detached is not None:
            _teardown(detached[2][0], graceful=True)

    async def stop_async(self) -> None:
        """``stop`` from inside an event loop."""
        await asyncio.to_thread(self.stop)

    async def start_async(self) -> None:
        """Bring every host up; on failure, tear down what was started."""
        if self._owned is not None:
            return
        began = time.monotonic()
        rootfs = self.rootfs or await asyncio.to_thread(lab_rootfs_cache().ensure)
        _sweep_stale()
        directory = Path(tempfile.mkdtemp(prefix=_LAB_PREFIX))
        lock_fd = os.open(directory / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC)
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        owned = _Owned(directory, lock_fd)
        self._owned, self.directory = owned, directory
        self._finalizer = weakref.finalize(self, _teardown, owned)
        try:
            await self._bring_up(owned, rootfs)
        except BaseException:
            self.stop()
            raise
        self.started_in = time.monotonic() - began

    async def _bring_up(self, owned: _Owned, rootfs: Path) -> None:
        lab_id = owned.directory.name[-6:].lower().replace("_", "x")
        subnet = _free_subnet()
        self.bridge_address = f"{subnet}.1"
        owned.bridge = self.bridge = f"wl{lab_id}br"
        owned.record()
        _ip_batch([f"link add {owned.bridge} type bridge",
                   f"addr add {self.bridge_address}/24 dev {owned.bridge}",
                   f"link set {owned.bridge} up"])
        if self.proxy:
            owned.proxy = _start_proxy(self.bridge_address, owned.directory)
            owned.record()
        client = asyncssh.generate_private_key("ssh-ed25519")
        client.write_private_key(str(self.client_key))
        self.client_key.chmod(0o600)
        layer = await self._prepare_layer(owned, rootfs, client)
        names = [f"lab{index:02d}" for index in range(1, self.count + 1)]
        sandboxes = [SandboxTarget(rootfs, network="none", layers=[layer], hostname=name,
                                   name=name) for name in names]
        owned.sandboxes.extend(sandboxes)
        await asyncio.gather(*(sandbox.open() for sandbox in sandboxes))
        veths = []
        for index, sandbox in enumerate(sandboxes, start=1):
            veth = f"wl{lab_id}h{index}"
            veths += [f"link add {veth} type veth peer name eth0 netns {sandbox.holder_pid}",
                      f"link set {veth} master {owned.bridge} up"]
        _ip_batch(veths)
        keys = [asyncssh.generate_private_key("ssh-ed25519") for _ in sandboxes]
        parts = enumerate(zip(names, sandboxes, keys, strict=True))
        self.hosts = [LabHost(name, f"{subnet}.{10 + index}", sandbox, key)
                      for index, (name, sandbox, key) in parts]
        await asyncio.gather(*(self._boot(host) for host in self.hosts))
        self.known_hosts.write_text("".join(
            f"{host.address} {host.host_key.export_public_key().decode().strip()}\n"
            for host in self.hosts), encoding="utf-8")
        await asyncio.gather(*(_wait_listening(host.address, 22) for host in self.hosts))

    async def _prepare_layer(self, owned: _Owned, rootfs: Path,
                             client: asyncssh.SSHKey) -> Path:
        prep = SandboxTarget(rootfs, network="none", name="lab-prepare")
        owned.sandboxes.append(prep)
        await prep.open()
        proxy = f"http://{self.bridge_address}:{PROXY_PORT}" if self.proxy else ""
        result = await prep.run(_PREPARE, timeout=60, env={
            "LAB_USER": SUDO_USER, "LAB_PASSWORD": self.sudo_password,
            "LAB_AUTHORIZED_KEY": client.export_public_key().decode().strip(),
            "LAB_SSHD_CONFIG": _SSHD_CONFIG, "LAB_PROXY": proxy,
        })
        if not result.ok:
            raise RuntimeError(f"preparing the lab layer failed: {result.stderr}")
        layer = owned.directory / "layer"
        assert prep.scratch_path is not None
        # cp -a keeps owners, modes, xattrs and overlay whiteouts (the removed host keys).
        subprocess.run(["cp", "-a", str(prep.scratch_path / "upper"), str(layer)], check=True)
        await prep.close()
        owned.sandboxes.remove(prep)
        return layer

    async def _boot(self, host: LabHost) -> None:
        key = host.host_key.export_private_key().decode()
        result = await host.sandbox.run(_BOOT, timeout=30, env={
            "LAB_NAME": host.name, "LAB_ADDRESS": host.address, "LAB_HOST_KEY": key})
        if not result.ok:
            raise RuntimeError(f"booting lab host {host.name} failed: {result.stderr}")

    def kill_sshd(self, index: int) -> None:
        """Kill host ``index``'s sshd (and every session it serves): the host is then
        unreachable over SSH while its namespace lives on."""
        sandbox = self.hosts[index].sandbox
        asyncio.run(sandbox.run("kill -KILL $(cat /run/sshd.pid) 2>/dev/null; "
                                "pkill -KILL -x sshd || true", timeout=30))


def _ip_batch(commands: list[str]) -> None:
    subprocess.run(["ip", "-batch", "-"], input="\n".join(commands) + "\n", text=True,
                   check=True, capture_output=True)


def _free_subnet() -> str:
    """A 10.x.y /24 no route on this host covers (the lab's addresses are its own)."""
    routes = subprocess.run(["ip", "-4", "route", "show", "table", "all"], text=True,
                            check=True, capture_output=True).stdout
    for _ in range(100):
        prefix = f"10.{random.randint(200, 250)}.{random.randint(0, 255)}"
        if f"{prefix}." not in routes:
            return prefix
    raise RuntimeError("no free 10.x.y.0/24 subnet for the lab")


def _start_proxy(address: str, directory: Path) -> subprocess.Popen[bytes]:
    """socat forwarding ``address:PROXY_PORT`` to Debian's archive, in its own session
    (so the forked per-connection children can be killed with it)."""
    socat = shutil.which("socat")
    if socat is None:
        raise RuntimeError("the SSH lab needs socat (scripts/system-deps.sh --test)")
    with open(directory / "proxy.log", "wb") as log:
        proc = subprocess.Popen(
            [socat, f"TCP-LISTEN:{PROXY_PORT},bind={address},fork,reuseaddr",
             "TCP:deb.debian.org:80"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    return proc


async def _wait_listening(address: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            _, writer = await asyncio.open_connection(address, port)
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.01)
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return


def _teardown(owned: _Owned, graceful: bool = False) -> None:
    """Kill every host, the forwarder and the bridge; remove the directory.

    Synchronous: it also runs from ``weakref.finalize`` (``graceful`` False) when the lab
    is dropped or the interpreter exits without ``stop()``; asyncio's thread pool may be
    gone then, so each host's PID 1 is SIGKILLed (the kernel kills the rest of its
    namespace) and its own finalizer removes its scratch directory.
    """
    async def close_all() -> None:
        await asyncio.gather(*(sandbox.close() for sandbox in owned.sandboxes))

    if graceful:
        asyncio.run(close_all())
    else:
        for sandbox in owned.sandboxes:
            with contextlib.suppress(ProcessLookupError, TypeError):
                os.kill(sandbox.holder_pid, signal.SIGKILL)  # type: ignore[arg-type]
    if owned.proxy is not None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(owned.proxy.pid, signal.SIGKILL)
        owned.proxy.wait()
    _remove_bridge(owned.bridge)
    shutil.rmtree(owned.directory, ignore_errors=True)
    with contextlib.suppress(OSError):
        os.close(owned.lock_fd)


def _remove_bridge(bridge: str) -> None:
    if bridge:
        subprocess.run(["ip", "link", "del", bridge], capture_output=True, check=False)


def _sweep_stale() -> None:
    """Undo labs whose process died without ``stop()``: their lock is free. Their hosts
    died with that process (each holder watches a pipe from it)."""
    for entry in Path(tempfile.gettempdir()).glob(_LAB_PREFIX + "*"):
        try:
            fd = os.open(entry / "lock", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue  # alive
        try:
            state = json.loads((entry / "state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            state = {}
        pid = int(state.get("proxy_pid") or 0)
        with contextlib.suppress(OSError):
            if pid and b"socat" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.killpg(pid, signal.SIGKILL)
        _remove_bridge(str(state.get("bridge") or ""))
        shutil.rmtree(entry, ignore_errors=True)
        os.close(fd)


def _main() -> None:
    """``python tests/lab.py N``: start N hosts, print them, wait for Ctrl-C."""
    import sys

    with SshLab(int(sys.argv[1]) if len(sys.argv) > 1 else 3) as lab:
        print(f"{lab.count} hosts up in {lab.started_in:.2f} s; key {lab.client_key}, "
              f"known_hosts {lab.known_hosts}, sudo user {SUDO_USER}")
        for host in lab.hosts:
            print(f"  {host.name}  {host.spec()}")
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()


if __name__ == "__main__":
    _main()
