"""Docker targets: scripts run in a container through the Docker engine's API.

* ``docker://CONTAINER`` (``DockerTarget``) execs into a running container, found by
  name or id; the container is left as it was found, apart from what scripts change.
* ``docker-image://IMAGE`` (``DockerImageTarget``) creates a fresh container from an
  image for this run (pulled if missing, unless ``pull`` is off) and removes it on
  ``close()``: a disposable target, like the sandbox.

The docker SDK (the ``docker`` extra) is imported only when a Docker target opens. The
engine is the configured URL (``docker.host``), else whatever the SDK finds (``DOCKER_HOST``,
then the local socket).

How a script runs: its text is written with ``put_archive`` to a private file (0600 in a
0700 directory) inside the container, then ``docker exec`` runs a small bash launcher
that runs ``/bin/bash FILE`` with its output relayed through FIFOs (see ``_LAUNCHER``:
a daemon the script leaves running must not hold the exec's own output, or the engine
stalls for seconds) and removes the files. The environment travels in the exec's
``Env`` (an API field, never a command line); docker lays it over the container's own
environment (its image ``ENV``, e.g. a proxy), which is kept on purpose: the container is
configured that way for everything that runs in it. Output is demultiplexed from the
exec's stream as it comes. An exec's process leads its own session, so on timeout (or
cancellation) a second exec SIGKILLs that process group, found by the unique script
path on its command line.

Containers made by ``DockerImageTarget`` get CAP_SYS_PTRACE (Docker drops it by
default): without it root cannot see which process of another user owns a port, which
verification checks. A ``docker://`` container needs it too for that check.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import functools
import io
import json
import os
import socket
import tarfile
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from workflow_agent.errors import TargetError, TargetUnreachableError
from workflow_agent.execution.process import DRAIN_GRACE, _Lines
from workflow_agent.execution.target import (
    OutputCallback,
    OutputCollector,
    RunResult,
    Target,
    script_env,
)

if TYPE_CHECKING:
    from docker.models.containers import Container

    import docker

#: Where scripts are written inside the container (a 0700 directory).
SCRIPT_DIR = "/run/workflow-agent"

#: Go's ``os.FileMode`` bits in the archive API's path stat.
_MODE_DIR = 1 << 31
_MODE_SYMLINK = 1 << 27

#: How long to wait for the engine to report the exec ended after its output did.
_EXIT_WAIT = 30.0

#: Runs the script at ``$0`` with its output relayed through FIFOs by two ``cat``s. A
#: daemon the script starts then holds only a FIFO, never the exec's own output: the
#: engine stalls the exec's end (and the container's next exec) ~2 s for a process
#: holding that. Once the script exits, the cats get ``DRAIN_GRACE`` (0.5 s) to pass on
#: what is buffered and are then stopped. Removes its files at the end.
_LAUNCHER = r"""
s=$0
mkfifo -m 600 -- "$s.out" "$s.err" || exit 125
/bin/bash -- "$s" >"$s.out" 2>"$s.err" </dev/null &
pid=$!
cat -- "$s.out" &
o=$!
cat -- "$s.err" >&2 &
e=$!
wait "$pid"
rc=$?
rm -f -- "$s" "$s.out" "$s.err"
for _ in 1 2 3 4 5 6 7 8 9 10; do
  { kill -0 "$o" || kill -0 "$e"; } 2>/dev/null || break
  sleep 0.05
done
kill "$o" "$e" 2>/dev/null
exit "$rc"
"""

#: Kills the process group of the launcher running the script at ``$WA_RUN`` (passed in
#: the environment, so this shell's own command line never matches): the launcher, the
#: script's bash and the cats. Only the launcher's: a job the script put in a group of
#: its own is the script's to end (``Target.run_then_parts``' guard kills its script
#: and removes its files when the script's bash dies; killed first, it left them).
#: Then removes the launcher's files. bash, not sh: dash's ``kill`` cannot signal a
#: process group.
_KILL_SCRIPT = r"""
for d in /proc/[0-9]*; do
  pid=${d#/proc/}
  [ "$pid" = "$$" ] && continue
  case "$(tr '\0' ' ' < "$d/cmdline" 2>/dev/null)" in
    "/bin/bash -c "*" $WA_RUN ") kill -KILL -- "-$pid" 2>/dev/null ;;
  esac
