"""Timing helpers shared by the benchmarks: whole-process wall time, peak RSS, tables.

Every number is the wall time of a whole process: ``time.perf_counter`` around
``subprocess.run``. Peak memory is ``/usr/bin/time -v``'s "Maximum resident set size".
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

Command = Sequence[str]


class BenchError(RuntimeError):
    """A benchmarked command failed: its numbers would mean nothing."""


@dataclass
class Series:
    """Samples of one measured thing, with an optional target or reference to compare."""

    label: str
    unit: str = "s"
    #: Upper bound the median should stay under (printed as ok / OVER).
    target: float | None = None
    #: Free text for the last column, e.g. a baseline measured elsewhere.
    note: str = ""
    samples: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    def verdict(self) -> str:
        if self.target is None or not self.samples:
            return self.note
        mark = "ok" if self.median <= self.target else "OVER"
        return f"target < {self.target:.2f} {self.unit}: {mark} {self.note}".rstrip()


def runs_default(default_runs: int) -> int:
    """The BENCH_RUNS environment variable if set, else ``default_runs``."""
    return int(os.environ.get("BENCH_RUNS", default_runs))


def parse_args(description: str, default_runs: int) -> argparse.Namespace:
    """``--runs N`` (default: $BENCH_RUNS, else ``default_runs``)."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--runs", "-n", type=int, default=runs_default(default_runs),
        help=f"timed runs per command (default: $BENCH_RUNS, else {default_runs})",
    )
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    return args


def run(
    cmd: Command, *, env: Mapping[str, str] | None = None, check: bool = True
) -> tuple[float, subprocess.CompletedProcess[str]]:
    """Run ``cmd`` to completion; return its wall time in seconds and its result."""
    start = time.perf_counter()
    result = subprocess.run(
        list(cmd), env=dict(env) if env is not None else None,
        stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False,
    )
    elapsed = time.perf_counter() - start
    if check and result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-15:]
        raise BenchError(f"{' '.join(cmd)} exited {result.returncode}:\n" + "\n".join(tail))
    return elapsed, result


def sample(
    series: Series, cmd: Command, *, runs: int, warmup: int = 1,
    env: Mapping[str, str] | None = None,
) -> Series:
    """Add ``runs`` wall times of ``cmd`` to ``series``, after ``warmup`` untimed runs."""
    return interleave([(series, cmd)], runs=runs, warmup=warmup, env=env)[0]


def interleave(
    pairs: Sequence[tuple[Series, Command]], *, runs: int, warmup: int = 1,
    env: Mapping[str, str] | None = None,
) -> list[Series]:
    """Time each command ``runs`` times, taking turns so that drift in the machine's load
    spreads over all of them; ``warmup`` untimed rounds first."""
    for round_ in range(warmup + runs):
        for series, cmd in pairs:
            if round_ < warmup:
                run(cmd, env=env)
            else:
                timed(series, cmd, env=env)
    return [series for series, _ in pairs]


def timed(
    series: Series, cmd: Command, *, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` once, adding its wall time to ``series``."""
    elapsed, result = run(cmd, env=env)
    series.samples.append(elapsed)
    return result


_MAX_RSS = re.compile(r"Maximum resident set size \(kbytes\): (\d+)")


def peak_rss_mib(cmd: Command, *, env: Mapping[str, str] | None = None) -> float:
    """Peak resident set size of ``cmd`` (and its waited-for children) in MiB."""
    _, result = run(["/usr/bin/time", "-v", *cmd], env=env)
    found = _MAX_RSS.search(result.stderr)
    if found is None:
        raise BenchError("/usr/bin/time -v printed no 'Maximum resident set size'")
    return int(found.group(1)) / 1024


def print_table(title: str, series: Sequence[Series]) -> None:
    """One row per series: median, min and max over its samples, then its verdict."""
    width = max([len("what"), *(len(s.label) for s in series)])
    print(f"\n{title}")
    print(f"{'what':<{width}}  {'median':>9}  {'min':>9}  {'max':>9}  {'n':>3}  vs")
    for s in series:
        if not s.samples:
            print(f"{s.label:<{width}}  {'-':>9}  {'-':>9}  {'-':>9}  {0:>3}  {s.note}")
            continue
        cells = [f"{v:.3f} {s.unit}" if s.unit == "s" else f"{v:.1f} {s.unit}"
                 for v in (s.median, min(s.samples), max(s.samples))]
        print(f"{s.label:<{width}}  {cells[0]:>9}  {cells[1]:>9}  {cells[2]:>9}  "
              f"{len(s.samples):>3}  {s.verdict()}")
