"""The local target and the host process runner."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from workflow_agent.execution.local import LocalTarget


def test_output_exit_status_and_streaming() -> None:
    seen: list[tuple[str, str]] = []
    result = asyncio.run(LocalTarget().run(
        "echo out; echo err >&2; printf 'no newline'; exit 3",
        on_output=lambda stream, line: seen.append((stream, line))))
    assert result.exit_code == 3 and not result.ok
    assert result.stdout == "out\nno newline\n" and result.stderr == "err\n"
    assert ("stdout", "out") in seen and ("stderr", "err") in seen


def test_very_long_lines_arrive_whole() -> None:
    result = asyncio.run(LocalTarget().run("head -c 300000 /dev/zero | tr '\\0' x; echo"))
    assert result.ok and result.stdout == "x" * 300000 + "\n"


def test_timeout_kills_the_whole_tree(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    result = asyncio.run(LocalTarget().run(
        f"sleep 60 & echo $! > {pidfile}; wait", timeout=0.5))
    assert result.timed_out and result.exit_code == 124
    child = int(pidfile.read_text())
    # SIGKILL is delivered asynchronously: give the child a moment to be gone (or a zombie).
    deadline = time.monotonic() + 5
    state = "?"
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{child}/stat").read_text().split(")")[1].split()[0]
        except FileNotFoundError:
            return
        if state == "Z":
            return
        time.sleep(0.05)
    raise AssertionError(f"the background child survived (state {state})")


def test_clean_environment_and_env_values(monkeypatch: object) -> None:
    os.environ["WORKFLOW_AGENT_TEST_LEAK"] = "leaked"
    try:
        result = asyncio.run(LocalTarget().run(
            'echo "${WORKFLOW_AGENT_TEST_LEAK:-clean} $TOKEN $PATH"', env={"TOKEN": "t0k"}))
    finally:
        del os.environ["WORKFLOW_AGENT_TEST_LEAK"]
    assert result.stdout.startswith("clean t0k /usr/local/sbin:")


def test_put_and_get(tmp_path: Path) -> None:
    target = LocalTarget()
    path = tmp_path / "a" / "b.conf"
    asyncio.run(target.put(str(path), b"data\x00\xff", mode=0o600))
    assert asyncio.run(target.get(str(path))) == b"data\x00\xff"
    assert path.stat().st_mode & 0o777 == 0o600


def test_a_background_child_holding_the_output_does_not_hold_the_run() -> None:
    """A daemon started without redirecting its output keeps the pipes open for good."""
    result = asyncio.run(LocalTarget().run(
        "sleep 30 & echo started; echo $! > /dev/null", timeout=20))
    assert result.ok and not result.timed_out
    assert result.duration < 5
    assert result.stdout == "started\n"
    assert asyncio.run(LocalTarget().run("pkill -f '^sleep 30$' || true")).ok
