"""The idempotent re-run on this host: prometheus-node-exporter is already installed and
running, and the same install job runs again, three ways, as whole processes:

(a) ``workflow-agent install prometheus-node-exporter --target local --yes``
(b) a hand-written bash script (baselines/node_exporter_install.sh)
(c) pyinfra on @local (baselines/node_exporter_deploy.py), if pyinfra is installed

Then where workflow-agent's time goes: imports per top-level package and its stages.
Sets the exporter up first if it is not installed and running, and restores the host.
"""

from __future__ import annotations

from _agent import (
    BENCH,
    NODE_EXPORTER,
    VENV_BIN,
    agent,
    agent_env,
    import_times,
    print_import_times,
    print_stages,
    stage_durations,
    stages_total,
    workflow_ids,
)
from _host import (
    INSTALL_SH,
    HostState,
    announce,
    daemon_pid,
    ensure_running_install,
    restore,
)
from _timing import Command, Series, interleave, parse_args, print_table

TARGET = 0.35  # workflow-agent's target for this job, whole process
INSTALL = ("install", NODE_EXPORTER, "--target", "local", "--yes")
PYINFRA = VENV_BIN / "pyinfra"
DEPLOY = BENCH / "baselines" / "node_exporter_deploy.py"
DEFAULT_RUNS = 10
CHANGES_HOST = True


def main(runs: int) -> None:
    start = HostState.now()
    announce(f"re-runs the install of {NODE_EXPORTER} on the local host (installs and starts "
             "it first if it is not running)", start)
    try:
        with agent_env() as env:
            ensure_running_install()
            pid = daemon_pid()
            workflow_agent = Series("(a) workflow-agent install", target=TARGET)
            bash = Series("(b) bash", note="baseline here: 0.04 s")
            pairs: list[tuple[Series, Command]] = [
                (workflow_agent, agent(*INSTALL)), (bash, ["bash", INSTALL_SH])]
            pyinfra = Series("(c) pyinfra @local", note="baseline here: 0.7 s")
            if PYINFRA.exists():
                pairs.append((pyinfra, [str(PYINFRA), "@local", str(DEPLOY), "-y"]))
            else:
                pyinfra.note = f"skipped: {PYINFRA} missing (pip install pyinfra)"
            interleave(pairs, runs=runs, env=env)
            if daemon_pid() != pid:
                print(f"WARNING: the daemon was restarted (pid {pid} -> {daemon_pid()}): "
                      "a re-run should change nothing")
            series = [workflow_agent, bash, pyinfra,
                      Series("(d) ansible-playbook", note="not run; baseline here: 5.5 s")]
            print_table(f"rerun: install when already installed, whole process, {runs} runs "
                        "each, taking turns, after 1 warm-up round", series)

            imports = import_times(["-m", "workflow_agent", *INSTALL], env)
            print_import_times("where workflow-agent's time goes: imports per top-level "
                               "package (python -X importtime, self times summed, s)", imports)
            stages = stage_durations(env, workflow_ids(env, "install", runs))
            print_stages("workflow-agent's stages (workflow-agent show ID -o json, s)", stages)
            breakdown(workflow_agent.median, sum(imports.values()), stages)
    finally:
        restore(start)


def breakdown(wall: float, imports: float, stages: dict[str, list[float]]) -> None:
    """Whole-process wall time split into imports, stages and the rest."""
    stage_total = stages_total(stages)
    rest = wall - imports - stage_total
    print("\nworkflow-agent install, whole process (median), roughly:")
    print(f"  {'imports (-X importtime inflates them a little)':<56} {imports:6.3f} s")
    print(f"  {'workflow stages':<56} {stage_total:6.3f} s")
    print(f"  {'the rest: interpreter, CLI, services, history, output':<56} {rest:6.3f} s")
    print(f"  {'whole process':<56} {wall:6.3f} s")


if __name__ == "__main__":
    main(parse_args(__doc__ or "", DEFAULT_RUNS).runs)
