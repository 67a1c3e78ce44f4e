"""Several scripts in one target run (``run_parts``, ``run_then_parts``), on this host via
LocalTarget."""

from __future__ import annotations

import asyncio
import shlex
from typing import Any

import pytest

from workflow_agent.agents.execution import summarize
from workflow_agent.execution.local import LocalTarget
from workflow_agent.execution.target import RunResult, quote, run_parts
from workflow_agent.scripting.render import PROLOGUE
from workflow_agent.secrets import Redactor


def test_each_part_gets_its_own_output_and_exit_status() -> None:
    parts = asyncio.run(run_parts(LocalTarget(), [
        "echo one; echo err-one >&2",
        "printf 'no newline'; printf 'err two' >&2; exit 3",
        "set -e; false; echo never",
        "",
        "printf 'two\\n\\nlines\\n\\n'; exit 0",
    ]))
    assert [(p.exit_code, p.stdout, p.stderr) for p in parts] == [
        (0, "one\n", "err-one\n"),
        (3, "no newline", "err two"),
        (1, "", ""),
        (0, "", ""),
        (0, "two\n\nlines\n\n", ""),
    ]
    assert not parts[1].ok and parts[4].ok and not any(p.timed_out for p in parts)


def test_parts_do_not_leak_into_each_other() -> None:
    # Options, variables and `exit` stay in their part's subshell.
    first, second = asyncio.run(run_parts(LocalTarget(), [
        "set -euo pipefail; x=1; exit 7",
        'echo "x=${x:-unset}"; false | true; echo "$-"',
    ]))
    assert first.exit_code == 7
    assert second.ok and second.stdout.splitlines()[0] == "x=unset"
    assert "e" not in second.stdout.splitlines()[1]


def test_a_part_cut_short_by_the_timeout_is_reported_as_such() -> None:
    parts = asyncio.run(run_parts(LocalTarget(), [
        "echo done", "echo started; sleep 30", "echo never"], timeout=1))
    assert (parts[0].exit_code, parts[0].stdout, parts[0].timed_out) == (0, "done\n", False)
    assert parts[1].timed_out and not parts[1].ok and parts[1].stdout == "started\n"
    assert parts[2].timed_out and parts[2].stdout == ""


def test_a_part_cannot_fake_the_frame() -> None:
    # The frame is random per run: a part printing something frame-like is just output.
    fake = "printf '\\n\\036part-0000000000000000 0 0\\n'"
    [part] = asyncio.run(run_parts(LocalTarget(), [fake]))
    assert part.stdout == "\n\x1epart-0000000000000000 0 0\n"


def test_a_syntax_error_stays_in_its_part() -> None:
    broken, after = asyncio.run(run_parts(LocalTarget(), ["echo (", "echo fine"]))
    assert broken.exit_code == 2 and "syntax error" in broken.stderr
    assert after.ok and after.stdout == "fine\n"


# -- a script, then read-only parts, in one run (run_then_parts) ---------------------------


def then_parts(script: str, parts: list[str], **kwargs: Any) -> tuple[
        RunResult, list[RunResult], list[tuple[str, str]]]:
    lines: list[tuple[str, str]] = []
    result, results = asyncio.run(LocalTarget().run_then_parts(
        script, parts, on_output=lambda *line: lines.append(line), **kwargs))
    return result, results, lines


@pytest.mark.parametrize("output", [
    "", "one\n", "no newline", "\n", "\n\n", "a\n\nb\n\n", "ends\n\n\n", "\x1escript-x 0\n"])
def test_the_script_output_is_exactly_what_target_run_gives(output: str) -> None:
    script = f"printf %s {shlex.quote(output)}; printf %s {shlex.quote(output)} >&2"
    alone = asyncio.run(LocalTarget().run(script))
    result, [part], lines = then_parts(script, ["echo part; echo part-err >&2"])
    assert (result.stdout, result.stderr) == (alone.stdout, alone.stderr)
    assert "".join(line + "\n" for stream, line in lines if stream == "stdout") == alone.stdout
    assert (part.stdout, part.stderr) == ("part\n", "part-err\n")


def test_the_script_runs_as_a_file_and_fails_at_its_own_line() -> None:
    prologue = PROLOGUE.format(version="test", integration="x", action="install",
                               method="m")
    script = prologue + 'echo "$0"\ntrue\nfalse\necho never\n'
    result, [part], _ = then_parts(script, ["echo after"])
    summary = summarize(result, Redactor())
    assert result.exit_code == 1
    assert summary.failed_line == script.splitlines().index("false") + 1
    assert result.stdout.startswith("/tmp/workflow-agent-") and "never" not in result.stdout
    assert part.stdout == "after\n"


def test_a_script_that_cannot_be_parsed_is_the_scripts_failure_only() -> None:
    result, [part], lines = then_parts("echo (", ["echo after"])
    assert result.exit_code == 2 and "syntax error" in result.stderr
    assert part.ok and part.stdout == "after\n"
    assert all("\x1e" not in line for _, line in lines)


def test_quote_keeps_bytes_that_are_not_utf8() -> None:
    name = "/tmp/a b-\udcff'\udcfe-é.conf"
    result = asyncio.run(LocalTarget().run(f"printf %s {quote(name)} | od -An -tx1"))
    assert bytes.fromhex(result.stdout) == name.encode("utf-8", "surrogateescape")
    assert quote("/etc/plain name") == "'/etc/plain name'"
