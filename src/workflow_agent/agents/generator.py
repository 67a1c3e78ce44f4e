"""The script generator agent: scripts written by an LLM when no template fits.

``install NAME --from-docs URL|FILE`` (or an integration none of whose methods fits the
facts) asks the LLM for install, verify and uninstall scripts, checks and parameters,
grounded in the documentation passages the knowledge agent retrieved (each cited). The
answer is a pydantic model (``ScriptsAnswer``) validated by ``complete_structured``,
which sends invalid answers back with the validation errors, a bounded number of times.

The answer becomes an ordinary integration folder (``definition.yaml`` + ``templates/``)
under ``DATA_DIR/generated/WORKFLOW/NAME``, loaded like a plugin and rendered by the
script builder like any template, so the same rendering rules, validation layers,
rehearsal, journal and checks apply. Parameters reach the scripts only as shell variables
assigned by template lines ``NAME={{ params.get('name', '') }}`` (one shell-quoted word
each); what the model wrote is kept literal inside ``{% raw %}`` blocks, and it is never
rendered as Jinja (an unsandboxed template from a model could run Python here).

Topics: ``generation.check`` (the request's generation options, before anything runs),
``generation.strategy`` (no method fits: generate, or say why not), ``generation.write``
(ask the LLM, write and load the folder), ``generation.save`` (``--save-as``).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from workflow_agent.bus import Message, MessageBus
from workflow_agent.config import WorkflowConfiguration
from workflow_agent.errors import (
    DefinitionError,
    InvalidInputError,
    KnowledgeError,
    NotConfirmedError,
    ParameterError,
    UnsupportedPlatformError,
)
from workflow_agent.facts import Facts
from workflow_agent.integrations.params import SAMPLES, checked_default
from workflow_agent.integrations.registry import Integration, Registry, load_integration
from workflow_agent.integrations.schema import (
    RESERVED_NAMES,
    ParameterSpec,
    ParameterType,
    UninstallSpec,
)
from workflow_agent.state import ErrorInfo, Provenance, WorkflowState, now
from workflow_agent.strategy import StrategyDecision, score_method

if TYPE_CHECKING:
    from workflow_agent.knowledge.store import Hit
    from workflow_agent.llm import LLMService

CHECK = "generation.check"
STRATEGY = "generation.strategy"
WRITE = "generation.write"
SAVE = "generation.save"

#: The method name of LLM-written scripts in the generated definition.
METHOD = "generated"
#: Answers the model may give in all (the first and its repairs).
MAX_ATTEMPTS = 3

# Shell variables a parameter's variable must not replace: the script's own environment.
_SHELL_NAMES = frozenset({
    "PATH", "HOME", "IFS", "PWD", "OLDPWD", "SHELL", "USER", "LOGNAME", "LANG", "TERM",
    "UID", "EUID", "PPID", "HOSTNAME", "RANDOM", "LINENO", "SECONDS", "OPTIND", "OPTARG",
    "PS1", "PS2", "PS4", "TMPDIR", "DEBIAN_FRONTEND", "PURGE", "REMOVE_USERS",
    "REMOVE_GROUPS", "REMOVE_PATHS", "REMOVE_PACKAGES", "BASH_ENV", "ENV", "CDPATH",
})
_UNINSTALL_VARIABLES = {
    "PURGE": "{{ purge }}", "REMOVE_USERS": "({{ remove_users }})",
    "REMOVE_GROUPS": "({{ remove_groups }})", "REMOVE_PATHS": "({{ remove_paths }})",
    "REMOVE_PACKAGES": "({{ remove_packages }})",
}
_ENDRAW = re.compile(r"\{%-?\s*endraw")
_CHECK_EXPRESSION = re.compile(r"\{\{\s*([a-z_][a-z0-9_]*)\s*\}\}")


# -- the answer the model must give -------------------------------------------------------


class ParameterAnswer(BaseModel):
    """One parameter the scripts read (as the shell variable of its name in capitals)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z_][a-z0-9_]*$",
                      description="lower_snake_case; the scripts read $NAME_IN_CAPITALS")
    type: ParameterType = "string"
    description: str = ""
    default: str | int | float | bool | list[str] | None = None
    pattern: str | None = Field(default=None, description="regex the whole value must match")
    choices: list[str | int | float] | None = None
    minimum: float | None = None
    maximum: float | None = None
    secret: bool = False
    env: str | None = Field(default=None, description="secrets only: the variable to read")

    @model_validator(mode="after")
    def _usable(self) -> ParameterAnswer:
        if self.name in RESERVED_NAMES or self.name.upper() in _SHELL_NAMES:
            raise ValueError(f"parameter name {self.name!r} is reserved; choose another")
        spec = self.spec()
        if not self.secret and self.default is not None:
            try:
                checked_default(self.name, spec)
            except ParameterError as exc:
                raise ValueError(f"default: {exc.message}") from None
        return self

    def spec(self) -> ParameterSpec:
        """The definition's parameter spec (``ValueError`` when inconsistent)."""
        return ParameterSpec.model_validate(
            self.model_dump(exclude={"name"}, exclude_none=True))


