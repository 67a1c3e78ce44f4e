"""The ``Target`` seam: somewhere a script can run, files can be put and fetched.

Every target runs scripts the same way: the script text is written to a private file on
the target and run with ``bash`` under a clean environment (``BASE_ENV`` plus what the
caller passes), standard input from ``/dev/null``. Secrets travel only in ``env``, never
in the script text or a process argument.

A run costs a round trip, and over SSH a runner on the host: ``run_parts`` runs several
independent read-only scripts in one run and hands each its own result;
``Target.run_then_parts`` runs a script as ``Target.run`` would, then such read-only
parts, in one run (or, over SSH, two runs queued at once: one round trip), keeping the
script's output, status and timeout its own.

``quote`` quotes a word for any of these scripts, bytes that are not UTF-8 included.
"""

from __future__ import annotations

import base64
import re
import secrets
import shlex
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import TYPE_CHECKING, AnyStr, ClassVar

if TYPE_CHECKING:
    from workflow_agent.facts import Facts

#: ``(stream, line)`` where stream is ``"stdout"`` or ``"stderr"``; line has no newline.
OutputCallback = Callable[[str, str], None]

#: The environment every script starts from, on every target.
BASE_ENV: Mapping[str, str] = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "HOME": "/root",
    "DEBIAN_FRONTEND": "noninteractive",
    "TERM": "dumb",
}


@dataclass(frozen=True)
class RunResult:
    """What one script run produced."""

    exit_code: int
    stdout: str
    stderr: str
    duration: float
    timed_out: bool = False
    #: The bytes a probe printed, when its base64 output was decoded for it already (a
    #: section of ``journal_probe.Sections``); ``stdout`` is empty then.
    data: bytes | None = None

    @property
    def ok(self) -> bool:
        """True when the script exited 0 within its timeout."""
        return self.exit_code == 0 and not self.timed_out


def probe_output(result: RunResult) -> bytes:
    """What a probe that prints base64 printed: ``data`` when decoded already, else its
    stdout decoded (``binascii.Error`` when that is not base64)."""
    if result.data is not None:
        return result.data
    return base64.b64decode("".join(result.stdout.split()))


@dataclass
class OutputCollector:
    """Collects streamed lines and forwards them to an optional callback."""

    forward: OutputCallback | None = None
    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def __call__(self, stream: str, line: str) -> None:
        (self.stdout if stream == "stdout" else self.stderr).append(line)
        if self.forward is not None:
            self.forward(stream, line)

    def result(self, exit_code: int, *, timed_out: bool = False) -> RunResult:
        """Freeze what was collected into a ``RunResult``."""
        return RunResult(
            exit_code=exit_code,
            stdout="".join(line + "\n" for line in self.stdout),
            stderr="".join(line + "\n" for line in self.stderr),
            duration=time.monotonic() - self.started,
            timed_out=timed_out,
        )


def script_env(env: Mapping[str, str] | None) -> dict[str, str]:
    """The full environment a script runs with: ``BASE_ENV`` overlaid by ``env``."""
    merged = dict(BASE_ENV)
    if env:
        merged.update(env)
    return merged


