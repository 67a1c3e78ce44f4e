"""asyncssh is imported without running a compiler, and its library lookups still find
what the dynamic loader would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from workflow_agent.execution import sshlib


def test_importing_asyncssh_runs_no_compiler_or_linker(tmp_path: Path) -> None:
    """A fresh interpreter whose PATH leads to a gcc, cc and ld that record being run
    imports asyncssh (as the tool does) without starting any of them, and leaves
    ``ctypes.util.find_library`` as it was."""
    bin_dir, ran = tmp_path / "bin", tmp_path / "ran"
    bin_dir.mkdir()
    for name in ("gcc", "cc", "ld", "objdump"):
        tool = bin_dir / name
        tool.write_text(f"#!/bin/sh\necho {name} >> {ran}\nexit 1\n")
        tool.chmod(0o755)
    code = ("import ctypes.util; before = ctypes.util.find_library\n"
            "from workflow_agent.execution.sshlib import asyncssh\n"
            "assert ctypes.util.find_library is before\n"
            "assert asyncssh.SSHClientConnection\n")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60)
    assert not ran.exists(), ran.read_text()
    # The same lookup through ctypes' own find_library does run them here: the test
    # would notice a compiler run.
    subprocess.run([sys.executable, "-c", "import ctypes.util; "
                    "ctypes.util.find_library('wa-no-such-library')"],
                   env=env, check=True, timeout=60)
    assert ran.exists()


def test_libraries_are_found_in_the_loader_cache_and_library_path(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert sshlib._loadable("c") == "libc.so.6"
    assert sshlib._loadable("wa-no-such-library") is None
    (tmp_path / "libwa-fake.so.1").write_bytes(b"")
    monkeypatch.setenv("LD_LIBRARY_PATH", f"/nonexistent::{tmp_path}")
    assert sshlib._loadable("wa-fake") == str(tmp_path / "libwa-fake.so.1")
