"""Snapshots and diffs of real directory trees on this host, via LocalTarget."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import re
import shlex
import shutil
from pathlib import Path

import pytest

from helpers import install_tiny_package
from workflow_agent.errors import ExecutionFailedError, InvalidInputError
from workflow_agent.execution.local import LocalTarget
from workflow_agent.execution.target import RunResult, Target, run_parts
from workflow_agent.verification.snapshot import (
    DEFAULT_IGNORE,
    FileEntry,
    Snapshot,
    SnapshotProbe,
    decode,
    diff,
    ignore_regex,
    remove_empty_dirs_created,
    take_snapshot,
)


def snap(*paths: Path | str, ignore: tuple[str, ...] = (), max_files: int = 1000) -> Snapshot:
    # Test trees live under /tmp, which DEFAULT_IGNORE skips: pass explicit patterns.
    return asyncio.run(take_snapshot(LocalTarget(), paths=[str(p) for p in paths],
                                     ignore=ignore, max_files=max_files))


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    for name in ("keep.txt", "modify.txt", "chmod.txt", "delete.txt", "name with spaces.txt"):
        (root / name).write_text(f"{name}\n")
    (root / "link").symlink_to("keep.txt")
    (root / "sub" / "nested.conf").write_text("a=1\n")
    return root


def test_snapshot_records_types_modes_hashes_and_links(tree: Path) -> None:
    snapshot = snap(tree)
    keep = snapshot.files[f"{tree}/keep.txt"]
    assert keep.type == "f" and keep.size == 9 and keep.mode == 0o644
    assert keep.uid == os.getuid() and keep.gid == os.getgid()
    assert keep.sha256 == hashlib.sha256(b"keep.txt\n").hexdigest()
    assert snapshot.files[f"{tree}/link"] == FileEntry(
        type="l", mode=0o777, uid=os.getuid(), gid=os.getgid(), size=8, target="keep.txt"
    )
    assert snapshot.files[str(tree)].type == "d" and snapshot.files[str(tree)].sha256 is None
    assert f"{tree}/name with spaces.txt" in snapshot.files
    assert len(snapshot.files) == 9
    # The host's package set, users and groups come along.
    assert "bash" in snapshot.packages and snapshot.users["root"].startswith("root:x:0:0:")
    assert "root" in snapshot.groups and snapshot.warnings == []
    assert Snapshot.model_validate_json(snapshot.model_dump_json()) == snapshot


def test_diff_reports_each_kind_of_change(tree: Path) -> None:
    before = snap(tree)
    (tree / "modify.txt").write_text("changed\n")
    (tree / "chmod.txt").chmod(0o600)
    (tree / "delete.txt").unlink()
    (tree / "new\nline.txt").write_text("x")
    (tree / "sub" / "new link").symlink_to("../keep.txt")
    (tree / "link").unlink()
    (tree / "link").symlink_to("modify.txt")
    (tree / "created" / "deeper").mkdir(parents=True)
    after = snap(tree)

    changes = diff(before, after)
    assert set(changes.added) == {
        f"{tree}/new\nline.txt", f"{tree}/sub/new link", f"{tree}/created", f"{tree}/created/deeper"
    }
    assert set(changes.removed) == {f"{tree}/delete.txt"}
    assert set(changes.modified) == {f"{tree}/modify.txt", f"{tree}/chmod.txt", f"{tree}/link"}
    content = changes.modified[f"{tree}/modify.txt"]
    assert content.content and content.metadata == []
    mode_only = changes.modified[f"{tree}/chmod.txt"]
    assert not mode_only.content and mode_only.metadata == ["mode 0644 -> 0600"]
    assert changes.modified[f"{tree}/link"].content
    assert not changes.is_empty
    assert changes.lines() == [
        f"+ {tree}/created (dir)",
        f"+ {tree}/created/deeper (dir)",
        f"+ {tree}/new\nline.txt (file)",
        f"+ {tree}/sub/new link (link)",
        f"- {tree}/delete.txt (file)",
        f"~ {tree}/chmod.txt (mode 0644 -> 0600)",
        f"~ {tree}/link (content)",
        f"~ {tree}/modify.txt (content)",
    ]
    # Directory sizes are not compared; an unchanged tree diffs empty.
    assert diff(after, snap(tree)).is_empty


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_owner_change_and_type_change(tree: Path) -> None:
    before = snap(tree)
    os.chown(tree / "keep.txt", 1, 1)
    (tree / "modify.txt").unlink()
    (tree / "modify.txt").mkdir()
    changes = diff(before, snap(tree))
    assert changes.lines() == [
        f"~ {tree}/keep.txt (owner 0:0 -> 1:1)",
        f"~ {tree}/modify.txt (content, mode 0644 -> 0755)",
    ]


def test_ignore_patterns(tree: Path) -> None:
    (tree / "cache" / "a" / "b").mkdir(parents=True)
    (tree / "cache" / "a" / "b" / "blob").write_text("x")
    (tree / "top.bak").write_text("x")
    (tree / "sub" / "deep.bak").write_text("x")
    snapshot = snap(tree, ignore=(f"{tree}/cache/**", f"{tree}/*.bak", f"{tree}/sub/nested.con?"))
    paths = set(snapshot.files)
    assert f"{tree}/cache" in paths  # the directory itself is kept, only its tree ignored
    assert not any(p.startswith(f"{tree}/cache/") for p in paths)
    assert f"{tree}/top.bak" not in paths
    assert f"{tree}/sub/deep.bak" in paths  # "*" stays within one path component
    assert f"{tree}/sub/nested.conf" not in paths


def test_ignore_regex_semantics() -> None:
    regex = ignore_regex(DEFAULT_IGNORE)
    assert regex is not None
    ignored = re.compile(regex, re.DOTALL)
    for path in ("/var/lib/dpkg/status", "/var/cache/apt/x/y", "/etc/passwd-", "/etc/shadow-",
                 "/etc/ld.so.cache", "/tmp/x", "/run/systemd/x", "/var/log/apt/history.log"):
        assert ignored.fullmatch(path), path
    for path in ("/var/lib/dpkg", "/etc/passwd", "/etc/default/foo-", "/etc/ld.so.cachex",
                 "/var/lib/prometheus", "/tmp"):
        assert not ignored.fullmatch(path), path
    assert ignore_regex([]) is None


def test_missing_paths_are_skipped_and_relative_paths_refused(tree: Path) -> None:
    snapshot = snap(tree / "absent", tree / "sub")
    assert set(snapshot.files) == {f"{tree}/sub", f"{tree}/sub/nested.conf"}
    assert snap(tree / "absent").files == {}
    with pytest.raises(InvalidInputError, match="absolute"):
        snap("relative/path")


def test_max_files_guard(tree: Path) -> None:
    with pytest.raises(InvalidInputError, match="more than 5 entries") as info:
        snap(tree, max_files=5)
    assert info.value.hint is not None and "max_files" in info.value.hint
    assert len(snap(tree, max_files=9).files) == 9
    with pytest.raises(InvalidInputError, match="more than 8 entries"):
        snap(tree, max_files=8)


@pytest.mark.parametrize("subdirs", [19, 21, 200])
def test_max_files_guard_when_few_entries_are_hashed(tmp_path: Path, subdirs: int) -> None:
    # 20, 22 and 201 entries (the tree's own directory too): head cuts the listing at
    # the 20th entry's first token, whether the walk has just ended or goes on.
    for number in range(subdirs):
        (tmp_path / f"d{number}").mkdir()
    with pytest.raises(InvalidInputError, match="more than 19 entries"):
        snap(tmp_path, max_files=19)
    assert len(snap(tmp_path, max_files=subdirs + 1).files) == subdirs + 1


def test_a_tree_too_large_stops_the_walk_at_the_limit(tmp_path: Path) -> None:
    # A listing larger than a pipe holds (~300 KB): find is still writing when head has
    # had enough, so it dies of SIGPIPE (a smaller one may be written in full first,
    # and then hashed: the refusal is the same).
    for number in range(3000):
        (tmp_path / f"{number:04}{'n' * 60}").write_text(str(number))
    probe = SnapshotProbe.of([str(tmp_path)], (), max_files=10)
    result = asyncio.run(LocalTarget().run(probe.script))
    # The script still ends well: the listing is cut after 9 * 10 + 1 tokens, and
    # nothing is hashed.
    assert result.exit_code == 0
    tokens = decode(result)
    assert tokens.index("PACKAGES") == 1 + 91
    assert not any(len(token) > 66 and token[64:66] == "  " for token in tokens)
    with pytest.raises(InvalidInputError):
        probe.parse(result, "here")


def test_files_hashed_in_several_batches(tmp_path: Path) -> None:
    # ~270 bytes a path: find runs sha256sum every ~500 files.
    contents = {tmp_path / f"{number:04}{'n' * 200}": str(number) for number in range(1200)}
    for path, text in contents.items():
        path.write_text(text)
    probe = SnapshotProbe.of([str(tmp_path)], ())
    files = probe.parse(asyncio.run(LocalTarget().run(probe.script)), "here").files
    assert len(files) == 1201
    for path, text in contents.items():
        assert files[str(path)].sha256 == hashlib.sha256(text.encode()).hexdigest()



def test_a_tree_listed_before_is_listed_and_hashed_in_one_walk(tmp_path: Path) -> None:
    """With an earlier snapshot, a tree hashed whole takes one find, its records and
    sha256sum's in several batches between them: the same snapshot as two walks take."""
    contents = {tmp_path / f"{number:04}{'n' * 200}": str(number) for number in range(990)}
    for path, text in contents.items():
        path.write_text(text)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "link").symlink_to("../0001")
    first = snap(tmp_path)
    (tmp_path / f"0002{'n' * 200}").write_text("changed")
    probe = SnapshotProbe.of([str(tmp_path)], (), since=first)
    assert "\\( -type f" in probe.script and "PIPESTATUS" not in probe.script
    result = asyncio.run(LocalTarget().run(probe.script))
    assert probe.parse(result, "here") == snap(tmp_path)
    assert probe.parse(result, "here").files[f"{tmp_path}/0002{'n' * 200}"].sha256 == (
        hashlib.sha256(b"changed").hexdigest())