class RemovalAnswer(BaseModel):
    """What uninstall removes (only what the install created is ever removed)."""

    model_config = ConfigDict(extra="forbid")

    packages: list[str] = []
    paths: list[str] = []
    users: list[str] = []
    groups: list[str] = []

    @model_validator(mode="after")
    def _valid(self) -> RemovalAnswer:
        UninstallSpec.model_validate(self.model_dump())
        return self


class ScriptsAnswer(BaseModel):
    """Scripts, checks and parameters for one integration on one kind of target."""

    model_config = ConfigDict(extra="forbid")

    description: str = Field(min_length=1, description="one sentence: what it installs")
    parameters: list[ParameterAnswer] = []
    install: str = Field(min_length=1, description="bash body of the install script")
    verify: str = Field(default="", description="bash body of the verify script, or empty")
    uninstall: str = Field(min_length=1, description="bash body of the uninstall script")
    checks: list[dict[str, Any]] = Field(
        min_length=1, description="checks in the definition.yaml format; values may use "
        "{{ parameter_name }} and nothing else")
    removes: RemovalAnswer = RemovalAnswer()
    sources: list[int] = Field(min_length=1,
                               description="numbers of the documentation passages used")

    @field_validator("install", "verify", "uninstall")
    @classmethod
    def _literal(cls, value: str) -> str:
        if _ENDRAW.search(value):
            raise ValueError("a script must not contain the text 'endraw'")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ScriptsAnswer:
        from workflow_agent.scripting.render import render_checks

        names = [p.name for p in self.parameters]
        if len(names) != len(set(names)):
            raise ValueError("parameter names must be unique")
        for check in self.checks:
            for value in _strings(check):
                bare = _CHECK_EXPRESSION.sub("", value)
                if re.search(r"\{[{%#]", bare):
                    raise ValueError(f"check value {value!r}: only {{{{ parameter_name }}}} "
                                     "may appear between braces")
        values: dict[str, Any] = {}
        for parameter in self.parameters:
            if not parameter.secret:
                spec = parameter.spec()
                values[parameter.name] = (SAMPLES[spec.type] if spec.default is None
                                          else checked_default(parameter.name, spec))
        render_checks(self.checks, values)  # ValueError names the check
        return self


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [s for item in value for s in _strings(item)]
    if isinstance(value, dict):
        return [s for item in value.values() for s in _strings(item)]
    return []


# -- requests and replies -----------------------------------------------------------------


@dataclass(frozen=True)
class CheckRequest:
    """The generation options of a request, checked before anything runs."""

    integration: str
    from_docs: str | None
    approve: bool
    save_as: str | None


@dataclass(frozen=True)
class StrategyRequest:
    """No method of ``integration`` (``None``: not yet written) fits ``facts``."""

    integration: Integration | None
    facts: Facts
    error: UnsupportedPlatformError


@dataclass(frozen=True)
class WriteRequest:
    """Ask the LLM for ``name``'s scripts on ``facts``, from ``passages``."""

    workflow_id: str
    name: str
    facts: Facts
    passages: tuple[Hit, ...]
    #: The integration whose definition frames the answer (no method fits), if any.
    existing: Integration | None = None
    #: Parameter names the user passed (never their values: they may be secrets).
    requested: tuple[str, ...] = ()


@dataclass(frozen=True)
class Generation:
    """The written integration and where its scripts came from."""

    integration: Integration
    answer: ScriptsAnswer
    provider: str
    model: str
    attempts: int
    cited: tuple[str, ...]

    def provenance(self) -> dict[str, list[Provenance]]:
        """Per action: the LLM, the documentation passages it cited, the template."""
        method = self.integration.definition.methods[0]
        by_action: dict[str, list[Provenance]] = {}
        for action in ("install", "verify", "uninstall"):
            template = getattr(method.templates, action)
            if template is None:
                continue
            by_action[action] = [
                Provenance(kind="llm", source=f"{self.provider}/{self.model}",
                           detail=f"written in {self.attempts} attempt(s); needs approval"),
                *(Provenance(kind="documentation", source=c) for c in self.cited),
                Provenance(kind="template", source=str(self.integration.templates_dir /
                                                       template),
                           detail="parameters assigned by the safe rendering rules"),
            ]
        return by_action


