"""How scripts run over SSH (used by ``ssh.SshTarget``): a runner shell that stays.

A new SSH session per script costs the host a forked sshd child, a login shell and a
runner, and the connection a dozen packets: about 0.2 s per round at 30 hosts sharing
two cores (measured in bench/fleet.py's lab). So each connection keeps a runner shell (a
few when runs overlap) and sends it one script after another::

    [sudo -S -k -p '' --] bash -c SHELL wa HELLO
    stdin: [sudo password\\n] HELLO\\n, then per run: ID ENV_BYTES SCRIPT_BYTES\\n <env> <script>

``sudo -S`` reads the password line (one byte at a time, so nothing more); the shell
skips input up to ``HELLO`` (the password line too, when sudo had no use for it), makes a
private directory (mode 0700), drops the environment sshd gave it and reports
``<RS>wa-shell PID DIR`` on stderr. For each run it reads the env lines into memory
(``read -N``: exactly those bytes), writes the script to its directory (mode 0600) and
starts it as a job of its own (``set -m``: its own process group, so a timeout kills
the whole tree), stdin from /dev/null: the job reports ``<RS>wa-pid ID PGID`` on stderr,
evaluates the env lines (``export NAME='value'``: ``BASE_ENV`` plus the caller's
``env``) and becomes ``bash SCRIPT``. So neither the script nor an env value nor the
password is ever in a process argument, and env values never touch the disk. A run
costs the host two programs: ``head`` and the script's ``bash``.

A run ends when the script exits, not when pipes close: the shell then writes
``\\n<RS>wa-end ID STATUS`` on stdout and on stderr. ``ID`` is random per run, so no
output can fake it; the newline before it is the shell's and is dropped. Bash's own job
messages ("Killed", "Done") go to /dev/null: the shell's stderr is kept on fd 3 for the
jobs. A daemon a script leaves running with the shell's stdout or stderr still open
writes into whatever runs next (or nowhere, between runs), so daemons are expected to be
detached (start-stop-daemon, systemd, or their own log file), as before.

Runs can be queued: the shell reads the next request when the last run ended, so a
script and the read-only probes after it (``SshTarget.run_then_parts``) are sent at once
and cost one round trip; the output after a run's end marker is the next run's.
"""

from __future__ import annotations

import asyncio
import logging
import re
import shlex
import signal as signals
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

from workflow_agent.execution.process import _Lines as Lines
from workflow_agent.execution.sshlib import asyncssh
from workflow_agent.execution.target import ENV_NAME, OutputCollector, RunResult

log = logging.getLogger(__name__)

#: The runner shell (see the module docstring). $1 is HELLO.
SHELL = r"""umask 077; cd / || exit 125
while IFS= read -r l; do [ "$l" = "$1" ] && break; done
[ "$l" = "$1" ] || exit 125
d=/tmp/workflow-agent-shell.$$.$RANDOM$RANDOM
mkdir -m 700 "$d" || exit 125
trap 'rm -rf -- "$d"' EXIT
trap 'exit 129' HUP TERM
exec 3>&2 2>/dev/null
unset -v $(compgen -e)
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C
set -m
printf '\036wa-shell %s %s\n' "$$" "$d" >&3
while IFS=' ' read -r id elen slen; do
  e=
  if (( elen )); then IFS= read -r -N "$elen" e || exit 125; fi
  head -c "$slen" > "$d/script" 2>&3 || exit 125
  ( printf '\036wa-pid %s %s\n' "$id" "$BASHPID" >&3
    eval "$e"
    exec bash "$d/script" 2>&3 3>&- ) < /dev/null &
  wait "$!"
  rc=$?
  printf -v f '\n\036wa-end %s %s\n' "$id" "$rc"
  printf %s "$f"; printf %s "$f" >&3
done
"""

#: Exit status of the shell when it could not set a run up.
SHELL_FAILED = 125
_READY = re.compile(rb"\x1ewa-shell (\d+) (\S+)\n")


@dataclass
class ShellRun:
    """One script's run on a runner shell: its output so far and how it ends."""

    run_id: str
    sink: OutputCollector
    stdout: Lines = field(init=False)
    stderr: Lines = field(init=False)
    #: The script's process group, once its job reported it (0 before).
    pgid: int = 0
    #: Exit status per stream's end marker.
    ends: dict[str, int] = field(default_factory=dict)
    done: asyncio.Future[int] = field(init=False)

    def __post_init__(self) -> None:
        self.stdout = Lines("stdout", self.sink)
        self.stderr = Lines("stderr", self.sink)
        self.done = asyncio.get_running_loop().create_future()

    def result(self, exit_code: int, *, timed_out: bool = False) -> RunResult:
        """What the run printed (partial lines too: it may have been cut short)."""
        self.stdout.flush()
        self.stderr.flush()
        return self.sink.result(exit_code, timed_out=timed_out)

    def request(self, env: bytes, script: bytes) -> bytes:
        """What the shell reads for this run."""
        return f"{self.run_id} {len(env)} {len(script)}\n".encode() + env + script


