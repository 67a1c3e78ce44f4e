"""Issue 4's fleet benchmark: the same small job on N SSH lab hosts, N = 1, 10, 30, as
whole processes, five ways taking turns in the same run:

(a) the asyncssh floor: a small script connecting to all hosts concurrently and running
    the three steps over one connection per host;
(b) pyinfra, ``--parallel N``;
(c) ansible-playbook, forks = N, tuned: ``gather_facts: no`` and pipelining;
(d) ansible-playbook, forks = N, defaults (facts gathered, no pipelining);
(e) workflow-agent: the job as a plugin-folder integration, through the fleet rollout
    ``workflow-agent install bench-fleet --inventory FILE --forks N --yes`` (history
    recorded for every host). When this workflow-agent has no ``--inventory`` (or with
    ``--standin``), N single-host ``install --target ssh://...`` processes run
    concurrently instead, and the tables say so.

The job: template ``/etc/bench-fleet/app.conf`` (the host's inventory name and a message
that differs on every run, so every run really writes it), run ``uname -sr``, check that
the file holds the message. Then the full prometheus-node-exporter install on 10 fresh
lab hosts through the fleet CLI (apt through the lab's forwarder to deb.debian.org),
and where workflow-agent's time goes (``-X importtime``, stage times from ``show``).

Needs root, socat, the lab's root file system with python3 added (built once, for
Ansible's modules) and, for the node-exporter part, the Debian archive. Changes nothing
on this host: everything runs in the lab's namespaces and temporary directories.
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from _agent import (
    NODE_EXPORTER,
    REPO,
    VENV_BIN,
    agent,
    agent_env,
    import_times,
    print_import_times,
)
from _timing import BenchError, Command, Series, print_table, run, runs_default

sys.path.append(str(REPO / "tests"))  # for lab.py
from lab import LAB_PACKAGES, SshLab  # type: ignore[import-not-found]
from workflow_agent.execution.rootfs import RootfsCache, default_cache_dir

DEFAULT_RUNS = 3
CHANGES_HOST = False
SIZES = (1, 10, 30)
#: Measured here earlier for this job at N = 30 (whole-process wall medians).
EARLIER_30 = {"floor": 0.81, "pyinfra": 1.44, "ansible tuned": 19.8, "ansible default": 32.3}
#: Issue 4's target at 30 hosts: within this factor of the asyncssh floor.
FLOOR_FACTOR = 1.5
NODE_HOSTS = 10
PLUGIN = "bench-fleet"
CONF = "/etc/bench-fleet/app.conf"
PYINFRA = VENV_BIN / "pyinfra"
ANSIBLE_PLAYBOOK = VENV_BIN / "ansible-playbook"

# -- the job, as each tool writes it ----------------------------------------------------

FLOOR_SCRIPT = '''\
"""The asyncssh floor: every host at once, one connection each, the three steps."""
import asyncio, json, shlex, sys
# asyncssh as workflow-agent imports it: without ctypes' compiler run (sshlib's docstring).
from workflow_agent.execution.sshlib import asyncssh

CONF = "/etc/bench-fleet/app.conf"
TEMPLATE = "# managed by the fleet benchmark\\nhost={host}\\nmessage={message}\\n"


async def job(host, address, key, known_hosts, message):
    async with asyncssh.connect(address, username="root", client_keys=[key],
                                known_hosts=known_hosts, agent_path=None) as conn:
        text = TEMPLATE.format(host=host, message=message)
        await conn.run(f"cat > {CONF}", input=text, check=True)
        await conn.run("uname -sr", check=True)
        await conn.run(f"grep -qxF {shlex.quote('message=' + message)} {CONF}", check=True)


async def main():
    hosts, key_file, known_hosts_file, message = sys.argv[1:5]
    key = asyncssh.read_private_key(key_file)
    known_hosts = asyncssh.read_known_hosts(known_hosts_file)
    pairs = json.loads(open(hosts).read())
    await asyncio.gather(*(job(name, address, key, known_hosts, message)
                           for name, address in pairs))


asyncio.run(main())
'''

PYINFRA_TEMPLATE = "# managed by the fleet benchmark\nhost={{ host.name }}\nmessage={{ message }}\n"
PYINFRA_DEPLOY = '''\
from pyinfra import host
from pyinfra.operations import files, server

message = host.data.message
files.template(name="template the file", src="app.conf.j2",
               dest="/etc/bench-fleet/app.conf", message=message)
server.shell(name="run a command", commands=["uname -sr"])
server.shell(name="check the file",
             commands=[f"grep -qxF message={message} /etc/bench-fleet/app.conf"])
'''

ANSIBLE_TEMPLATE = ("# managed by the fleet benchmark\nhost={{ inventory_hostname }}\n"
                    "message={{ message }}\n")
ANSIBLE_PLAYBOOK_TEXT = '''\
- hosts: all
  gather_facts: {facts}
  tasks:
    - name: template the file
      ansible.builtin.template:
        src: app.conf.j2
        dest: /etc/bench-fleet/app.conf
        mode: "0644"
    - name: run a command
      ansible.builtin.command: uname -sr
    - name: check the file
      ansible.builtin.command: grep -qxF "message={{{{ message }}}}" /etc/bench-fleet/app.conf
      changed_when: false
'''

PLUGIN_DEFINITION = f'''\
name: {PLUGIN}
version: "1"
description: The fleet benchmark's job - template a file, run a command, check the file.
parameters:
  message:
    type: string
    default: hello
    pattern: '^[A-Za-z0-9_.-]+$'
platforms:
  - os_family: debian
methods:
  - name: script
    templates:
      install: install.sh.j2
checks:
  - type: file_contains
    path: {CONF}
    text: "message={{{{ message }}}}"
uninstall:
  paths: [{CONF}]
  watch: [/etc/bench-fleet]
'''
PLUGIN_INSTALL = f'''\
HOST={{{{ facts.hostname }}}}
MESSAGE={{{{ message }}}}
printf '# managed by the fleet benchmark\\nhost=%s\\nmessage=%s\\n' "$HOST" "$MESSAGE" > {CONF}
uname -sr
'''


# -- running them -----------------------------------------------------------------------

@dataclass
class Tool:
    """One way of doing the job: its series and how to build its command for a run."""

    series: Series
    command: Callable[[int, str], Command]
    env: dict[str, str]
    #: Runs the N commands concurrently instead of one command (the stand-in).
    concurrent: Callable[[int, str], list[Command]] | None = None
    after: Callable[[], None] = lambda: None
    samples_by_size: dict[int, list[float]] = field(default_factory=dict)
    #: Per size, (client CPU, hosts' CPU) seconds of each timed run.
    cpu_by_size: dict[int, list[tuple[float, float]]] = field(default_factory=dict)


def run_concurrently(cmds: Sequence[Command], env: dict[str, str], workdir: Path) -> float:
    """Start every command at once; wall time until the last one exits."""
    outputs = [workdir / f"out-{index}" for index in range(len(cmds))]
    start = time.perf_counter()
    procs = []
    for cmd, out in zip(cmds, outputs, strict=True):
        with out.open("wb") as sink:
            procs.append(subprocess.Popen(list(cmd), env=env, stdin=subprocess.DEVNULL,
                                          stdout=sink, stderr=subprocess.STDOUT))
    codes = [proc.wait() for proc in procs]
    elapsed = time.perf_counter() - start
    for cmd, code, out in zip(cmds, codes, outputs, strict=True):
        if code != 0:
            tail = out.read_text(errors="replace").strip().splitlines()[-15:]
            raise BenchError(f"{' '.join(cmd)} exited {code}:\n" + "\n".join(tail))
    return elapsed


def fleet_cli_available(env: dict[str, str]) -> bool:
    """Whether this workflow-agent's install has the fleet rollout (``--inventory``)."""
    _, result = run(agent("install", "--help"), env=env, check=False)
    return "--inventory" in result.stdout


