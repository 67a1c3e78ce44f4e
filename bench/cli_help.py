"""Wall time of ``workflow-agent --help`` (target: under 0.3 s)."""

from __future__ import annotations

from _agent import agent, agent_env
from _timing import Series, parse_args, print_table, sample

TARGET = 0.3
DEFAULT_RUNS = 20
CHANGES_HOST = False


def main(runs: int) -> None:
    with agent_env() as env:
        series = sample(Series("workflow-agent --help", target=TARGET),
                        agent("--help"), runs=runs, env=env)
    print_table(f"cli_help: whole-process wall time, {runs} runs after 1 warm-up", [series])


if __name__ == "__main__":
    main(parse_args(__doc__ or "", DEFAULT_RUNS).runs)
