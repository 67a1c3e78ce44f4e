"""Typed checks that prove an integration works, run on the target through bash.

Each probe is one bash script run on the target using only bash, /proc, ``/dev/tcp``
and coreutils (minimal targets have no curl, ss, ps or python); its output is parsed
here. Probes that return arbitrary bytes (process tables, HTTP responses, file contents)
pipe them through ``base64`` so the bytes arrive intact and in short lines whatever they
contain. ``run_checks`` retries failing checks until a deadline: daemons take a moment.

Every run is a round trip (over SSH, to a runner on the host): the checks that are one
read-only script (``ScriptCheck``: package, process, port, file) are run together, ONE
``run_parts`` per attempt of all those still failing. The HTTP checks (``http_get``)
run on their own, one run per attempt each: a server that never answers must not hold
the other checks up.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import shlex
import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import ErrorDetails

from workflow_agent.execution.target import probe_output, run_parts
from workflow_agent.validators import Regex
from workflow_agent.verification.exposition import Sample, parse_exposition
from workflow_agent.verification.http import MAX_BODY, HttpFailure, check_url, http_get

if TYPE_CHECKING:
    from workflow_agent.execution.target import RunResult, Target

__all__ = [
    "CHECK_TYPES", "Check", "CheckResult", "CheckSpec", "CheckSpecError", "FileContains",
    "HttpEndpoint", "PackageInstalled", "PortListening", "ProcessRunning", "PrometheusMetrics",
    "Sample", "ScriptCheck", "batched_scripts", "parse_check", "parse_exposition",
    "run_checks",
]


def _reject_bool(value: object) -> object:
    # Lax int parsing would take ``true`` as 1: templated values may arrive as strings
    # ("9100"), which we do want to accept, but a boolean is always a mistake.
    if isinstance(value, bool):
        raise ValueError("expected an integer, got a boolean")
    return value


def _url(value: object) -> object:
    return check_url(value) if isinstance(value, str) else value


_Int = Annotated[int, BeforeValidator(_reject_bool)]


class CheckResult(BaseModel):
    """The outcome of one check (after its retries, when run by ``run_checks``)."""

    model_config = ConfigDict(frozen=True)

    name: str
    type: str
    passed: bool
    detail: str
    duration: float
    attempts: int = 1


@dataclass(frozen=True)
class _Outcome:
    passed: bool
    detail: str
    retry: bool = True  # False when trying again cannot help (e.g. https is unsupported)


class Check(BaseModel, ABC):
    """Base of every check: frozen, unknown fields rejected, ``type`` is the discriminator."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    type: str

    @property
    @abstractmethod
    def label(self) -> str:
        """What this check proves, for people, e.g. ``port 9100 listening``."""

    @abstractmethod
    async def _probe(self, target: Target, timeout: float) -> _Outcome: ...

    async def _attempt(self, target: Target, timeout: float) -> tuple[CheckResult, bool]:
        started = time.monotonic()
        outcome = await self._probe(target, timeout)
        result = CheckResult(
            name=self.label,
            type=self.type,
            passed=outcome.passed,
            detail=outcome.detail,
            duration=time.monotonic() - started,
        )
        return result, outcome.retry

    async def run(self, target: Target, *, timeout: float = 10.0) -> CheckResult:
        """Run the check once on ``target``; ``timeout`` bounds the probe script."""
        result, _ = await self._attempt(target, timeout)
        return result


class ScriptCheck(Check, ABC):
    """A check that is one read-only bash script and the judgement of its result, so
    that several can share a run (``run_parts``). The script runs in a subshell of a
    wrapper shell: it must not take ``$$`` for its own process."""

    @property
    @abstractmethod
    def script(self) -> str:
        """The probe script."""

    @abstractmethod
    def _judge(self, result: RunResult) -> _Outcome: ...

    async def _probe(self, target: Target, timeout: float) -> _Outcome:
        return self._judge(await target.run(self.script, timeout=timeout))


def _failure(result: RunResult, what: str) -> _Outcome:
    if result.timed_out:
        return _Outcome(False, f"{what} timed out after {result.duration:.1f}s on the target")
    message = " ".join(result.stderr.split())[-300:] or f"exit {result.exit_code}"
    return _Outcome(False, f"{what} failed on the target: {message}")