def lab_rootfs() -> Path:
    """The lab's root file system plus python3 (Ansible's modules need it on the hosts);
    built once with mmdebstrap, then cached."""
    cache = RootfsCache(default_cache_dir(), include=(*LAB_PACKAGES, "python3"),
                        flavor="ssh-python3")
    return cache.ensure()


def write_inventories(lab: SshLab, work: Path, count: int) -> tuple[Path, Path, Path]:
    """Ansible-style YAML inventory (Ansible and workflow-agent), pyinfra's inventory.py
    and the floor's host list, for the first ``count`` hosts."""
    hosts = lab.hosts[:count]
    folder = work / f"n{count}"
    folder.mkdir(exist_ok=True)
    ssh_args = f"-o UserKnownHostsFile={lab.known_hosts} -o IdentitiesOnly=yes"
    inventory = {"all": {
        "hosts": {host.name: {"ansible_host": host.address} for host in hosts},
        "vars": {"ansible_user": "root", "ansible_ssh_private_key_file": str(lab.client_key),
                 "ansible_ssh_common_args": ssh_args},
    }}
    yaml_inventory = folder / "hosts.yml"
    yaml_inventory.write_text(json.dumps(inventory, indent=1), encoding="utf-8")  # JSON is YAML
    data = {"ssh_user": "root", "ssh_key": str(lab.client_key),
            "ssh_known_hosts_file": str(lab.known_hosts), "ssh_strict_host_key_checking": "yes"}
    pyinfra_hosts = [(host.name, {"ssh_hostname": host.address, **data}) for host in hosts]
    pyinfra_inventory = folder / "inventory.py"
    pyinfra_inventory.write_text(f"hosts = {pyinfra_hosts!r}\n", encoding="utf-8")
    floor_hosts = folder / "hosts.json"
    floor_hosts.write_text(json.dumps([[host.name, host.address] for host in hosts]),
                           encoding="utf-8")
    return yaml_inventory, pyinfra_inventory, floor_hosts


