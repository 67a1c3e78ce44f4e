"""The contract both nsenter-entered targets keep (execution/entered.py): the sandbox and
the systemd sandbox, each tested for real."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from helpers import run_sh
from target_contract import (
    check_env_never_reaches_a_command_line,
    check_run_then_parts,
    check_timeout_kills_the_whole_process_tree,
)
from workflow_agent.execution.entered import EnteredTarget
from workflow_agent.execution.nspawn import NspawnTarget

pytestmark = pytest.mark.sandbox


@pytest.fixture(params=["sandbox", "systemd-sandbox"])
def entered(request: pytest.FixtureRequest) -> Iterator[EnteredTarget]:
    """An opened target of each kind, closed after the test."""
    if request.param == "sandbox":
        yield request.getfixturevalue("sandbox")
        return
    target = NspawnTarget(request.getfixturevalue("systemd_rootfs"))
    asyncio.run(target.open())
    try:
        yield target
    finally:
        asyncio.run(target.close())


def test_env_reaches_the_script_but_never_a_command_line(entered: EnteredTarget) -> None:
    asyncio.run(check_env_never_reaches_a_command_line(entered))


def test_timeout_kills_the_whole_process_tree(entered: EnteredTarget) -> None:
    asyncio.run(check_timeout_kills_the_whole_process_tree(entered))


def test_a_script_then_read_only_parts_in_one_run(entered: EnteredTarget) -> None:
    asyncio.run(check_run_then_parts(entered))


def test_put_and_get_roundtrip(entered: EnteredTarget) -> None:
    data = bytes(range(256)) * 3
    asyncio.run(entered.put("/opt/wa/deep/dir/blob.bin", data, 0o640))
    assert asyncio.run(entered.get("/opt/wa/deep/dir/blob.bin")) == data
    assert run_sh(entered, "stat -c %a /opt/wa/deep/dir/blob.bin").stdout == "640\n"
    asyncio.run(entered.put("/opt/wa/deep/dir/blob.bin", b"replaced\n", 0o755))
    check = run_sh(entered, "cat /opt/wa/deep/dir/blob.bin; stat -c %a /opt/wa/deep/dir/blob.bin")
    assert check.stdout == "replaced\n755\n"
    assert asyncio.run(entered.get("/opt/wa/deep/dir/blob.bin")) == b"replaced\n"
    with pytest.raises(FileNotFoundError):
        asyncio.run(entered.get("/etc/no-such-file"))
    with pytest.raises(IsADirectoryError):
        asyncio.run(entered.get("/etc"))
    with pytest.raises(ValueError):
        asyncio.run(entered.get("etc/hostname"))
    # Nothing is left behind in the exchange directory.
    assert run_sh(entered, "ls -A /run/workflow-agent | grep -v '^run-' || true").stdout == ""
