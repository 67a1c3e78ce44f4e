"""Fleet rollouts on a lab of real sshd hosts (tests/lab.py): prometheus-node-exporter
installed on every inventory host over SSH and its metrics fetched from this machine over
each host's own address; a partial failure that stops at the right batch and rolls back;
a host whose sshd dies mid-install; the shared fleet id in the history."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import cli_env, metrics, plugin, run_cli
from lab import SshLab
from workflow_agent.agent import WorkflowAgent
from workflow_agent.config import WorkflowConfiguration
from workflow_agent.errors import InvalidInputError
from workflow_agent.fleet.inventory import load_inventory
from workflow_agent.fleet.plan import (
    BatchSize,
    FleetTargets,
    RolloutOptions,
    crossed,
    plan_batches,
)
from workflow_agent.fleet.rollout import HostResult, Rollout
from workflow_agent.integrations.registry import Registry
from workflow_agent.verification.snapshot import DEFAULT_IGNORE, Snapshot, diff, take_snapshot

NODE = "prometheus-node-exporter"


# -- helpers ----------------------------------------------------------------------------


@pytest.fixture
def make_lab() -> Iterator[Callable[[int], SshLab]]:
    """Start labs of n SSH hosts; each is torn down when the test ends."""
    if os.geteuid() != 0:
        pytest.skip("the SSH lab needs root (namespaces, veth, a bridge)")
    if shutil.which("socat") is None:
        pytest.skip("the SSH lab needs socat (scripts/system-deps.sh --test)")
    labs: list[SshLab] = []

    def make(count: int) -> SshLab:
        lab = SshLab(count)
        labs.append(lab)
        lab.start()
        return lab

    yield make
    for lab in labs:
        lab.stop()


def cli(lab: SshLab, tmp_path: Path, *args: str, env: dict[str, str] | None = None
        ) -> subprocess.CompletedProcess[str]:
    """The real command line; SSH keys come from the inventory, not the settings."""
    return run_cli(tmp_path, *args, env=env or {
        k: v for k, v in lab.config_env().items() if not k.endswith("CLIENT_KEYS")})


def ini_inventory(lab: SshLab, path: Path) -> Path:
    lines = ["[fleet]"]
    lines += [f"{host.name} ansible_host={host.address}" for host in lab.hosts]
    lines += ["", "[fleet:vars]", "ansible_user=root",
              f"ansible_ssh_private_key_file={lab.client_key}"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def serves_metrics(address: str) -> bool:
    try:
        return "node_exporter_build_info" in metrics(address)
    except (urllib.error.URLError, ConnectionError, http.client.HTTPException):
        return False  # nothing listens, or something that does not speak HTTP


def remote(lab: SshLab, index: int, script: str) -> str:
    async def scenario() -> str:
        async with lab.target(index) as target:
            result = await target.run(script, timeout=60)
            assert result.ok, result.stderr
            return result.stdout

    return asyncio.run(scenario())


def installed(lab: SshLab, index: int) -> bool:
    """The package or its user is on host ``index``."""
    out = remote(lab, index, f"dpkg-query -W -f '${{Status}}' {NODE} 2>/dev/null || true; "
                             "echo; getent passwd prometheus || true")
    return "install ok installed" in out or "prometheus:" in out


def snapshot(lab: SshLab, index: int) -> Snapshot:
    """The integration's watched paths, packages, users and groups on host ``index``."""
    spec = Registry.discover([], entry_points=False).get(NODE).definition.uninstall

    async def take() -> Snapshot:
        async with lab.target(index) as target:
            return await take_snapshot(target, paths=spec.watch,
                                       ignore=[*DEFAULT_IGNORE, *spec.ignore])

    return asyncio.run(take())


# -- batch planning (pure) --------------------------------------------------------------


