"""The SSH target: scripts run on a remote host over one asyncssh connection.

``ssh://user@host:port`` (``parse_ssh_spec``) names the host. ``open()`` connects once
(through a jump host if configured), checks the host key against known_hosts, learns
whether the login user is root, and for anyone else checks that ``sudo`` accepts the
password. Scripts then run one after another in a runner shell kept on that connection
(a few when runs overlap), with no new session per script: see ``ssh_runner.py``.

``put`` and ``get`` use SFTP. SFTP runs as the login user, so for a sudo user the bytes
go through a private staging directory and a root helper script moves them into place.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import re
import secrets
import shlex
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

from workflow_agent.errors import InvalidInputError, TargetError, TargetUnreachableError
from workflow_agent.execution.ssh_runner import (
    SHELL,
    SHELL_FAILED,
    ShellRun,
    ShellSession,
    env_lines,
)
from workflow_agent.execution.sshlib import asyncssh
from workflow_agent.execution.target import (
    OutputCallback,
    OutputCollector,
    RunResult,
    Target,
    framed_parts,
    script_env,
    unframed_parts,
)

if TYPE_CHECKING:
    from workflow_agent.config import SshSettings

log = logging.getLogger(__name__)
_T = TypeVar("_T")

#: A sudo password, or a way to get one when it is first needed (e.g. a prompt).
PasswordSource = str | Callable[[], str | None] | None

_USER = re.compile(r"[A-Za-z0-9._][A-Za-z0-9._-]*\$?")
#: How long a killed run may take to report its end before the channel is dropped.
_KILL_WAIT = 10.0
#: Runner shells one connection keeps at most (sshd allows 10 sessions per connection
#: by default; SFTP and kills need theirs).
_SHELLS = 4
#: How long a runner shell (and sudo) may take to start.
_START_WAIT = 60.0
#: Ciphers in order of preference: asyncssh's own order puts chacha20-poly1305 first,
#: which it computes in Python per packet (two cipher contexts each); AES-GCM is one
#: call into OpenSSL per packet. Measured here, 30 hosts x 12 sessions: client CPU
#: 0.45 s with chacha20, 0.27 s with AES-GCM. The server still picks from this list.
_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com",
            "chacha20-poly1305@openssh.com", "aes128-ctr", "aes192-ctr", "aes256-ctr")


# -- the target spec ------------------------------------------------------------------


@dataclass(frozen=True)
class SshAddress:
    """Where to connect: ``user@host:port``."""

    user: str
    host: str
    port: int = 22

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ssh://{self.user}@{host}:{self.port}"


def parse_ssh_spec(spec: str, *, default_user: str = "root") -> SshAddress:
    """Parse ``ssh://[user@]host[:port]`` (the scheme is optional, for jump hosts).

    ``InvalidInputError`` says what is wrong: no host, a bad port, a password or a path
    in the spec.
    """
    text = spec if spec.startswith("ssh://") else f"ssh://{spec}"
    hint = "Write it as ssh://user@host:port, e.g. ssh://root@192.0.2.10:22."
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise InvalidInputError(f"malformed SSH target {spec!r}: {exc}", hint=hint) from exc
    if parts.password is not None:
        raise InvalidInputError(
            "malformed SSH target: it holds a password (not repeated here)",
            hint="Never put passwords in a target: use keys, the agent, or "
            "ssh.sudo_password_env for sudo.",
        )
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise InvalidInputError(f"malformed SSH target {spec!r}: unexpected path", hint=hint)
    host = parts.hostname or ""
    if not host or not re.fullmatch(r"[A-Za-z0-9._:%-]+", host) or host.startswith("-"):
        raise InvalidInputError(f"malformed SSH target {spec!r}: no valid host", hint=hint)
    user = parts.username if parts.username is not None else default_user
    if not _USER.fullmatch(user):
        raise InvalidInputError(f"malformed SSH target {spec!r}: bad user {user!r}", hint=hint)
    return SshAddress(user, host, port if port is not None else 22)


# -- the target -----------------------------------------------------------------------


class SshTarget(Target):
    """A remote host reached over SSH (asyncssh), one connection per target object.

    ``settings`` is the configuration's ``ssh`` section; ``sudo_password`` a password or
    a callable asked once, only if the login user is not root and sudo is on.
    """

    kind = "ssh"

    def __init__(
        self,
        address: SshAddress | str,
        settings: SshSettings | None = None,
        *,
        sudo_password: PasswordSource = None,
    ) -> None:
        super().__init__()
        from workflow_agent.config import SshSettings

        self.address = parse_ssh_spec(address) if isinstance(address, str) else address
        self.settings = settings or SshSettings()
        self._password_source = sudo_password
        self._password: str | None = None
        self._conn: asyncssh.SSHClientConnection | None = None
        self._jump: asyncssh.SSHClientConnection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sftp: asyncssh.SFTPClient | None = None
        self._sftp_lock: asyncio.Lock | None = None
        self._stage_dir = ""
        self._opening: asyncio.Future[None] | None = None
        self._idle_shells: list[tuple[asyncssh.SSHClientChannel[bytes], ShellSession]] = []
        self._shell_slots: asyncio.Semaphore | None = None
        self.sudo = False
        self.remote_uid = -1

    @property
    def identity(self) -> str:
        return str(self.address)

    def __repr__(self) -> str:  # never the password
        return f"SshTarget({self.identity!r}, sudo={self.sudo})"

    # -- connecting -------------------------------------------------------------------

    async def open(self) -> None:
        """Connect, check the host key, find out whether sudo is needed and works.
        Concurrent calls share one attempt (a fleet starts connecting early)."""
        if self._opening is None:
            self._opening = asyncio.ensure_future(self._open())
        await asyncio.shield(self._opening)

    async def _open(self) -> None:
        settings = self.settings
        keys = [_load_key(path) for path in settings.client_keys]
        options: dict[str, object] = {
            "known_hosts": self._known_hosts(),
            **self._accept_new(),
            "client_keys": keys or (),
            "agent_path": () if settings.use_agent else None,
            "connect_timeout": settings.connect_timeout,
            "keepalive_interval": settings.keepalive_interval,
            "keepalive_count_max": 3,
            "encryption_algs": _CIPHERS,
        }
        if not settings.check_host_keys:
            log.warning("host key checking is off for %s (ssh.check_host_keys)", self.identity)
        try:
            if settings.jump_host:
                jump = parse_ssh_spec(settings.jump_host, default_user=self.address.user)
                self._jump = await self._connect(jump, options)
                options = {**options, "tunnel": self._jump}
            self._conn = await self._connect(self.address, options)
            self._loop = asyncio.get_running_loop()
            await self._probe()
        except BaseException:
            await self._disconnect()
            raise

    def _known_hosts(self) -> object:
        if not self.settings.check_host_keys:
            return None
        path = self.settings.known_hosts
        if self.settings.check_host_keys == "accept-new":
            path = _known_hosts_file(path)
        return _read_known_hosts(path) if path is not None else ()

    def _accept_new(self) -> dict[str, object]:
        """With ``check_host_keys: accept-new``, the client that trusts a host known_hosts
        has no key for, adding its key there (a key that differs from the one known_hosts
        holds is refused as ever: asyncssh asks only about keys it does not trust)."""
        if self.settings.check_host_keys != "accept-new":
            return {}
        path = _known_hosts_file(self.settings.known_hosts)

        class AcceptNew(asyncssh.SSHClient):
            def validate_host_public_key(self, host: str, addr: str, port: int,
                                         key: asyncssh.SSHKey) -> bool:
                known = _read_cached(path, asyncssh.read_known_hosts).match(host, addr, port)
                if any(known[:2]):  # keys for this host, none of them this one
                    return False
                name = host if port == 22 else f"[{host}]:{port}"
                algorithm, data = key.export_public_key().decode().split()[:2]
                with open(path, "a", encoding="utf-8") as known_hosts:
                    known_hosts.write(f"{name} {algorithm} {data}\n")
                log.warning("trusted %s on first use and added its key (%s) to %s "
                            "(ssh.check_host_keys: accept-new)", name,
                            key.get_fingerprint(), path)
                return True

        return {"client_factory": AcceptNew}

    async def _connect(
        self, address: SshAddress, options: Mapping[str, object]
    ) -> asyncssh.SSHClientConnection:
        via = " via the jump host" if "tunnel" in options else ""
        try:
            return await asyncssh.connect(
                address.host, address.port, username=address.user, **options
            )
        except asyncssh.HostKeyNotVerifiable as exc:
            raise self._host_key_error(address, exc) from exc
        except asyncssh.PermissionDenied as exc:
            tried = (
                ", ".join(str(p) for p in self.settings.client_keys)
                or "the default keys (~/.ssh/id_*)"
                + (" and the ssh-agent" if self.settings.use_agent else "")
            )
            raise TargetUnreachableError(
                f"authentication failed for {address}{via}: the server accepted none of "
                f"{tried}",
                hint=f"Add the public key to ~{address.user}/.ssh/authorized_keys on the "
                "host, or list the right key in ssh.client_keys.",
            ) from exc
        except TimeoutError as exc:
            raise TargetUnreachableError(
                f"{address}{via} did not answer within {self.settings.connect_timeout:g} s",
                hint="Check the address, that the host is up and that no firewall drops "
                f"port {address.port}; raise ssh.connect_timeout for slow links.",
            ) from exc
        except OSError as exc:
            # asyncio's strerror is "Connect call failed (addr)": the errno says why.
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise TargetUnreachableError(
                f"cannot connect to {address}{via}: {reason}",
                hint="Check the address and port, and that sshd runs on the host.",
            ) from exc
        except asyncssh.Error as exc:
            raise TargetUnreachableError(
                f"SSH connection to {address}{via} failed: {exc.reason}"
            ) from exc

    def _host_key_error(self, address: SshAddress, exc: Exception) -> TargetError:
        path = self.settings.known_hosts or Path.home() / ".ssh" / "known_hosts"
        name = address.host if address.port == 22 else f"[{address.host}]:{address.port}"
        known = False
        with contextlib.suppress(OSError, ValueError):
            known = bool(asyncssh.read_known_hosts(str(path)).match(
                address.host, address.host, address.port)[0])
        if known:
            return TargetUnreachableError(
                f"host key mismatch for {address}: refused. The key the host presented is "
                f"not the one {path} holds for it; the host was reinstalled, or someone is "
                "intercepting the connection",
                hint=f"If you know the key changed, remove the old one with `ssh-keygen -R "
                f"'{name}' -f {path}`, check the new fingerprint and add it.",
            )
        return TargetUnreachableError(
            f"the host key of {address} is not in {path}: refused",
            hint=f"Check the fingerprint, then add it, e.g. `ssh-keyscan -p {address.port} "
            f"{address.host} >> {path}`; or set ssh.known_hosts to the file that has it.",
        )

    async def _probe(self) -> None:
        """Learn the login user's uid; in sudo mode check that sudo accepts us. Logging
        in as root needs no probe (one session fewer per host)."""
        if self.address.user == "root":
            self.remote_uid = 0
            return
        code, out, err = await self._exec("id -u")
        if code != 0 or not out.strip().isdigit():
            raise TargetError(f"`id -u` failed on {self.identity}: {err.strip() or out!r}")
        self.remote_uid = int(out)
        self.sudo = self.remote_uid != 0 and self.settings.sudo
        if not self.sudo:
            return
        source = self._password_source
        password = await asyncio.to_thread(source) if callable(source) else source
        if password is not None and ("\n" in password or "\r" in password):
            raise TargetError("the sudo password must be one line")
        self._password = password or None
        code, _, err = await self._exec(
            self._command(["true"]), stdin=self._password_line()
        )
        if code != 0:
            raise self._sudo_error(err)

    def _sudo_error(self, stderr: str) -> TargetError:
        who = f"{self.address.user} on {self.identity}"
        env = self.settings.sudo_password_env
        if "incorrect password" in stderr or "Sorry, try again" in stderr:
            return TargetError(
                f"sudo refused the password for {who}",
                hint=f"Check the password in ${env}." if env else "Check the password.",
            )
        if "password is required" in stderr:
            return TargetError(
                f"sudo needs a password for {who} and none was given",
                hint="Set ssh.sudo_password_env to the name of an environment variable "
                "holding it, or run on a terminal to be asked.",
            )
        if "not in the sudoers" in stderr or "not allowed" in stderr:
            return TargetError(f"{who} may not use sudo",
                               hint="Log in as root, or grant the user sudo rights.")
        detail = stderr.strip().splitlines()[-1] if stderr.strip() else "no message"
        return TargetError(f"sudo failed for {who}: {detail}",
                           hint="Set ssh.sudo to false to run as the login user.")

    async def close(self) -> None:
        """Stop a connection attempt in flight, remove the staging directory and
        disconnect. Idempotent."""
        opening, self._opening = self._opening, None
        if opening is not None and not opening.done():
            opening.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await opening
        await self._disconnect()

    async def _disconnect(self) -> None:
        self._opening = None
        conn, jump, sftp = self._conn, self._jump, self._sftp
        self._conn = self._jump = self._sftp = None
        if sftp is not None:
            if self._stage_dir:
                with contextlib.suppress(asyncssh.Error, OSError):
                    await sftp.rmtree(self._stage_dir)
            sftp.exit()
            with contextlib.suppress(asyncssh.Error, OSError):
                await sftp.wait_closed()
        self._stage_dir = ""
        for chan, _ in self._idle_shells:
            chan.close()
        self._idle_shells.clear()
        self._shell_slots = None
        for connection in (conn, jump):
            if connection is not None:
                connection.close()
                with contextlib.suppress(asyncssh.Error, OSError):
                    await connection.wait_closed()

    def _connection(self) -> asyncssh.SSHClientConnection:
        conn = self._conn
        if conn is None:
            raise TargetError(f"{self.identity} is not open",
                              hint="Use it as `async with target:`.")
        if self._loop is not asyncio.get_running_loop():
            raise TargetError(
                f"{self.identity} was opened in another event loop",
                hint="An SSH connection belongs to the loop that opened it: open, use and "
                "close the target inside one asyncio.run().",
            )
        return conn

    # -- commands ---------------------------------------------------------------------

    def _command(self, argv: Sequence[str]) -> str:
        """The SSH command line running ``argv`` (as root through sudo in sudo mode)."""
        if self.sudo:
            # -k: always read the password we send (a cached timestamp would leave it
            # unread); -n when there is none, so sudo fails instead of waiting.
            prefix = ["sudo", "-S", "-k", "-p", ""] if self._password else ["sudo", "-n"]
            argv = [*prefix, "--", *argv]
        return "exec " + shlex.join(argv)

    def _password_line(self) -> bytes:
        return (self._password + "\n").encode() if self.sudo and self._password else b""

    async def _exec(self, command: str, stdin: bytes = b"") -> tuple[int, str, str]:
        """Run a short helper command; its exit code, stdout and stderr."""
        conn = self._connection()
        try:
            result = await conn.run(command, input=stdin, encoding=None, check=False,
                                    timeout=120)
        except (asyncssh.Error, OSError) as exc:  # OSError: a write to a dead socket
            raise self._lost(exc) from exc
        stdout = result.stdout if isinstance(result.stdout, bytes) else b""
        stderr = result.stderr if isinstance(result.stderr, bytes) else b""
        code = result.exit_status if result.exit_status is not None else 255
        return code, stdout.decode("utf-8", "replace"), stderr.decode("utf-8", "replace")

    def _lost(self, exc: BaseException | None) -> TargetUnreachableError:
        reason = getattr(exc, "reason", None) or (str(exc) if exc else "channel closed")
        return TargetUnreachableError(
            f"the SSH connection to {self.identity} was lost: {reason}",
            hint="Check that the host is up and sshd runs; then run again.",
        )

    async def run(
        self,
        script: str,
        *,
        env: Mapping[str, str] | None = None,
        timeout: float = 600.0,
        on_output: OutputCallback | None = None,
    ) -> RunResult:
        env_bytes = env_lines(script_env(env))
        async with self._shell() as (chan, shell):
            run = self._send(chan, shell, env_bytes, script, OutputCollector(on_output))
            return await self._finish(chan, shell, run, timeout)

    async def run_then_parts(
        self,
        script: str,
        parts: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        timeout: float = 600.0,
        parts_timeout: float = 600.0,
        on_output: OutputCallback | None = None,
        marker: str = "",
    ) -> tuple[RunResult, list[RunResult]]:
        """As ``Target.run_then_parts``, without its wrapper: the script and the parts
        are two runs queued on one runner shell at once (one round trip). A script that
        times out is killed as ``run`` kills one; the parts run after it all the same."""
        script_vars = script_env(env)
        if marker:
            name, _, value = marker.partition("=")
            script_vars[name] = value  # env_lines checks the name
        nonce = secrets.token_hex(8)
        async with self._shell() as (chan, shell):
            first = self._send(chan, shell, env_lines(script_vars), script,
                               OutputCollector(on_output))
            then = self._send(chan, shell, env_lines(script_env(None)),
                              framed_parts(parts, nonce), OutputCollector())
            result = await self._finish(chan, shell, first, timeout)
            if not first.done.done():
                # The kill got no answer and the shell was dropped: the parts never ran.
                whole = then.result(-1, timed_out=True)
            else:
                whole = await self._finish(chan, shell, then, parts_timeout)
        return result, unframed_parts(whole, len(parts), nonce)

    def _send(self, chan: asyncssh.SSHClientChannel[bytes], shell: ShellSession,
              env_bytes: bytes, script: str, sink: OutputCollector) -> ShellRun:
        """Queue a run of ``script`` on ``shell``."""
        run = ShellRun(uuid.uuid4().hex, sink)
        shell.begin(run)
        try:
            chan.write(run.request(env_bytes, script.encode("utf-8")))
        except (asyncssh.Error, OSError) as exc:
            raise self._lost(exc) from exc
        return run

    async def _finish(self, chan: asyncssh.SSHClientChannel[bytes], shell: ShellSession,
                      run: ShellRun, timeout: float) -> RunResult:
        """``run``'s result once it ended, or was killed after ``timeout`` seconds."""
        ends: list[asyncio.Future[Any]] = [run.done, shell.closed]
        ended = asyncio.ensure_future(asyncio.wait(ends, return_when=asyncio.FIRST_COMPLETED))
        try:
            await asyncio.wait_for(ended, timeout)
        except TimeoutError:
            await self._kill_run(chan, shell, run)
            return run.result(124, timed_out=True)
        except asyncio.CancelledError:
            await asyncio.shield(self._kill_run(chan, shell, run))
            raise
        if not run.done.done():
            if shell.exit_status == SHELL_FAILED:
                raise TargetError(f"could not start the script on {self.identity}: "
                                  + _tail(run.sink.stderr),
                                  hint="The host needs bash, coreutils and a writable /tmp.")
            raise self._lost(shell.closed.result())
        return run.result(run.done.result())

    @contextlib.asynccontextmanager
    async def _shell(self) -> AsyncIterator[tuple[asyncssh.SSHClientChannel[bytes], ShellSession]]:
        """An idle runner shell of this connection (started when none is idle), held for
        one run; see ``ssh_runner``. At most ``_SHELLS`` run at once, the rest wait."""
        if self._shell_slots is None:
            self._shell_slots = asyncio.Semaphore(_SHELLS)
        async with self._shell_slots:
            while self._idle_shells and not self._idle_shells[-1][1].alive:
                self._idle_shells.pop()[0].close()
            pair = self._idle_shells.pop() if self._idle_shells else await self._start_shell()
            try:
                yield pair
            finally:
                if pair[1].idle:
                    self._idle_shells.append(pair)
                else:
                    pair[0].close()

    async def _start_shell(self) -> tuple[asyncssh.SSHClientChannel[bytes], ShellSession]:
        conn = self._connection()
        hello = uuid.uuid4().hex
        shell = ShellSession()
        try:
            chan, _ = await conn.create_session(
                lambda: shell, self._command(["bash", "-c", SHELL, "wa", hello]),
                encoding=None)
            chan.write(self._password_line() + hello.encode() + b"\n")
        except (asyncssh.Error, OSError) as exc:  # OSError: a write to a dead socket
            raise self._lost(exc) from exc
        try:
            await asyncio.wait([shell.ready], timeout=_START_WAIT)
        except asyncio.CancelledError:
            chan.close()
            raise
        if shell.ready.done() and not shell.ready.exception():
            return chan, shell
        chan.close()
        errors = shell.startup_errors.decode("utf-8", "replace")
        if not shell.ready.done():
            raise TargetError(f"the runner shell on {self.identity} did not start within "
                              f"{_START_WAIT:g} s: {errors.strip() or 'no message'}")
        if self.sudo and "sudo" in errors:
            raise self._sudo_error(errors)
        if shell.closed.done() and shell.exit_status is None:
            raise self._lost(shell.closed.result())
        raise TargetError(
            f"could not start the runner shell on {self.identity} (exit "
            f"{shell.exit_status}): {errors.strip() or 'no message'}",
            hint="The host needs bash, coreutils and a writable /tmp.",
        )

    async def _kill_run(self, chan: asyncssh.SSHClientChannel[bytes], shell: ShellSession,
                        run: ShellRun) -> None:
        """SIGKILL the run's process group and wait for its end (the shell then takes
        the next run); a shell that does not report the end is closed."""
        if run.pgid > 1:
            kill = ["kill", "-KILL", "--", f"-{run.pgid}"]
            try:
                code, _, err = await self._exec(self._command(kill), self._password_line())
            except TargetError as exc:
                code, err = -1, exc.message
            if code != 0:
                log.warning("killing the timed-out run on %s failed: %s", self.identity, err)
        ends: list[asyncio.Future[Any]] = [run.done, shell.closed]
        await asyncio.wait(ends, timeout=_KILL_WAIT, return_when=asyncio.FIRST_COMPLETED)
        if not run.done.done():
            shell.runs.clear()
            chan.close()

    # -- files ------------------------------------------------------------------------

    async def _sftp_client(self) -> asyncssh.SFTPClient:
        conn = self._connection()
        if self._sftp_lock is None:
            self._sftp_lock = asyncio.Lock()
        async with self._sftp_lock:
            if self._sftp is None:
                try:
                    self._sftp = await conn.start_sftp_client()
                except asyncssh.Error as exc:
                    raise TargetError(
                        f"SFTP is not available on {self.identity}: {exc}",
                        hint="Enable the sftp subsystem in the host's sshd_config.",
                    ) from exc
            if self.sudo and not self._stage_dir:
                stage = f"/tmp/workflow-agent-stage.{uuid.uuid4().hex}"
                await self._sftp_call(self._sftp.mkdir(
                    stage, asyncssh.SFTPAttrs(permissions=0o700)), stage)
                self._stage_dir = stage
            return self._sftp

    async def _sftp_call(self, call: Awaitable[object], path: str) -> object:
        try:
            return await call
        except asyncssh.SFTPNoSuchFile as exc:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path) from exc
        except asyncssh.SFTPError as exc:
            raise TargetError(f"SFTP on {self.identity} failed for {path}: {exc.reason}") from exc
        except (asyncssh.Error, OSError) as exc:  # OSError: a write to a dead socket
            raise self._lost(exc) from exc

    def _check_path(self, path: str) -> None:
        if not path.startswith("/"):
            raise ValueError(f"remote paths must be absolute: {path!r}")

    async def put(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self._check_path(path)
        sftp = await self._sftp_client()
        if self.sudo:
            staged = f"{self._stage_dir}/put-{uuid.uuid4().hex}"
            await self._sftp_write(sftp, staged, data)
            script = (
                'set -e; d=$(dirname -- "$WA_DEST"); mkdir -p -- "$d"; t="$d/.wa-put-$$"\n'
                'trap \'rm -f -- "$WA_SRC"\' EXIT\n'
                'cat -- "$WA_SRC" > "$t"; chmod "$WA_MODE" "$t"; mv -f -- "$t" "$WA_DEST"\n'
            )
            result = await self.run(script, timeout=120, env={
                "WA_SRC": staged, "WA_DEST": path, "WA_MODE": format(mode, "o")})
            if not result.ok:
                raise TargetError(f"writing {path} on {self.identity} failed: {result.stderr}")
            return
        parent = path.rsplit("/", 1)[0] or "/"
        await self._sftp_call(sftp.makedirs(parent, exist_ok=True), parent)
        tmp = f"{parent.rstrip('/')}/.wa-put-{uuid.uuid4().hex}"
        await self._sftp_write(sftp, tmp, data)
        await self._sftp_call(sftp.chmod(tmp, mode), tmp)
        try:
            await self._sftp_call(sftp.posix_rename(tmp, path), path)
        except BaseException:
            with contextlib.suppress(asyncssh.Error):
                await sftp.remove(tmp)
            raise

    async def _sftp_write(self, sftp: asyncssh.SFTPClient, path: str, data: bytes) -> None:
        async def write() -> None:
            attrs = asyncssh.SFTPAttrs(permissions=0o600)
            async with sftp.open(path, "wb", attrs) as handle:
                await handle.write(data)

        await self._sftp_call(write(), path)

    async def get(self, path: str) -> bytes:
        self._check_path(path)
        sftp = await self._sftp_client()
        source = path
        if self.sudo:
            source = f"{self._stage_dir}/get-{uuid.uuid4().hex}"
            script = (
                '[ -e "$WA_SRC" ] || exit 3; [ -d "$WA_SRC" ] && exit 4\n'
                'cat -- "$WA_SRC" > "$WA_DEST" && chown "$WA_USER" "$WA_DEST"\n'
            )
            result = await self.run(script, timeout=120, env={
                "WA_SRC": path, "WA_DEST": source, "WA_USER": str(self.remote_uid)})
            if result.exit_code == 3:
                raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
            if result.exit_code == 4:
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
            if not result.ok:
                raise TargetError(f"reading {path} on {self.identity} failed: {result.stderr}")
        else:
            attrs = await self._sftp_call(sftp.stat(path), path)
            directory = asyncssh.FILEXFER_TYPE_DIRECTORY
            if isinstance(attrs, asyncssh.SFTPAttrs) and attrs.type == directory:
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)

        async def read() -> bytes:
            async with sftp.open(source, "rb") as handle:
                data = await handle.read()
            return data if isinstance(data, bytes) else data.encode()

        try:
            data = await self._sftp_call(read(), path)
        finally:
            if source != path:
                with contextlib.suppress(asyncssh.Error):
                    await sftp.remove(source)
        assert isinstance(data, bytes)
        return data


