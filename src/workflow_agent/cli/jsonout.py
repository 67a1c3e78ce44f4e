"""Results for programs: JSON on stdout.

Apart from ``output`` (Rich, for people) so that a ``--output json`` run never imports
Rich: about 22 ms before the first host is contacted.
"""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from workflow_agent.integrations.registry import Integration
    from workflow_agent.state import WorkflowState


def emit_json(data: Any) -> None:
    """Print ``data`` as JSON on stdout (for scripts and CI)."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def state_json(state: WorkflowState, *, include_scripts: bool = False) -> dict[str, Any]:
    """The machine-readable result of a workflow."""
    data = state.model_dump(mode="json", exclude={"scripts", "facts"})
    data["exit_code"] = state.exit_code
    if state.facts is not None:
        data["facts"] = state.facts.summary()
    if include_scripts:
        data["scripts"] = {a: s.model_dump(mode="json") for a, s in state.scripts.items()}
    return data


def integration_json(item: Integration) -> dict[str, Any]:
    """One integration, machine-readable."""
    return {"source": item.source, "root": str(item.root),
            **item.definition.model_dump(mode="json")}
