"""Run every benchmark in one go (``make bench``).

rerun and first_install install and uninstall prometheus-node-exporter on THIS host (and
restore its starting state); --no-host-changes skips them. journal installs only in
sandboxes (root, the cached Debian root and the Debian archive needed); fleet runs in a
lab of SSH hosts in namespaces (root, socat; pyinfra and ansible-core installed).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from datetime import UTC, datetime

import cli_help
import first_install
import journal
import knowledge_base
import plan_local
import rerun
from _timing import BenchError, runs_default

# bench/fleet.py; ruff sorts it apart because tests/fleet/ exists too.
import fleet

BENCHMARKS = (cli_help, plan_local, rerun, first_install, journal, knowledge_base, fleet)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", "-n", type=int, default=None,
                        help="timed runs for every benchmark (default: $BENCH_RUNS, else each "
                        "benchmark's own)")
    parser.add_argument("--no-host-changes", action="store_true",
                        help="skip the benchmarks that install the exporter on this host")
    args = parser.parse_args()
    print(f"workflow-agent benchmarks, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, "
          f"{platform.node()}, {platform.platform()}, Python {platform.python_version()}")
    failed: list[str] = []
    for module in BENCHMARKS:
        name = module.__name__
        if args.no_host_changes and module.CHANGES_HOST:
            print(f"\n=== {name}: skipped (--no-host-changes)")
            continue
        runs = args.runs or runs_default(module.DEFAULT_RUNS)
        print(f"\n=== {name} ({runs} runs)", flush=True)
        started = time.perf_counter()
        try:
            module.main(runs)
        except BenchError as exc:
            failed.append(name)
            print(f"=== {name} FAILED: {exc}", flush=True)
            continue
        print(f"=== {name} took {time.perf_counter() - started:.0f} s", flush=True)
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