class Target(ABC):
    """Somewhere scripts run. Use as ``async with target:``; ``open`` is idempotent."""

    kind: ClassVar[str]

    def __init__(self) -> None:
        self._facts: Facts | None = None

    @property
    @abstractmethod
    def identity(self) -> str:
        """A stable name for this target, used in history, locks and snapshots."""

    async def open(self) -> None:
        """Connect or start the target. The default has nothing to do."""

    async def close(self) -> None:
        """Disconnect or destroy the target. The default has nothing to do."""

    async def __aenter__(self) -> Target:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @abstractmethod
    async def run(
        self,
        script: str,
        *,
        env: Mapping[str, str] | None = None,
        timeout: float = 600.0,
        on_output: OutputCallback | None = None,
    ) -> RunResult:
        """Run a bash script; stream its output; kill its whole process tree on timeout."""

    @abstractmethod
    async def put(self, path: str, data: bytes, mode: int = 0o644) -> None:
        """Write ``data`` to ``path`` on the target (parents created)."""

    @abstractmethod
    async def get(self, path: str) -> bytes:
        """Read ``path`` from the target; ``FileNotFoundError`` when absent."""

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
        """Run ``script`` as ``run`` would, then the read-only ``parts`` as
        ``run_parts`` does, in ONE ``run`` (a target may do it its own way, in one round
        trip as well): the script's result, and one per part.

        The script runs as ``bash FILE``, stdin ``/dev/null``, with ``env`` (which travels
        as ``target.run`` passes it, never in the run's text), plus ``marker``
        (``NAME=VALUE``, written in the run's text: nothing secret) that neither the wrapper
        nor the parts carry. Its output alone streams to ``on_output`` and makes its
        result; ``timeout`` bounds it (its process group is killed then, as ``target.run``
        kills a script: exit 124, ``timed_out``). The parts run without ``env``; the whole
        run gets ``timeout + parts_timeout``. The script's process group is its own: a
        guard kills it when the run ends before the script does (a cancellation).

        Parts the run never finished are reported as ``run_parts`` does, all of them when
        the script's own end was not seen (the wrapper could not set the script up: exit
        125, or was killed).
        """
        nonce = secrets.token_hex(8)
        name, _, value = marker.partition("=")
        bad = [name for name in [*(env or {}), *([name] if marker else [])]
               if not ENV_NAME.fullmatch(name)]
        if bad:  # names are written in the run's text
            raise ValueError(f"not an environment variable name: {bad[0]!r}")
        if marker:
            marker = f"{name}={shlex.quote(value)} "
        # Only the caller's names are in the text; BASE_ENV's values are nothing secret.
        unset = [name for name in env or {} if name not in BASE_ENV]
        restore = [f"{name}={shlex.quote(BASE_ENV[name])}" for name in env or {}
                   if name in BASE_ENV]
        text = _THEN.format(
            end=f"WORKFLOW_AGENT_SCRIPT_{nonce}",
            script=script if script.endswith("\n") or not script else script + "\n",
            marker=marker, timeout=f"{timeout:.3f}", nonce=nonce,
            unset=(f"unset -v {' '.join(unset)}\n" if unset else "")
            + (f"export {' '.join(restore)}\n" if restore else ""),
        ) + framed_parts(parts, nonce)
        output = _ScriptOutput(nonce, on_output)
        whole = await self.run(text, env=env, timeout=timeout + parts_timeout,
                               on_output=output)
        return (output.script_result(whole),
                unframed_parts(output.parts_result(whole), len(parts), nonce))

    async def facts(self, *, refresh: bool = False) -> Facts:
        """Facts about the target, gathered once per target object unless ``refresh``."""
        if self._facts is None or refresh:
            from workflow_agent.facts import gather_facts

            self._facts = await gather_facts(self)
        return self._facts


def quote(word: str) -> str:
    """``shlex.quote`` for a script run on a target, a word holding bytes that are not
    UTF-8 included: such a word (read with ``surrogateescape``, as file names from the
    target are) is written ``$'...'`` with every byte that is not printable ASCII as
    ``\\xHH``, so the script text stays UTF-8 and bash gets the original bytes back."""
    try:
        word.encode("utf-8")
    except UnicodeEncodeError:
        raw = word.encode("utf-8", "surrogateescape")
        return "$'" + "".join(chr(byte) if 0x20 <= byte < 0x7F and byte not in b"\\'"
                              else f"\\x{byte:02x}" for byte in raw) + "'"
    return shlex.quote(word)