def test_batches_canary_first_then_serial_sized() -> None:
    assert plan_batches(5) == [5]
    assert plan_batches(5, canary=1, serial=BatchSize.parse("3")) == [1, 3, 1]
    assert plan_batches(10, serial=BatchSize.parse("25%")) == [2, 2, 2, 2, 2]  # 2.5 -> 2
    assert plan_batches(3, serial=BatchSize.parse("10%")) == [1, 1, 1]  # at least one
    assert plan_batches(2, canary=5) == [2]
    # The threshold is a share of the batch's reachable hosts, exceeded strictly.
    assert crossed(1, 3, 0) and not crossed(0, 3, 0)
    assert not crossed(1, 3, 34) and crossed(2, 3, 34)
    assert not crossed(0, 0, 0)  # a batch of unreachable hosts says nothing
    for bad in ("0", "x", "-2", "2.5", "%"):
        with pytest.raises(InvalidInputError, match="--serial"):
            BatchSize.parse(bad)


def test_bad_fleet_input_is_refused_before_any_host_is_touched(tmp_path: Path) -> None:
    inventory = tmp_path / "hosts.ini"
    inventory.write_text("[web]\nweb1 ansible_host=192.0.2.1\nweb2 ansible_host=192.0.2.1\n")
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path),
           "WORKFLOW_AGENT_DATA_DIR": str(tmp_path / "data")}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "workflow_agent", "install", NODE,
                               "--inventory", str(inventory), "--yes", *args], env=env,
                              capture_output=True, text=True, stdin=subprocess.DEVNULL)

    unknown = run("--limit", "db")
    assert unknown.returncode == 2 and "db" in unknown.stderr
    serial = run("--serial", "lots")
    assert serial.returncode == 2 and "--serial" in serial.stderr
    twice = run()  # two inventory names, one address: they would fight over one host
    assert twice.returncode == 2 and "web1" in twice.stderr and "web2" in twice.stderr
    both = run("--target", "local", "--limit", "web1")
    assert both.returncode == 2 and "--target" in both.stderr
    assert not (tmp_path / "data" / "journal").exists()


# -- on the lab -------------------------------------------------------------------------


def test_install_on_every_inventory_host_with_per_host_ssh_settings(
    make_lab: Callable[[int], SshLab], tmp_path: Path
) -> None:
    lab = make_lab(4)
    first, last = lab.hosts[0], lab.hosts[3]
    inventory = tmp_path / "hosts.yml"
    inventory.write_text(json.dumps({"all": {
        # The key comes from the inventory only: HOME has no ~/.ssh and no agent is used.
        "vars": {"ansible_user": "root", "ansible_ssh_private_key_file": str(lab.client_key)},
        "children": {
            "web": {"hosts": {h.name: {"ansible_host": h.address} for h in lab.hosts[:2]}},
            "db": {"hosts": {
                lab.hosts[2].name: {"ansible_host": lab.hosts[2].address},
                # Reached only through the first host, as a jump host.
                last.name: {"ansible_host": last.address,
                            "ansible_ssh_common_args": f"-o ProxyJump=root@{first.address}"},
            }},
        },
    }}), encoding="utf-8")

    done = cli(lab, tmp_path, "install", NODE, "--inventory", str(inventory), "--forks", "4",
               "--yes", "--output", "json")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["counts"] == {"succeeded": 4, "failed": 0, "unreachable": 0, "skipped": 0}
    assert [h["host"] for h in report["hosts"]] == [h.name for h in lab.hosts]
    for result, host in zip(report["hosts"], lab.hosts, strict=True):
        assert result["target"] == host.spec() and result["status"] == "succeeded"
        assert not result["unreachable"] and not result["rolled_back"] and result["workflow_id"]
        # Each host's own exporter, fetched from here over the host's own address.
        body = metrics(host.address)
        assert "node_cpu_seconds_total" in body and f'nodename="{host.name}"' in body
    sshd_log = remote(lab, 3, "cat /var/log/sshd-lab.log")
    assert f"from {first.address} " in sshd_log  # the jump host really carried it

    history = cli(lab, tmp_path, "history", "--fleet", report["fleet_id"][:8],
                  "--output", "json")
    assert history.returncode == 0, history.stderr
    rows = json.loads(history.stdout)
    assert sorted(r["id"] for r in rows) == sorted(h["workflow_id"] for h in report["hosts"])
    assert {r["fleet_id"] for r in rows} == {report["fleet_id"]}
    assert {(r["action"], r["status"]) for r in rows} == {("install", "succeeded")}

    # Text mode: one progress line per host and stage on stderr, a summary table on stdout.
    checked = cli(lab, tmp_path, "verify", NODE, "--inventory", str(inventory),
                  "--limit", "web")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    for host in lab.hosts[:2]:
        assert any(host.name in line and "succeeded" in line and "verify" in line
                   for line in checked.stderr.splitlines()), checked.stderr
        assert any(line.count(host.name) and "succeeded" in line
                   for line in checked.stdout.splitlines()), checked.stdout
    assert lab.hosts[2].name not in checked.stdout + checked.stderr
    assert "2 succeeded" in checked.stdout

    removed = cli(lab, tmp_path, "uninstall", NODE, "--inventory", str(inventory), "--yes",
                  "--forks", "4", "--output", "json")
    assert removed.returncode == 0, removed.stdout + removed.stderr
    assert not any(serves_metrics(h.address) for h in lab.hosts)
    assert not any(installed(lab, i) for i in range(4))