class PackageInstalled(ScriptCheck):
    """The package is installed (dpkg status ``install ok installed``; ``rpm -q`` fallback)."""

    type: Literal["package_installed"] = "package_installed"
    package: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9+._:~-]*$")

    @property
    def label(self) -> str:
        return f"package {self.package} installed"

    @property
    def script(self) -> str:
        pkg = shlex.quote(self.package)
        return f"""
if command -v dpkg-query >/dev/null 2>&1; then
  echo dpkg; dpkg-query -W -f '${{Status}}\\t${{Version}}\\n' {pkg} 2>&1 || true
elif command -v rpm >/dev/null 2>&1; then
  echo rpm; rpm -q --qf '%{{NAME}}\\t%{{VERSION}}-%{{RELEASE}}\\n' {pkg} 2>&1 || true
else echo none; fi
"""

    def _judge(self, result: RunResult) -> _Outcome:
        if not result.ok:
            return _failure(result, "package query")
        manager, *lines = result.stdout.splitlines() or ["none"]
        if manager == "none":
            return _Outcome(False, "neither dpkg-query nor rpm is available", retry=False)
        statuses: list[str] = []
        for line in lines:
            status, _, version = line.partition("\t")
            if manager == "rpm" and version:
                return _Outcome(True, f"{self.package} {version} installed (rpm)")
            # dpkg: "<want> <error> <status>"; "hold ok installed" is installed too.
            words = status.split()
            if manager == "dpkg" and len(words) == 3 and words[1:] == ["ok", "installed"]:
                return _Outcome(True, f"{self.package} {version} installed")
            statuses.append(line.replace("\t", " ").strip())
        return _Outcome(False, f"{self.package} is not installed ({'; '.join(statuses)})")


class ProcessRunning(ScriptCheck):
    """A live process whose comm or basename of argv[0] is ``name``; reports the pids."""

    type: Literal["process_running"] = "process_running"
    name: str = Field(min_length=1, pattern=r"^[^/\x00]+$")

    @property
    def label(self) -> str:
        return f"process {self.name} running"

    @property
    def script(self) -> str:
        # pid, /proc/PID/stat and argv[0] as NUL-terminated fields. The script's own shells
        # (the run's, the part's subshell, the loop's) are skipped so a check for "bash"
        # does not find itself.
        return r"""set -o pipefail
part=$BASHPID
for d in /proc/[0-9]*; do
  pid=${d#/proc/}
  [ "$pid" = "$$" ] || [ "$pid" = "$part" ] || [ "$pid" = "$BASHPID" ] && continue
  IFS= read -r st 2>/dev/null <"$d/stat" || continue
  a0=
  IFS= read -r -d '' a0 2>/dev/null <"$d/cmdline"
  printf '%s\0%s\0%s\0' "$pid" "$st" "$a0"
done | base64
"""

    def _judge(self, result: RunResult) -> _Outcome:
        if not result.ok:
            return _failure(result, "process scan")
        fields = probe_output(result).decode("utf-8", "replace").split("\0")
        pids: list[int] = []
        seen = 0
        for pid, stat, argv0 in zip(fields[0::3], fields[1::3], fields[2::3], strict=False):
            close = stat.rfind(")")
            if close < 0:
                continue
            seen += 1
            comm, state = stat[stat.find("(") + 1 : close], stat[close + 2 : close + 3]
            if state in ("Z", "X"):  # zombies and dead tasks are not running
                continue
            # The kernel truncates comm to 15 bytes; argv[0] carries the full name.
            if self.name in (comm, argv0.rsplit("/", 1)[-1]) or (
                len(self.name) > 15 and comm == self.name[:15]
            ):
                pids.append(int(pid))
        if pids:
            listed = ", ".join(str(p) for p in sorted(pids))
            return _Outcome(True, f"running as pid {listed}")
        return _Outcome(False, f"no process named {self.name!r} among {seen} processes")


_IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _decode_proc_address(hexaddr: str, little_endian: bool) -> _IPAddress:
    raw = bytes.fromhex(hexaddr)
    if little_endian:  # the kernel prints each 32-bit word in host byte order
        raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return ipaddress.ip_address(raw)


