"""Fixtures of the generation tests: real documentation over local HTTP, and an agent
whose LLM is the scripted test model (everything else is real).

``blackbox_readme``  the README that Debian's prometheus-blackbox-exporter package ships
                     (``apt-get download`` + ``dpkg -x`` at test time, cached; never
                     committed). No built-in integration covers this exporter.
``doc_server``       a real HTTP server on 127.0.0.1 (``tests/doc_server.py``).
``no_proxy_env``     (automatic) no proxy variables: documentation comes from loopback.
"""

from __future__ import annotations

import gzip
import shutil
import subprocess

import pytest

# The shared fixtures: imported here, pytest finds them in this module.
from doc_server import CACHE, doc_server, no_proxy_env

__all__ = ["blackbox_readme", "doc_server", "no_proxy_env"]

PACKAGE = "prometheus-blackbox-exporter"


@pytest.fixture(scope="session")
def blackbox_readme() -> str:
    """The package's README.md, downloaded and extracted once per machine."""
    for tool in ("apt-get", "dpkg"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    root = CACHE / "blackbox"
    readme = root / "usr/share/doc" / PACKAGE / "README.md.gz"
    if not readme.is_file():
        debs = CACHE / "blackbox-debs"
        debs.mkdir(parents=True, exist_ok=True)
        subprocess.run(["apt-get", "download", PACKAGE], cwd=debs, check=True,
                       capture_output=True)
        for deb in sorted(debs.glob(f"{PACKAGE}_*.deb")):
            subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
    return gzip.decompress(readme.read_bytes()).decode()