@pytest.mark.parametrize(("grown", "kind"), [(1, "file"), (3000, "file"), (300, "dir")])
def test_a_tree_grown_past_the_limit_since_is_refused_all_the_same(
        tmp_path: Path, grown: int, kind: str) -> None:
    """One walk lists and hashes: head still cuts a tree grown past max_files, and the
    snapshot is refused, however many of its entries were hashed before the cut."""
    for number in range(9):
        (tmp_path / f"f{number}").write_text(str(number))
    first = snap(tmp_path, max_files=10)
    for number in range(grown):
        new = tmp_path / f"g{number:04}{'n' * 60}"
        new.mkdir() if kind == "dir" else new.write_text(str(number))
    probe = SnapshotProbe.of([str(tmp_path)], (), max_files=10, since=first)
    result = asyncio.run(LocalTarget().run(probe.script))
    assert result.exit_code == 0
    with pytest.raises(InvalidInputError, match="more than 10 entries"):
        probe.parse(result, "here")
    exact = SnapshotProbe.of([str(tmp_path)], (), max_files=10 + grown, since=first)
    assert exact.parse(asyncio.run(LocalTarget().run(exact.script)), "here") == snap(
        tmp_path, max_files=10 + grown)


def fake_result(*tokens: str) -> RunResult:
    raw = b"".join(t.encode("utf-8", "surrogateescape") + b"\0" for t in tokens)
    return RunResult(0, base64.b64encode(raw).decode(), "", 0.0)