def test_a_failed_batch_stops_the_rollout_and_is_rolled_back(
    make_lab: Callable[[int], SshLab], tmp_path: Path
) -> None:
    # Batches: [lab01] (canary), [lab02 lab03 lab04], [lab05].
    lab = make_lab(5)
    # lab03: a broken apt source, so apt refuses to install (the script fails).
    remote(lab, 2, "echo 'deb this is not a source' > /etc/apt/sources.list.d/broken.list")
    # lab04: port 9100 already served by another program, so the exporter cannot bind
    # and verification fails after the package went in.
    remote(lab, 3, "/usr/sbin/sshd -f /etc/ssh/sshd_config.lab -p 9100 "
                   "-o PidFile=/run/sshd-9100.pid")
    before = {i: snapshot(lab, i) for i in (1, 2, 3, 4)}

    done = cli(lab, tmp_path, "install", NODE, "--inventory",
               str(ini_inventory(lab, tmp_path / "hosts.ini")), "--canary", "1",
               "--serial", "3", "--max-fail", "40%", "--yes", "--output", "json")
    report = json.loads(done.stdout)
    hosts = {h["host"]: h for h in report["hosts"]}
    assert done.returncode == 5, done.stderr  # the worst failure: verification (exit 5)
    assert report["batches"] == [["lab01"], ["lab02", "lab03", "lab04"], ["lab05"]]
    assert report["stopped"].startswith("batch 2 of 3: 2 of 3 reachable host(s) failed")
    assert "40%" in report["stopped"] and "batch 3 not started" in report["stopped"]

    # The canary batch verified and is left alone: still serving its metrics.
    assert hosts["lab01"]["status"] == "succeeded" and not hosts["lab01"]["rolled_back"]
    assert serves_metrics(lab.hosts[0].address)
    # The failed batch: why each host failed, and all of it rolled back.
    assert hosts["lab03"]["status"] == "failed" and hosts["lab04"]["status"] == "failed"
    assert "install script failed" in hosts["lab03"]["error"]
    assert "does not work" in hosts["lab04"]["error"]
    assert hosts["lab02"]["status"] == "succeeded" and hosts["lab02"]["rollback_workflow_id"]
    assert "rolled back: batch 2" in hosts["lab02"]["error"]
    for name in ("lab02", "lab03", "lab04"):
        assert hosts[name]["rolled_back"] and not hosts[name]["unreachable"], hosts[name]
    for index in (1, 2, 3):
        after = snapshot(lab, index)
        assert diff(before[index], after).is_empty, diff(before[index], after).lines()
        assert NODE not in after.packages and "prometheus" not in after.users
        assert not serves_metrics(lab.hosts[index].address)
    # Another program's listener on lab04 survived the rollback.
    assert remote(lab, 3, "kill -0 $(cat /run/sshd-9100.pid) && echo alive").strip() == "alive"
    # The later batch never started: no workflow, nothing on the host.
    assert hosts["lab05"]["status"] == "skipped" and hosts["lab05"]["workflow_id"] is None
    assert diff(before[4], snapshot(lab, 4)).is_empty

    history = cli(lab, tmp_path, "history", "--fleet", report["fleet_id"], "--output", "json")
    rows = json.loads(history.stdout)
    assert sorted((r["target"], r["action"]) for r in rows) == sorted(
        [(lab.hosts[i].spec(), "install") for i in range(4)]
        + [(lab.hosts[1].spec(), "rollback")])


