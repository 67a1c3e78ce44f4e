"""Wall time and peak RSS of ``workflow-agent plan prometheus-node-exporter --target local``.

Planning only reads the host (facts, rendering, validation); it changes nothing on it, but
records the plan in a throw-away history.
"""

from __future__ import annotations

from _agent import NODE_EXPORTER, agent, agent_env
from _timing import Series, parse_args, peak_rss_mib, print_table, sample

DEFAULT_RUNS = 10
CHANGES_HOST = False


def main(runs: int) -> None:
    cmd = agent("plan", NODE_EXPORTER, "--target", "local", "-o", "json")
    with agent_env() as env:
        wall = sample(Series("wall time"), cmd, runs=runs, env=env)
        rss = Series("peak RSS", unit="MiB", note="/usr/bin/time -v")
        rss.samples = [peak_rss_mib(cmd, env=env) for _ in range(runs)]
    print_table(f"plan_local: workflow-agent plan {NODE_EXPORTER} --target local -o json, "
                f"{runs} runs after 1 warm-up", [wall, rss])


if __name__ == "__main__":
    main(parse_args(__doc__ or "", DEFAULT_RUNS).runs)