done
rm -f -- "$WA_RUN" "$WA_RUN.out" "$WA_RUN.err"
"""

_INSTALL_HINT = "Install the docker extra: pip install 'workflow-agent[docker]'"

T = TypeVar("T")


def _sdk() -> Any:
    """The ``docker`` module; a ``TargetError`` naming the extra when it is missing."""
    try:
        import docker
    except ImportError as exc:
        raise TargetError(
            "the Docker targets need the docker SDK, which is not installed", hint=_INSTALL_HINT
        ) from exc
    return docker


def _unix_socket_path(url: str) -> str | None:
    for prefix in ("unix://", "http+unix://"):
        if url.startswith(prefix):
            return url[len(prefix):] or None
    return None


def connect(host: str | None, *, timeout: float = 60.0) -> docker.DockerClient:
    """A client of the engine at ``host`` (or the SDK's default), checked reachable.

    Errors: ``TargetError`` naming the extra when the SDK is missing;
    ``TargetUnreachableError`` when no engine answers there.
    """
    sdk = _sdk()
    from_env = sdk.utils.kwargs_from_env().get("base_url")
    base_url = host or from_env or sdk.constants.DEFAULT_UNIX_SOCKET
    where = host or base_url
    hint = (
        "Is dockerd running? Point workflow-agent at it with docker.host in the "
        "configuration (WORKFLOW_AGENT_DOCKER__HOST) or DOCKER_HOST."
    )
    path = _unix_socket_path(base_url)
    if path is not None:
        # Checked here first: the SDK leaks its socket when a unix connect fails.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(timeout)
            try:
                probe.connect(path)
            except OSError as exc:
                raise TargetUnreachableError(
                    f"cannot reach the Docker engine at {where}: {exc.strerror or exc}",
                    hint=hint,
                ) from exc
    try:
        if host:
            client: docker.DockerClient = sdk.DockerClient(base_url=host, timeout=timeout)
        else:
            client = sdk.from_env(timeout=timeout)
    except sdk.errors.DockerException as exc:
        raise TargetUnreachableError(
            f"cannot reach the Docker engine at {where}: {exc}", hint=hint
        ) from exc
    return client


def _tar_file(path: str, data: bytes, mode: int, *, private_dir: str | None = None) -> bytes:
    """A tar to extract at ``/`` that writes ``path``; parents the engine creates 0755."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        if private_dir is not None:
            folder = tarfile.TarInfo(private_dir.lstrip("/"))
            folder.type = tarfile.DIRTYPE
            folder.mode = 0o700
            folder.mtime = int(time.time())
            archive.addfile(folder)
        info = tarfile.TarInfo(path.lstrip("/"))
        info.size = len(data)
        info.mode = mode
        info.mtime = int(time.time())
        archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


class _ExecStream:
    """Reads one exec's multiplexed output in a thread and feeds it to the event loop.

    The SDK's socket is blocking, so a thread reads it; lines are delivered on the loop.
    ``stop()`` shuts the socket down, which ends the thread's read at once.
    """

    def __init__(self, sock: Any, sink: OutputCollector) -> None:
        self._sock = sock
        # SocketIO (unix) and SSL sockets wrap the real one, which shutdown() needs.
        self._raw: socket.socket = getattr(sock, "_sock", sock)
        self._loop = asyncio.get_running_loop()
        self._lines = {1: _Lines("stdout", sink), 2: _Lines("stderr", sink)}
        self._ended = asyncio.Event()
        self._stopped = False
        self._thread = threading.Thread(target=self._read, name="docker-exec-output", daemon=True)

    def start(self) -> None:
        # The client's API timeout would otherwise end a script that is quiet for a while.
        self._raw.settimeout(None)
        self._thread.start()

    def _read(self) -> None:
        from docker.utils.socket import frames_iter

        try:
            for stream, data in frames_iter(self._sock, tty=False):  # type: ignore[no-untyped-call]
                if stream in self._lines and data:
                    self._deliver(self._lines[stream].feed, data)
        except OSError:
            pass  # shut down by stop(), or the engine went away: the exit code says which
        finally:
            with contextlib.suppress(OSError):
                self._sock.close()
            with contextlib.suppress(OSError):
                self._raw.close()
            self._deliver(lambda _: self._ended.set(), b"")

    def _deliver(self, call: Callable[[bytes], None], data: bytes) -> None:
        if self._stopped:
            return
        with contextlib.suppress(RuntimeError):  # the loop closed after stop(): nobody waits
            self._loop.call_soon_threadsafe(call, data)

    async def ended(self, within: float) -> bool:
        """Whether the output stream has ended, waiting up to ``within`` seconds."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ended.wait(), within)
        return self._ended.is_set()

    def stop(self) -> None:
        """Stop delivering; flush partial lines; unblock and end the reading thread."""
        if self._stopped:
            return
        self._stopped = True
        with contextlib.suppress(OSError):
            self._raw.shutdown(socket.SHUT_RDWR)
        for lines in self._lines.values():
            lines.flush()


class DockerTarget(Target):
    """A running container, reached through the Docker engine (``docker://CONTAINER``).

    ``container`` is a name or id; ``host`` the engine URL (None: ``DOCKER_HOST`` or the
    local socket); ``user`` whom scripts run as (root by default: installs need it).
    """

    kind = "docker"

    def __init__(
        self,
        container: str,
        *,
        host: str | None = None,
        user: str = "0",
        api_timeout: float = 60.0,
    ) -> None:
        super().__init__()
        if not container:
            raise ValueError("a container name or id is required")
        self.container = container
        self.host = host
        self.user = user
        self.api_timeout = api_timeout
        self._client: docker.DockerClient | None = None
        self._id: str | None = None
        self._name: str | None = None

    @property
    def identity(self) -> str:
        # The container's name once known: what users type, and the same for id or name.
        return f"{self.kind}://{self._name or self.container}"

    @property
    def container_id(self) -> str | None:
        """The full container id while open."""
        return self._id

    # -- lifecycle -------------------------------------------------------------------

    async def open(self) -> None:
        """Connect to the engine and find the running container; a no-op when open."""
        if self._client is not None:
            return
        client = await asyncio.to_thread(connect, self.host, timeout=self.api_timeout)
        try:
            container = await self._find(client)
        except BaseException:
            client.close()
            raise
        self._adopt(client, container)

    def _adopt(self, client: docker.DockerClient, container: Container) -> None:
        self._client = client
        self._id = container.id
        self._name = container.name

    async def _find(self, client: docker.DockerClient) -> Container:
        sdk = _sdk()
        try:
            container: Container = await asyncio.to_thread(client.containers.get, self.container)
        except sdk.errors.NotFound as exc:
            raise TargetUnreachableError(
                f"no such container {self.container!r} on the Docker engine",
                hint="`docker ps` lists the running containers; use docker-image://IMAGE "
                "for a fresh container from an image.",
            ) from exc
        except sdk.errors.DockerException as exc:
            raise TargetError(f"looking up container {self.container!r} failed: {exc}") from exc
        if container.status != "running":
            raise TargetUnreachableError(
                f"container {container.name} is not running (it is {container.status})",
                hint=f"Start it first: docker start {container.name}",
            )
        return container

    async def close(self) -> None:
        """Disconnect from the engine. Idempotent."""
        client, self._client = self._client, None
        if client is not None:
            client.close()

    # -- engine calls ----------------------------------------------------------------

    def _api(self) -> tuple[Any, str]:
        if self._client is None or self._id is None:
            raise TargetError(
                f"{self.identity} is not open", hint="Use it as `async with target:`."
            )
        return self._client.api, self._id

    @contextlib.contextmanager
    def _engine_errors(self, doing: str) -> Iterator[None]:
        """Convert the SDK's errors for ``doing`` (e.g. "writing /etc/x") at the boundary."""
        sdk = _sdk()
        import requests

        try:
            yield
        except sdk.errors.NotFound as exc:
            raise TargetUnreachableError(
                f"{doing} in {self.identity} failed: the container is gone",
                hint="Something removed the container; open the target again.",
            ) from exc
        except sdk.errors.APIError as exc:
            if exc.status_code == 409:  # "Container ... is not running"
                raise TargetUnreachableError(
                    f"{doing} in {self.identity} failed: {exc.explanation}",
                    hint="The container stopped; start it again (docker start).",
                ) from exc
            raise TargetError(f"{doing} in {self.identity} failed: {exc.explanation}") from exc
        except (requests.exceptions.ConnectionError, sdk.errors.DockerException) as exc:
            raise TargetUnreachableError(
                f"{doing} in {self.identity} failed: lost the Docker engine ({exc})",
                hint="Is dockerd still running?",
            ) from exc

    async def _call(self, doing: str, call: Callable[[], T]) -> T:
        """Run a blocking SDK call in a thread, converting its errors."""
        with self._engine_errors(doing):
            return await asyncio.to_thread(call)

    # -- running -----------------------------------------------------------------------

    async def run(
        self,
        script: str,
        *,
        env: Mapping[str, str] | None = None,
        timeout: float = 600.0,
        on_output: OutputCallback | None = None,
    ) -> RunResult:
        api, cid = self._api()
        sink = OutputCollector(on_output)
        path = f"{SCRIPT_DIR}/run-{uuid.uuid4().hex}.sh"
        archive = _tar_file(path, script.encode("utf-8"), 0o600, private_dir=SCRIPT_DIR)
        await self._call("writing the script", lambda: api.put_archive(cid, "/", archive))
        try:
            exec_id: str = (await self._call("starting the script", lambda: api.exec_create(
                cid, ["/bin/bash", "-c", _LAUNCHER, path], environment=script_env(env),
                user=self.user, workdir="/", stdin=False, stdout=True, stderr=True,
            )))["Id"]
            sock = await self._call("starting the script",
                                    lambda: api.exec_start(exec_id, socket=True))
        except BaseException:
            with contextlib.suppress(TargetError):  # the launcher never ran to remove it
                await self._exec_quiet(["/bin/rm", "-f", "--", path], {})
            raise
        output = _ExecStream(sock, sink)
        output.start()
        timed_out = False
        try:
            try:
                code = await asyncio.wait_for(self._finished(exec_id, output), timeout)
            except TimeoutError:
                timed_out = True
                await self._kill(path)
                code = await asyncio.wait_for(self._finished(exec_id, output), _EXIT_WAIT)
            except asyncio.CancelledError:
                await asyncio.shield(self._kill(path))
                raise
        finally:
            output.stop()
        return sink.result(124 if timed_out else code, timed_out=timed_out)

    async def _finished(self, exec_id: str, output: _ExecStream) -> int:
        """Wait for the exec to end; its exit code.

        Its output ends with it (the launcher sees to that). As a safety net the engine
        is also asked, less often over time; once it says the process exited the output
        gets ``DRAIN_GRACE`` to finish.
        """
        api, _ = self._api()
        delay = 0.25
        while True:
            if await output.ended(delay):
                break
            info = await self._call("watching the script", lambda: api.exec_inspect(exec_id))
            if not info["Running"]:
                await output.ended(DRAIN_GRACE)
                break
            delay = min(delay * 2, 2.0)
        while True:  # the engine may record the exit a moment after the stream closes
            info = await self._call("watching the script", lambda: api.exec_inspect(exec_id))
            if not info["Running"] and info["ExitCode"] is not None:
                return int(info["ExitCode"])
            await asyncio.sleep(0.01)

    async def _kill(self, path: str) -> None:
        await self._exec_quiet(["/bin/bash", "-c", _KILL_SCRIPT], {"WA_RUN": path})

    async def _exec_quiet(self, argv: list[str], env: Mapping[str, str]) -> str:
        """Run a short helper command in the container; its output (stderr included)."""
        api, cid = self._api()

        def call() -> str:
            created = api.exec_create(cid, argv, environment=script_env(env), user=self.user,
                                      workdir="/", stdin=False)
            out: bytes = api.exec_start(created["Id"])
            return out.decode("utf-8", errors="replace")

        return await self._call("cleaning up", call)

    # -- files -------------------------------------------------------------------------

    def _check_path(self, path: str) -> None:
        if not path.startswith("/"):
            raise ValueError(f"container paths must be absolute: {path!r}")

    async def put(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self._check_path(path)
        api, cid = self._api()
        archive = _tar_file(path, data, mode)
        # The engine creates missing parents (0755, root) and replaces an existing file.
        await self._call(f"writing {path}", lambda: api.put_archive(cid, "/", archive))

    async def get(self, path: str) -> bytes:
        self._check_path(path)
        api, cid = self._api()
        wanted = path
        for _ in range(40):  # symlink hops, as the kernel allows
            found, link, data = await self._call(
                f"reading {path}", functools.partial(self._fetch, api, cid, wanted)
            )
            if not found:
                raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
            if link:
                wanted = link
                continue
            return data
        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)

    @staticmethod
    def _fetch(api: Any, cid: str, path: str) -> tuple[bool, str, bytes]:
        """``(exists, symlink target, contents)`` of ``path`` via the archive API.

        A plain GET on the API session (a ``requests.Session``) rather than
        ``get_archive``, so a directory's archive is never downloaded: its response is
        closed as soon as the path's stat header says what it is.
        """
        import requests

        url = f"{api.base_url}/v{api.api_version}/containers/{cid}/archive"
        with api.get(url, params={"path": path}, stream=True, timeout=api.timeout) as response:
            if response.status_code == 404:
                return False, "", b""
            try:
                response.raise_for_status()
            except requests.exceptions.HTTPError as exc:
                _sdk().errors.create_api_error_from_http_exception(exc)  # raises APIError
            header = response.headers.get("X-Docker-Container-Path-Stat", "")
            stat = json.loads(base64.b64decode(header)) if header else {}
            mode = int(stat.get("mode", 0))
            if mode & _MODE_DIR:
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
            if mode & _MODE_SYMLINK and stat.get("linkTarget"):
                return True, str(stat["linkTarget"]), b""
            content = response.content
        with tarfile.open(fileobj=io.BytesIO(content)) as archive:
            for member in archive:
                if member.isfile():
                    extracted = archive.extractfile(member)
                    assert extracted is not None
                    return True, "", extracted.read()
        raise IsADirectoryError(errno.EISDIR, "not a regular file", path)


def _remove_container(client: docker.DockerClient, container_id: str) -> None:
    """Force-remove a container (kills what runs in it) and close the client."""
    sdk = _sdk()
    try:
        client.api.remove_container(container_id, force=True, v=True)
    except sdk.errors.NotFound:
        pass  # already gone
    finally:
        client.close()


class DockerImageTarget(DockerTarget):
    """A fresh container from ``image`` for this run, removed on ``close()``
    (``docker-image://IMAGE``).

    The container runs ``sleep infinity`` under the engine's init (which reaps the
    daemons scripts leave behind). ``network`` is its network mode (e.g. ``"host"``);
    None uses the engine's default. ``pull``: fetch the image when the engine lacks it.
    """

    kind = "docker-image"

    def __init__(
        self,
        image: str,
        *,
        host: str | None = None,
        user: str = "0",
        network: str | None = None,
        pull: bool = True,
        api_timeout: float = 60.0,
        name: str | None = None,
    ) -> None:
        # Named now, so identity is stable before open() and the container findable.
        super().__init__(name or f"workflow-agent-{uuid.uuid4().hex[:12]}", host=host,
                         user=user, api_timeout=api_timeout)
        if not image:
            raise ValueError("an image name is required")
        self.image = image
        self.network = network
        self.pull = pull
        self._finalizer: weakref.finalize[Any, Any] | None = None

    async def open(self) -> None:
        """Create and start the container; a no-op when open."""
        if self._client is not None:
            return
        client = await asyncio.to_thread(connect, self.host, timeout=self.api_timeout)
        try:
            container = await asyncio.to_thread(self._create, client)
        except BaseException:
            client.close()
            raise
        self._adopt(client, container)
        # Removed on close(), or at interpreter exit if close() never comes.
        self._finalizer = weakref.finalize(self, _remove_container, client, str(container.id))

    def _create(self, client: docker.DockerClient) -> Container:
        sdk = _sdk()
        try:
            client.images.get(self.image)
        except sdk.errors.ImageNotFound as exc:
            if not self.pull:
                raise TargetError(
                    f"no such image {self.image!r} on the Docker engine",
                    hint="`docker images` lists the images it has; pull or build it first, "
                    "or allow pulling (docker.pull in the configuration).",
                ) from exc
            self._pull(client)
        except sdk.errors.DockerException as exc:
            raise TargetError(f"looking up image {self.image!r} failed: {exc}") from exc
        try:
            container: Container = client.containers.run(
                self.image,
                entrypoint=["sleep"],
                command=["infinity"],
                name=self.container,
                detach=True,
                init=True,
                network_mode=self.network,
                labels={"io.workflow-agent.disposable": "true"},
                # Without it root cannot read another user's /proc/PID/fd, so checks
                # could not tell which process owns a port (Docker drops it by default).
                cap_add=["SYS_PTRACE"],
            )
        except sdk.errors.APIError as exc:
            with contextlib.suppress(sdk.errors.DockerException):
                client.api.remove_container(self.container, force=True)
            raise TargetUnreachableError(
                f"starting a container from {self.image!r} failed: {exc.explanation}",
                hint="The image needs sleep and bash; check docker.network in the "
                "configuration.",
            ) from exc
        return container

    def _pull(self, client: docker.DockerClient) -> None:
        sdk = _sdk()
        repository, tag = sdk.utils.parse_repository_tag(self.image)
        try:
            client.images.pull(repository, tag=tag or "latest")
        except sdk.errors.APIError as exc:
            raise TargetError(
                f"no such image {self.image!r} on the Docker engine, and pulling it failed: "
                f"{exc.explanation}",
                hint="Check the image name, or make the image available to the engine "
                "(docker pull / docker import) first.",
            ) from exc

    async def close(self) -> None:
        """Remove the container (and everything in it). Idempotent."""
        finalizer, self._finalizer, self._client = self._finalizer, None, None
        if finalizer is not None:
            await asyncio.to_thread(finalizer)
