"""How one script runs over an SSH channel (used by ``ssh.SshTarget``).

The SSH command line holds only a fixed runner program, a random
marker and two lengths; everything else travels on the channel's standard input::

    [sudo -S -k -p '' --] setsid -w bash -c RUNNER wa MARKER ENV_BYTES SCRIPT_BYTES
    stdin: [sudo password\\n] MARKER\\n <env file> <script>

``sudo -S`` reads the password line (one byte at a time, so nothing more). The runner,
leader of a new session so a timeout can kill its whole process group, makes a private
directory (mode 0700), reports ``<RS>wa PGID DIR`` as its first line of stderr, skips
input up to the marker (the password line too, when sudo had no use for it), writes the
env file and the script there (mode 0600) and runs ``env -i BASH_ENV=env-file bash
script`` with stdin from /dev/null. Bash sources the env file first: it deletes itself
and exports ``BASE_ENV`` plus the caller's ``env``. So neither the script nor an env
value nor the password is ever in a process argument.

A run ends when the script exits, not when the channel's pipes close: a daemon the
script starts may hold them for hours. sshd sends the runner's exit status as soon as it
exits; the output gets ``DRAIN_GRACE`` more to arrive, then the channel is closed (what
``process.run_process`` does with a pidfd on this host). A timeout or a cancelled run
sends ``kill -KILL -- -PGID`` on a second channel.
"""

from __future__ import annotations

import asyncio
import re
import shlex
import signal as signals
from collections.abc import Mapping
from typing import Any

import asyncssh

from workflow_agent.execution.process import _Lines as Lines
from workflow_agent.execution.target import OutputCollector

#: The runner (see the module docstring). $1 marker, $2 env bytes, $3 script bytes.
#: mkdir (not mktemp): one fork fewer, and mkdir never follows an existing path.
RUNNER = r"""umask 077; cd / || exit 125
d=/tmp/workflow-agent-run.$$.$RANDOM$RANDOM
mkdir -m 700 "$d" || exit 125
printf '\036wa %s %s\n' "$$" "$d" >&2
found=
while IFS= read -r l; do [ "$l" = "$1" ] && { found=1; break; }; done
if [ -z "$found" ] || ! head -c "$2" > "$d/env" || ! head -c "$3" > "$d/script"; then
  rm -rf -- "$d"; exit 125
fi
env -i BASH_ENV="$d/env" bash "$d/script" < /dev/null
rc=$?
rm -rf -- "$d"
exit "$rc"
"""

#: Exit status of the runner when it could not set the script up.
RUNNER_FAILED = 125
_HANDSHAKE = b"\x1ewa "
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class RunSession(asyncssh.SSHClientSession[bytes]):
    """Receives one run's output and end; see the module docstring for the protocol."""

    def __init__(self, sink: OutputCollector, handshake: bool) -> None:
        self.stdout = Lines("stdout", sink)
        self.stderr = Lines("stderr", sink)
        self.awaiting_handshake = handshake
        self.head = b""
        self.pgid = 0
        self.run_dir = ""
        self.killed = False
        loop = asyncio.get_running_loop()
        self.exited: asyncio.Future[int] = loop.create_future()
        self.closed: asyncio.Future[Exception | None] = loop.create_future()

    @property
    def ends(self) -> list[asyncio.Future[Any]]:
        """The futures that end a run: the exit status, or the channel closing."""
        return [self.exited, self.closed]

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        if self.killed:
            return  # e.g. setsid's complaint that its child was killed
        if datatype != asyncssh.EXTENDED_DATA_STDERR:
            self.stdout.feed(data)
            return
        if self.awaiting_handshake:
            # Before the runner's first line only sudo writes here (an empty line after
            # reading the password, or its complaints): pass those on, minus blank lines.
            self.head += data
            data = b""
            while self.awaiting_handshake and b"\n" in self.head:
                line, _, self.head = self.head.partition(b"\n")
                if line.startswith(_HANDSHAKE):
                    self.awaiting_handshake = False
                    pgid, _, run_dir = line[len(_HANDSHAKE):].decode().partition(" ")
                    self.pgid = int(pgid) if pgid.isdigit() else 0
                    self.run_dir = run_dir
                elif line.strip():
                    self.stderr.feed(line + b"\n")
            if self.awaiting_handshake:
                return
            data, self.head = self.head, b""
        self.stderr.feed(data)

    def exit_status_received(self, status: int) -> None:
        if not self.exited.done():
            self.exited.set_result(status)

    def exit_signal_received(self, signal: str, core_dumped: bool, msg: str, lang: str) -> None:
        number = getattr(signals, f"SIG{signal}", None)
        if not self.exited.done():
            self.exited.set_result(128 + int(number) if number is not None else 255)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(exc)

    def finish(self) -> None:
        """Deliver what is still buffered (a last line without a newline)."""
        if self.head:
            self.stderr.feed(self.head)
            self.head = b""
        self.stdout.flush()
        self.stderr.flush()


def env_file(env: Mapping[str, str]) -> bytes:
    """The env file the script's bash sources first (``BASH_ENV``): it removes itself."""
    lines = ['rm -f -- "$BASH_ENV"; unset BASH_ENV']
    for name, value in env.items():
        if not _NAME.fullmatch(name):
            raise ValueError(f"not an environment variable name: {name!r}")
        if "\0" in value:
            raise ValueError(f"environment variable {name} holds a NUL byte")
        lines.append(f"export {name}={shlex.quote(value)}")
    return ("\n".join(lines) + "\n").encode("utf-8")
