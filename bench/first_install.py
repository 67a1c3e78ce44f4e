"""The first real install of prometheus-node-exporter on this host, and its uninstall, with
the package already downloaded (in apt's cache), as whole processes:

workflow-agent install / uninstall --target local --yes, against the bash equivalent
(baselines/node_exporter_install.sh and node_exporter_uninstall.sh). The two take turns,
and every install starts from the same clean state (no package, user, group or dirs).
Then workflow-agent's stages. Purges the exporter if it is there, and restores the host.
"""

from __future__ import annotations

from _agent import NODE_EXPORTER, agent, agent_env, print_stages, stage_durations, workflow_ids
from _host import INSTALL_SH, UNINSTALL_SH, HostState, announce, purge, restore
from _timing import BenchError, Command, Series, parse_args, print_table, run, timed

RATIO = 1.2  # target: workflow-agent within 1.2x of bash
LOCAL = ("--target", "local", "--yes")
DEFAULT_RUNS = 3
CHANGES_HOST = True


def make_clean(after: str) -> None:
    """Purge whatever of the exporter is still here; say so if ``after`` left it."""
    state = HostState.now()
    if state.clean:
        return
    print(f"note: after {after}: {state.describe()}; purging before the next install")
    purge()
    if not HostState.now().clean:
        raise BenchError(f"cannot get back to a clean state: {HostState.now().describe()}")


def compare(agent_series: Series, bash_series: Series) -> None:
    ratio = agent_series.median / bash_series.median
    verdict = "ok" if ratio <= RATIO else "OVER"
    agent_series.note = f"{ratio:.2f}x bash; target <= {RATIO}x: {verdict}"


def main(runs: int) -> None:
    start = HostState.now()
    announce(f"installs and uninstalls {NODE_EXPORTER} on the local host {2 * runs} times "
             "(apt-get install, purge)", start)
    agent_install, agent_uninstall = Series("workflow-agent install"), Series(
        "workflow-agent uninstall")
    bash_install = Series("bash install", note="baseline here: 4.55 s")
    bash_uninstall = Series("bash uninstall", note="baseline here: 3.28 s")
    try:
        with agent_env() as env:
            make_clean("the start")
            run(["apt-get", "install", "--download-only", "-y", "-qq",
                 "--no-install-recommends", NODE_EXPORTER])
            run(agent("plan", NODE_EXPORTER, "--target", "local"), env=env)  # warms caches
            turns: list[tuple[str, Series, Command, Series, Command]] = [
                ("workflow-agent", agent_install, agent("install", NODE_EXPORTER, *LOCAL),
                 agent_uninstall, agent("uninstall", NODE_EXPORTER, *LOCAL)),
                ("bash", bash_install, ["bash", INSTALL_SH], bash_uninstall,
                 ["bash", UNINSTALL_SH]),
            ]
            for round_ in range(runs):
                for name, install_series, install, uninstall_series, uninstall in (
                        turns if round_ % 2 == 0 else turns[::-1]):
                    timed(install_series, install, env=env)
                    timed(uninstall_series, uninstall, env=env)
                    make_clean(f"{name} uninstall")
            compare(agent_install, bash_install)
            compare(agent_uninstall, bash_uninstall)
            print_table(
                f"first_install: from a clean host, package in apt's cache, whole process, "
                f"{runs} rounds taking turns",
                [agent_install, bash_install, agent_uninstall, bash_uninstall,
                 Series("pyinfra", note="not run; baseline here: 5.39 s / 3.84 s"),
                 Series("ansible", note="not run; baseline here: 10.9 s / 6.4 s")])
            for action, series in (("install", agent_install), ("uninstall", agent_uninstall)):
                stages = stage_durations(env, workflow_ids(env, action, runs))
                print_stages(f"workflow-agent {action}: stages (workflow-agent show ID -o json, "
                             "s)", stages, wall=series.median)
    finally:
        restore(start)


if __name__ == "__main__":
    main(parse_args(__doc__ or "", DEFAULT_RUNS).runs)