def test_a_host_that_dies_mid_install_is_reported_unreachable(
    make_lab: Callable[[int], SshLab], tmp_path: Path
) -> None:
    lab = make_lab(3)
    hosts = load_inventory(ini_inventory(lab, tmp_path / "hosts.ini")).select("all")
    config = WorkflowConfiguration(data_dir=tmp_path / "data", cache_dir=tmp_path / "cache",
                                   ssh=lab.ssh_settings(client_keys=[]))
    container = FleetTargets(config, hosts).container
    victim = lab.hosts[1].name
    killing: list[asyncio.Future[Any]] = []

    def on_update(host: HostResult) -> None:
        # Its changes are journaled and the install script is starting: kill its sshd.
        if host.name == victim and host.stage == "journal" and not killing:
            killing.append(asyncio.ensure_future(asyncio.to_thread(lab.kill_sshd, 1)))

    async def scenario() -> Any:
        rollout = Rollout(WorkflowAgent(container), hosts, RolloutOptions(forks=3),
                          on_update=on_update)
        report = await rollout.run("install", NODE)
        await asyncio.gather(*killing)
        return report

    report = asyncio.run(scenario())
    results = {h.name: h for h in report.hosts}
    dead = results[victim]
    assert killing and dead.status == "unreachable" and dead.unreachable
    assert "connection" in (dead.error or "") and "recover" in (dead.error or "")
    for index in (0, 2):
        host = results[lab.hosts[index].name]
        assert host.status == "succeeded", host
        assert serves_metrics(lab.hosts[index].address)
    assert report.stopped is None and report.exit_code == 6
    assert report.count("failed") == 0 and report.count("unreachable") == 1

    rows = container.history.list_workflows(fleet_id=report.fleet_id, limit=None)
    assert {r.fleet_id for r in rows} == {report.fleet_id} and len(rows) == 3
    assert {r.id for r in rows} == {h.workflow_id for h in report.hosts}


def test_rollback_all_on_failure_undoes_the_earlier_batches_too(
    make_lab: Callable[[int], SshLab], tmp_path: Path
) -> None:
    # Batches: [lab01] (canary), [lab02 lab03]; lab03 cannot install.
    lab = make_lab(3)
    remote(lab, 2, "echo 'deb this is not a source' > /etc/apt/sources.list.d/broken.list")
    before = snapshot(lab, 0)

    done = cli(lab, tmp_path, "install", NODE, "--inventory",
               str(ini_inventory(lab, tmp_path / "hosts.ini")), "--canary", "1",
               "--serial", "2", "--rollback-all-on-failure", "--yes")
    assert done.returncode == 4, done.stdout + done.stderr  # the install script failed
    # The summary table for people: every host, its status, whether it was rolled back.
    rows = {line.split()[1]: line for line in done.stdout.splitlines()
            if line.startswith("│ lab")}
    assert "succeeded" in rows["lab01"] and "yes" in rows["lab01"]
    assert "succeeded" in rows["lab02"] and "yes" in rows["lab02"]
    assert "failed" in rows["lab03"] and "yes" in rows["lab03"]
    assert "stopped: batch 2 of 2: 1 of 2 reachable host(s) failed" in " ".join(
        done.stdout.split())
    # The canary verified, and was rolled back all the same, back to its snapshot.
    assert diff(before, snapshot(lab, 0)).is_empty
    assert not any(serves_metrics(h.address) for h in lab.hosts)
    assert not any(installed(lab, i) for i in range(3))