@dataclass(frozen=True)
class SaveRequest:
    """Save ``generation`` as the integration ``save_as`` (a name or DIR/NAME)."""

    generation: Generation
    save_as: str


# -- the agent ----------------------------------------------------------------------------


class ScriptGeneratorAgent:
    """Answers the ``generation.*`` topics with the LLM the container builds on first use."""

    def __init__(self, config: WorkflowConfiguration, llm: Callable[[], LLMService],
                 available: bool) -> None:
        self.config = config
        self.llm = llm
        self.available = available

    def attach(self, bus: MessageBus) -> None:
        """Serve this agent's topics on ``bus``."""
        bus.serve(CHECK, self._check)
        bus.serve(STRATEGY, self._strategy)
        bus.serve(WRITE, self._write)
        bus.serve(SAVE, self._save)

    async def _check(self, message: Message) -> None:
        request: CheckRequest = message.payload
        if request.approve and not self.config.llm.allow_unattended:
            raise InvalidInputError(
                "--approve cannot run LLM-written scripts: the configuration does not allow "
                "unattended LLM scripts (llm.allow_unattended is false)",
                hint="Approve them at the prompt instead, or set llm.allow_unattended: true "
                "in the configuration file (WORKFLOW_AGENT_LLM__ALLOW_UNATTENDED=true).",
            )
        if request.from_docs is not None and not self.available:
            from workflow_agent.llm import LLMNotConfiguredError

            raise LLMNotConfiguredError("install --from-docs")
        if request.save_as is not None:
            destination(request.save_as, self.config.plugin_dirs)

    async def _strategy(self, message: Message) -> StrategyDecision:
        request: StrategyRequest = message.payload
        if not self.available:
            hint = (request.error.hint or "") + " Or configure an LLM (docs/llm.md): it " \
                "writes scripts from the documentation in the knowledge base."
            raise UnsupportedPlatformError(request.error.message, hint=hint.strip())
        existing = request.integration
        scores = [] if existing is None else [score_method(m, request.facts)
                                              for m in existing.definition.methods]
        why = ("no template yet" if existing is None
               else f"no template fits ({request.error.message})")
        return StrategyDecision(
            method=METHOD, scores=scores,
            reason=f"{METHOD}: {why}; an LLM writes the scripts from the documentation, "
            "and they run only after approval",
        )

    async def _write(self, message: Message) -> Generation:
        request: WriteRequest = message.payload
        if not request.passages:
            raise KnowledgeError(
                f"no documentation about {request.name} in the knowledge base: the LLM "
                "would have nothing to ground the scripts in",
                hint=f"Add some: workflow-agent knowledge add URL --integration {request.name}"
                " (or install with --from-docs URL).",
            )
        service = self.llm()
        structured = await service.complete_structured(
            prompt(request), ScriptsAnswer, workflow_id=request.workflow_id,
            purpose="generate", max_attempts=MAX_ATTEMPTS,
        )
        answer = structured.output
        usage = structured.completion.usage
        cited = tuple(dict.fromkeys(request.passages[n - 1].citation for n in answer.sources
                                    if 1 <= n <= len(request.passages)))
        if not cited:  # the model cited nothing it was given: show what it was given
            cited = tuple(dict.fromkeys(h.citation for h in request.passages))
        folder = self.config.data_dir / "generated" / request.workflow_id / request.name
        definition = _definition(request, answer, f"{usage.provider}/{usage.model}", cited)
        write_folder(folder, definition, answer, cited, f"{usage.provider}/{usage.model}")
        integration = load_integration(folder, source=f"generated by {usage.provider}/"
                                       f"{usage.model} for workflow {request.workflow_id}")
        return Generation(integration, answer, usage.provider, usage.model,
                          structured.attempts, cited)

    async def _save(self, message: Message) -> Path:
        request: SaveRequest = message.payload
        return save(request.generation.integration, request.save_as, self.config.plugin_dirs)


# -- the prompt ---------------------------------------------------------------------------

