"""Failure signatures: what went wrong, normalised so that the next run can recognise it.

A failed run (its failing command, exit status, output tail and failed checks) is matched
against ``RULES`` in order; the first rule that matches names the signature (``dpkg-lock``,
``package-not-found``, ...). Nothing matched: a ``generic`` signature made of the failing
command and exit status with the volatile parts (pids, temporary paths, timestamps, long
hex ids) replaced, so the same failure gives the same key every time.

A rule may name a ``Fix``. Fixes are fixed, reviewed code from this module, never text
from an LLM: a shell snippet inserted right after the script's prologue (so strict mode
and the failure marker apply to it too), or a parameter change that goes through the
integration's own parameter validation. Either way the modified script passes the same
validation layers as any other.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict

from workflow_agent.scripting.render import FAILURE_MARKER, PROLOGUE, RenderedScript

#: Fix names: what the next run does about a learned signature.
WAIT_DPKG_LOCK = "wait-dpkg-lock"
APT_UPDATE_FIRST = "apt-update-first"
CHOOSE_FREE_PORT = "choose-free-port"

#: Longest a script waits for apt's and dpkg's locks before going on (and failing again).
LOCK_WAIT_SECONDS = 300

_WAIT_DPKG_LOCK = f"""\
# workflow-agent fix {WAIT_DPKG_LOCK}: an earlier run found the package manager locked by
# another process. Wait (at most {LOCK_WAIT_SECONDS} s) until no process holds apt's or
# dpkg's locks; /proc/locks lists both flock(2) and fcntl locks, which apt uses.
wa_waited=0
for wa_lock in /var/lib/dpkg/lock-frontend /var/lib/dpkg/lock /var/lib/apt/lists/lock; do
  [ -e "$wa_lock" ] || continue
  wa_dev=$(stat -c %d "$wa_lock")
  wa_id=$(printf '%02x:%02x:%s' "$(( (wa_dev >> 8) & 0xfff ))" \\
    "$(( (wa_dev & 0xff) | ((wa_dev >> 12) & 0xfff00) ))" "$(stat -c %i "$wa_lock")")
  while grep -q " $wa_id " /proc/locks && [ "$wa_waited" -lt {LOCK_WAIT_SECONDS} ]; do
    if [ "$wa_waited" = 0 ]; then
      echo "workflow-agent: waiting for $wa_lock, held by another process"
    fi
    sleep 1
    wa_waited=$((wa_waited + 1))
  done
done
echo "workflow-agent: waited $wa_waited s for the package manager's locks"
"""

_APT_UPDATE_FIRST = f"""\
# workflow-agent fix {APT_UPDATE_FIRST}: an earlier run could not find a package or
# fetched from stale package lists: refresh them first.
if command -v apt-get >/dev/null; then
  apt-get update