def _load_key(path: Path) -> asyncssh.SSHKey:
    """Read a private key file, converting failures into ``TargetError``s (read once
    per process while the file stays the same: a fleet uses one key for many hosts)."""
    try:
        return _read_cached(path, asyncssh.read_private_key)
    except OSError as exc:
        raise TargetError(
            f"cannot read the SSH key {path}: {exc.strerror or exc}",
            hint="Check the path in ssh.client_keys and that this user may read it.",
        ) from exc
    except (asyncssh.KeyImportError, asyncssh.KeyEncryptionError) as exc:
        raise TargetError(
            f"{path} is not a usable private key: {exc}",
            hint="Give an OpenSSH or PEM private key; keys with a passphrase need the "
            "ssh-agent (ssh-add) instead.",
        ) from exc


def _tail(lines: Sequence[str]) -> str:
    """The last lines of some output, for an error message."""
    return " ".join(" ".join(lines[-5:]).split()) or "no message"


_FILE_CACHE: dict[tuple[str, Path, int, int], Any] = {}


def _read_cached(path: Path, read: Callable[[str], _T]) -> _T:
    """``read(path)``, reused while the file's size and mtime stay the same."""
    stat = path.stat()
    key = (read.__name__, path, stat.st_size, stat.st_mtime_ns)
    if key not in _FILE_CACHE:
        _FILE_CACHE[key] = read(str(path))
    value: _T = _FILE_CACHE[key]
    return value


def _known_hosts_file(path: Path | None) -> Path:
    """The known_hosts file (``~/.ssh/known_hosts`` by default), created empty (mode
    600, its folder 700) when missing, for keys trusted on first use to go to."""
    path = path or Path.home() / ".ssh" / "known_hosts"
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    return path


def _read_known_hosts(path: Path) -> object:
    """The known_hosts file, parsed once while it stays the same; a missing file is
    asyncssh's to report (as it does for a path), so it is passed on as one."""
    try:
        return _read_cached(path, asyncssh.read_known_hosts)
    except (OSError, ValueError):
        return str(path)