def test_listing_and_hashes_parse_in_any_order() -> None:
    sha_a, sha_b = "a" * 64, "b" * 64
    trailer = ("PACKAGES", "ii \tbash\t5.2\n", "PASSWD", "root:x:0:0::/root:/bin/bash",
               "GROUP", "root:x:0:", "END")
    entry = ("0", "0", "1", "123.0000000000")
    probe = SnapshotProbe.of(["/x"], ())
    snapshot = probe.parse(fake_result(
        "wa-snapshot-3",
        f"{sha_b}  /x/b",  # a hash before its entry
        "d", "755", *entry, "/x", "", "11:5.0",
        "f", "644", *entry, "/x/a", "", "12:5.0",
        # Fields inside an entry may look like a hash or a marker: never read as such.
        "l", "777", *entry, "/x/PACKAGES", f"{sha_a}  /x/c", "13:5.0",
        f"{sha_a}  /x/a",
        "l", "777", *entry, "/x/link", "PACKAGES", "14:5.0",
        "f", "644", *entry, "/x/b", "", "15:5.0",
        *trailer,
    ), "here")
    assert set(snapshot.files) == {"/x", "/x/a", "/x/b", "/x/PACKAGES", "/x/link"}
    assert (snapshot.files["/x/a"].sha256, snapshot.files["/x/b"].sha256) == (sha_a, sha_b)
    assert snapshot.files["/x/PACKAGES"].target == f"{sha_a}  /x/c"
    assert snapshot.files["/x/link"].target == "PACKAGES"
    assert snapshot.packages == {"bash": "5.2"} and set(snapshot.users) == {"root"}
    with pytest.raises(ExecutionFailedError, match="garbled"):
        probe.parse(fake_result("wa-snapshot-3", "not a record", *trailer), "here")
    with pytest.raises(ExecutionFailedError, match="incomplete"):
        probe.parse(fake_result("wa-snapshot-2", *trailer), "here")


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"),
                    reason="mounting over /etc needs root and unshare")