class ShellSession(asyncssh.SSHClientSession[bytes]):
    """The client side of a runner shell: splits its streams into runs."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        #: The shell's directory, once it reported itself.
        self.ready: asyncio.Future[str] = loop.create_future()
        self.closed: asyncio.Future[Exception | None] = loop.create_future()
        self.exit_status: int | None = None
        #: What the shell (or sudo) wrote on stderr before it was ready.
        self.startup_errors = b""
        #: The runs sent and not ended yet, in the order the shell takes them.
        self.runs: deque[ShellRun] = deque()
        self._buffers = {"stdout": b"", "stderr": b""}
        #: Whether the last byte passed on per stream was a newline (see ``_feed``).
        self._fed_newline = {"stdout": False, "stderr": False}

    @property
    def alive(self) -> bool:
        """Ready and neither exited nor disconnected."""
        return self.ready.done() and not self.ready.exception() and not self.closed.done()

    @property
    def idle(self) -> bool:
        """Alive with no run pending: the next run starts at once."""
        return self.alive and not self.runs

    def begin(self, run: ShellRun) -> None:
        """Queue ``run``: the output after the runs queued before it ends is its."""
        self.runs.append(run)

    def _current(self, stream: str) -> ShellRun | None:
        return next((run for run in self.runs if stream not in run.ends), None)

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        stream = "stderr" if datatype == asyncssh.EXTENDED_DATA_STDERR else "stdout"
        self._buffers[stream] += data
        if not self.ready.done():
            self._handshake()
        if self.ready.done():
            self._pump(stream)

    def _handshake(self) -> None:
        head = self._buffers["stderr"]
        match = _READY.search(head)
        if match is None:
            return
        self.startup_errors = head[: match.start()]
        self._buffers["stderr"] = head[match.end():]
        self.ready.set_result(match[2].decode())

    def _pump(self, stream: str) -> None:
        data = self._buffers[stream]
        self._buffers[stream] = b""
        while data:
            run = self._current(stream)
            if run is None:
                log.debug("discarding output outside a run: %r", data[:200])
                return
            if stream == "stderr" and not run.pgid:
                # The job reports its process group before the script can write anything.
                marker = f"\x1ewa-pid {run.run_id} ".encode()
                start = data.find(marker)
                end = data.find(b"\n", start) if start >= 0 else -1
                if end < 0:
                    self._buffers[stream] = data
                    return
                run.pgid = int(data[start + len(marker):end])
                data = data[end + 1:]
            data = self._feed(run, stream, data)

    def _feed(self, run: ShellRun, stream: str, data: bytes) -> bytes:
        """Pass ``data`` on to the run, up to its end marker; returns what follows the
        marker (the next run's). A newline at the end that ends a line with text is
        passed on at once (so a waiting script's last line shows): if it turns out to
        start the end marker, the script's last line had no newline of its own, and the
        output is the same lines either way."""
        lines: Lines = getattr(run, stream)
        marker = f"\n\x1ewa-end {run.run_id} ".encode()
        fed_newline = self._fed_newline[stream]
        hay = (b"\n" if fed_newline else b"") + data
        offset = len(hay) - len(data)
        start = hay.find(marker)
        if start < 0:
            keep = _marker_start(hay, marker)
            if not keep and data.endswith(b"\n") and (
                    data.endswith(b"\n\n") or (data == b"\n" and not lines.midline)):
                keep = 1  # it would end an empty line: the marker's newline, maybe
            cut = len(data) - min(keep, len(data))
            self._buffers[stream] = data[cut:]
            data = data[:cut]
            lines.feed(data)
            if data:
                self._fed_newline[stream] = data.endswith(b"\n")
            return b""
        end = hay.find(b"\n", start + len(marker))
        if end < 0:
            self._buffers[stream] = data[max(start - offset, 0):]
            lines.feed(data[:max(start - offset, 0)])
            return b""
        lines.feed(data[:max(start - offset, 0)])
        lines.flush()
        self._fed_newline[stream] = False
        run.ends[stream] = int(hay[start + len(marker):end])
        if len(run.ends) == 2:
            self.runs.remove(run)
            run.done.set_result(run.ends["stdout"])
        return hay[end + 1:]

    def exit_status_received(self, status: int) -> None:
        self.exit_status = status

    def exit_signal_received(self, signal: str, core_dumped: bool, msg: str, lang: str) -> None:
        number = getattr(signals, f"SIG{signal}", None)
        self.exit_status = 128 + int(number) if number is not None else 255

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.startup_errors += self._buffers["stderr"]
            self.ready.set_exception(ConnectionError("the runner shell ended"))
            self.ready.exception()  # retrieved: the caller reads startup_errors instead
        if not self.closed.done():
            self.closed.set_result(exc)


def _marker_start(data: bytes, marker: bytes) -> int:
    """How many bytes at the end of ``data`` may be the start of ``marker`` (a lone
    newline does not count: see ``ShellSession._feed``)."""
    at = data.rfind(marker[:2], max(len(data) - len(marker), 0))
    return len(data) - at if at >= 0 and marker.startswith(data[at:]) else 0


def env_lines(env: Mapping[str, str]) -> bytes:
    """The lines the job evaluates before it becomes the script's bash."""
    lines = []
    for name, value in env.items():
        if not ENV_NAME.fullmatch(name):
            raise ValueError(f"not an environment variable name: {name!r}")
        if "\0" in value:
            raise ValueError(f"environment variable {name} holds a NUL byte")
        lines.append(f"export {name}={shlex.quote(value)}\n")
    return "".join(lines).encode("utf-8")