_SYSTEM = """\
You write bash scripts that install, verify and uninstall one monitoring integration on \
one target whose facts are given. Ground every step in the numbered documentation \
passages and list the numbers you used in "sources".

Rules for the scripts:
- Bodies only: no shebang and no "set -e"; each script already starts with \
"set -Eeuo pipefail" and stops at the first failing command.
- Install from the distribution's package manager when the documentation allows it. \
Never pipe a download into a shell, never disable a firewall or SELinux, never write \
/etc/sudoers, never eval.
- Parameters are shell variables named after the parameter in capitals (listen_port is \
"$LISTEN_PORT"); always quote them. A secret parameter is read only from its \
environment variable, never put on a command line.
- Start the service the way the target's init_system allows: systemd: systemctl; sysv: \
/etc/init.d/NAME (create the directories its pid and log files need); none: start the \
daemon directly in the background. Be safe to run twice.
- The uninstall script may use PURGE (true or false) and the arrays REMOVE_USERS, \
REMOVE_GROUPS, REMOVE_PATHS and REMOVE_PACKAGES: what the install created and may be \
removed. Remove nothing else.
- Checks use the definition.yaml check types: package_installed (package), \
process_running (name), port_listening (port), http_endpoint (url, status, contains), \
prometheus_metrics (url, metrics), file_contains (path, text or regex). Values may \
contain {{ parameter_name }} and nothing else between braces.
"""


def prompt(request: WriteRequest) -> list[Any]:
    """The messages asking for ``request``'s scripts: facts, the frame of an existing
    definition, parameter names asked for, and the passages with their citations.

    Parameter values are never included: they may be secrets."""
    from workflow_agent.knowledge.store import format_passages
    from workflow_agent.llm import Message as LLMMessage

    parts = [f"Integration: {request.name}",
             "Target facts: " + json.dumps(request.facts.summary(), sort_keys=True,
                                           default=str)]
    if request.existing is not None:
        definition = request.existing.definition
        frame = {"parameters": {n: s.model_dump(mode="json", exclude_none=True,
                                                exclude={"default"} if s.secret else set())
                                for n, s in definition.parameters.items()},
                 "checks": definition.checks,
                 "uninstall": definition.uninstall.model_dump(mode="json")}
        parts.append("Its definition (keep these parameters, checks and uninstall lists; "
                     "answer them unchanged): " + json.dumps(frame, sort_keys=True))
    if request.requested:
        parts.append("The user sets these parameters, so declare them: "
                     + ", ".join(sorted(request.requested)))
    parts.append("Documentation passages:\n\n" + format_passages(request.passages))
    return [LLMMessage.system(_SYSTEM), LLMMessage.user("\n\n".join(parts))]


# -- the folder ---------------------------------------------------------------------------


def _definition(request: WriteRequest, answer: ScriptsAnswer, model: str,
                cited: Sequence[str]) -> dict[str, Any]:
    facts = request.facts
    requires: dict[str, str] = {"init_system": facts.init_system}
    if facts.package_manager:
        requires["package_manager"] = facts.package_manager
    platform = {"os_family": facts.os_family, "distros": [facts.distro]}
    templates = {"install": f"{METHOD}/install.sh.j2", "uninstall": f"{METHOD}/uninstall.sh.j2"}
    if answer.verify.strip():
        templates["verify"] = f"{METHOD}/verify.sh.j2"
    method = {"name": METHOD, "requires": requires, "complexity": 3, "security": 3,
              "description": f"written by {model} from {'; '.join(cited)}",
              "templates": templates}
    if request.existing is not None:
        # The existing definition stays the authority on parameters, checks, uninstall.
        base = request.existing.definition.model_dump(mode="json", exclude_none=True)
        base["name"] = request.name
        base["platforms"] = [*base["platforms"], platform]
        base["methods"] = [method]
        base["checks"] = base["checks"] or answer.checks
        return base
    return {
        "name": request.name, "version": "1.0.0",
        "description": answer.description,
        "parameters": {p.name: p.spec().model_dump(mode="json", exclude_none=True)
                       for p in answer.parameters},
        "platforms": [platform], "methods": [method], "checks": answer.checks,
        "uninstall": answer.removes.model_dump(),
    }


def _safe_line(text: str) -> str:
    """One line fit for a bash comment in a raw block: no newline, no Jinja braces."""
    return re.sub(r"[\x00-\x1f\x7f{}%]", " ", text)


