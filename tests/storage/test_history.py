"""The history store against real databases: SQLite files, and PostgreSQL when available."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import create_engine, update

from workflow_agent.errors import HistoryError, InvalidInputError
from workflow_agent.secrets import MASK, Redactor
from workflow_agent.storage import tables
from workflow_agent.storage.baselines import BaselineIndex
from workflow_agent.storage.history import (
    HEAD_REVISION,
    MIN_ID_PREFIX,
    HistoryStore,
    alembic_config,
)
from workflow_agent.storage.spool import HistorySpool

T0 = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)


def _run_python(code: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
    )


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "nested" / "dir" / "history.db"


@pytest.fixture
def store(db_path: Path) -> Iterator[HistoryStore]:
    history = HistoryStore.for_path(db_path)
    history.open()
    yield history
    history.close()


def _new_id() -> str:
    return str(uuid.uuid4())


def _full_workflow(history: HistoryStore, *, integration: str = "nginx") -> str:
    """Record a complete install workflow and return its id."""
    wid = _new_id()
    history.start_workflow(
        workflow_id=wid,
        action="install",
        integration=integration,
        target="sandbox:debian-12",
        params={"port": 8080, "modules": ["status", "ssl"], "nested": {"on": True}},
    )
    for offset, name in enumerate(("facts", "plan", "execute")):
        history.record_stage(
            wid,
            name=name,
            status="succeeded",
            started_at=T0 + timedelta(seconds=offset),
            finished_at=T0 + timedelta(seconds=offset, milliseconds=250),
            detail={"step": offset},
        )
        history.checkpoint(wid, stage=name, state_json=json.dumps({"after": name}))
    history.add_artifact(wid, stage="plan", kind="script", name="install.sh", content="echo hi\n")
    history.add_artifact(wid, stage="execute", kind="output", name="stdout", content="hi\n")
    history.finish_workflow(wid, status="succeeded", exit_code=0)
    return wid


def _check_round_trip(history: HistoryStore) -> None:
    """The whole life of a few workflows, read back through every read method."""
    first = _full_workflow(history, integration="nginx")
    failed = _new_id()
    history.start_workflow(
        workflow_id=failed,
        action="verify",
        integration="redis",
        target="local",
        params={},
        fleet_id="fleet-1",
    )
    history.record_stage(
        failed,
        name="verify",
        status="failed",
        started_at=T0,
        finished_at=T0 + timedelta(seconds=2),
    )
    history.finish_workflow(failed, status="failed", error="port 6379 closed", exit_code=5)
    last = _full_workflow(history, integration="nginx")

    record = history.get_workflow(first)
    assert (record.id, record.action, record.integration) == (first, "install", "nginx")
    assert record.target == "sandbox:debian-12"
    assert record.status == "succeeded"
    assert record.exit_code == 0
    assert record.error is None
    assert record.params == {"port": 8080, "modules": ["status", "ssl"], "nested": {"on": True}}
    assert record.pid == os.getpid()
    assert record.host == socket.gethostname()
    assert record.started_at.tzinfo is not None
    assert record.finished_at is not None
    assert record.finished_at >= record.started_at
    assert record.duration is not None
    assert record.duration >= 0
    assert [(s.name, s.status) for s in record.stages] == [
        ("facts", "succeeded"),
        ("plan", "succeeded"),
        ("execute", "succeeded"),
    ]
    assert record.stages[1].started_at == T0 + timedelta(seconds=1)
    assert record.stages[1].started_at.utcoffset() == timedelta(0)
    assert record.stages[1].duration == pytest.approx(0.25)
    assert record.stages[2].detail == {"step": 2}
    assert [c.stage for c in record.checkpoints] == ["facts", "plan", "execute"]
    assert all(c.created_at.tzinfo is not None for c in record.checkpoints)
    assert [(a.stage, a.kind, a.name, a.content) for a in record.artifacts] == [
        ("plan", "script", "install.sh", "echo hi\n"),
        ("execute", "output", "stdout", "hi\n"),
    ]
    assert history.last_checkpoint(first) == ("execute", '{"after": "execute"}')

    failed_record = history.get_workflow(failed)
    assert failed_record.status == "failed"
    assert failed_record.error == "port 6379 closed"
    assert failed_record.exit_code == 5
    assert failed_record.fleet_id == "fleet-1"
    assert failed_record.stages[0].detail == {}
    assert failed_record.checkpoints == []
    assert history.last_checkpoint(failed) is None

    assert [w.id for w in history.list_workflows()] == [last, failed, first]
    assert [w.id for w in history.list_workflows(limit=2)] == [last, failed]
    assert [w.id for w in history.list_workflows(integration="nginx")] == [last, first]
    assert [w.id for w in history.list_workflows(status="failed")] == [failed]
    assert history.list_workflows(integration="redis", status="succeeded") == []
    assert history.list_workflows(limit=0) == []
    summary = history.list_workflows(limit=1)[0]
    assert summary == history.list_workflows(integration="nginx", limit=1)[0]
    assert (summary.status, summary.exit_code) == ("succeeded", 0)

    assert history.latest_snapshot(target="local", integration="redis") is None
    history.save_snapshot(target="local", integration="redis", workflow_id=failed, content="[1]")
    history.save_snapshot(target="local", integration="redis", workflow_id=failed, content="[2]")
    history.save_snapshot(target="other", integration="redis", workflow_id=failed, content="[3]")
    assert history.latest_snapshot(target="local", integration="redis") == "[2]"


def test_round_trip(store: HistoryStore) -> None:
    _check_round_trip(store)


def test_data_survives_reopen(db_path: Path) -> None:
    with HistoryStore.for_path(db_path) as first:
        wid = _full_workflow(first)
    with HistoryStore.for_path(db_path) as second:
        assert second.get_workflow(wid).status == "succeeded"
        assert len(second.get_workflow(wid).stages) == 3


def test_sqlite_settings(store: HistoryStore, db_path: Path) -> None:
    assert db_path.is_file()
    with contextlib.closing(sqlite3.connect(db_path)) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    # foreign_keys is per connection, so look at one of the store's own.
    with pytest.raises(HistoryError, match="no workflow with id 'nope'"):
        store.record_stage("nope", name="x", status="skipped", started_at=T0, finished_at=T0)


# -- the redactor ------------------------------------------------------------------------

# Contains characters JSON escapes, so a redaction of the JSON text alone would miss it.
SECRET = 'pa"ss\\wörd-s3cr3t'
PLAIN_SECRET = "hunter2-plain-token"


def _secret_forms() -> list[bytes]:
    """Every way the secrets could be spelled in the file: raw, and escaped inside JSON."""
    forms = {SECRET, PLAIN_SECRET}
    for secret in (SECRET, PLAIN_SECRET):
        for ascii_only in (True, False):
            forms.add(json.dumps(secret, ensure_ascii=ascii_only)[1:-1])
    return [form.encode() for form in forms]


def test_secrets_never_reach_the_database_file(db_path: Path) -> None:
    redactor = Redactor()
    history = HistoryStore.for_path(db_path, redactor=redactor)
    # The store must use this very object, even while it is still empty (falsy).
    assert history.redactor is redactor
    redactor.add([SECRET, PLAIN_SECRET])
    history.open()
    wid = _new_id()
    history.start_workflow(
        workflow_id=wid,
        action="install",
        integration="postgres",
        target=f"ssh://admin:{PLAIN_SECRET}@db1",
        params={"password": SECRET, "nested": [{"token": PLAIN_SECRET}], SECRET: "as a key"},
    )
    history.record_stage(
        wid,
        name="execute",
        status="failed",
        started_at=T0,
        finished_at=T0,
        detail={"stderr": f"login failed for {SECRET}"},
    )
    history.checkpoint(
        wid, stage="execute", state_json=json.dumps({"params": {"password": SECRET}})
    )
    history.add_artifact(
        wid, stage="execute", kind="output", name="stderr", content=f"auth {PLAIN_SECRET} bad"
    )
    history.add_artifact(
        wid,
        stage="facts",
        kind="facts",
        name="facts.json",
        content=json.dumps({"env": {"DB_PASSWORD": SECRET}}, indent=2),
    )
    history.save_snapshot(
        target=f"ssh://admin:{PLAIN_SECRET}@db1",
        integration="postgres",
        workflow_id=wid,
        content=json.dumps({"files": {"/etc/app.conf": f"password={SECRET}"}}),
    )
    history.finish_workflow(wid, status="failed", error=f"psql: bad password {SECRET}")

    record = history.get_workflow(wid)
    assert record.params["password"] == MASK
    assert record.params["nested"] == [{"token": MASK}]
    assert record.params[MASK] == "as a key"
    assert record.target == f"ssh://admin:{MASK}@db1"
    assert record.stages[0].detail == {"stderr": f"login failed for {MASK}"}
    assert record.error == f"psql: bad password {MASK}"
    assert json.loads(record.artifacts[1].content) == {"env": {"DB_PASSWORD": MASK}}
    checkpoint = history.last_checkpoint(wid)
    assert checkpoint is not None
    assert json.loads(checkpoint[1]) == {"params": {"password": MASK}}
    # Lookups go through the redactor too, so they find what was stored.
    snapshot = history.latest_snapshot(
        target=f"ssh://admin:{PLAIN_SECRET}@db1", integration="postgres"
    )
    assert snapshot is not None
    assert MASK in snapshot

    # While open, recent pages live in the -wal file; after close they are in the .db.
    _assert_no_secret_bytes(db_path, expect_wal=True)
    history.close()
    _assert_no_secret_bytes(db_path, expect_wal=False)


def _assert_no_secret_bytes(db_path: Path, *, expect_wal: bool) -> None:
    files = [p for p in db_path.parent.iterdir() if p.name.startswith(db_path.name)]
    assert db_path in files
    if expect_wal:
        assert db_path.with_name(db_path.name + "-wal") in files
    for path in files:
        data = path.read_bytes()
        for form in _secret_forms():
            assert form not in data, f"{form!r} found in {path.name}"


def test_unchanged_json_keeps_its_exact_text(db_path: Path) -> None:
    with HistoryStore.for_path(db_path, redactor=Redactor([PLAIN_SECRET])) as history:
        wid = _full_workflow(history)
        state = '{ "b": 1,\n  "a": [1, 2] }'
        history.checkpoint(wid, stage="verify", state_json=state)
        assert history.last_checkpoint(wid) == ("verify", state)


# -- crashes -----------------------------------------------------------------------------

CRASHING_CHILD = """
    import sys, time
    from datetime import UTC, datetime
    from pathlib import Path
    from workflow_agent.storage.history import HistoryStore

    store = HistoryStore.for_path(Path(sys.argv[1]))
    store.open()
    wid = sys.argv[2]
    store.start_workflow(
        workflow_id=wid, action="install", integration="nginx", target="local", params={}
    )
    for name in ("facts", "plan"):
        now = datetime.now(UTC)
        store.record_stage(wid, name=name, status="succeeded", started_at=now, finished_at=now)
    store.checkpoint(wid, stage="plan", state_json='{"stage": "plan"}')
    print("ready", flush=True)
    time.sleep(120)
