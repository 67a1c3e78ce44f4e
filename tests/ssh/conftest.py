"""Fixtures for the SSH tests: one lab of real sshd hosts per test session (tests/lab.py).

Hosts have roles so tests that change a host do not disturb the others:
0 the CLI install/uninstall, 1 the target contract, 2 the sudo install, 3 a jump target.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from lab import SshLab

pytestmark = pytest.mark.sandbox


@pytest.fixture(scope="session")
def ssh_lab() -> Iterator[SshLab]:
    """A running lab of four SSH hosts, torn down at the end of the session."""
    if os.geteuid() != 0:
        pytest.skip("the SSH lab needs root (namespaces, veth, a bridge)")
    if shutil.which("socat") is None:
        pytest.skip("the SSH lab needs socat (scripts/system-deps.sh --test)")
    lab = SshLab(4)
    lab.start()
    try:
        yield lab
    finally:
        lab.stop()