def close_control_masters(directory: Path) -> None:
    """Ansible leaves OpenSSH ControlPersist masters behind (60 s); close ours so no run
    reuses another's connections."""
    if not directory.is_dir():
        return
    for socket in directory.iterdir():
        subprocess.run(["ssh", "-o", f"ControlPath={socket}", "-O", "exit", "lab"],
                       capture_output=True, check=False)
    shutil.rmtree(directory, ignore_errors=True)


class Bench:
    """The lab, the files each tool reads, and the tools themselves."""

    def __init__(self, lab: SshLab, work: Path, agent_environment: dict[str, str],
                 standin: bool) -> None:
        self.lab, self.work, self.standin = lab, work, standin
        self.counter = 0
        self.agent_env = agent_environment
        plugin = work / "plugins" / PLUGIN
        (plugin / "templates").mkdir(parents=True)
        (plugin / "definition.yaml").write_text(PLUGIN_DEFINITION, encoding="utf-8")
        (plugin / "templates" / "install.sh.j2").write_text(PLUGIN_INSTALL, encoding="utf-8")
        self.agent_env.update(lab.config_env())
        self.agent_env["WORKFLOW_AGENT_PLUGIN_DIRS"] = json.dumps([str(work / "plugins")])
        (work / "floor.py").write_text(FLOOR_SCRIPT, encoding="utf-8")
        (work / "deploy.py").write_text(PYINFRA_DEPLOY, encoding="utf-8")
        (work / "app.conf.j2").write_text(PYINFRA_TEMPLATE, encoding="utf-8")
        ansible_dir = work / "ansible"
        ansible_dir.mkdir()
        (ansible_dir / "app.conf.j2").write_text(ANSIBLE_TEMPLATE, encoding="utf-8")
        for name, facts in (("tuned", "no"), ("default", "yes")):
            (ansible_dir / f"{name}.yml").write_text(ANSIBLE_PLAYBOOK_TEXT.format(facts=facts),
                                                     encoding="utf-8")
        (ansible_dir / "ansible.cfg").write_text("[defaults]\n", encoding="utf-8")
        self.plain_env = {key: value for key, value in os.environ.items()
                          if not key.startswith(("ANSIBLE_", "WORKFLOW_AGENT_"))}
        self.plain_env.pop("PYTHONDONTWRITEBYTECODE", None)
        self.plain_env["PYTHONPYCACHEPREFIX"] = self.agent_env["PYTHONPYCACHEPREFIX"]
        self.inventories: dict[int, tuple[Path, Path, Path]] = {}

    def message(self) -> str:
        self.counter += 1
        return f"run{self.counter}"

    def ansible_env(self, tuned: bool) -> dict[str, str]:
        ansible = self.work / "ansible"
        env = dict(self.plain_env)
        env.update({
            "ANSIBLE_CONFIG": str(ansible / "ansible.cfg"),
            "ANSIBLE_HOME": str(ansible / "home"),
            "ANSIBLE_LOCAL_TEMP": str(ansible / "tmp"),
            "ANSIBLE_SSH_CONTROL_PATH_DIR": str(ansible / "cp"),
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_HOST_KEY_CHECKING": "True",  # against the lab's known_hosts
        })
        if tuned:
            env["ANSIBLE_PIPELINING"] = "True"
        return env

    def tools(self) -> list[Tool]:
        work = self.work

        def floor(count: int, message: str) -> Command:
            return [sys.executable, str(work / "floor.py"), str(self.inventories[count][2]),
                    str(self.lab.client_key), str(self.lab.known_hosts), message]

        def pyinfra(count: int, message: str) -> Command:
            return [str(PYINFRA), str(self.inventories[count][1]), str(work / "deploy.py"),
                    "-y", "--parallel", str(count), "--data", f"message={message}",
                    "--chdir", str(work)]

        def ansible(playbook: str) -> Callable[[int, str], Command]:
            def command(count: int, message: str) -> Command:
                return [str(ANSIBLE_PLAYBOOK), "-i", str(self.inventories[count][0]),
                        "-f", str(count), "-e", f"message={message}",
                        str(work / "ansible" / playbook)]
            return command

        def fleet(count: int, message: str) -> Command:
            return agent("install", PLUGIN, "--inventory", str(self.inventories[count][0]),
                         "--forks", str(count), "--yes", "-p", f"message={message}",
                         "-o", "json")

        def singles(count: int, message: str) -> list[Command]:
            return [agent("install", PLUGIN, "--target", host.spec(), "--yes",
                          "-p", f"message={message}", "-o", "json")
                    for host in self.lab.hosts[:count]]

        cp_dir = work / "ansible" / "cp"
        label = ("(e) workflow-agent: N concurrent single-host installs (STAND-IN)"
                 if self.standin else "(e) workflow-agent install --inventory --forks N")
        return [
            Tool(Series("(a) asyncssh floor"), floor, self.plain_env),
            Tool(Series("(b) pyinfra --parallel N"), pyinfra, self.plain_env),
            Tool(Series("(c) ansible-playbook tuned, forks N"), ansible("tuned.yml"),
                 self.ansible_env(tuned=True), after=lambda: close_control_masters(cp_dir)),
            Tool(Series("(d) ansible-playbook default, forks N"), ansible("default.yml"),
                 self.ansible_env(tuned=False), after=lambda: close_control_masters(cp_dir)),
            Tool(Series(label), fleet, self.agent_env,
                 concurrent=singles if self.standin else None),
        ]

    def once(self, tool: Tool, count: int) -> tuple[float, float, float]:
        """One run: wall time, the tool's CPU (its processes) and the hosts' CPU."""
        message = self.message()
        hosts_before, mine_before = hosts_cpu(), os.times()
        try:
            if tool.concurrent is not None:
                elapsed = run_concurrently(tool.concurrent(count, message), tool.env,
                                           self.work)
            else:
                elapsed, _ = run(tool.command(count, message), env=tool.env)
        finally:
            tool.after()
        mine = os.times()
        client = (mine.children_user - mine_before.children_user
                  + mine.children_system - mine_before.children_system)
        time.sleep(0.3)  # the hosts' last processes end and are counted
        return elapsed, client, hosts_cpu() - hosts_before

    def measure(self, tools: Sequence[Tool], count: int, runs: int) -> None:
        self.inventories[count] = write_inventories(self.lab, self.work, count)
        for round_ in range(1 + runs):  # one untimed warm-up round first
            times = []
            for tool in tools:
                elapsed, client, hosts = self.once(tool, count)
                times.append(f"{elapsed:.2f}")
                if round_:
                    tool.samples_by_size.setdefault(count, []).append(elapsed)
                    tool.cpu_by_size.setdefault(count, []).append((client, hosts))
            print(f"  N={count} round {round_}{' (warm-up)' if not round_ else ''}: "
                  f"{' / '.join(times)} s (load {os.getloadavg()[0]:.1f})", flush=True)