# Each part runs in a subshell of its own, through eval so that even a syntax error
# stays in its part; after it, the wrapper prints a frame line on stdout
# (``<RS>part-NONCE INDEX STATUS``) and on stderr (``<RS>part-NONCE INDEX``), each after
# a newline of its own, so a part's last line needs none. NONCE is random per run: no
# part's output can fake a frame. Each frame is ONE write (bash's printf flushes at every
# newline its format prints, ``printf %s`` a whole string at once): one SSH packet, not two.
_PART = """( eval {script} )
s=$?
printf -v s '\\n\\036part-{nonce} {index} %d\\n' "$s"; printf %s "$s"
printf %s $'\\n\\036part-{nonce} {index}\\n' >&2
"""


def framed_parts(scripts: Sequence[str], nonce: str) -> str:
    """The text running ``scripts`` as parts, framed with ``nonce``."""
    return "".join(_PART.format(script=shlex.quote(script), nonce=nonce, index=index)
                   for index, script in enumerate(scripts))


def unframed_parts(whole: RunResult, count: int, nonce: str) -> list[RunResult]:
    """The ``count`` parts' results in ``whole``, the output of ``framed_parts``."""
    head = f"\n\x1epart-{nonce} "
    stdouts, fields = cut_frames(whole.stdout, head, "\n", count)  # fields: "INDEX STATUS"
    stderrs, _ = cut_frames(whole.stderr, head, "\n", count)
    return framed_results(whole, stdouts, [int(f.rpartition(" ")[2]) for f in fields],
                          stderrs, count)


def cut_frames(data: AnyStr, head: AnyStr, tail: AnyStr, count: int
               ) -> tuple[list[AnyStr], list[AnyStr]]:
    """``data`` cut at its first ``count`` frames (``head``, a field, ``tail``): the
    pieces before each frame and after the last one, and the frames' fields. Plain
    searches: a frame holds a random nonce, and a regex per nonce is a compile per run
    (half a millisecond of Python each)."""
    pieces: list[AnyStr] = []
    fields: list[AnyStr] = []
    start = 0
    while len(fields) < count:
        at = data.find(head, start)
        stop = data.find(tail, at + len(head)) if at >= 0 else -1
        if stop < 0:
            break
        pieces.append(data[start:at])
        fields.append(data[at + len(head):stop])
        start = stop + len(tail)
    pieces.append(data[start:])
    return pieces, fields


def framed_results(whole: RunResult, outputs: Sequence[str | bytes], statuses: Sequence[int],
                   stderrs: Sequence[str], count: int) -> list[RunResult]:
    """One result per framed piece of ``whole`` (``outputs`` and ``stderrs`` as
    ``cut_frames`` cuts them, never empty): a piece with a frame after it has that
    frame's status; one the run never finished (it was killed, or a piece before it
    exited the shell) gets the run's exit status (or -1). Bytes pieces become ``data``."""
    results = []
    for index in range(count):
        output = outputs[index] if index < len(outputs) else outputs[-1][:0]  # "" or b""
        stderr = stderrs[index] if index < len(stderrs) else ""
        stdout, data = (output, None) if isinstance(output, str) else ("", output)
        if index < len(statuses):
            results.append(RunResult(statuses[index], stdout, stderr, whole.duration,
                                     data=data))
        else:
            results.append(RunResult(whole.exit_code or -1, stdout, stderr, whole.duration,
                                     timed_out=whole.timed_out, data=data))
    return results


async def run_parts(
    target: Target,
    scripts: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = 600.0,
) -> list[RunResult]:
    """Run independent bash ``scripts`` one after the other in ONE ``target.run``; one
    ``RunResult`` each: its own stdout, stderr and exit status.

    Each script runs in a subshell of its own (``exit``, ``set`` options and even a
    syntax error stay in it).
    A part the run never finished (timeout, lost connection) gets the run's exit status
    (or -1) and what it printed so far; ``duration`` is the whole run's.
    """
    nonce = secrets.token_hex(8)
    whole = await target.run(framed_parts(scripts, nonce), env=env, timeout=timeout)
    return unframed_parts(whole, len(scripts), nonce)