def template_text(body: str, variables: Mapping[str, str], header: Sequence[str]) -> str:
    """A template: the header comments and the body literal (``raw``), the variables the
    body uses assigned by template expressions in plain shell context."""
    used = [name for name in variables
            if re.search(rf"\$\{{?{name}(?![A-Za-z0-9_])", body)]
    lines = ["{% raw %}", *(f"# {_safe_line(h)}" for h in header), "{% endraw %}"]
    lines += [f"{name}={variables[name]}" for name in used]
    text = "\n".join(lines) + "\n{% raw %}\n" + body.rstrip("\n") + "\n{% endraw %}\n"
    return text


def write_folder(folder: Path, definition: Mapping[str, Any], answer: ScriptsAnswer,
                 cited: Sequence[str], model: str) -> None:
    """Write ``definition.yaml`` and ``templates/generated/*.sh.j2`` into ``folder``."""
    (folder / "templates" / METHOD).mkdir(parents=True, exist_ok=True)
    (folder / "definition.yaml").write_text(
        "# Written by an LLM from documentation (workflow-agent install --from-docs).\n"
        + yaml.safe_dump(dict(definition), sort_keys=False, allow_unicode=True),
        encoding="utf-8")
    parameters = definition.get("parameters", {})
    variables = {
        name.upper(): ("({{ params.get(%r, []) }})" if spec.get("type") == "list"
                       else "{{ params.get(%r, '') }}") % name
        for name, spec in parameters.items() if not spec.get("secret")
    }
    header = [f"Written by {model} from:", *(f"  {c}" for c in cited)]
    for action, body in (("install", answer.install), ("verify", answer.verify),
                         ("uninstall", answer.uninstall)):
        if not body.strip():
            continue
        own = {**variables, **(_UNINSTALL_VARIABLES if action == "uninstall" else {})}
        (folder / "templates" / METHOD / f"{action}.sh.j2").write_text(
            template_text(body, own, header), encoding="utf-8")


def destination(save_as: str, plugin_dirs: Sequence[Path]) -> Path:
    """The folder ``--save-as`` writes: ``DIR/NAME`` as given, or NAME in the first
    plugin folder. Refuses a name that is not an integration name or a folder that exists."""
    given = Path(save_as)
    if "/" in save_as:
        folder = given.expanduser().absolute()
    elif plugin_dirs:
        folder = plugin_dirs[0] / save_as
    else:
        raise InvalidInputError(
            f"--save-as {save_as}: no plugin folder to save it in",
            hint="Set plugin_dirs in the configuration, or give a path: --save-as DIR/NAME.")
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", folder.name):
        raise InvalidInputError(
            f"--save-as {save_as}: {folder.name!r} is not an integration name",
            hint="Use lower case letters, digits and dashes, e.g. my-exporter.")
    if folder.exists():
        raise InvalidInputError(f"--save-as {save_as}: {folder} already exists",
                                hint="Remove it, or choose another name.")
    return folder


def save(integration: Integration, save_as: str, plugin_dirs: Sequence[Path]) -> Path:
    """Copy the generated folder to its destination under its new name, and prove that
    the registry loads it like any plugin folder (else remove it again)."""
    folder = destination(save_as, plugin_dirs)
    folder.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(integration.root, folder)
    path = folder / "definition.yaml"
    text = path.read_text(encoding="utf-8")
    head, _, body = text.partition("\n")
    data = yaml.safe_load(body)
    data["name"] = folder.name
    path.write_text(head + "\n" + yaml.safe_dump(data, sort_keys=False, allow_unicode=True),
                    encoding="utf-8")
    try:
        Registry.discover([folder.parent], entry_points=False).get(folder.name)
    except DefinitionError:
        shutil.rmtree(folder)
        raise
    return folder


def unapproved(state: WorkflowState) -> WorkflowState:
    """The final state when LLM-written scripts were not approved: nothing ran."""
    error = NotConfirmedError(
        f"the LLM-written scripts for {state.integration} were not approved; nothing was "
        "changed on the target",
        hint="Approve them at the interactive prompt (read them first: provenance and "
        "findings are shown), or pass --approve with llm.allow_unattended: true.",
    )
    info = ErrorInfo(type=type(error).__name__, message=error.message, hint=error.hint,
                     exit_code=error.exit_code)
    return state.model_copy(update={"status": "refused", "error": info, "finished_at": now()})


def is_generated(state: WorkflowState) -> bool:
    """Whether an LLM wrote any of ``state``'s scripts."""
    return any(p.kind == "llm" for items in state.provenance.values() for p in items)