def hosts_cpu() -> float:
    """CPU seconds used so far on the lab hosts: per host, its listening sshd's own time
    plus that of every process below it that has ended (sessions, shells, scripts), and
    the same of the host's PID 1 (its sandbox holder), which reaps what outlived its
    parent: a shell whose session closed first. Processes still running (a daemon) are
    not counted."""
    found = subprocess.run(["pgrep", "-x", "sshd"], capture_output=True, text=True,
                           check=False).stdout.split()
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in found:
        try:
            fields = _stat(pid)
            if Path(f"/proc/{fields[1]}/comm").read_text().strip() == "sshd":
                continue  # a session: its time reaches its listening sshd when it ends
            total += sum(int(value) for value in fields[11:15])
            total += sum(int(value) for value in _stat(fields[1])[11:15])  # the holder
        except (OSError, IndexError):
            continue
    return total / tick


def _stat(pid: str) -> list[str]:
    """The fields of /proc/PID/stat after the command name (field 4 first)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


# -- reading workflow-agent's history -----------------------------------------------------

def history_rows(env: dict[str, str]) -> list[dict[str, Any]]:
    _, result = run(agent("history", "--limit", "100000", "-o", "json"), env=env)
    rows: list[dict[str, Any]] = json.loads(result.stdout)
    return rows


def _seconds(start: str, end: str) -> float:
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def stages_of(env: dict[str, str], ids: Sequence[str]) -> dict[str, list[float]]:
    """Per stage, its durations across the workflows ``ids`` (from ``show -o json``)."""
    stages: dict[str, list[float]] = {}
    for workflow_id in ids:
        _, result = run(agent("show", workflow_id, "-o", "json"), env=env)
        for stage in json.loads(result.stdout)["stages"]:
            if stage.get("started_at") and stage.get("finished_at"):
                seconds = _seconds(stage["started_at"].replace("Z", "+00:00"),
                                   stage["finished_at"].replace("Z", "+00:00"))
                stages.setdefault(stage["name"], []).append(seconds)
    return stages


def print_stage_table(title: str, stages: dict[str, list[float]]) -> None:
    print(f"\n{title}")
    print(f"{'stage':<20}  {'median':>8}  {'min':>8}  {'max':>8}  {'hosts':>5}")
    for name, values in stages.items():
        print(f"{name:<20}  {statistics.median(values):8.3f}  {min(values):8.3f}  "
              f"{max(values):8.3f}  {len(values):>5}")


def check_history(env: dict[str, str], lab: SshLab, count: int, runs: int,
                  integration: str) -> list[dict[str, Any]]:
    """Every host has a succeeded install of ``integration`` for every run; returns the
    newest run's rows (one per host)."""
    rows = [row for row in history_rows(env)
            if row["action"] == "install" and row["integration"] == integration]
    newest: list[dict[str, Any]] = []
    for host in lab.hosts[:count]:
        mine = [row for row in rows if row["target"] == host.spec()]
        succeeded = [row for row in mine if row["status"] == "succeeded"]
        if len(succeeded) < runs:
            raise BenchError(f"history has {len(succeeded)} succeeded installs of "
                             f"{integration} on {host.spec()}, expected {runs}: {mine[:3]}")
        newest.append(mine[0])
    return newest