# The script is written through a quoted here-document (no expansion; the delimiter is
# random) to a file in a private directory, and runs as `bash FILE` as on every target,
# as a job of its own (set -m: its own process group), its environment the run's plus
# the marker. A guard, a job of its own too, reads a FIFO only this shell holds open
# for writing: a line means the script ended; the time running out, or end of file (the
# target killed this shell: a timeout of the whole run, or a cancellation) make it
# SIGKILL the script's process group, as the target itself would kill a script. Then
# the caller's variables are dropped, and the frame line printed on both streams (after
# a newline of its own, as the parts' frames); the parts follow.
_THEN = """d=$(mktemp -d /tmp/workflow-agent-XXXXXXXXXX) && mkfifo "$d/guard" &&
  exec 5<>"$d/guard" 6<"$d/guard" || exit 125
cat > "$d/script" <<'{end}'
{script}{end}
set -m
{marker}bash "$d/script" </dev/null 5>&- 6<&- &
pid=$!
{{ read -r -t {timeout} _; s=$?; (( s )) || exit 0; (( s > 128 )) && : > "$d/timeout"
  kill -KILL -- -"$pid"; (( s > 128 )) || rm -rf -- "$d"; }} <&6 >/dev/null 2>&1 5>&- 6<&- &
guard=$!
set +m
exec 6<&-
wait "$pid" 2>/dev/null
s=$?
echo >&5
exec 5>&-
wait "$guard"
[ -e "$d/timeout" ] && s=timeout
rm -rf -- "$d"
{unset}printf -v s '\\n\\036script-{nonce} %s\\n' "$s"; printf %s "$s"
printf %s $'\\n\\036script-{nonce}\\n' >&2
"""

#: What an environment variable's name may be (names are written in scripts' text).
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class _ScriptOutput:
    """The output callback of a ``run_then_parts`` run: the lines before a stream's frame
    line are the script's (forwarded as they come), the lines after it the parts'.

    The newline the wrapper prints before a frame makes an empty line when the script's
    last line ended with one of its own: an empty line is held back until the next line
    shows it is not that one.
    """

    def __init__(self, nonce: str, forward: OutputCallback | None) -> None:
        self.frame = f"\x1escript-{nonce}"
        self.script = OutputCollector(forward)
        self.rest: dict[str, list[str]] = {"stdout": [], "stderr": []}
        self.framed: set[str] = set()
        self.held: set[str] = set()
        #: What the frame on stdout says: the script's exit status, or ``timeout``.
        self.status: str | None = None
        self.ended = 0.0

    def __call__(self, stream: str, line: str) -> None:
        if stream in self.framed:
            self.rest[stream].append(line)
        elif line == self.frame or line.startswith(self.frame + " "):
            self.framed.add(stream)
            self.held.discard(stream)
            if stream == "stdout":
                self.status = line[len(self.frame) + 1:]
                self.ended = time.monotonic()
        else:
            if stream in self.held:
                self.script(stream, "")
            if line:
                self.held.discard(stream)
                self.script(stream, line)
            else:
                self.held.add(stream)

    def script_result(self, whole: RunResult) -> RunResult:
        """The script's result; without a frame (the wrapper failed, or was killed) the
        whole run's, a timeout of the whole run being the script's."""
        for stream in self.held - self.framed:  # genuine: no frame followed
            self.script(stream, "")
        if self.status is None:
            return self.script.result(124 if whole.timed_out else whole.exit_code,
                                      timed_out=whole.timed_out)
        timed_out = self.status == "timeout"
        result = self.script.result(124 if timed_out else int(self.status),
                                    timed_out=timed_out)
        return replace(result, duration=self.ended - self.script.started)

    def parts_result(self, whole: RunResult) -> RunResult:
        """What the parts printed, with the whole run's status (for ``unframed_parts``)."""
        return replace(whole, stdout="".join(line + "\n" for line in self.rest["stdout"]),
                       stderr="".join(line + "\n" for line in self.rest["stderr"]))
