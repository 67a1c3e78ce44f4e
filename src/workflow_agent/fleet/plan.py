"""What a fleet rollout is asked to do, before any of the workflow machinery loads: the
rollout options and batches, and each inventory host's target.

``FleetTargets`` builds each host's target with its own SSH settings (user, port, key
file, jump host, become) over the configuration's ``ssh`` section, and can start
connecting hosts before their workflows ask for them: the fleet command connects the
first batch while the rest of the tool is still being imported (about 0.3 s at 30 hosts
here, the time the hosts' sshd take to accept the connections).
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from workflow_agent.config import SshSettings, WorkflowConfiguration
from workflow_agent.container import Container
from workflow_agent.errors import InvalidInputError
from workflow_agent.execution.target import Target
from workflow_agent.fleet.inventory import Host

_SHARE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(%?)\s*$")
#: ``ansible_connection`` values that mean SSH.
_SSH_CONNECTIONS = ("", "ssh", "smart", "paramiko", "paramiko_ssh",
                    "ansible.builtin.ssh", "ansible.builtin.paramiko_ssh")


# -- options ------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchSize:
    """``--serial``: a number of hosts, or a percentage of all selected hosts."""

    value: float
    percent: bool

    @classmethod
    def parse(cls, text: str) -> BatchSize:
        """``"3"`` or ``"25%"``; ``InvalidInputError`` otherwise."""
        match = _SHARE.match(text)
        if match is None or float(match[1]) <= 0 or (not match[2] and "." in match[1]):
            raise InvalidInputError(
                f"--serial {text!r} is not a number of hosts or a percentage",
                hint="Write --serial 2 (hosts per batch) or --serial 25% (of the hosts).",
            )
        return cls(float(match[1]), bool(match[2]))

    def hosts(self, total: int) -> int:
        """Hosts per batch out of ``total``: a percentage rounds down, at least one
        (as Ansible's ``serial`` does)."""
        if self.percent:
            return max(1, math.floor(total * self.value / 100))
        return max(1, int(self.value))


def parse_percent(text: str, option: str = "--max-fail") -> float:
    """``"25%"`` or ``"25"`` as 25.0 (0 to 100)."""
    match = _SHARE.match(text)
    if match is None or not 0 <= float(match[1]) <= 100:
        raise InvalidInputError(f"{option} {text!r} is not a percentage from 0 to 100",
                                hint=f"Write e.g. {option} 20%.")
    return float(match[1])


@dataclass(frozen=True)
class RolloutOptions:
    """How a rollout proceeds (the ``--forks/--serial/--canary/--max-fail`` flags)."""

    #: Hosts worked on at once.
    forks: int = 5
    #: Hosts per batch after the canaries; None: all the rest in one batch.
    serial: BatchSize | None = None
    #: Hosts in the first batch, on their own.
    canary: int = 0
    #: The largest share (percent) of a batch's reachable hosts that may fail with the
    #: rollout going on; 0: any failure stops it.
    max_fail: float = 0.0
    #: When the rollout stops, roll back every host it changed, not only the batch's.
    rollback_all: bool = False

    def __post_init__(self) -> None:
        if self.forks < 1:
            raise InvalidInputError("--forks must be at least 1")
        if self.canary < 0:
            raise InvalidInputError("--canary must not be negative")
        if not 0 <= self.max_fail <= 100:
            raise InvalidInputError("--max-fail must be a percentage from 0 to 100")


def plan_batches(count: int, *, canary: int = 0, serial: BatchSize | None = None) -> list[int]:
    """Batch sizes for ``count`` hosts: ``canary`` first, then ``serial``-sized batches
    (the last one may be smaller), or all the rest in one."""
    sizes: list[int] = []
    left = count
    if canary and left:
        sizes.append(min(canary, left))
        left -= sizes[-1]
    step = serial.hosts(count) if serial is not None else left
    while left > 0:
        sizes.append(min(step, left))
        left -= sizes[-1]
    return sizes


def crossed(failed: int, reachable: int, max_fail: float) -> bool:
    """Whether ``failed`` of ``reachable`` hosts is more than ``max_fail`` percent."""
    return reachable > 0 and failed * 100 > max_fail * reachable


# -- per-host targets ---------------------------------------------------------------


def target_spec(host: Host) -> str:
    """The ``--target`` of an inventory host: ``ansible_connection`` ``ssh`` (the
    default) gives ``ssh://user@host:port``; ``local`` this machine; ``docker`` the
    container named by the host's address."""
    connection = str(host.vars.get("ansible_connection") or "").strip()
    if connection in _SSH_CONNECTIONS:
        return host.target
    if connection in ("local", "ansible.builtin.local"):
        return "local"
    if connection in ("docker", "community.docker.docker"):
        return f"docker://{host.address}"
    raise InvalidInputError(
        f"inventory host {host.name!r}: ansible_connection {connection!r} is not supported",
        hint="Fleet rollouts reach hosts over ssh, local or docker.",
    )


def host_ssh_settings(host: Host, base: SshSettings) -> SshSettings:
    """``base`` with the host's own key file, jump host and ``ansible_become``."""
    update: dict[str, Any] = {}
    if host.private_key_file is not None:
        update["client_keys"] = [host.private_key_file]
    if host.jump_host:
        update["jump_host"] = host.jump_host
    if "ansible_become" in host.vars:
        update["sudo"] = host.become
    return base.model_copy(update=update) if update else base


class FleetTargets:
    """The target factory of a fleet's container: each inventory host's target with the
    host's own SSH settings; targets opened early are handed out first."""

    def __init__(self, config: WorkflowConfiguration, hosts: Sequence[Host]) -> None:
        self.config = config
        self.by_spec = {target_spec(host): host for host in hosts}
        for host in hosts:  # a ProxyCommand it cannot follow: refused before any host
            _ = host.jump_host
        self.container = Container(config, target_factory=self)
        self._early: dict[str, Target] = {}

    def __call__(self, spec: str) -> Target:
        early = self._early.pop(spec, None)
        return early if early is not None else self._build(spec)

    def _build(self, spec: str) -> Target:
        host = self.by_spec.get(spec)
        if host is None or not spec.startswith("ssh://"):
            return self.container.make_target(spec)
        password = host.become_password
        return self.container.ssh_target(spec, host_ssh_settings(host, self.config.ssh),
                                         password if isinstance(password, str) else None)

    def open_early(self, hosts: Iterable[Host]) -> None:
        """Start connecting the SSH ``hosts`` now; their workflows then wait for the
        connection in flight instead of starting one (a failure is theirs to report)."""
        for host in hosts:
            spec = target_spec(host)
            if spec.startswith("ssh://") and spec not in self._early:
                target = self._early[spec] = self._build(spec)
                opening = asyncio.ensure_future(target.open())
                opening.add_done_callback(_retrieved)

    async def close_unused(self) -> None:
        """Close the targets opened early that no workflow took."""
        unused, self._early = list(self._early.values()), {}
        for target in unused:
            await target.close()


def _retrieved(task: asyncio.Future[Any]) -> None:
    """Mark an early open's outcome as seen: the workflow that takes the target sees it
    again; one that never runs (a skipped batch) has nothing to report."""
    if not task.cancelled():
        task.exception()