# -- the parts ------------------------------------------------------------------------------

def job_on_sizes(bench: Bench, sizes: Sequence[int], runs: int) -> list[Tool]:
    tools = bench.tools()
    for count in sizes:
        print(f"\nthe job on {count} host(s): {runs} runs each, taking turns, after a "
              "warm-up round", flush=True)
        bench.measure(tools, count, runs)
    return tools


def report_job(tools: Sequence[Tool], sizes: Sequence[int], runs: int, standin: bool) -> None:
    for count in sizes:
        rows = []
        for tool in tools:
            series = Series(tool.series.label, samples=tool.samples_by_size.get(count, []))
            rows.append(series)
        floor = rows[0].median
        for series in rows[1:]:
            series.note = f"{series.median / floor:.2f}x floor"
        if count == max(sizes) == 30:
            for series, key in zip(rows, EARLIER_30, strict=False):
                series.note = (series.note + f"; earlier here {EARLIER_30[key]:.2f} s").lstrip(
                    "; ")
            agent_series = rows[-1]
            verdict = ("ok" if agent_series.median <= FLOOR_FACTOR * floor
                       and agent_series.median < rows[1].median else "NOT MET")
            agent_series.note += (f"; target <= {FLOOR_FACTOR}x floor "
                                  f"({FLOOR_FACTOR * floor:.2f} s) and < pyinfra: {verdict}")
        print_table(f"fleet job on {count} host(s), whole process wall time, {runs} runs "
                    "each" + (" (workflow-agent: STAND-IN, no fleet CLI)" if standin else ""),
                    rows)
    print("\nCPU per run, medians (client: the tool's processes; hosts: every lab host's "
          "sshd and what ran under it):")
    for count in sizes:
        for tool in tools:
            cpu = tool.cpu_by_size.get(count, [])
            if cpu:
                client = statistics.median(c for c, _ in cpu)
                hosts = statistics.median(h for _, h in cpu)
                print(f"  N={count:<3} {tool.series.label:<60} client {client:5.2f} s   "
                      f"hosts {hosts:5.2f} s")
    print("\nper extra host (slope between the smallest and largest N, medians):")
    low, high = min(sizes), max(sizes)
    if high > low:
        for tool in tools:
            a = statistics.median(tool.samples_by_size[low])
            b = statistics.median(tool.samples_by_size[high])
            print(f"  {tool.series.label:<60} {(b - a) / (high - low) * 1000:7.0f} ms")


