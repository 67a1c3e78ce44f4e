"""The Docker targets against a real dockerd started by the test run (conftest.py)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from helpers import host_pids_with, run_sh, unique_sleep
from target_contract import (
    check_env_never_reaches_a_command_line,
    check_run_then_parts,
    check_timeout_kills_the_whole_process_tree,
)
from workflow_agent.config import WorkflowConfiguration
from workflow_agent.container import Container
from workflow_agent.errors import InvalidInputError, TargetError, TargetUnreachableError
from workflow_agent.execution.docker import DockerImageTarget, DockerTarget
from workflow_agent.execution.target import RunResult


@pytest.fixture
def image_target(docker_engine: str, docker_image: str) -> Iterator[DockerImageTarget]:
    """An opened ``docker-image://`` target on the test engine, closed after the test."""
    target = DockerImageTarget(docker_image, host=docker_engine, network="host", pull=False)
    asyncio.run(target.open())
    try:
        yield target
    finally:
        asyncio.run(target.close())


def test_env_reaches_the_script_but_never_a_command_line(image_target: DockerImageTarget) -> None:
    result = asyncio.run(check_env_never_reaches_a_command_line(image_target))
    assert result.stderr == "waiting\n"
    # The script file went into a private directory and is gone after the run.
    listing = run_sh(image_target, "stat -c %a /run/workflow-agent; ls -A /run/workflow-agent")
    assert listing.stdout.splitlines()[0] == "700"
    script_file = next(name for name in listing.stdout.splitlines() if name.endswith(".sh"))
    # Only the listing script's own file and its two output FIFOs.
    assert sorted(listing.stdout.splitlines()[1:]) == [
        script_file, f"{script_file}.err", f"{script_file}.out"
    ]


def test_exit_code_and_the_base_environment(image_target: DockerImageTarget) -> None:
    result = run_sh(image_target, 'echo "$LANG $HOME $DEBIAN_FRONTEND"; exit 7')
    assert result.exit_code == 7 and not result.ok and not result.timed_out
    assert result.stdout == "C.UTF-8 /root noninteractive\n"
    assert run_sh(image_target, "id -u").stdout == "0\n"


def test_timeout_kills_the_whole_process_tree(image_target: DockerImageTarget) -> None:
    asyncio.run(check_timeout_kills_the_whole_process_tree(image_target))


def test_a_script_then_read_only_parts_in_one_run(image_target: DockerImageTarget) -> None:
    asyncio.run(check_run_then_parts(image_target))


def test_a_daemon_holding_stdout_does_not_hold_the_run(image_target: DockerImageTarget) -> None:
    # The engine keeps an exec's output open ~2 s for a background process that
    # inherited it; the run must end when the script does.
    marker = unique_sleep()
    began = time.monotonic()
    result = run_sh(image_target, f"sleep {marker} &\necho done\n", timeout=30)
    took = time.monotonic() - began
    assert result.ok and result.stdout == "done\n"
    assert took < 1.5, f"took {took:.2f} s"
    assert host_pids_with(f"sleep\0{marker}".encode()), "the daemon keeps running"


def test_put_and_get_roundtrip(image_target: DockerImageTarget) -> None:
    data = bytes(range(256)) * 3
    asyncio.run(image_target.put("/opt/wa/deep/dir/blob.bin", data, 0o640))
    assert asyncio.run(image_target.get("/opt/wa/deep/dir/blob.bin")) == data
    check = run_sh(image_target, "stat -c '%a %U' /opt/wa/deep/dir/blob.bin /opt/wa/deep")
    assert check.stdout == "640 root\n755 root\n"
    asyncio.run(image_target.put("/opt/wa/deep/dir/blob.bin", b"replaced\n", 0o755))
    check = run_sh(image_target, "cd /opt/wa/deep/dir && cat blob.bin && stat -c %a blob.bin")
    assert check.stdout == "replaced\n755\n"
    # A symlink is followed, as reading a path on any other target does.
    run_sh(image_target, "ln -s deep/dir/blob.bin /opt/wa/link")
    assert asyncio.run(image_target.get("/opt/wa/link")) == b"replaced\n"
    with pytest.raises(FileNotFoundError):
        asyncio.run(image_target.get("/etc/no-such-file"))
    with pytest.raises(FileNotFoundError):
        asyncio.run(image_target.get("/no/such/dir/file"))
    with pytest.raises(IsADirectoryError):
        asyncio.run(image_target.get("/"))  # answered from the stat: nothing is downloaded
    with pytest.raises(ValueError):
        asyncio.run(image_target.get("etc/hostname"))
    with pytest.raises(ValueError):
        asyncio.run(image_target.put("etc/x", b""))