def test_passwd_without_a_last_newline_and_no_group_file(tmp_path: Path) -> None:
    probe = SnapshotProbe.of([str(tmp_path)], ())
    script = tmp_path / "snapshot.sh"
    script.write_text(probe.script)
    # printf's escapes: a newline, and Latin-1 bytes (not UTF-8); no newline at the end.
    passwd = r"root:x:0:0:root:/root:/bin/bash\nodd:x:7:7:\351t\351:/:/bin/sh"
    # A private mount namespace: /etc there holds just that passwd (no group file).
    inner = f"mount -t tmpfs none /etc && printf {shlex.quote(passwd)} > /etc/passwd && " \
            f"exec bash {shlex.quote(str(script))}"
    result = asyncio.run(LocalTarget().run(f"exec unshare --mount bash -c {shlex.quote(inner)}"))
    tokens = decode(result)
    at = tokens.index("PASSWD")
    assert tokens[at : at + 4] == ["PASSWD", "root:x:0:0:root:/root:/bin/bash\nodd:x:7:7:\udce9t"
                                   "\udce9:/:/bin/sh", "GROUP", ""]
    snapshot = probe.parse(result, "here")
    assert snapshot.users["odd"] == "odd:x:7:7:\udce9t\udce9:/:/bin/sh"
    assert snapshot.groups == {} and snapshot.warnings == []


def test_non_utf8_file_names_survive(tree: Path) -> None:
    os.close(os.open(os.fsencode(tree) + b"/caf\xe9", os.O_CREAT | os.O_WRONLY, 0o644))
    snapshot = snap(tree)
    name = f"{tree}/caf\udce9"
    assert snapshot.files[name].sha256 is not None


def test_package_user_and_group_diff() -> None:
    before = Snapshot(
        packages={"curl": "7.88.1-10", "jq": "1.6-2.1"},
        users={"root": "root:x:0:0:root:/root:/bin/bash"},
        groups={"adm": "adm:x:4:"},
    )
    after = Snapshot(
        packages={"curl": "7.88.1-11", "prometheus-node-exporter": "1.5.0-1+b6"},
        config_files_remaining=["jq"],
        users={"root": "root:x:0:0:root:/root:/bin/sh",
               "prometheus": "prometheus:x:104:110::/var/lib/prometheus:/usr/sbin/nologin"},
        groups={"prometheus": "prometheus:x:110:"},
    )
    changes = diff(before, after)
    assert changes.lines() == [
        "+ package prometheus-node-exporter 1.5.0-1+b6",
        "- package jq 1.6-2.1",
        "~ package curl 7.88.1-10 -> 7.88.1-11",
        "+ package jq config files remain (removed, not purged)",
        "+ user prometheus",
        "~ user root",
        "+ group prometheus",
        "- group adm",
    ]
    assert diff(after, after).is_empty and diff(after, after).lines() == []