def where_agent_time_goes(bench: Bench, tools: Sequence[Tool], count: int, runs: int) -> None:
    env = bench.agent_env
    newest = check_history(env, bench.lab, count, runs + 1, PLUGIN)
    print(f"\nhistory: every one of the {count} hosts has a succeeded {PLUGIN} install for "
          f"each of the {runs + 1} runs at N={count}"
          + (f" (fleet id of the last run: {newest[0].get('fleet_id')})"
             if newest[0].get("fleet_id") else ""))
    stages = stages_of(env, [str(row["id"]) for row in newest])
    print_stage_table(f"workflow-agent's stages, last run at N={count}, per host "
                      "(workflow-agent show ID -o json, s)", stages)
    durations = [float(row["duration"]) for row in newest if row.get("duration") is not None]
    if durations:
        print(f"per-host workflow duration (history): median {statistics.median(durations):.3f}"
              f", max {max(durations):.3f} s; whole process median "
              f"{statistics.median(tools[-1].samples_by_size[count]):.3f} s")
    cmd = (["-m", "workflow_agent", *tools[-1].command(count, bench.message())[1:]]
           if not bench.standin else
           ["-m", "workflow_agent", "install", PLUGIN, "--target", bench.lab.hosts[0].spec(),
            "--yes", "-p", f"message={bench.message()}"])
    print_import_times("workflow-agent's imports, one " + ("fleet run" if not bench.standin
                       else "single-host run") + " (python -X importtime, self times summed)",
                       import_times(cmd, env))
    if not bench.standin:
        cmd = ["-m", "workflow_agent", *tools[-1].command(count, bench.message())[1:]]
        cpu_and_blocking(cmd, env, bench.work)