class PortListening(ScriptCheck):
    """A TCP socket in LISTEN state on ``port`` (optionally reachable on ``host``)."""

    type: Literal["port_listening"] = "port_listening"
    port: _Int = Field(ge=1, le=65535)
    host: str | None = None

    @field_validator("host")
    @classmethod
    def _host_is_ip(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                return str(ipaddress.ip_address(value))
            except ValueError:
                raise ValueError(f"host must be an IP address, got {value!r}") from None
        return value

    @property
    def label(self) -> str:
        return f"port {self.port} listening" + (f" on {self.host}" if self.host else "")

    def _serves(self, addr: _IPAddress) -> bool:
        if self.host is None:
            return True
        want = ipaddress.ip_address(self.host)
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        # A wildcard listener serves its family; "::" also serves IPv4 (dual stack).
        wildcard = addr.is_unspecified and (addr.version == want.version or addr.version == 6)
        return wildcard or addr == want

    @property
    def script(self) -> str:
        # Socket owners too: a sandbox sharing the host's network sees the host's sockets,
        # and a port some other namespace's process holds proves nothing about the target.
        return r"""printf '\1\0' | od -An -tx2
echo "--uid $(id -u)"
echo '--tcp'; cat /proc/net/tcp 2>/dev/null
echo '--tcp6'; cat /proc/net/tcp6 2>/dev/null
echo '--owners'; find /proc/[0-9]*/fd -lname 'socket:*' -printf '%h %l\n' 2>/dev/null
true"""

    def _judge(self, result: RunResult) -> _Outcome:
        if not result.ok:
            return _failure(result, "socket scan")
        first, *lines = result.stdout.splitlines()
        little_endian = first.strip() == "0001"
        root = "--uid 0" in lines
        owners: dict[str, set[int]] = {}
        listening: list[str] = []
        inodes: list[str] = []
        for line in lines:
            cols = line.split()
            if len(cols) == 2 and cols[1].startswith("socket:["):
                pid = cols[0].split("/")[2]
                owners.setdefault(cols[1][8:-1], set()).add(int(pid))
                continue
            if len(cols) < 10 or cols[3] != "0A" or ":" not in cols[1]:  # 0A is TCP_LISTEN
                continue
            hexaddr, hexport = cols[1].split(":")
            if int(hexport, 16) != self.port:
                continue
            addr = _decode_proc_address(hexaddr, little_endian)
            shown = f"[{addr}]" if addr.version == 6 else str(addr)
            listening.append(f"{shown}:{self.port}")
            if self._serves(addr):
                inodes.append(cols[9])
        listening = list(dict.fromkeys(listening))  # SO_REUSEPORT: one line per socket
        if inodes:
            pids = sorted(set().union(*(owners.get(inode, set()) for inode in inodes)))
            if pids:
                return _Outcome(True, f"listening on {', '.join(listening)} "
                                      f"(pid {', '.join(map(str, pids))})")
            if root:
                return _Outcome(False, f"port {self.port} is listening, but no process on this "
                                "target owns the socket: it belongs to another namespace "
                                "(e.g. the host's, when a sandbox shares the host network)")
            return _Outcome(True, "listening on " + ", ".join(listening))
        if listening:
            return _Outcome(False, f"listening only on {', '.join(listening)}, not {self.host}")
        return _Outcome(False, f"nothing is listening on TCP port {self.port}")


class HttpEndpoint(Check):
    """GET ``url`` from the target answers ``status`` (and the body contains ``contains``)."""

    type: Literal["http_endpoint"] = "http_endpoint"
    url: Annotated[str, BeforeValidator(_url)]
    status: _Int = Field(default=200, ge=100, le=599)
    contains: str | None = None

    @property
    def label(self) -> str:
        extra = f" containing {self.contains!r}" if self.contains is not None else ""
        return f"GET {self.url} returns {self.status}{extra}"

    async def _probe(self, target: Target, timeout: float) -> _Outcome:
        response = await http_get(target, self.url, timeout=timeout)
        if isinstance(response, HttpFailure):
            return _Outcome(False, response.detail, retry=not response.permanent)
        size = f"{len(response.body)} bytes" + (" (truncated)" if response.truncated else "")
        if response.status != self.status:
            return _Outcome(False, f"HTTP {response.status} (expected {self.status}), {size}")
        if self.contains is not None and self.contains not in response.text:
            return _Outcome(False, f"HTTP {response.status}, body ({size}) lacks {self.contains!r}")
        return _Outcome(True, f"HTTP {response.status}, {size}")


class PrometheusMetrics(Check):
    """``url`` serves Prometheus metrics including every name in ``metrics``.

    A name may be a family (``node_cpu_seconds``) or a sample name (``x_bucket``); each
    needs at least ``min_samples`` samples.
    """

    type: Literal["prometheus_metrics"] = "prometheus_metrics"
    url: Annotated[str, BeforeValidator(_url)]
    metrics: list[str] = Field(min_length=1)
    min_samples: _Int = Field(default=1, ge=1)

    @property
    def label(self) -> str:
        return f"metrics at {self.url}: {', '.join(self.metrics)}"

    async def _probe(self, target: Target, timeout: float) -> _Outcome:
        response = await http_get(target, self.url, timeout=timeout, accept="text/plain")
        if isinstance(response, HttpFailure):
            return _Outcome(False, response.detail, retry=not response.permanent)
        if response.status != 200:
            return _Outcome(False, f"HTTP {response.status} from {self.url}")
        text = response.text
        if response.truncated:  # parse the complete lines that did arrive
            text = text[: text.rfind("\n") + 1]
        try:
            families = parse_exposition(text)
        except ValueError as exc:
            return _Outcome(False, f"invalid exposition format: {exc}")
        by_name = Counter(s.name for samples in families.values() for s in samples)
        total = sum(by_name.values())
        missing = []
        for metric in self.metrics:
            count = max(len(families.get(metric, ())), by_name.get(metric, 0))
            if count < self.min_samples:
                missing.append(f"{metric} ({count} samples)" if count else metric)
        seen = f"{total} samples in {len(families)} families"
        if response.truncated:
            seen += f" (response cut at {MAX_BODY} bytes)"
        if missing:
            return _Outcome(False, f"missing {', '.join(missing)}; {seen}")
        return _Outcome(True, f"all {len(self.metrics)} metrics present; {seen}")


class FileContains(ScriptCheck):
    """``path`` is a regular file containing ``text`` and matching ``regex`` (if given).

    ``regex`` is a Python regular expression searched with ``re.MULTILINE``.
    """

    type: Literal["file_contains"] = "file_contains"
    path: str = Field(pattern=r"^/")
    text: str | None = None
    regex: Regex | None = None

    @property
    def label(self) -> str:
        what = [f"contains {self.text!r}"] if self.text is not None else []
        what += [f"matches /{self.regex}/"] if self.regex is not None else []
        return f"file {self.path} " + (" and ".join(what) or "exists")

    @property
    def script(self) -> str:
        path = shlex.quote(self.path)
        return f"""set -o pipefail
[ -e {path} ] || exit 3
[ -f {path} ] || exit 4
head -c {MAX_BODY} -- {path} | base64
"""

    def _judge(self, result: RunResult) -> _Outcome:
        if result.exit_code in (3, 4) and not result.timed_out:
            missing = result.exit_code == 3
            return _Outcome(False, "does not exist" if missing else "not a regular file")
        if not result.ok:
            return _failure(result, f"reading {self.path}")
        content = probe_output(result).decode("utf-8", "replace")
        if self.text is not None and self.text not in content:
            return _Outcome(False, f"does not contain {self.text!r}")
        if self.regex is not None and not re.search(self.regex, content, re.MULTILINE):
            return _Outcome(False, f"no match for /{self.regex}/")
        return _Outcome(True, f"{len(content.encode())} bytes checked")


CheckSpec = Annotated[
    PackageInstalled | ProcessRunning | PortListening | HttpEndpoint | PrometheusMetrics
    | FileContains,
    Field(discriminator="type"),
]
"""Any check, discriminated by its ``type`` field (for definitions and stored results)."""

CHECK_TYPES: dict[str, type[Check]] = {
    cls.model_fields["type"].default: cls
    for cls in (PackageInstalled, ProcessRunning, PortListening, HttpEndpoint,
                PrometheusMetrics, FileContains)
}


class CheckSpecError(ValueError):
    """A check spec is invalid; ``field`` names the offending field when there is one."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


def _describe(error: ErrorDetails) -> tuple[str | None, str]:
    field = ".".join(str(part) for part in error["loc"]) or None
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        return field, f"unknown field {field!r}"
    if error["type"] == "missing":
        return field, f"missing required field {field!r}"
    return field, f"field {field!r}: {message}" if field else message


def parse_check(data: Mapping[str, Any]) -> Check:
    """Build a check from a mapping with a ``type`` key (values already rendered).

    ``CheckSpecError`` (a ``ValueError``) for an unknown type or bad fields.
    """
    if not isinstance(data, Mapping):
        raise CheckSpecError(f"a check must be a mapping, got {type(data).__name__}")
    kind = data.get("type")
    known = ", ".join(CHECK_TYPES)
    if kind is None:
        raise CheckSpecError(f"check has no 'type'; expected one of: {known}", "type")
    cls = CHECK_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise CheckSpecError(f"unknown check type {kind!r}; expected one of: {known}", "type")
    try:
        return cls.model_validate(dict(data))
    except ValidationError as exc:
        problems = [_describe(error) for error in exc.errors()]
        message = f"{kind} check: " + "; ".join(text for _, text in problems)
        raise CheckSpecError(message, problems[0][0]) from exc


async def _until_passes(
    target: Target, check: Check, deadline: float, interval: float
) -> CheckResult:
    started, attempts = time.monotonic(), 0
    while True:
        attempts += 1
        # A probe gets at least 5 s even near the deadline: slow targets must not turn a
        # passing check into a timeout. The deadline only stops new attempts.
        budget = max(deadline - time.monotonic(), 5.0)
        result, retry = await check._attempt(target, budget)
        if result.passed or not retry or time.monotonic() + interval > deadline:
            return result.model_copy(
                update={"duration": time.monotonic() - started, "attempts": attempts}
            )
        await asyncio.sleep(interval)


async def _together_until_pass(
    target: Target, checks: Sequence[ScriptCheck], deadline: float, interval: float,
    first: Sequence[RunResult] | None,
) -> list[CheckResult]:
    """``_until_passes`` for several script checks at once: each attempt is one run of
    the scripts of the checks still failing (the first one's results may be ``first``);
    a check that passed (or cannot pass) is not run again."""
    started, attempts = time.monotonic(), 0
    done: dict[int, CheckResult] = {}
    pending = list(range(len(checks)))
    while pending:
        attempts += 1
        if first is not None:
            results, first = list(first), None
        else:
            budget = max(deadline - time.monotonic(), 5.0)
            results = await run_parts(target, [checks[i].script for i in pending],
                                      timeout=budget)
        now = time.monotonic()
        retrying = []
        for index, result in zip(pending, results, strict=True):
            check = checks[index]
            outcome = check._judge(result)
            if outcome.passed or not outcome.retry or now + interval > deadline:
                done[index] = CheckResult(
                    name=check.label, type=check.type, passed=outcome.passed,
                    detail=outcome.detail, duration=now - started, attempts=attempts)
            else:
                retrying.append(index)
        pending = retrying
        if pending:
            await asyncio.sleep(interval)
    return [done[index] for index in range(len(checks))]


def batched_scripts(checks: Sequence[Check]) -> list[str]:
    """The scripts ``run_checks`` runs together in an attempt (those of the
    ``ScriptCheck`` among ``checks``, in order): what its ``first`` holds the results of."""
    return [check.script for check in checks if isinstance(check, ScriptCheck)]


async def run_checks(
    target: Target, checks: Sequence[Check], *, timeout: float = 15.0, interval: float = 0.5,
    first: Sequence[RunResult] | None = None,
) -> list[CheckResult]:
    """Run ``checks``, retrying each failing one every ``interval`` seconds until it
    passes or ``timeout`` seconds have passed: the script checks together (one run per
    attempt), each other check concurrently with them. Results are in ``checks`` order.

    ``first``: the results of the first attempt of the script checks (of
    ``batched_scripts(checks)``), when the caller ran them in a run of its own.
    """
    deadline = time.monotonic() + timeout
    scripted = [check for check in checks if isinstance(check, ScriptCheck)]
    others = [check for check in checks if not isinstance(check, ScriptCheck)]
    if first is not None and len(first) != len(scripted):
        raise ValueError(f"{len(first)} first results for {len(scripted)} script checks")
    together = asyncio.ensure_future(
        _together_until_pass(target, scripted, deadline, interval, first))
    alone = [asyncio.ensure_future(_until_passes(target, check, deadline, interval))
             for check in others]
    try:
        await asyncio.gather(together, *alone)
    except BaseException:
        # gather leaves the other probes running when one raises (say, the target went
        # away) or when we are cancelled: stop them before passing the error on.
        for task in (together, *alone):
            task.cancel()
        await asyncio.gather(together, *alone, return_exceptions=True)
        raise
    scripted_results = iter(together.result())
    other_results = iter(task.result() for task in alone)
    return [next(scripted_results) if isinstance(check, ScriptCheck) else next(other_results)
            for check in checks]
