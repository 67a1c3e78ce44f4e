"""The whole workflow in Docker containers: real engine, real apt, real exporter, real HTTP."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from helpers import free_low_port
from workflow_agent.agent import WorkflowAgent
from workflow_agent.agents.coordinator import WorkflowRequest
from workflow_agent.config import WorkflowConfiguration
from workflow_agent.container import Container
from workflow_agent.state import WorkflowState

NODE = "prometheus-node-exporter"


def metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        body: str = response.read().decode()
    return body


def test_install_verify_uninstall_in_a_running_container(
    tmp_path: Path, docker_engine: str, container: Any
) -> None:
    # Each workflow opens its own docker:// target from the spec, as the CLI does.
    config = WorkflowConfiguration(data_dir=tmp_path / "data", cache_dir=tmp_path / "cache",
                                   docker={"host": docker_engine})
    agent = WorkflowAgent(Container(config))
    port = free_low_port()
    spec = f"docker://{container.name}"

    def run(action: str) -> WorkflowState:
        request = WorkflowRequest(action=action, integration=NODE,  # type: ignore[arg-type]
                                  target=spec, params={"listen_port": str(port)})
        return asyncio.run(agent.run(request))

    installed = run("install")
    assert installed.status == "succeeded", installed.error
    assert installed.target_identity == spec
    assert installed.checks and all(check.passed for check in installed.checks)
    # Host network: the exporter in the container serves on this host's port.
    body = metrics(port)
    assert "node_cpu_seconds_total" in body and "node_exporter_build_info" in body

    verified = run("verify")
    assert verified.status == "succeeded", verified.error

    removed = run("uninstall")
    assert removed.status == "succeeded", removed.error
    assert removed.leftovers == []
    assert [s.name for s in removed.stages][-1] == "proof"
    left = container.exec_run(["sh", "-c", "dpkg-query -W prometheus-node-exporter 2>&1; "
                               "getent passwd prometheus; ls /var/lib/prometheus 2>&1"])
    assert b"no packages found" in left.output and b"prometheus:" not in left.output
    with pytest.raises(OSError):
        metrics(port)
    rows = agent.container.history.list_workflows(limit=3)
    assert [(r.action, r.status) for r in rows] == [
        ("uninstall", "succeeded"), ("verify", "succeeded"), ("install", "succeeded")]


def test_cli_installs_into_a_fresh_container_from_an_image(
    tmp_path: Path, docker_engine: str, docker_image: str, docker_client: Any
) -> None:
    before = {c.id for c in docker_client.containers.list(all=True)}
    port = free_low_port()
    env = {
        **{k: v for k, v in os.environ.items()
           if not k.startswith("WORKFLOW_AGENT_") and k != "DOCKER_HOST"},
        "WORKFLOW_AGENT_DATA_DIR": str(tmp_path / "data"),
        "DOCKER_HOST": docker_engine,  # the SDK's own variable, when docker.host is unset
        "WORKFLOW_AGENT_DOCKER__NETWORK": "host",
        "WORKFLOW_AGENT_DOCKER__PULL": "false",
    }
    # No --yes: a container made for this run is disposable, so nobody is asked.
    done = subprocess.run(
        [sys.executable, "-m", "workflow_agent", "install", NODE, "--target",
         f"docker-image://{docker_image}", "--param", f"listen_port={port}", "--output", "json"],
        env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout)
    assert result["status"] == "succeeded"
    assert result["target_identity"].startswith("docker-image://workflow-agent-")
    # The container (and the exporter in it) is gone with the command.
    assert {c.id for c in docker_client.containers.list(all=True)} == before
    with pytest.raises(OSError):
        metrics(port)
