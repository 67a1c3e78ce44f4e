"""The command line as a user runs it: real processes, exit codes, messages, JSON."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers import unique_sleep
from workflow_agent.storage.history import HistoryStore


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """A clean environment with its own history (the sandbox cache is shared)."""
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("WORKFLOW_AGENT_")},
        "WORKFLOW_AGENT_DATA_DIR": str(tmp_path / "data"),
        "COLUMNS": "200",
    }


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workflow_agent", *args],
        env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300,
    )


def add_plugin(tmp_path: Path, env: dict[str, str], definition: dict[str, object],
               install: str) -> None:
    folder = tmp_path / "plugins" / str(definition["name"])
    (folder / "templates").mkdir(parents=True)
    (folder / "templates" / "install.sh.j2").write_text(install)
    base = {"version": "1", "description": "test", "platforms": [{"os_family": "debian"}],
            "methods": [{"name": "script", "templates": {"install": "install.sh.j2"}}],
            "uninstall": {"watch": ["/opt"]}}
    (folder / "definition.yaml").write_text(yaml.safe_dump({**base, **definition}))
    env["WORKFLOW_AGENT_PLUGIN_DIRS"] = json.dumps([str(tmp_path / "plugins")])


def test_help_and_integrations(env: dict[str, str]) -> None:
    assert cli(env, "--help").returncode == 0
    listed = cli(env, "integrations", "list", "--output", "json")
    assert listed.returncode == 0
    assert "prometheus-node-exporter" in [i["name"] for i in json.loads(listed.stdout)]
    shown = cli(env, "integrations", "show", "prometheus-node-exporter")
    assert shown.returncode == 0 and "listen_port" in shown.stdout


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["install", "node-exporter"], 2, "Did you mean: prometheus-node-exporter"),
        (["install", "prometheus-node-exporter", "-p", "listen_port=abc"], 2,
         "'abc' is not a valid integer"),
        (["install", "prometheus-node-exporter", "-p", "listen_address=a b"], 2,
         "does not match the pattern"),
        (["install", "prometheus-node-exporter", "-p", "listen_port"], 2, "not KEY=VALUE"),
        (["install", "prometheus-node-exporter", "--target", "mars"], 2, "unknown target"),
        (["install", "prometheus-node-exporter"], 7, "Pass --yes"),
        (["show", "nosuchid"], 1, "workflow-agent history"),
    ],
)
def test_bad_input_is_explained_with_its_exit_code(
    env: dict[str, str], args: list[str], code: int, message: str
) -> None:
    result = cli(env, *args, "--target", "local") if args[0] == "install" and \
        "--target" not in args else cli(env, *args)
    assert result.returncode == code, result.stderr
    assert message in " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr


def test_missing_required_parameter(tmp_path: Path, env: dict[str, str]) -> None:
    add_plugin(tmp_path, env, {"name": "needs-key", "parameters": {
        "api_key": {"type": "string", "secret": True, "required": True, "env": "API_KEY"}}},
        'echo "$API_KEY" > /dev/null\n')
    result = cli(env, "plan", "needs-key", "--target", "local")
    assert result.returncode == 2
    assert "'api_key': is required" in result.stderr and "API_KEY" in result.stderr


def test_unreachable_sandbox_is_a_target_error(tmp_path: Path, env: dict[str, str]) -> None:
    """No cached root file system and an archive nobody answers: exit 6, said plainly."""
    env["WORKFLOW_AGENT_CACHE_DIR"] = str(tmp_path / "empty-cache")
    env["WORKFLOW_AGENT_SANDBOX__MIRROR"] = "http://127.0.0.1:9/debian"
    result = cli(env, "plan", "prometheus-node-exporter", "--target", "sandbox")
    assert result.returncode == 6, result.stderr
    assert "mmdebstrap" in result.stderr and "Traceback" not in result.stderr


def test_plan_json_changes_nothing_and_is_recorded(env: dict[str, str]) -> None:
    result = cli(env, "plan", "prometheus-node-exporter", "--target", "local", "-o", "json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["status"] == "succeeded" and plan["strategy"]["method"] == "apt"
    assert set(plan["scripts"]) == {"install", "verify", "uninstall"}
    assert all(r["findings"] == [] or all(f["severity"] != "error" for f in r["findings"])
               for r in plan["validation"].values())
    history = json.loads(cli(env, "history", "-o", "json").stdout)
    assert history[0]["id"] == plan["workflow_id"] and history[0]["action"] == "plan"
    shown = json.loads(cli(env, "show", plan["workflow_id"][:8], "-o", "json").stdout)
    assert [s["name"] for s in shown["stages"]][-1] == "script-validation"


@pytest.mark.sandbox
def test_secret_never_printed_or_stored(tmp_path: Path, env: dict[str, str]) -> None:
    secret = "s3cr3t-Licence-Key-123"
    add_plugin(tmp_path, env, {"name": "leaky", "parameters": {
        "licence": {"type": "string", "secret": True, "required": True, "env": "LICENCE"}}},
        'echo "licence is $LICENCE"\nprintf "%s" "$LICENCE" > /opt/licence\nfalse\n')
    env["LICENCE"] = secret
    result = cli(env, "install", "leaky", "--target", "sandbox", "--verbose")
    assert result.returncode == 4
    assert "licence is ********" in result.stderr
    assert secret not in result.stdout + result.stderr
    shown = cli(env, "show", json.loads(cli(env, "history", "-o", "json").stdout)[0]["id"])
    assert "licence is ********" in shown.stdout and secret not in shown.stdout
    for path in (tmp_path / "data").rglob("*"):  # the database and the spool
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


@pytest.mark.sandbox
def test_killed_run_shows_as_incomplete_and_loses_nothing(
    tmp_path: Path, env: dict[str, str]
) -> None:
    add_plugin(tmp_path, env, {"name": "slow"}, "mkdir -p /opt/slow\nsleep 60\n")
    proc = subprocess.Popen([sys.executable, "-m", "workflow_agent", "install", "slow",
                             "--target", "sandbox", "--no-rehearse", "-o", "json"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        stages: list[str] = []
        data = tmp_path / "data"
        while "journal" not in stages and time.monotonic() < deadline:
            time.sleep(0.2)
            with HistoryStore.for_path(data / "history.db", spool_dir=data / "spool") as store:
                listed = store.list_workflows(limit=1)
                if listed:
                    stages = [s.name for s in store.get_workflow(listed[0].id).stages]
        assert "journal" in stages, "the run never reached its execute stage"
        time.sleep(0.5)  # inside the install script now
    finally:
        proc.kill()
        proc.wait()
    listed = json.loads(cli(env, "history", "-o", "json").stdout)
    assert listed[0]["status"] == "incomplete"
    shown = json.loads(cli(env, "show", listed[0]["id"], "-o", "json").stdout)
    assert [s["name"] for s in shown["stages"]][-1] == "journal"
    assert any(a["kind"] == "script" for a in shown["artifacts"])
    # The sandbox died with the agent: no process still runs the script.
    time.sleep(0.5)
    survivors = subprocess.run(["pgrep", "-f", "sleep 60"], capture_output=True, text=True)
    assert survivors.stdout == ""


def test_one_workflow_at_a_time_per_target(tmp_path: Path, env: dict[str, str]) -> None:
    """A second install on a busy target is refused naming the holder; once the holder is
    killed, its half-done install must be recovered before the next one may start."""
    marker = tmp_path / "started"
    duration = unique_sleep()  # pgrep must find this run's sleep, not anybody else's
    add_plugin(tmp_path, env, {"name": "slow-local", "uninstall": {"packages": ["bash"]}},
               f"touch {marker}\nsleep {duration}\n")
    first = subprocess.Popen([sys.executable, "-m", "workflow_agent", "install", "slow-local",
                              "--target", "local", "--no-rehearse", "--yes"], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120  # a loaded CI machine is slow to start Python
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert marker.exists(), "the first install never started its script"
        second = cli(env, "install", "slow-local", "--target", "local", "--yes")
        assert second.returncode == 6, second.stderr
        message = " ".join(second.stderr.split())
        assert "is being changed by another workflow" in message
        assert f"pid {first.pid}" in message and "action install" in message
    finally:
        first.kill()
        first.wait()
    add_plugin(tmp_path / "quick", env, {"name": "quick-local",
                                         "uninstall": {"packages": ["bash"]}}, "true\n")
    env["WORKFLOW_AGENT_PLUGIN_DIRS"] = json.dumps(
        [str(tmp_path / "plugins"), str(tmp_path / "quick" / "plugins")])
    blocked = cli(env, "install", "quick-local", "--target", "local", "--yes")
    assert blocked.returncode == 6, blocked.stderr
    assert "workflow-agent recover" in " ".join(blocked.stderr.split())
    # The killed install's script still sleeps (its process group outlived the agent);
    # recover stops it, as a process the install started.
    recovered = cli(env, "recover", "--yes", "-o", "json")
    assert recovered.returncode == 0, recovered.stderr
    [item] = json.loads(recovered.stdout)
    assert item["result"] == "rolled back"
    assert subprocess.run(["pgrep", "-f", f"^sleep {duration}$"],
                          capture_output=True).returncode == 1
    third = cli(env, "install", "quick-local", "--target", "local", "--yes")
    assert third.returncode == 0, third.stderr


def test_ctrl_c_mid_install_says_what_it_left_and_recover_undoes_it(
    tmp_path: Path, env: dict[str, str]
) -> None:
    marker, conf = tmp_path / "started", Path("/opt") / f"wfa-ctrl-c-{unique_sleep()}"
    duration = unique_sleep()
    add_plugin(tmp_path, env, {"name": "ctrl-c-local", "uninstall": {"watch": ["/opt"]}},
               f"echo changed > {conf}\ntouch {marker}\nsleep {duration}\n")
    run = subprocess.Popen([sys.executable, "-m", "workflow_agent", "install", "ctrl-c-local",
                            "--target", "local", "--no-rehearse", "--yes"], env=env,
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert marker.exists(), "the install never started its script"
        run.send_signal(signal.SIGINT)
        _, err = run.communicate(timeout=120)
    finally:
        run.kill()
    assert run.returncode == 130, err
    said = " ".join(err.split())
    assert "left part-way through changing local" in said and "phase executing" in said
    assert "workflow-agent recover" in said and "Traceback" not in said
    assert conf.exists()
    recovered = cli(env, "recover", "--yes", "-o", "json")
    assert recovered.returncode == 0, recovered.stderr
    assert [item["result"] for item in json.loads(recovered.stdout)] == ["rolled back"]
    assert not conf.exists()
    assert subprocess.run(["pgrep", "-f", f"^sleep {duration}$"],
                          capture_output=True).returncode == 1


def test_listing_with_a_broken_plugin_says_which_file(tmp_path: Path, env: dict[str, str]) -> None:
    add_plugin(tmp_path, env, {"name": "broken", "checks": [{"type": "no_such_check"}]},
               "true\n")
    result = cli(env, "integrations", "list")
    assert result.returncode == 2, result.stderr
    assert "broken/definition.yaml" in " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr
    assert cli(env, "integrations", "show", "prometheus-node-exporter").returncode == 0


def test_a_failed_install_resumes_once_its_cause_is_fixed(
    tmp_path: Path, env: dict[str, str]
) -> None:
    ready = Path("/var/tmp") / f"workflow-agent-test-ready-{os.getpid()}"
    add_plugin(tmp_path, env, {"name": "needs-ready", "uninstall": {"packages": ["bash"]}},
               f"test -e {ready}\n")
    try:
        failed = cli(env, "install", "needs-ready", "--target", "local", "--yes", "-o", "json")
        assert failed.returncode == 4, failed.stderr
        first = json.loads(failed.stdout)["workflow_id"]
        ready.touch()
        resumed = cli(env, "resume", first[:8], "--yes", "-o", "json")
        assert resumed.returncode == 0, resumed.stderr
        state = json.loads(resumed.stdout)
        assert any(f"resumes workflow {first[:8]}" in note and "same scripts" in note
                   for note in state["notes"]), state["notes"]
        again = cli(env, "resume", state["workflow_id"][:8])
        assert again.returncode == 2 and "nothing to resume" in " ".join(again.stderr.split())
    finally:
        ready.unlink(missing_ok=True)