def cpu_and_blocking(cmd: Command, env: dict[str, str], work: Path) -> None:
    """One more fleet run, twice: its CPU time (``/usr/bin/time``: the process and the
    children it waited for) against its wall time; then under cProfile, the functions
    with the most time of their own in the main thread, i.e. the event loop's thread:
    a blocking call there stalls every host's workflow at once."""
    _, timed_run = run(["/usr/bin/time", "-f", "%e %U %S", sys.executable, *cmd], env=env)
    wall, user, system = (float(v) for v in timed_run.stderr.strip().splitlines()[-1].split())
    print(f"\none fleet run at N=max: wall {wall:.2f} s, CPU {user + system:.2f} s (user "
          f"{user:.2f}, sys {system:.2f}, with waited-for children): the rest is waiting")
    out = work / "fleet.prof"
    run([sys.executable, "-m", "cProfile", "-o", str(out), *cmd], env=env)
    stats = pstats.Stats(str(out))
    total = stats.total_tt  # type: ignore[attr-defined]
    rows = sorted(stats.stats.items(),  # type: ignore[attr-defined]
                  key=lambda item: item[1][2], reverse=True)[:12]
    print(f"the same run under cProfile ({total:.2f} s in the main thread): most time of "
          "their own")
    print(f"{'function':<70}  {'calls':>6}  {'own s':>7}")
    for (filename, line, name), (_, calls, own, _, _) in rows:
        where = filename.split("/site-packages/")[-1].split("/src/")[-1]
        label = name if filename == "~" else f"{where}:{line}({name})"
        print(f"{label[-70:]:<70}  {calls:>6}  {own:7.3f}")


def node_exporter(bench: Bench, standin: bool) -> None:
    """The full node-exporter install on NODE_HOSTS hosts, then the re-run."""
    lab = bench.lab
    env = bench.agent_env
    hosts = lab.hosts[:NODE_HOSTS]
    inventory = bench.work / f"node{NODE_HOSTS}.yml"
    inventory.write_text(json.dumps({"all": {
        "hosts": {host.name: {"ansible_host": host.address} for host in hosts},
        "vars": {"ansible_user": "root"}}}), encoding="utf-8")
    if standin:
        def timed() -> float:
            return run_concurrently([agent("install", NODE_EXPORTER, "--target", host.spec(),
                                           "--yes", "-o", "json") for host in hosts],
                                    env, bench.work)
    else:
        def timed() -> float:
            elapsed, _ = run(agent("install", NODE_EXPORTER, "--inventory", str(inventory),
                                   "--forks", str(NODE_HOSTS), "--yes", "-o", "json"), env=env)
            return elapsed
    print(f"\nprometheus-node-exporter on {NODE_HOSTS} hosts: first install, then a re-run",
          flush=True)
    first = Series(f"first install, {NODE_HOSTS} hosts" + (" (STAND-IN)" if standin else ""),
                   samples=[timed()])
    serving = sum("node_cpu_seconds_total" in metrics(host.address) for host in hosts)
    rerun = Series(f"re-run (installed), {NODE_HOSTS} hosts", samples=[timed()])
    print_table(f"node-exporter through the fleet CLI, whole process; {serving}/{NODE_HOSTS} "
                "hosts serve node_cpu_seconds_total on their own address", [first, rerun])
    rows = check_history(env, lab, NODE_HOSTS, 2, NODE_EXPORTER)
    ids = [str(row["id"]) for row in history_rows(env)
           if row["integration"] == NODE_EXPORTER and row["action"] == "install"]
    first_ids = ids[NODE_HOSTS:2 * NODE_HOSTS]
    print_stage_table("first install: stages per host (s)", stages_of(env, first_ids))
    print_stage_table("re-run: stages per host (s)", stages_of(env, [str(r["id"]) for r in rows]))