"""


def test_killed_workflow_is_reported_incomplete(store: HistoryStore, db_path: Path) -> None:
    wid = _new_id()
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(CRASHING_CHILD), str(db_path), wid],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == "ready\n"
        assert store.get_workflow(wid).status == "running"
        assert [w.id for w in store.list_workflows(status="running")] == [wid]
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait(timeout=30)
        if child.stdout is not None:
            child.stdout.close()
    assert child.returncode == -signal.SIGKILL

    record = store.get_workflow(wid)
    assert record.status == "incomplete"
    assert record.finished_at is None
    assert [s.name for s in record.stages] == ["facts", "plan"]
    assert store.last_checkpoint(wid) == ("plan", '{"stage": "plan"}')
    assert [w.id for w in store.list_workflows(status="incomplete")] == [wid]
    assert store.list_workflows(status="running") == []
    assert store.list_workflows()[0].status == "incomplete"
    # Derived on read only: the row itself still says running.
    with contextlib.closing(sqlite3.connect(db_path)) as raw:
        row = raw.execute("SELECT status FROM workflows WHERE id = ?", (wid,)).fetchone()
    assert row == ("running",)


def test_running_workflow_of_this_process_or_another_host(store: HistoryStore) -> None:
    mine = _new_id()
    store.start_workflow(
        workflow_id=mine, action="plan", integration="nginx", target="local", params={}
    )
    assert store.get_workflow(mine).status == "running"

    elsewhere = _new_id()
    store.start_workflow(
        workflow_id=elsewhere, action="plan", integration="nginx", target="local", params={}
    )
    engine = create_engine(store.url)
    try:
        with engine.begin() as conn:
            conn.execute(
                update(tables.workflows)
                .where(tables.workflows.c.id == elsewhere)
                .values(host="some-other-host", pid=2**22 + 12345)
            )
    finally:
        engine.dispose()
    # Its process cannot be checked from here, so the row is trusted.
    assert store.get_workflow(elsewhere).status == "running"


# -- migrations ---------------------------------------------------------------------------


def test_head_revision_constant_matches_alembic() -> None:
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(alembic_config())
    assert script.get_heads() == [HEAD_REVISION]


def test_fresh_database_is_migrated_to_head(store: HistoryStore, db_path: Path) -> None:
    with contextlib.closing(sqlite3.connect(db_path)) as raw:
        assert raw.execute("SELECT version_num FROM alembic_version").fetchall() == [
            (HEAD_REVISION,)
        ]
        names = {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert names >= {"workflows", "stages", "checkpoints", "artifacts", "snapshots"}


def test_migrations_match_the_table_definitions(store: HistoryStore) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    engine = create_engine(store.url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(context, tables.metadata) == []
    finally:
        engine.dispose()


OPEN_AND_LIST_MODULES = """
    import sys
    from pathlib import Path
    from workflow_agent.storage.history import HistoryStore

    store = HistoryStore.for_path(Path(sys.argv[1]))
    store.open()
    store.list_workflows()
    store.close()
    print(sorted(m for m in sys.modules if m.partition(".")[0] == "alembic"))
