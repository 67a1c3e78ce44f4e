"""Failure learning on real failures: rules on real apt/dpkg/socket output from a sandbox,
the learning loop (a held dpkg lock recognised, then waited for), and the LLM summary."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from workflow_agent.agent import WorkflowAgent
from workflow_agent.agents.coordinator import WorkflowRequest
from workflow_agent.agents.execution import summarize
from workflow_agent.agents.improvement import (
    ANALYSE,
    FIXES,
    AnalyseRequest,
    FixesRequest,
    FixPlan,
    ImprovementAgent,
)
from workflow_agent.bus.memory import MemoryBus
from workflow_agent.config import WorkflowConfiguration
from workflow_agent.container import Container
from workflow_agent.execution.pool import TargetPool
from workflow_agent.execution.sandbox import SandboxTarget
from workflow_agent.llm.scripted import ScriptedProvider
from workflow_agent.llm.service import LLMService
from workflow_agent.recovery.failures import (
    APT_UPDATE_FIRST,
    CHOOSE_FREE_PORT,
    WAIT_DPKG_LOCK,
    FailureText,
    match,
)
from workflow_agent.secrets import Redactor
from workflow_agent.state import WorkflowState
from workflow_agent.storage.history import HistoryStore
from workflow_agent.storage.spool import HistorySpool

NODE = "prometheus-node-exporter"

#: Holds dpkg's frontend lock the way apt does, with fcntl (a flock(2) lock would not
#: stop apt): a real process in the sandbox, for ``seconds``. x86-64 ``struct flock``.
HOLD_LOCK = (
    "perl -e 'use Fcntl; open(my $f, \">>\", \"/var/lib/dpkg/lock-frontend\") or die; "
    "my $l = pack(\"ssx4qqix4\", F_WRLCK, 0, 0, 0, 0); "
    "fcntl($f, F_SETLKW, $l) or die \"lock: $!\"; "
    "sleep {seconds}' >/dev/null 2>&1 &\n"
    "sleep 0.5; grep -q POSIX /proc/locks\n"
)


def sh(target: SandboxTarget, script: str, timeout: float = 180) -> tuple[int, str]:
    result = asyncio.run(target.run(script, timeout=timeout))
    return result.exit_code, result.stdout + result.stderr


def failed(target: SandboxTarget, script: str) -> FailureText:
    """Run ``script`` (it must fail) and describe it as the coordinator does."""
    result = asyncio.run(target.run(script, timeout=180))
    assert not result.ok, result.stdout + result.stderr
    summary = summarize(result, Redactor())
    return FailureText(stage="execute", exit_code=summary.exit_code,
                       failed_command=summary.failed_command, output_tail=summary.output_tail)


def hold_lock(target: SandboxTarget, seconds: int) -> None:
    code, out = sh(target, HOLD_LOCK.format(seconds=seconds))
    assert code == 0, out


def release_lock(target: SandboxTarget) -> None:
    # No procps in the minimal root: find the holder through /proc.
    code, out = sh(target, 'for p in /proc/[0-9]*; do\n'
                   '  [ "$(cat "$p/comm" 2>/dev/null)" = perl ] && kill "${p#/proc/}"\n'
                   'done\nsleep 0.3\n! grep -q POSIX /proc/locks\n')
    assert code == 0, out


# -- rules on real output --------------------------------------------------------------


def test_real_apt_failures_get_their_signatures(sandbox: SandboxTarget) -> None:
    hold_lock(sandbox, 60)
    locked = match(failed(sandbox, "apt-get install -y --no-install-recommends jq"))
    assert (locked.kind, locked.fix) == ("dpkg-lock", WAIT_DPKG_LOCK)
    assert "<pid>" in locked.evidence  # the holder's pid is volatile: not in the key
    release_lock(sandbox)

    missing = match(failed(sandbox, "apt-get install -y wfa-no-such-package"))
    assert (missing.kind, missing.subject, missing.fix) == (
        "package-not-found", "wfa-no-such-package", APT_UPDATE_FIRST)

    # A source nobody answers on: its lists fail to download, so its package is missing;
    # the unreachable repository is the cause, not the missing package.
    unreachable = match(failed(sandbox, (
        "echo 'deb http://127.0.0.1:9/debian bookworm main' > /etc/apt/sources.list\n"
        "apt-get update; apt-get install -y wfa-no-such-package")))
    assert unreachable.kind == "repo-unreachable" and unreachable.fix is None
    assert "Connection refused" in unreachable.evidence or "127.0.0.1:9" in str(
        unreachable.subject)
    unresolved = match(failed(sandbox, (
        "echo 'deb http://wfa-no-such-host.invalid/debian bookworm main' "
        "> /etc/apt/sources.list\napt-get update; apt-get install -y wfa-no-such-package")))
    assert (unresolved.kind, unresolved.subject) == ("repo-unreachable",
                                                     "wfa-no-such-host.invalid")

    unsigned = match(failed(sandbox, (
        ": > /tmp/empty.gpg\necho 'deb [signed-by=/tmp/empty.gpg] "
        "http://deb.debian.org/debian bookworm main' > /etc/apt/sources.list\n"
        "apt-get update; apt-get install -y wfa-no-such-package")))
    assert unsigned.kind == "gpg-key-missing" and unsigned.subject


def test_a_port_taken_by_a_real_listener(sandbox: SandboxTarget) -> None:
    # The sandbox shares this host's network: a listener here takes the port there too.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        signature = match(failed(sandbox, (
            f"perl -MIO::Socket::INET -e 'IO::Socket::INET->new(LocalAddr => \"127.0.0.1\", "
            f"LocalPort => {port}, Listen => 1) or die \"listen on port {port}: $@\\n\"'")))
    assert (signature.kind, signature.subject, signature.fix) == (
        "port-in-use", str(port), CHOOSE_FREE_PORT)


def test_systemctl_without_systemd_as_init(systemd_rootfs: Path) -> None:
    # The systemd root file system, but not booted: systemctl sees it is not PID 1's
    # root, does nothing and says so (exit 0); the daemon then is not there.
    target = SandboxTarget(systemd_rootfs)
    asyncio.run(target.open())
    try:
        signature = match(failed(target, "systemctl restart cron\ntest -e /run/crond.pid\n"))
    finally:
        asyncio.run(target.close())
    assert signature.kind == "no-systemd" and signature.fix is None
    assert "Running in chroot, ignoring command 'restart'" in signature.evidence


def test_generic_signature_ignores_temp_paths_pids_and_times(sandbox: SandboxTarget) -> None:
    script = ('f=$(mktemp)\necho "$(date -Is) [$$] cannot read $f.conf at $(date +%T)" >&2\n'
              "exit 3\n")
    first, second = (match(failed(sandbox, script)) for _ in range(2))
    assert first.kind == "generic" and first.fix is None
    assert first.key == second.key
    assert "<tmp>" in first.key and "<time>" in first.key and "exit 3" in first.key


# -- the learning loop -------------------------------------------------------------------


def make_agent(tmp_path: Path, llm: LLMService | None = None, **settings: object
               ) -> WorkflowAgent:
    config = WorkflowConfiguration(
        data_dir=tmp_path / "data", cache_dir=tmp_path / "cache", **settings  # type: ignore[arg-type]
    )
    return WorkflowAgent(Container(config, llm=llm))


def install(agent: WorkflowAgent, target: SandboxTarget, integration: str = NODE,
            environ: dict[str, str] | None = None, **params: str) -> WorkflowState:
    request = WorkflowRequest(action="install", integration=integration, target="sandbox",
                              params=params, target_object=target, environ=environ or {})
    return asyncio.run(agent.run(request))


def cli(data: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "WORKFLOW_AGENT_DATA_DIR": str(data)}
    return subprocess.run([sys.executable, "-m", "workflow_agent", *args], env=env,
                          capture_output=True, text=True, timeout=60, check=False)


def test_a_held_dpkg_lock_is_learned_then_waited_for(
    tmp_path: Path, sandbox: SandboxTarget
) -> None:
    # Without a rehearsal, so that the lock is still held when the real run starts (a
    # rehearsal's copy-on-write copy gets its own lock file, and takes its own time).
    agent = make_agent(tmp_path, rehearse=False)
    hold_lock(sandbox, 600)
    first = install(agent, sandbox, listen_port="19131")
    assert first.status == "failed", first.notes
    assert any("recognised as dpkg-lock" in note for note in first.notes), first.notes
    learned = agent.container.history.list_failures(integration=NODE)
    assert [(f.signature, f.fix, f.proven) for f in learned] == [
        ("dpkg-lock", WAIT_DPKG_LOCK, False)]
    assert learned[0].last_workflow_id == first.workflow_id

    # Still held when the next run starts, released a while later (as when an automatic
    # upgrade finishes): the run applies the learned fix, waits, and succeeds.
    release_lock(sandbox)
    hold_lock(sandbox, 12)
    second = install(agent, sandbox, listen_port="19131")
    assert second.status == "succeeded", (second.error, second.notes)
    assert [(f.fix, f.learned_from) for f in second.fixes] == [
        (WAIT_DPKG_LOCK, first.workflow_id)]
    names = [s.name for s in second.stages]
    assert names.index("strategy") < names.index("known-fixes") < names.index("generate")
    script = second.scripts["install"].text
    assert f"workflow-agent fix {WAIT_DPKG_LOCK}" in script
    assert second.validation["install"].errors == []  # the fixed script passed validation
    record = agent.container.history.get_workflow(second.workflow_id)
    output = next(a.content for a in record.artifacts if (a.kind, a.name) == (
        "output", "install"))
    assert "waiting for /var/lib/dpkg/lock-frontend" in output
    waited = int(output.split("workflow-agent: waited ")[1].split()[0])
    assert 3 <= waited <= 12

    learned = agent.container.history.list_failures(integration=NODE)
    assert [(f.signature, f.count, f.fix_applied, f.fix_succeeded, f.proven_by) for f in
            learned] == [("dpkg-lock", 1, 1, 1, second.workflow_id)]
    listed = json.loads(cli(tmp_path / "data", "failures", "-o", "json").stdout)
    assert [(r["signature"], r["integration"], r["fix"], r["proven"]) for r in listed] == [
        ("dpkg-lock", NODE, WAIT_DPKG_LOCK, True)]
    text = cli(tmp_path / "data", "failures").stdout
    assert "dpkg-lock" in text and "yes" in text


# -- the LLM's root-cause summary ----------------------------------------------------------


def secret_plugin(tmp_path: Path) -> Path:
    folder = tmp_path / "plugins" / "tokened"
    (folder / "templates").mkdir(parents=True)
    (folder / "templates" / "install.sh.j2").write_text(
        'echo "connecting with token $WFA_TOKEN"\nls /opt/wfa-missing-dir\n')
    (folder / "definition.yaml").write_text(yaml.safe_dump({
        "name": "tokened", "version": "1", "description": "test integration",
        "parameters": {"token": {"type": "string", "secret": True, "env": "WFA_TOKEN",
                                 "required": True}},
        "platforms": [{"os_family": "debian"}],
        "methods": [{"name": "script", "templates": {"install": "install.sh.j2"}}],
        "uninstall": {"watch": ["/opt"]},
    }))
    return tmp_path / "plugins"


def test_the_llm_summarises_from_the_output_tail_without_secrets(
    tmp_path: Path, sandbox: SandboxTarget
) -> None:
    model = ScriptedProvider([json.dumps({
        "summary": "The script lists /opt/wfa-missing-dir, which nothing created.",
        "kind": "other", "confidence": "high"})])
    redactor = Redactor()
    agent = make_agent(tmp_path, LLMService(model, redactor=redactor),
                       plugin_dirs=[secret_plugin(tmp_path)], rehearse=False)
    state = install(agent, sandbox, integration="tokened",
                    environ={"WFA_TOKEN": "s3cret-wfa-value"})
    assert state.status == "failed"
    assert len(model.calls) == 1
    prompt = "\n".join(m.content for m in model.calls[0].messages)
    assert "/opt/wfa-missing-dir" in prompt and "No such file or directory" in prompt
    assert "connecting with token" in prompt and "s3cret-wfa-value" not in prompt
    assert any("according to the LLM: The script lists" in n for n in state.notes)
    learned = agent.container.history.list_failures(integration="tokened")
    assert len(learned) == 1 and learned[0].kind == "generic"
    assert learned[0].llm_summary and "wfa-missing-dir" in learned[0].llm_summary
    assert "s3cret" not in learned[0].evidence + learned[0].summary


# -- storage -----------------------------------------------------------------------------------


def test_spooled_failures_and_outcomes_reach_the_store(tmp_path: Path) -> None:
    spool = HistorySpool(tmp_path / "spool", Redactor())
    spool.start_workflow(workflow_id="w1", action="install", integration="x", target="t",
                         params={})
    for _ in range(2):
        spool.record_failure(workflow_id="w1", integration="x", stage="execute",
                             signature="dpkg-lock", kind="dpkg-lock", summary="locked",
                             evidence="E: Could not get lock", fix=WAIT_DPKG_LOCK)
    spool.record_fix_outcome(workflow_id="w1", integration="x", signature="dpkg-lock",
                             succeeded=False)
    spool.record_fix_outcome(workflow_id="w1", integration="x", signature="dpkg-lock",
                             succeeded=True)
    spool.finish_workflow("w1", status="succeeded")
    with HistoryStore.for_path(tmp_path / "h.db", spool_dir=tmp_path / "spool") as store:
        [entry] = store.list_failures()
    assert (entry.count, entry.fix_applied, entry.fix_succeeded, entry.proven_by,
            entry.fix_last_result) == (2, 2, 1, "w1", "succeeded")
    assert not list((tmp_path / "spool").glob("*.jsonl"))



# -- when installs look up what was learned ---------------------------------------------------

LOCKED = FailureText(stage="execute", exit_code=100, output_tail=(
    "E: Could not get lock /var/lib/dpkg/lock-frontend. It is held by process 4242 "
    "(apt-get)"))
NO_FIX = FailureText(stage="execute", exit_code=2, output_tail="ls: cannot access "
                     "'/opt/wfa-missing-dir': No such file or directory")


class Looked:
    """The history store a test's improvement agent opens, and how often it read the
    learned failures."""

    def __init__(self, tmp_path: Path) -> None:
        self.path, self.spool = tmp_path / "h.db", tmp_path / "spool"
        self.store: HistoryStore | None = None
        self.reads = 0

    def __call__(self) -> HistoryStore:
        if self.store is None:
            self.store = HistoryStore.for_path(self.path, spool_dir=self.spool)
            self.store.open()
            read = self.store.list_failures

            def counted(**kwargs: Any) -> Any:
                self.reads += 1
                return read(**kwargs)

            self.store.list_failures = counted  # type: ignore[method-assign]
        return self.store


def no_target(spec: str) -> Any:
    raise AssertionError(f"no target is needed here, yet {spec} was opened")


def improvement(tmp_path: Path, looked: Looked) -> tuple[MemoryBus, HistorySpool]:
    bus, spool = MemoryBus(), HistorySpool(looked.spool, Redactor())
    ImprovementAgent(TargetPool(no_target), spool, looked,
                     learned=tmp_path / "learned").attach(bus)
    return bus, spool


def learn(agent: tuple[MemoryBus, HistorySpool], integration: str, failure: FailureText
          ) -> None:
    """A failed install of ``integration`` is analysed."""
    bus, spool = agent
    workflow = f"w-{integration}-{failure.exit_code}"
    spool.start_workflow(workflow_id=workflow, action="install", integration=integration,
                         target="t", params={})

    async def go() -> None:
        await bus.request(ANALYSE, AnalyseRequest(workflow, integration, failure), timeout=30)
    asyncio.run(go())


def fixes_of(agent: tuple[MemoryBus, HistorySpool], integration: str, hosts: int = 1
             ) -> list[list[str]]:
    """What ``hosts`` installs of ``integration`` asking at once are told to apply."""
    bus = agent[0]

    async def go() -> list[FixPlan]:
        return list(await asyncio.gather(*(bus.request(FIXES, FixesRequest(
            f"w{i}", integration, {}, {}, frozenset(), "apt"), timeout=30)
            for i in range(hosts))))
    return [[f.fix for f in plan.applied] for plan in asyncio.run(go())]


def test_only_a_learned_fix_makes_installs_of_its_integration_look(tmp_path: Path) -> None:
    looked = Looked(tmp_path)
    agent = improvement(tmp_path, looked)
    learn(agent, "alpha", NO_FIX)  # nothing a next run could do differently
    assert fixes_of(agent, "alpha") == [[]]
    assert looked.store is None, "the history store was opened for a failure with no fix"

    learn(agent, "alpha", LOCKED)
    assert (tmp_path / "learned" / "alpha").exists()
    assert fixes_of(agent, "beta", hosts=30) == [[]] * 30
    assert looked.store is None, "another integration's fix opened the history store"
    # A fleet's 30 hosts asking at once share one read, and each gets the fix.
    assert fixes_of(agent, "alpha", hosts=30) == [[WAIT_DPKG_LOCK]] * 30
    assert looked.reads == 1


def test_the_marker_of_earlier_releases_becomes_one_per_integration(tmp_path: Path) -> None:
    looked = Looked(tmp_path)
    spool = HistorySpool(looked.spool, Redactor())
    spool.start_workflow(workflow_id="w0", action="install", integration="gamma",
                         target="t", params={})
    spool.record_failure(workflow_id="w0", integration="gamma", stage="execute",
                         signature="dpkg-lock", kind="dpkg-lock", summary="locked",
                         evidence="E: Could not get lock", fix=WAIT_DPKG_LOCK)
    spool.record_failure(workflow_id="w0", integration="delta", stage="execute",
                         signature="generic", kind="generic", summary="failed",
                         evidence="exit 2")
    (tmp_path / "failures.learned").touch()  # earlier releases' "learned some failure"
    agent = improvement(tmp_path, looked)

    assert fixes_of(agent, "delta") == [[]]  # looked, once
    assert not (tmp_path / "failures.learned").exists()
    assert sorted(p.name for p in (tmp_path / "learned").iterdir()) == ["gamma"]
    assert fixes_of(agent, "gamma") == [[WAIT_DPKG_LOCK]]
    assert fixes_of(agent, "delta") == [[]]
    assert looked.reads == 2  # gamma's own look-up; delta's second answer needed none