def metrics(address: str) -> str:
    try:
        with urllib.request.urlopen(f"http://{address}:9100/metrics", timeout=10) as response:
            body: str = response.read().decode()
            return body
    except OSError:
        return ""


def main(runs: int, sizes: Sequence[int] = SIZES, *, standin: bool | None = None,
         node: bool = True, wait_for_fleet: float = 0.0) -> None:
    for tool in (PYINFRA, ANSIBLE_PLAYBOOK):
        if not tool.exists():
            raise BenchError(f"{tool} is missing: pip install -e '.[bench,test]'")
    rootfs = lab_rootfs()
    work = Path(tempfile.mkdtemp(prefix="workflow-agent-bench-fleet-"))
    lab = SshLab(max(sizes), rootfs=rootfs)
    try:
        with agent_env() as env:
            if standin is None:
                deadline = time.monotonic() + wait_for_fleet
                while not fleet_cli_available(env) and time.monotonic() < deadline:
                    print("waiting for the fleet CLI (workflow-agent install --inventory)...",
                          flush=True)
                    time.sleep(60)
                standin = not fleet_cli_available(env)
            if standin:
                print("NOTE: workflow-agent is measured as a STAND-IN: N single-host "
                      "`install --target ssh://...` processes at once, not the fleet CLI")
            lab.start()
            print(f"lab of {lab.count} hosts up in {lab.started_in:.2f} s; load average "
                  f"{os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
            prepare = subprocess.run(
                [sys.executable, "-c", PREPARE, str(lab.client_key), str(lab.known_hosts),
                 *(host.address for host in lab.hosts)], capture_output=True, text=True,
                check=False)
            if prepare.returncode != 0:
                raise BenchError(f"preparing the lab hosts failed: {prepare.stderr}")
            bench = Bench(lab, work, env, standin)
            tools = job_on_sizes(bench, sizes, runs)
            report_job(tools, sizes, runs, standin)
            where_agent_time_goes(bench, tools, max(sizes), runs)
            if node:
                lab.stop()
                lab = SshLab(NODE_HOSTS, rootfs=rootfs)
                lab.start()
                bench.lab = lab
                bench.agent_env.update(lab.config_env())
                node_exporter(bench, standin)
            print(f"\nload average at the end: {os.getloadavg()[0]:.2f} "
                  f"{os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
    finally:
        lab.stop()
        shutil.rmtree(work, ignore_errors=True)


#: Untimed: the directory every tool writes into, on every host.
PREPARE = '''\
import asyncio, sys
import asyncssh

async def one(address, key, known_hosts):
    async with asyncssh.connect(address, username="root", client_keys=[key],
                                known_hosts=known_hosts, agent_path=None) as conn:
        await conn.run("install -d -m 0755 /etc/bench-fleet", check=True)

async def main():
    key = asyncssh.read_private_key(sys.argv[1])
    known_hosts = asyncssh.read_known_hosts(sys.argv[2])
    await asyncio.gather(*(one(a, key, known_hosts) for a in sys.argv[3:]))

asyncio.run(main())
'''


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", "-n", type=int, default=runs_default(DEFAULT_RUNS),
                        help=f"timed runs per tool and size (default: $BENCH_RUNS, else "
                        f"{DEFAULT_RUNS})")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)),
                        help="host counts, comma-separated (default: 1,10,30)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--standin", action="store_true", default=None,
                      help="time N concurrent single-host installs instead of the fleet CLI")
    mode.add_argument("--wait-for-fleet", type=float, default=0.0, metavar="MINUTES",
                      help="poll this long for the fleet CLI before falling back to the "
                      "stand-in")
    parser.add_argument("--no-node-exporter", action="store_true",
                        help="skip the node-exporter install on 10 hosts")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    sizes = sorted({int(size) for size in args.sizes.split(",")})
    main(args.runs, sizes, standin=args.standin, node=not args.no_node_exporter,
         wait_for_fleet=args.wait_for_fleet * 60)


if __name__ == "__main__":
    cli()