def test_facts_are_gathered_in_the_container(image_target: DockerImageTarget) -> None:
    facts = asyncio.run(image_target.facts())
    assert facts.os_family == "debian" and facts.distro == "debian"
    assert facts.package_manager == "apt" and facts.is_root
    # No systemd in a container: services start through their init scripts.
    assert facts.init_system == "sysv"
    assert "bash" in facts.installed_packages


def test_image_target_container_is_removed_on_close(
    docker_engine: str, docker_image: str, docker_client: Any
) -> None:
    target = DockerImageTarget(docker_image, host=docker_engine, pull=False)
    assert target.identity.startswith("docker-image://workflow-agent-")
    before = target.identity
    asyncio.run(target.open())
    assert target.identity == before  # stable before and after open
    cid = target.container_id
    assert cid is not None
    assert docker_client.containers.get(cid).status == "running"
    asyncio.run(target.close())
    asyncio.run(target.close())  # idempotent
    assert [c for c in docker_client.containers.list(all=True) if c.id == cid] == []


def test_docker_target_execs_into_a_running_container(
    docker_engine: str, container: Any
) -> None:
    # Found by id, named by name: one identity whichever the user typed.
    target = DockerTarget(container.id[:12], host=docker_engine)

    async def scenario() -> tuple[str, RunResult]:
        async with target:
            return target.identity, await target.run("cat /proc/1/cmdline | tr '\\0' ' '")

    identity, result = asyncio.run(scenario())
    assert identity == f"docker://{container.name}"
    assert result.ok and "sleep infinity" in result.stdout
    container.reload()
    assert container.status == "running", "closing a docker:// target leaves the container"


def test_container_builds_docker_targets_from_specs(docker_engine: str) -> None:
    container = Container(WorkflowConfiguration(docker={"host": docker_engine, "network": "host"}))
    target = container.make_target("docker://web-1")
    assert isinstance(target, DockerTarget) and not isinstance(target, DockerImageTarget)
    assert target.identity == "docker://web-1" and target.host == docker_engine
    image = container.make_target("docker-image://registry.local:5000/team/img:1.2")
    assert isinstance(image, DockerImageTarget)
    assert image.image == "registry.local:5000/team/img:1.2" and image.network == "host"
    for bad in ("docker://", "docker-image://", "docker:web-1"):
        with pytest.raises(InvalidInputError, match="names no"):
            container.make_target(bad)


# -- bad input -------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["unix:///nonexistent/docker.sock", "tcp://127.0.0.1:1"])
def test_unreachable_engine_is_a_clear_error(host: str) -> None:
    with pytest.raises(TargetUnreachableError, match="cannot reach the Docker engine") as caught:
        asyncio.run(DockerTarget("anything", host=host).open())
    assert host in caught.value.message
    assert caught.value.hint is not None and "DOCKER_HOST" in caught.value.hint


def test_no_such_container_is_a_clear_error(docker_engine: str) -> None:
    with pytest.raises(TargetUnreachableError, match="no such container 'wa-missing'") as caught:
        asyncio.run(DockerTarget("wa-missing", host=docker_engine).open())
    assert caught.value.hint is not None and "docker ps" in caught.value.hint


def test_a_stopped_container_is_refused(docker_engine: str, container: Any) -> None:
    container.stop(timeout=0)
    with pytest.raises(TargetUnreachableError, match="is not running") as caught:
        asyncio.run(DockerTarget(container.name, host=docker_engine).open())
    assert caught.value.hint == f"Start it first: docker start {container.name}"


@pytest.mark.parametrize("pull", [False, True])
def test_no_such_image_is_a_clear_error(
    docker_engine: str, docker_client: Any, pull: bool
) -> None:
    before = {c.id for c in docker_client.containers.list(all=True)}
    target = DockerImageTarget("workflow-agent/no-such-image:1", host=docker_engine, pull=pull)
    with pytest.raises(TargetError, match="no such image 'workflow-agent/no-such-image:1'"):
        asyncio.run(target.open())
    assert {c.id for c in docker_client.containers.list(all=True)} == before


def test_a_missing_docker_extra_names_it() -> None:
    # A fresh interpreter where `import docker` fails, as without the extra.
    program = (
        "import asyncio, sys\n"
        "sys.modules['docker'] = None\n"
        "from workflow_agent.errors import TargetError\n"
        "from workflow_agent.execution.docker import DockerTarget\n"
        "try:\n"
        "    asyncio.run(DockerTarget('x').open())\n"
        "except TargetError as exc:\n"
        "    print(exc.message, '|', exc.hint)\n"
    )
    out = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                         check=True).stdout
    assert "need the docker SDK" in out and "workflow-agent[docker]" in out
