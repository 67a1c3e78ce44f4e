"""Every error workflow-agent raises on purpose, in one tree.

    WorkflowAgentError                  root; ``hint`` says what to do about it
    ├── InvalidInputError               the request is wrong            (exit 2)
    │   ├── UnknownIntegrationError     no such integration; close names offered
    │   ├── ParameterError              missing / unknown / mistyped / pattern mismatch
    │   ├── UnsupportedPlatformError    no platform or method fits the target's facts
    │   ├── ConfigurationError          configuration file or setting is invalid
    │   └── RollbackRefusedError        undoing would overwrite later edits (--force)
    ├── DefinitionError                 an integration definition is invalid (file + field)
    ├── ValidationRefusedError          generated scripts failed validation   (exit 3)
    ├── TargetError                     the target cannot be used            (exit 6)
    │   ├── TargetUnreachableError      cannot connect / start the target
    │   ├── SandboxToolingMissingError  a host tool the sandbox needs is missing
    │   ├── TargetBusyError             another workflow is changing the target
    │   └── RecoveryNeededError         a crashed workflow left changes not undone
    ├── ExecutionFailedError            a script on the target failed / timed out (exit 4)
    ├── VerificationFailedError         the integration does not work after install (exit 5)
    ├── LeftoversError                  uninstall left things behind           (exit 5)
    ├── NotConfirmedError               the user declined (or could not be asked) (exit 7)
    ├── RollbackFailedError             changes could not all be undone        (exit 8)
    ├── HistoryError                    the history store cannot be read or written
    ├── LLMError                        an LLM call failed; its branch is drawn in llm/errors.py
    └── KnowledgeError                  documentation cannot be fetched, read or parsed, or
                                        the knowledge base cannot be used

Third-party errors are converted at the boundary (``raise ... from exc``). Only the CLI
turns these into messages for people; everything below it raises.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence


class WorkflowAgentError(Exception):
    """Root of every deliberate workflow-agent error.

    ``hint`` tells the user what to do; the CLI prints it under the message.
    """

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class InvalidInputError(WorkflowAgentError):
    """The request itself is wrong: nothing was changed on any target."""

    exit_code = 2


class UnknownIntegrationError(InvalidInputError):
    """The named integration is not in the registry."""

    def __init__(self, name: str, close: Sequence[str], available: Sequence[str]) -> None:
        if close:
            hint = "Did you mean: " + ", ".join(close) + "?"
        else:
            hint = "Available integrations: " + (", ".join(available) or "none")
        super().__init__(f"unknown integration {name!r}", hint=hint)
        self.name = name
        self.close = list(close)


class ParameterError(InvalidInputError):
    """A parameter is missing, unknown, of the wrong type or does not match its pattern."""

    def __init__(self, parameter: str, problem: str, *, hint: str | None = None) -> None:
        super().__init__(f"parameter {parameter!r}: {problem}", hint=hint)
        self.parameter = parameter


class UnsupportedPlatformError(InvalidInputError):
    """No supported platform or installation method matches the target's facts."""


class ConfigurationError(InvalidInputError):
    """The configuration (file, environment or flags) is invalid."""


class DefinitionError(WorkflowAgentError):
    """An integration definition failed to load; names the file and the field."""

    exit_code = 2

    def __init__(self, path: str, field: str, problem: str) -> None:
        super().__init__(
            f"{path}: {field}: {problem}",
            hint="Fix the integration definition; docs/writing-integrations.md "
            "describes every field.",
        )
        self.path = path
        self.field = field


class ValidationRefusedError(WorkflowAgentError):
    """Generated scripts have validation errors, so nothing was run."""

    exit_code = 3


class TargetError(WorkflowAgentError):
    """The target cannot be used."""

    exit_code = 6


class TargetUnreachableError(TargetError):
    """The target cannot be reached or started."""


class SandboxToolingMissingError(TargetError):
    """A host tool that the sandbox target needs is not installed."""

    def __init__(self, tool: str, package: str) -> None:
        super().__init__(
            f"the sandbox target needs {tool!r}, which is not installed",
            hint=f"Install it with: apt-get install {package}",
        )
        self.tool = tool
        self.package = package


class TargetBusyError(TargetError):
    """Another workflow holds the target's lock; names the holder."""

    def __init__(self, target: str, holder: Mapping[str, str]) -> None:
        who = ", ".join(f"{k} {v}" for k, v in holder.items() if k != "host") or "unknown"
        super().__init__(
            f"{target} is being changed by another workflow ({who})",
            hint="Wait for it to finish (workflow-agent history shows it), or raise "
            "lock_wait in the configuration to wait for it automatically.",
        )
        self.holder = dict(holder)


class RecoveryNeededError(TargetError):
    """A workflow killed mid-change left its journal unfinished on this target."""

    def __init__(self, target: str, workflows: Sequence[str]) -> None:
        super().__init__(
            f"{target} holds changes of interrupted workflow(s) "
            f"{', '.join(w[:8] for w in workflows)} that were never rolled back",
            hint="Run `workflow-agent recover` to finish their rollback first (with "
            "--inventory FILE for an inventory's hosts; `workflow-agent changes ID` lists "
            "what they changed).",
        )
        self.workflows = list(workflows)


class ExecutionFailedError(WorkflowAgentError):
    """A script on the target exited non-zero or timed out."""

    exit_code = 4


class VerificationFailedError(WorkflowAgentError):
    """Checks after install found the integration not working."""

    exit_code = 5


class LeftoversError(WorkflowAgentError):
    """Uninstall finished but left files, packages or users behind."""

    exit_code = 5


class NotConfirmedError(WorkflowAgentError):
    """The user declined the change, or it needed confirmation nobody could give."""

    exit_code = 7


class RollbackRefusedError(InvalidInputError):
    """A rollback would overwrite what was changed after the workflow it undoes."""


class RollbackFailedError(WorkflowAgentError):
    """A rollback could not undo (or could not verify) every change; the journal and
    its backups are kept, so it can be retried."""

    exit_code = 8


class HistoryError(WorkflowAgentError):
    """The history store cannot be read or written."""


class KnowledgeError(WorkflowAgentError):
    """Documentation cannot be fetched, read or parsed, or the knowledge base cannot be used.

    Raised by ``knowledge/``; the hint says what to do (a proxy, a timeout, a file path).
    """
