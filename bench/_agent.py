"""Running workflow-agent for the benchmarks, and reading where its time went.

Each benchmark uses its own WORKFLOW_AGENT_DATA_DIR and WORKFLOW_AGENT_CACHE_DIR (in a
temporary directory), so its workflows never land in the user's history.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import sys
import tempfile
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from _timing import BenchError, Command, run

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
VENV_BIN = Path(sys.executable).parent
WORKFLOW_AGENT = str(VENV_BIN / "workflow-agent")
NODE_EXPORTER = "prometheus-node-exporter"
#: Bytecode of the editable source is cached here, not beside the sources (see README).
PYCACHE = Path(tempfile.gettempdir()) / "workflow-agent-bench-pycache"


@contextmanager
def agent_env() -> Iterator[dict[str, str]]:
    """This process's environment, with throw-away data and cache directories."""
    root = Path(tempfile.mkdtemp(prefix="workflow-agent-bench-"))
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(PYCACHE)
    env["WORKFLOW_AGENT_DATA_DIR"] = str(root / "data")
    env["WORKFLOW_AGENT_CACHE_DIR"] = str(root / "cache")
    env.pop("WORKFLOW_AGENT_HISTORY_URL", None)
    try:
        yield env
    finally:
        shutil.rmtree(root, ignore_errors=True)


def agent(*args: str) -> list[str]:
    """The workflow-agent command line with ``args``."""
    return [WORKFLOW_AGENT, *args]


def workflow_ids(env: dict[str, str], action: str, limit: int) -> list[str]:
    """Ids of the newest ``limit`` workflows of ``action`` in this data directory."""
    _, result = run(agent("history", "--limit", "1000", "-o", "json"), env=env)
    rows = [r for r in json.loads(result.stdout) if r["action"] == action]
    return [r["id"] for r in rows[:limit]]


def stage_durations(env: dict[str, str], ids: Sequence[str]) -> dict[str, list[float]]:
    """Per stage name, its durations (s) across the workflows ``ids``, in stage order."""
    stages: dict[str, list[float]] = {}
    for workflow_id in ids:
        _, result = run(agent("show", workflow_id, "-o", "json"), env=env)
        for stage in json.loads(result.stdout)["stages"]:
            stages.setdefault(stage["name"], []).append(float(stage["duration"] or 0.0))
    return stages


def stages_total(stages: dict[str, list[float]]) -> float:
    """Median over the workflows of the sum of their stages."""
    return float(statistics.median(sum(r) for r in zip(*stages.values(), strict=False)))


def print_stages(title: str, stages: dict[str, list[float]], wall: float | None = None) -> None:
    """Median, min and max per stage, their median sum, and what the whole process (median
    ``wall``) spent outside the stages."""
    print(f"\n{title}")
    print(f"{'stage':<20}  {'median':>8}  {'min':>8}  {'max':>8}")
    for name, values in stages.items():
        print(f"{name:<20}  {statistics.median(values):8.3f}  {min(values):8.3f}  "
              f"{max(values):8.3f}")
    total = stages_total(stages)
    print(f"{'all stages':<20}  {total:8.3f}")
    if wall is not None:
        print(f"{'outside the stages':<20}  {wall - total:8.3f}  (whole process {wall:.3f})")


_IMPORT_LINE = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|\s+(\S+)$")


def import_times(cmd: Command, env: dict[str, str]) -> dict[str, float]:
    """Seconds of import per top-level package (summed self times of ``-X importtime``)."""
    _, result = run([sys.executable, "-X", "importtime", *cmd], env=env)
    per_package: dict[str, float] = defaultdict(float)
    for line in result.stderr.splitlines():
        found = _IMPORT_LINE.match(line)
        if found:
            per_package[found.group(3).split(".")[0]] += int(found.group(1)) / 1e6
    if not per_package:
        raise BenchError("python -X importtime printed no import times")
    return dict(per_package)


def print_import_times(title: str, per_package: dict[str, float], top: int = 12) -> None:
    """The ``top`` slowest top-level packages, the rest summed, and the total."""
    ranked = sorted(per_package.items(), key=lambda item: item[1], reverse=True)
    print(f"\n{title}")
    print(f"{'package':<28}  {'import':>8}")
    for name, seconds in ranked[:top]:
        print(f"{name:<28}  {seconds:8.3f}")
    rest = sum(seconds for _, seconds in ranked[top:])
    print(f"{f'{len(ranked) - top} others':<28}  {rest:8.3f}")
    print(f"{'all imports':<28}  {sum(per_package.values()):8.3f}")
