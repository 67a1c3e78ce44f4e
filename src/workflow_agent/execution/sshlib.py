"""asyncssh, imported without a compiler run: ``from workflow_agent.execution.sshlib
import asyncssh``.

On import, asyncssh looks for liboqs (for sntrup761 key exchange) with
``ctypes.util.find_library``. When ldconfig's cache does not know a library, that
function falls back to linking a test program with gcc, then to running ld: on a
machine with a compiler, five programs and about 35 ms at every start of the tool, before
the first host is contacted. Here the lookup is what the dynamic loader itself would
find: ldconfig's cache, then ``LD_LIBRARY_PATH``. (ML-KEM key exchange comes from the
cryptography package either way.)
"""

from __future__ import annotations

import ctypes.util
import glob
import os


def _loadable(name: str) -> str | None:
    """``find_library(name)`` without its compiler and linker fallbacks."""
    in_cache = getattr(ctypes.util, "_findSoname_ldconfig", None)
    if in_cache is None:  # not glibc's ctypes: leave the lookup as it is
        return _find_library(name)
    found: str | None = in_cache(name)
    if found:
        return found
    for folder in filter(None, os.environ.get("LD_LIBRARY_PATH", "").split(":")):
        matches = sorted(glob.glob(os.path.join(glob.escape(folder), f"lib{name}.so*")))
        if matches:
            return matches[0]
    return None


_find_library = ctypes.util.find_library
ctypes.util.find_library = _loadable
try:
    import asyncssh
finally:
    ctypes.util.find_library = _find_library

__all__ = ["asyncssh"]