"""


def test_reopening_does_not_import_alembic(db_path: Path) -> None:
    # Control: a fresh database does need Alembic, so the check below means something.
    first = _run_python(OPEN_AND_LIST_MODULES, str(db_path))
    assert first.stdout.strip() != "[]"
    again = _run_python(OPEN_AND_LIST_MODULES, str(db_path))
    assert again.stdout.strip() == "[]"


def test_concurrent_first_opens_migrate_once(db_path: Path) -> None:
    code = textwrap.dedent(
        """
        import sys
        from pathlib import Path
        from workflow_agent.storage.history import HistoryStore
        store = HistoryStore.for_path(Path(sys.argv[1]))
        store.open()
        store.close()
        """
    )
    children = [
        subprocess.Popen([sys.executable, "-c", code, str(db_path)], stderr=subprocess.PIPE)
        for _ in range(4)
    ]
    for child in children:
        _, err = child.communicate(timeout=60)
        assert child.returncode == 0, err.decode()
    with HistoryStore.for_path(db_path) as history:
        assert history.list_workflows() == []


def test_unknown_schema_revision_is_a_history_error(db_path: Path) -> None:
    with HistoryStore.for_path(db_path):
        pass
    with contextlib.closing(sqlite3.connect(db_path)) as raw, raw:
        raw.execute("UPDATE alembic_version SET version_num = '9999'")
    history = HistoryStore.for_path(db_path)
    with pytest.raises(HistoryError, match="'9999'") as caught:
        history.open()
    assert caught.value.hint is not None
    assert "newer workflow-agent" in caught.value.hint
    assert not history.is_open


def test_not_a_database_is_a_history_error(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    db_path.write_bytes(b"this is not a sqlite file at all, just text" * 100)
    with pytest.raises(HistoryError, match="cannot open the history database") as caught:
        HistoryStore.for_path(db_path).open()
    assert caught.value.hint is not None
    assert str(db_path) in caught.value.hint
    assert caught.value.__cause__ is not None


def test_use_before_open_is_a_history_error(db_path: Path) -> None:
    with pytest.raises(HistoryError, match="not open"):
        HistoryStore.for_path(db_path).list_workflows()


def test_open_and_close_are_idempotent(db_path: Path) -> None:
    history = HistoryStore.for_path(db_path)
    history.open()
    history.open()
    history.close()
    history.close()
    history.open()
    assert history.list_workflows() == []
    history.close()


def test_invalid_url_is_a_history_error() -> None:
    with pytest.raises(HistoryError, match="invalid history database URL"):
        HistoryStore("not a url")


# -- looking workflows up -------------------------------------------------------------------


def test_unknown_workflow_id_has_a_helpful_hint(store: HistoryStore) -> None:
    _full_workflow(store)
    for wanted in ("0123456789abcdef", "abc"):
        with pytest.raises(HistoryError) as caught:
            store.get_workflow(wanted)
        assert caught.value.hint is not None
        assert "workflow-agent history" in caught.value.hint
    with pytest.raises(HistoryError) as caught:
        store.get_workflow("abc")
    assert caught.value.hint is not None
    assert f"at least {MIN_ID_PREFIX}" in caught.value.hint


def test_id_prefix_lookup(store: HistoryStore) -> None:
    wid = _full_workflow(store)
    assert store.get_workflow(wid[:MIN_ID_PREFIX]).id == wid
    assert store.get_workflow(wid[:13]).id == wid
    with pytest.raises(HistoryError):
        store.get_workflow(wid[: MIN_ID_PREFIX - 1])


def test_ambiguous_prefix_and_like_wildcards(store: HistoryStore) -> None:
    for wid in ("abcdef01-0000", "abcdef02-0000", "abc%ef03-0000"):
        store.start_workflow(
            workflow_id=wid, action="plan", integration="x", target="local", params={}
        )
    with pytest.raises(HistoryError, match="ambiguous") as caught:
        store.get_workflow("abcdef0")
    assert "abcdef01-0000" in str(caught.value)
    assert "abcdef02-0000" in str(caught.value)
    # % and _ in a prefix are literal characters, not LIKE wildcards.
    assert store.get_workflow("abc%ef").id == "abc%ef03-0000"
    with pytest.raises(HistoryError):
        store.get_workflow("abc_ef0")


# -- misuse -------------------------------------------------------------------------------


def test_writes_for_unknown_workflows_fail(store: HistoryStore) -> None:
    missing = _new_id()
    calls: list[Callable[[], None]] = [
        lambda: store.checkpoint(missing, stage="plan", state_json="{}"),
        lambda: store.add_artifact(missing, stage="plan", kind="plan", name="p", content="x"),
        lambda: store.finish_workflow(missing, status="succeeded"),
        lambda: store.save_snapshot(
            target="local", integration="x", workflow_id=missing, content="{}"
        ),
    ]
    for call in calls:
        with pytest.raises(HistoryError, match=missing):
            call()


def test_duplicate_workflow_id(store: HistoryStore) -> None:
    wid = _full_workflow(store)
    with pytest.raises(HistoryError, match="already in the history"):
        store.start_workflow(
            workflow_id=wid, action="install", integration="x", target="t", params={}
        )


def test_bad_arguments_are_value_errors(store: HistoryStore) -> None:
    with pytest.raises(ValueError, match="action"):
        store.start_workflow(
            workflow_id=_new_id(), action="explode", integration="x", target="t", params={}
        )
    wid = _full_workflow(store)
    with pytest.raises(ValueError, match="naive"):
        store.record_stage(
            wid,
            name="x",
            status="succeeded",
            started_at=datetime(2025, 1, 1),  # naive on purpose
            finished_at=T0,
        )
    with pytest.raises(ValueError, match="stage status"):
        store.record_stage(wid, name="x", status="running", started_at=T0, finished_at=T0)
    with pytest.raises(ValueError, match="final status"):
        store.finish_workflow(wid, status="running")
    # A filter comes from the user, so it is a user-facing error with the choices.
    with pytest.raises(InvalidInputError, match="bogus") as caught:
        store.list_workflows(status="bogus")
    assert caught.value.hint is not None
    assert "incomplete" in caught.value.hint


def test_non_utc_datetimes_are_stored_as_utc(store: HistoryStore) -> None:
    wid = _full_workflow(store)
    plus_two = T0.astimezone(timezone(timedelta(hours=2)))
    store.record_stage(wid, name="tz", status="skipped", started_at=plus_two, finished_at=T0)
    stage = store.get_workflow(wid).stages[-1]
    assert stage.started_at == T0
    assert stage.started_at.utcoffset() == timedelta(0)
    assert stage.duration == 0


# -- PostgreSQL -----------------------------------------------------------------------------


def _find_pg_tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True)
    return str(candidates[0]) if candidates else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """A throw-away PostgreSQL cluster on loopback; yields a URL without a database."""
    pytest.importorskip("psycopg", reason="psycopg is not installed (pip install psycopg[binary])")
    initdb, pg_ctl = _find_pg_tool("initdb"), _find_pg_tool("pg_ctl")
    if initdb is None or pg_ctl is None:
        pytest.skip("initdb/pg_ctl not found: apt-get install postgresql")
    prefix: list[str] = []
    if os.geteuid() == 0:
        # PostgreSQL refuses to run as root; run it as the postgres user instead.
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no postgres user to run PostgreSQL as")
        prefix = ["runuser", "-u", "postgres", "--"]
    data = Path(tempfile.mkdtemp(prefix="wfa-pg-"))
    if prefix:
        os.chown(data, owner.pw_uid, owner.pw_gid)
    port = _free_port()
    log = data / "server.log"

    def run(*command: str) -> None:
        done = subprocess.run([*prefix, *command], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            server_log = log.read_text(errors="replace") if log.exists() else ""
            shutil.rmtree(data, ignore_errors=True)
            pytest.fail(f"{command[0]} failed:\n{done.stdout}{done.stderr}{server_log}")

    run(initdb, "-D", str(data / "db"), "-U", "postgres", "--auth=trust", "-E", "UTF8")
    # Loopback only, socket in our own directory, no fsync: it is thrown away anyway.
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {data} -c fsync=off"
    run(pg_ctl, "-D", str(data / "db"), "-l", str(log), "-o", options, "-w", "start")
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}"
    finally:
        subprocess.run(
            [*prefix, pg_ctl, "-D", str(data / "db"), "-m", "immediate", "-w", "stop"],
            check=False,
            capture_output=True,
            timeout=120,
        )
        shutil.rmtree(data, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server: str) -> str:
    """A fresh, empty database on the throw-away server."""
    import psycopg

    name = "t_" + uuid.uuid4().hex[:12]
    admin = postgres_server.replace("postgresql+psycopg", "postgresql") + "/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return f"{postgres_server}/{name}"


def test_round_trip_on_postgresql(postgres_url: str) -> None:
    # Plain postgresql:// must work too (mapped to psycopg 3).
    with HistoryStore(postgres_url.replace("postgresql+psycopg", "postgresql")) as history:
        assert history.url.drivername == "postgresql+psycopg"
        _check_round_trip(history)
        wid = _full_workflow(history)
        assert history.get_workflow(wid[:MIN_ID_PREFIX]).id == wid
        with pytest.raises(HistoryError, match="no workflow"):
            history.get_workflow("zzzzzzzz")
        with pytest.raises(HistoryError, match="no workflow"):
            history.record_stage(
                "missing", name="x", status="skipped", started_at=T0, finished_at=T0
            )
    with HistoryStore(postgres_url) as again:
        assert len(again.list_workflows(limit=None)) == 4


def test_postgresql_migrations_match_the_table_definitions(postgres_url: str) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    with HistoryStore(postgres_url):
        pass
    engine = create_engine(postgres_url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(context, tables.metadata) == []
    finally:
        engine.dispose()


def test_spool_ingest_and_baseline_index_on_postgresql(postgres_url: str, tmp_path: Path) -> None:
    """One transaction per file on PostgreSQL too, where a failed statement spoils the
    transaction: the lines before a bad one still go in, each once."""
    spool_dir = tmp_path / "spool"
    spool = HistorySpool(spool_dir, Redactor())
    spool.start_workflow(workflow_id="w1", action="install", integration="x", target="t",
                         params={})
    spool.record_stage("w1", name="facts", status="succeeded", started_at=T0, finished_at=T0)
    spool.save_snapshot(target="t", integration="x", workflow_id="w1", content='{"a": 1}')
    [path] = spool_dir.glob("*.jsonl")
    good = path.read_bytes()
    spool.record_stage("ghost", name="facts", status="succeeded", started_at=T0,
                       finished_at=T0)
    index = BaselineIndex(tmp_path / "baselines")
    failing = HistoryStore(postgres_url, spool_dir=spool_dir, baselines=index)
    with pytest.raises(HistoryError, match="no workflow with id 'ghost'"):
        failing.open()
    failing.close()
    with HistoryStore(postgres_url) as history:
        assert [s.name for s in history.get_workflow("w1").stages] == ["facts"]
        assert history.spool_progress(path.name) == 3
    assert index.latest(target="t", integration="x") == '{"a": 1}' and not index.complete
    path.write_bytes(good)  # the bad line deleted
    spool.finish_workflow("w1", status="succeeded")
    with HistoryStore(postgres_url, spool_dir=spool_dir, baselines=index) as history:
        record = history.get_workflow("w1")
        assert (record.status, [s.name for s in record.stages]) == ("succeeded", ["facts"])
    assert index.complete and list(spool_dir.iterdir()) == []


def test_reopen_timing_smoke(db_path: Path) -> None:
    """Not a benchmark: catches an accidental slow path (e.g. migrating every time)."""
    with HistoryStore.for_path(db_path):
        pass
    started = time.perf_counter()
    with HistoryStore.for_path(db_path) as history:
        _full_workflow(history)
    assert time.perf_counter() - started < 1.0