def test_remove_empty_dirs_created(tree: Path) -> None:
    (tree / "was-empty").mkdir()
    before = snap(tree)
    (tree / "a" / "b" / "c").mkdir(parents=True)
    (tree / "kept" / "inner").mkdir(parents=True)
    (tree / "kept" / "leftover.conf").write_text("x")
    (tree / "odd name\n").mkdir()
    changes = diff(before, snap(tree))

    removed = asyncio.run(remove_empty_dirs_created(LocalTarget(), changes))
    # Deepest first, so "a/b" is empty by the time its turn comes.
    assert removed == [f"{tree}/a/b/c", f"{tree}/a/b", f"{tree}/kept/inner", f"{tree}/a",
                       f"{tree}/odd name\n"]
    assert (tree / "kept" / "leftover.conf").exists() and (tree / "was-empty").is_dir()
    assert diff(before, snap(tree)).lines() == [f"+ {tree}/kept (dir)",
                                                f"+ {tree}/kept/leftover.conf (file)"]
    assert asyncio.run(remove_empty_dirs_created(LocalTarget(), diff(before, before))) == []


def test_nested_paths_are_listed_once(tree: Path) -> None:
    # Without folding nested paths together the 9 entries would count as 20.
    assert len(snap(tree, tree / "sub", f"{tree}/", max_files=9).files) == 9


def test_a_walk_within_a_subtree_meets_what_the_snapshot_lists_there(tree: Path) -> None:
    (tree / "sub" / "cache" / "deep").mkdir(parents=True)
    (tree / "sub" / "cache" / "deep" / "blob").write_text("x")
    (tree / "sub" / "odd name.bak").write_text("x")
    (tree / "subway").mkdir()  # a sibling whose name starts like the subtree's
    ignore = (f"{tree}/sub/cache/**", f"{tree}/*/*.bak")
    sub = f"{tree}/sub"
    cases = [
        ([tree], sub),  # walked from above: all but the way down is pruned
        ([f"{tree}/sub/nested.conf", f"{tree}/keep.txt", f"{tree}/subway"], sub),
        ([f"{tree}/sub"], str(tree)),
        ([f"{tree}/keep.txt"], sub),  # nothing of it within: no start point
    ]
    met = []
    for paths, within in cases:
        probe = SnapshotProbe.of([str(p) for p in paths], ignore)
        listed, walked = asyncio.run(run_parts(LocalTarget(), [
            probe.script,
            probe.walk(within) + "(( ${#paths[@]} )) && walk -print0 | base64 -w 4096; true",
        ]))
        inside = {p for p in probe.parse(listed, "here").files
                  if p == within or p.startswith(within + "/")}
        found = {p for p in decode(walked) if p == within or p.startswith(within + "/")}
        assert found == inside, (paths, within)
        met.append(found)
    assert f"{tree}/sub/cache" in met[0] and f"{tree}/sub/odd name.bak" not in met[0]
    assert f"{tree}/subway" not in met[1] and met[3] == set()


def test_one_run_can_take_a_snapshot_among_other_parts(tree: Path) -> None:
    probe = SnapshotProbe.of([str(tree)], ())
    before, listed, after = asyncio.run(run_parts(LocalTarget(), [
        "echo before", probe.script, "echo after; exit 4"]))
    assert probe.parse(listed, "here") == snap(tree)
    assert (before.stdout, after.stdout, after.exit_code) == ("before\n", "after\n", 4)


def _packages_token(result: RunResult) -> str:
    tokens = decode(result)
    return tokens[tokens.index("PACKAGES") + 1]