fi
"""

#: The reviewed snippets a fix may insert, by fix name.
SNIPPETS = {WAIT_DPKG_LOCK: _WAIT_DPKG_LOCK, APT_UPDATE_FIRST: _APT_UPDATE_FIRST}

#: What each fix does, as the user is told.
FIX_DESCRIPTIONS = {
    WAIT_DPKG_LOCK: f"wait (up to {LOCK_WAIT_SECONDS} s) for apt's and dpkg's locks first",
    APT_UPDATE_FIRST: "run apt-get update first",
    CHOOSE_FREE_PORT: "choose a free port on the target for a defaulted port parameter",
}

Kind = Literal["dpkg-lock", "gpg-key-missing", "repo-stale", "repo-unreachable",
               "package-not-found", "port-in-use", "no-systemd", "generic"]
KINDS: tuple[str, ...] = get_args(Kind)


class Signature(BaseModel):
    """A failure, normalised: ``key`` is the same every time the same thing goes wrong."""

    model_config = ConfigDict(frozen=True)

    kind: str
    key: str
    #: What it means, for a person.
    summary: str
    #: The output line that matched (already masked), or the failing command.
    evidence: str
    #: What the failure is about: a package, port, host or key id, when the rule says.
    subject: str | None = None
    #: The known fix for it, if there is one.
    fix: str | None = None


class AppliedFix(BaseModel):
    """A learned fix a run applied: which, why, learned from which workflow."""

    model_config = ConfigDict(frozen=True)

    signature: str
    kind: str
    fix: str
    #: The workflow whose failure taught it (the latest one).
    learned_from: str
    reason: str
    #: What the fix changed in this run.
    change: str
    #: Whether an earlier run already succeeded with it.
    proven: bool = False


@dataclass(frozen=True)
class FailureText:
    """What a failed stage left to analyse (all of it masked already)."""

    stage: str
    exit_code: int | None = None
    failed_command: str | None = None
    output_tail: str = ""
    #: ``name: detail`` of each failed verification check.
    checks: Sequence[str] = ()
    message: str = ""

    def lines(self) -> list[str]:
        """Every line worth matching, the output first."""
        text = "\n".join([self.output_tail, *self.checks, self.message])
        return [line.strip() for line in text.splitlines() if line.strip()]


@dataclass(frozen=True)
class Rule:
    """Lines matching any of ``patterns`` mean ``kind``; group 1, if any, is the subject."""

    kind: str
    patterns: tuple[re.Pattern[str], ...]
    summary: str
    fix: str | None = None


def _rule(kind: str, summary: str, *patterns: str, fix: str | None = None) -> Rule:
    return Rule(kind, tuple(re.compile(p) for p in patterns), summary, fix)


#: In order: the first rule with a matching line wins. A repository that cannot be
#: reached comes before "package not found", which is then only its consequence.
RULES: tuple[Rule, ...] = (
    _rule("dpkg-lock", "another process holds the package manager's lock",
          r"Could not get lock (/var/lib/(?:dpkg|apt/lists)/lock\S*)",
          r"Unable to acquire the dpkg frontend lock",
          r"dpkg status database is locked by another process",
          r"Unable to lock the administration directory",
          fix=WAIT_DPKG_LOCK),
    _rule("gpg-key-missing", "a repository is signed with a key apt does not have",
          r"NO_PUBKEY ([0-9A-Fa-f]{8,})",
          r"public key is not available"),
    _rule("repo-stale", "the package lists are out of date (the archive moved on)",
          r"Failed to fetch \S+\s+404\s+Not Found",
          r"Unable to fetch some archives, maybe run apt-get update",
          fix=APT_UPDATE_FIRST),
    _rule("repo-unreachable", "a package repository cannot be reached",
          r"Could not resolve '([^']+)'",
          r"Temporary failure resolving '([^']+)'",
          r"Could not connect to (\S+)",
          r"Failed to fetch (\S+).*(?:Connection refused|Connection timed out)",
          r"Failed to fetch (\S+)"),
    _rule("package-not-found", "a package is not in the package lists",
          r"Unable to locate package (\S+)",
          r"Package '?([^' ]+)'? has no installation candidate",
          r"Couldn't find any package by (?:glob|regex) '([^']+)'",
          fix=APT_UPDATE_FIRST),
    _rule("port-in-use", "the port is already taken by another process",
          r"[Aa]ddress already in use",
          r"EADDRINUSE",
          r"port (\d+) is listening, but no process on this target owns the socket",
          fix=CHOOSE_FREE_PORT),
    _rule("no-systemd", "the script uses systemd, but the target was not booted with it",
          r"System has not been booted with systemd",
          r"Failed to connect to bus: (?:Host is down|No such file or directory)",
          r"Running in chroot, ignoring (?:request|command)",
          r"systemctl: command not found"),
)

_PORT = re.compile(r"(?:port |:)(\d{2,5})\b")
_MARKER = re.compile(re.escape(FAILURE_MARKER) + r"(\d+) with exit (\d+): (.*)")

#: Volatile parts of a command or message, replaced so the same failure keys the same.
_VOLATILE = (
    (re.compile(r"/run/workflow-agent/\S+"), "<script>"),
    (re.compile(r"(?:/var)?/tmp/\S+"), "<tmp>"),
    (re.compile(r"\b\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(?:[.,]\d+)?(?:Z|[+-]\d{2}:?\d{2})?"),
     "<time>"),
    (re.compile(r"\b\d{1,2}:\d{2}:\d{2}(?:[.,]\d+)?\b"), "<time>"),
    (re.compile(r"\b(pid|process|PID)[ =:]+\d+"), r"\1 <pid>"),
    (re.compile(r"\[\d+\]"), "[<pid>]"),
    (re.compile(r"\b[0-9a-f]{12,}\b"), "<id>"),
    (re.compile(r"\s+"), " "),
)


def normalise(text: str) -> str:
    """``text`` with pids, temporary paths, timestamps and long hex ids replaced."""
    for pattern, replacement in _VOLATILE:
        text = pattern.sub(replacement, text)
    return text.strip()


def match(failure: FailureText) -> Signature:
    """The signature of ``failure``: the first rule that matches, else a generic one."""
    lines = failure.lines()
    for rule in RULES:
        for line in lines:
            for pattern in rule.patterns:
                found = pattern.search(line)
                if found is None:
                    continue
                subject = found.group(1) if found.groups() else None
                if rule.kind == "port-in-use" and subject is None:
                    port = _PORT.search(line)
                    subject = port.group(1) if port else None
                return Signature(kind=rule.kind, key=rule.kind, summary=rule.summary,
                                 evidence=normalise(line)[:500], subject=subject,
                                 fix=rule.fix)
    return _generic(failure, lines)


def _generic(failure: FailureText, lines: list[str]) -> Signature:
    command, exit_code = failure.failed_command, failure.exit_code
    for line in lines:
        marked = _MARKER.search(line)
        if marked and command is None:
            command, exit_code = marked.group(3), int(marked.group(2))
    if command is None:
        # No failing command known (e.g. a check failed): the first line says what.
        command = lines[0] if lines else failure.stage
    shown = normalise(command)[:200]
    status = f" (exit {exit_code})" if exit_code is not None else ""
    key = f"generic: {failure.stage}: {shown}{status}"
    if len(key) > 255:
        key = key[:230] + " #" + hashlib.sha256(key.encode()).hexdigest()[:16]
    return Signature(kind="generic", key=key, summary=f"{failure.stage} failed: {shown}{status}",
                     evidence=shown)


def insert_snippets(script: RenderedScript, fixes: Iterable[str]) -> RenderedScript:
    """``script`` with the snippets of ``fixes`` inserted right after its prologue.

    Only names in ``SNIPPETS`` are accepted: the text inserted is always this module's.
    """
    snippets = [SNIPPETS[name] for name in fixes]
    if not snippets:
        return script
    lines = script.text.splitlines(keepends=True)
    header = len(PROLOGUE.splitlines())
    # Rendered scripts all start with the prologue; anything else gets the snippets after
    # its shebang, so they run first either way.
    if script.text.startswith(PROLOGUE.split("\n", 1)[0]) and len(lines) >= header and \
            lines[header - 1].rstrip().endswith("ERR"):
        at = header
    else:
        at = 1 if lines and lines[0].startswith("#!") else 0
    text = "".join([*lines[:at], *snippets, *lines[at:]])
    return script.model_copy(update={"text": text,
                                     "sha256": hashlib.sha256(text.encode()).hexdigest()})


#: Read-only: every local TCP port in LISTEN state on the target, one per line.
LISTENING_PORTS_SCRIPT = r"""for f in /proc/net/tcp /proc/net/tcp6; do
  [ -r "$f" ] || continue
  while read -r _ local _ state _; do
    [ "$state" = 0A ] && echo $(( 16#${local##*:} ))
  done < "$f"
done
true
"""


def free_port(listening: Iterable[int], start: int, maximum: int = 65535,
              tries: int = 200) -> int | None:
    """The first port after ``start`` that nothing listens on (``None``: none nearby)."""
    taken = set(listening)
    for port in range(start + 1, min(start + tries, maximum) + 1):
        if port not in taken:
            return port
    return None