def test_an_interrupted_rollout_names_what_it_left_and_recover_undoes_it_on_each_host(
    make_lab: Callable[[int], SshLab], tmp_path: Path
) -> None:
    lab = make_lab(3)
    plugins = plugin(tmp_path, "slow-conf", "echo changed > /etc/slow-conf.conf\nsleep 61\n")
    env = {**{k: v for k, v in lab.config_env().items() if not k.endswith("CLIENT_KEYS")},
           "WORKFLOW_AGENT_PLUGIN_DIRS": json.dumps([str(plugins)])}
    inventory = str(ini_inventory(lab, tmp_path / "hosts.ini"))
    before = [remote(lab, i, "ls -A /etc") for i in range(3)]
    rollout = subprocess.Popen(
        [sys.executable, "-m", "workflow_agent", "install", "slow-conf", "--inventory",
         inventory, "--forks", "3", "--yes"], env=cli_env(tmp_path, env),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not all(
                remote(lab, i, "test -e /etc/slow-conf.conf && echo yes || true").strip()
                for i in range(3)):
            time.sleep(0.2)
        rollout.send_signal(signal.SIGINT)  # Ctrl-C, while every host runs its script
        out, err = rollout.communicate(timeout=120)
    finally:
        rollout.kill()
    assert rollout.returncode == 130, out + err
    message = " ".join(err.split())
    assert "interrupted" in message and "3 host(s) were left part-way through the change" \
        in message, message
    assert all(host.name in message for host in lab.hosts)
    assert f"workflow-agent recover --inventory {inventory}" in message
    assert "Traceback" not in message

    again = cli(lab, tmp_path, "install", "slow-conf", "--inventory", inventory, "--yes",
                "--output", "json", env=env)
    assert again.returncode != 0
    assert all("never rolled back" in (h["error"] or "") and "recover" in (h["hint"] or "")
               for h in json.loads(again.stdout)["hosts"]), again.stdout

    # The hosts' key is the inventory's: recover reaches them through it.
    recovered = cli(lab, tmp_path, "recover", "--inventory", inventory, "--yes", "--forks",
                    "3", "--output", "json", env=env)
    assert recovered.returncode == 0, recovered.stdout + recovered.stderr
    found = json.loads(recovered.stdout)
    assert sorted(item["target"] for item in found if item["result"] == "rolled back") == \
        sorted(host.spec() for host in lab.hosts), found
    for index in range(3):
        # The file is gone again; the script's sleep was stopped.
        assert remote(lab, index, "ls -A /etc") == before[index]
        assert remote(lab, index, "pgrep -x sleep || true").strip() == ""


def test_an_inventorys_sudo_password_is_used_and_a_vaulted_one_is_said_to_be_unread(
    make_lab: Callable[[int], SshLab], tmp_path: Path
) -> None:
    lab = make_lab(2)
    plugins = plugin(tmp_path, "root-conf", "echo ok > /etc/root-conf.conf\n")
    password = lab.sudo_password
    vault = ("!vault |\n          $ANSIBLE_VAULT;1.1;AES256\n"
             "          6231336539666234306139346433616338376437376461363365363430623138\n")
    inventory = tmp_path / "hosts.yml"
    inventory.write_text(
        "all:\n"
        "  vars:\n"
        "    ansible_user: deploy\n"
        "    ansible_become: true\n"
        f"    ansible_ssh_private_key_file: {lab.client_key}\n"
        f"    app_token: {vault}"
        "    motd: !unsafe '{{ not a template }}'\n"
        "  hosts:\n"
        f"    {lab.hosts[0].name}:\n"
        f"      ansible_host: {lab.hosts[0].address}\n"
        f"      ansible_become_password: {json.dumps(password)}\n"
        f"    {lab.hosts[1].name}:\n"
        f"      ansible_host: {lab.hosts[1].address}\n"
        "      ansible_password: not-for-logins\n"
        f"      ansible_become_password: {vault}", encoding="utf-8")
    env = {**{k: v for k, v in lab.config_env().items() if not k.endswith("CLIENT_KEYS")},
           "WORKFLOW_AGENT_PLUGIN_DIRS": json.dumps([str(plugins)])}

    done = cli(lab, tmp_path, "install", "root-conf", "--inventory", str(inventory),
               "--forks", "2", "--max-fail", "100%", "--yes", "--output", "json", env=env)
    hosts = {h["host"]: h for h in json.loads(done.stdout)["hosts"]}
    assert hosts[lab.hosts[0].name]["status"] == "succeeded", done.stdout + done.stderr
    assert remote(lab, 0, "cat /etc/root-conf.conf") == "ok\n"
    vaulted = hosts[lab.hosts[1].name]
    assert vaulted["status"] == "failed" and "sudo needs a password" in vaulted["error"]
    said = " ".join(done.stderr.split())
    assert "encrypted with Ansible Vault, which workflow-agent does not decrypt" in said
    assert f"login password the inventory gives {lab.hosts[1].name} (ansible_password) is " \
        "not used" in said
    assert password not in done.stdout + done.stderr
    assert not [path for path in (tmp_path / "data").rglob("*")
                if path.is_file() and password.encode() in path.read_bytes()]

    # A connection variable it needs cannot be vaulted: refused before any host is touched.
    inventory.write_text(inventory.read_text().replace(
        "ansible_user: deploy", f"ansible_user: {vault.rstrip()}\n"), encoding="utf-8")
    refused = cli(lab, tmp_path, "install", "root-conf", "--inventory", str(inventory),
                  "--yes", env=env)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "ansible_user is encrypted with Ansible Vault" in " ".join(refused.stderr.split())


def test_a_fleet_plan_shows_each_distinct_script_once_and_changes_nothing(
    make_lab: Callable[[int], SshLab], tmp_path: Path
) -> None:
    lab = make_lab(2)
    inventory = str(ini_inventory(lab, tmp_path / "hosts.ini"))
    planned = cli(lab, tmp_path, "plan", NODE, "--inventory", inventory, "--output", "json")
    assert planned.returncode == 0, planned.stdout + planned.stderr
    report = json.loads(planned.stdout)
    plans = report["plans"]
    assert list(plans) == [h.name for h in lab.hosts]
    assert {p["method"] for p in plans.values()} == {"apt"}
    digest = plans[lab.hosts[0].name]["scripts"]["install"]
    assert plans[lab.hosts[1].name]["scripts"]["install"] == digest  # the same script
    assert "apt-get" in report["scripts"][digest]["text"]
    assert report["scripts"][digest]["findings"] == []
    assert not any(installed(lab, i) for i in range(2))

    text = cli(lab, tmp_path, "plan", NODE, "--inventory", inventory)
    assert text.returncode == 0, text.stdout + text.stderr
    said = " ".join(text.stdout.split())
    assert f"2 host(s): {lab.hosts[0].name}, {lab.hosts[1].name} (method apt)" in said
    assert len(re.findall(r"\binstall script \(", said)) == 1 and "2 succeeded" in said
