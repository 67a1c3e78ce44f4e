"""The runner shell's stream protocol, chunk by chunk (the real shell: test_ssh_target)."""

from __future__ import annotations

import asyncio

import asyncssh
import pytest

from workflow_agent.execution.ssh_runner import ShellRun, ShellSession
from workflow_agent.execution.target import OutputCollector, RunResult

RUN_ID = "0123456789abcdef0123456789abcdef"
OUTPUTS = [b"", b"a\n", b"a", b"a\n\n", b"\n", b"\n\n", b"a\nb", b"x\x1ewa-end not-it 1\n"]


def stream(output: bytes, status: int) -> bytes:
    """What the shell writes for one run: the output, then the end marker."""
    return output + f"\n\x1ewa-end {RUN_ID} {status}\n".encode()


def collector(watched: bool) -> OutputCollector:
    """Where a run's lines go: watched (a callback sees each as it comes) or only kept."""
    seen: list[tuple[str, str]] = []
    return OutputCollector(lambda stream, line: seen.append((stream, line)) if watched else None)


def replay(stdout: bytes, stderr: bytes, cut: int, watched: bool) -> RunResult:
    """Feed a run's two streams split at ``cut`` (in a few pieces) into a session."""

    async def body() -> RunResult:
        session = ShellSession()
        session.data_received(b"sudo noise\n\x1ewa-shell 42 /tmp/d\n",
                              asyncssh.EXTENDED_DATA_STDERR)
        assert await session.ready == "/tmp/d"
        run = ShellRun(RUN_ID, collector(watched))
        session.begin(run)
        err = f"\x1ewa-pid {RUN_ID} 77\n".encode() + stderr
        for data, kind in ((stdout, None), (err, asyncssh.EXTENDED_DATA_STDERR)):
            for piece in (data[:cut], data[cut:cut + 1], data[cut + 1:]):
                if piece:
                    session.data_received(piece, kind)  # type: ignore[arg-type]
        assert run.pgid == 77 and not session.runs
        return run.result(await run.done)

    return asyncio.run(body())


@pytest.mark.parametrize("watched", [True, False])
@pytest.mark.parametrize("output", OUTPUTS)
def test_output_comes_back_the_same_however_it_is_split(output: bytes, watched: bool) -> None:
    expected = "".join(line + "\n" for line in output.decode().split("\n"))
    if output.endswith(b"\n") or not output:
        expected = expected[:-1]  # no line after the last newline
    data = stream(output, 3)
    for cut in range(len(data) + 1):
        result = replay(data, stream(output, 3), cut, watched)
        assert (result.exit_code, result.stdout, result.stderr) == (3, expected, expected)


@pytest.mark.parametrize("watched", [True, False])
def test_queued_runs_each_get_their_own_output_however_it_is_split(watched: bool) -> None:
    """A script and the parts after it are queued at once: the bytes after one run's end
    marker (even in the same chunk) are the next run's."""
    ids = ["a" * 32, "b" * 32]
    outputs = [b"first\nno newline", b"second\n"]

    def whole(kind: str) -> bytes:
        return b"".join((f"\x1ewa-pid {run_id} {7 + i}\n".encode() if kind == "err" else b"")
                        + output + f"\n\x1ewa-end {run_id} {i}\n".encode()
                        for i, (run_id, output) in enumerate(zip(ids, outputs, strict=True)))

    async def body(cut: int) -> list[RunResult]:
        session = ShellSession()
        session.data_received(b"\x1ewa-shell 42 /tmp/d\n", asyncssh.EXTENDED_DATA_STDERR)
        runs = [ShellRun(run_id, collector(watched)) for run_id in ids]
        for run in runs:
            session.begin(run)
        for data, kind in ((whole("out"), None), (whole("err"), asyncssh.EXTENDED_DATA_STDERR)):
            for piece in (data[:cut], data[cut:]):
                if piece:
                    session.data_received(piece, kind)  # type: ignore[arg-type]
        assert [run.pgid for run in runs] == [7, 8] and not session.runs
        return [run.result(await run.done) for run in runs]

    for cut in range(len(whole("err")) + 1):
        first, second = asyncio.run(body(cut))
        assert (first.exit_code, first.stdout, first.stderr) == (
            0, "first\nno newline\n", "first\nno newline\n")
        assert (second.exit_code, second.stdout, second.stderr) == (1, "second\n", "second\n")