def test_packages_are_listed_again_only_when_the_package_database_changed(
    sandbox: Target,
) -> None:
    """A snapshot taken after another (``since``) skips ``dpkg-query`` while
    dpkg's database is as it was, and has the earlier packages; once a package is
    really installed (dpkg -i of a package built here) it lists them again."""
    first_probe = SnapshotProbe.of(["/etc/apt"])
    first = first_probe.parse(asyncio.run(sandbox.run(first_probe.script)), "sandbox")
    assert first.packages_stamp and "/var/lib/dpkg/status:" in first.packages_stamp
    assert first.packages["dpkg"] and "wa-test-pkg" not in first.packages

    probe = SnapshotProbe.of(["/etc/apt"], since=first)
    unchanged = asyncio.run(sandbox.run(probe.script))
    assert _packages_token(unchanged).splitlines()[1:] == ["#same"]
    again = probe.parse(unchanged, "sandbox")
    assert (again.packages, again.config_files_remaining, again.packages_stamp) == (
        first.packages, first.config_files_remaining, first.packages_stamp)
    assert diff(first, again).is_empty

    install_tiny_package(sandbox, "wa-test-pkg")
    changed = asyncio.run(sandbox.run(probe.script))
    assert "#same" not in _packages_token(changed)
    after = probe.parse(changed, "sandbox")
    assert after.packages_stamp != first.packages_stamp
    assert diff(first, after).lines() == ["+ package wa-test-pkg 1.0"]


def test_a_listing_left_out_needs_the_snapshot_it_stands_for() -> None:
    """Output saying ``#same`` parsed without that snapshot is refused, never read as
    "no packages"."""
    probe = SnapshotProbe.of(["/nonexistent"], ())
    raw = b"\0".join([b"wa-snapshot-3", b"PACKAGES", b"#db /var/lib/dpkg/status:1:2:3 \n#same\n",
                      b"PASSWD", b"", b"GROUP", b"", b"END", b""])
    result = RunResult(0, base64.b64encode(raw).decode(), "", 0.1)
    with pytest.raises(ExecutionFailedError, match="garbled"):
        probe.parse(result, "here")
    other = Snapshot(packages={"bash": "5.2"}, packages_stamp="/var/lib/dpkg/status:9:9:9 ")
    with pytest.raises(ExecutionFailedError, match="garbled"):
        SnapshotProbe.of(["/nonexistent"], (), since=other).parse(result, "here")


def test_a_snapshot_since_another_hashes_only_what_changed(tmp_path: Path) -> None:
    """Files that keep their stamp (inode, ctime, mtime, size) keep their hash and are not
    read again; one rewritten in place with its modification time put back, one replaced
    by a file of the same size, and a new one are hashed (every hash checked against a
    snapshot that hashes all)."""
    for number in range(40):  # 1.25 MiB: worth telling apart
        (tmp_path / f"f{number:02}").write_bytes(os.urandom(32 * 1024))
    first = snap(tmp_path)
    rewritten = tmp_path / "f01"
    before = rewritten.stat()
    rewritten.write_bytes(os.urandom(32 * 1024))
    os.utime(rewritten, ns=(before.st_atime_ns, before.st_mtime_ns))
    (tmp_path / "replacement").write_bytes(os.urandom(32 * 1024))
    os.replace(tmp_path / "replacement", tmp_path / "f02")
    (tmp_path / "f40").write_bytes(b"new\n")

    probe = SnapshotProbe.of([str(tmp_path)], (), since=first)
    assert "declare -A known" in probe.script
    result = asyncio.run(LocalTarget().run(probe.script))
    hashed = {token[66:] for token in decode(result)
              if len(token) > 66 and token[64:66] == "  "}
    assert hashed == {f"{tmp_path}/f01", f"{tmp_path}/f02", f"{tmp_path}/f40"}
    assert probe.parse(result, "here") == snap(tmp_path)
    assert diff(first, snap(tmp_path)).lines() == [
        f"+ {tmp_path}/f40 (file)", f"~ {tmp_path}/f01 (content)", f"~ {tmp_path}/f02 (content)"]


def test_a_small_tree_is_hashed_whole_even_since_another(tree: Path) -> None:
    """Telling a few small files apart costs more than hashing them."""
    probe = SnapshotProbe.of([str(tree)], (), since=snap(tree))
    assert "declare -A known" not in probe.script
    assert probe.parse(asyncio.run(LocalTarget().run(probe.script)), "here") == snap(tree)
