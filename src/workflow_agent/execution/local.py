"""The local target: scripts run as subprocesses on this host."""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Mapping
from pathlib import Path

from workflow_agent.execution.process import run_process
from workflow_agent.execution.target import OutputCallback, RunResult, Target, script_env


class LocalTarget(Target):
    """This host. Changes are real: use the sandbox target to try things out."""

    kind = "local"

    @property
    def identity(self) -> str:
        return f"local:{socket.gethostname()}"

    async def run(
        self,
        script: str,
        *,
        env: Mapping[str, str] | None = None,
        timeout: float = 600.0,
        on_output: OutputCallback | None = None,
    ) -> RunResult:
        fd, path = tempfile.mkstemp(prefix="workflow-agent-", suffix=".sh")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(script)
            return await run_process(
                ["/bin/bash", path], env=script_env(env), timeout=timeout, on_output=on_output
            )
        finally:
            os.unlink(path)

    async def put(self, path: str, data: bytes, mode: int = 0o644) -> None:
        dest = Path(path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.workflow-agent-tmp")
        tmp.write_bytes(data)
        tmp.chmod(mode)
        tmp.replace(dest)

    async def get(self, path: str) -> bytes:
        return Path(path).read_bytes()
