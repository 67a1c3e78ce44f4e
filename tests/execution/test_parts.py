"""Several scripts in one target run (``run_parts``), on this host via LocalTarget."""

from __future__ import annotations

import asyncio

from workflow_agent.execution.local import LocalTarget
from workflow_agent.execution.target import run_parts


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
