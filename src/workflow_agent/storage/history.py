"""``HistoryStore``: the record of every workflow the agent ran, kept in a SQL database.

SQLite (a file, in WAL mode) by default; PostgreSQL by URL. Every write is its own short
transaction, so a crash at any point loses nothing already written, and every text or
JSON value goes through the ``Redactor`` before it reaches the database.

Start-up is kept cheap: ``open()`` looks at ``alembic_version`` with plain SQLAlchemy and
imports Alembic (slow to import) only when the schema is missing or behind
``HEAD_REVISION``.

A workflow whose row still says ``running`` but whose process is gone from this host is
reported as ``incomplete``; the row is left alone, the status is derived on every read.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from sqlalchemy import (
    URL,
    Connection,
    Engine,
    create_engine,
    event,
    insert,
    inspect,
    make_url,
    select,
    text,
    update,
)
from sqlalchemy.exc import ArgumentError, IntegrityError, NoSuchModuleError, SQLAlchemyError
from sqlalchemy.pool import ConnectionPoolEntry

from workflow_agent.errors import HistoryError, InvalidInputError
from workflow_agent.secrets import Redactor
from workflow_agent.storage.tables import artifacts, checkpoints, snapshots, stages, workflows

if TYPE_CHECKING:
    from alembic.config import Config

#: The newest Alembic revision in ``migrations/versions``. A database at this revision is
#: used as is, without importing Alembic. Bump it with every new migration (a test checks).
HEAD_REVISION = "0001"

#: The Alembic environment shipped inside the package.
MIGRATIONS_DIR = Path(__file__).with_name("migrations")

ACTIONS = frozenset({"install", "verify", "uninstall", "plan"})
RUNNING = "running"
#: Derived on read for a ``running`` row whose process is gone; never stored.
INCOMPLETE = "incomplete"
FINAL_STATUSES = frozenset({"succeeded", "failed", "refused"})
WORKFLOW_STATUSES = frozenset({RUNNING, INCOMPLETE, *FINAL_STATUSES})
STAGE_STATUSES = frozenset({"succeeded", "failed", "skipped"})

#: Shortest id prefix ``get_workflow`` accepts: short enough to type, long enough that
#: a collision among a few thousand uuid4 ids is very unlikely.
MIN_ID_PREFIX = 6

#: How long a writer waits for another process holding the SQLite write lock.
SQLITE_BUSY_TIMEOUT_MS = 10_000

#: Key of the PostgreSQL advisory lock held while migrating (arbitrary, fixed).
_PG_MIGRATION_LOCK = 0x57464147  # "WFAG"

#: Connection execution option naming the statement that begins a SQLite transaction.
_SQLITE_BEGIN = "workflow_agent_sqlite_begin"

_FIND_IDS_HINT = "List recent workflows and their ids with: workflow-agent history"


@dataclass(frozen=True, kw_only=True)
class WorkflowSummary:
    """One line of ``workflow-agent history``.

    ``status`` is ``incomplete`` when the row says ``running`` but the process that
    ran it is gone from this host.
    """

    id: str
    action: str
    integration: str
    target: str
    status: str
    started_at: datetime
    finished_at: datetime | None
    duration: float | None
    error: str | None
    exit_code: int | None
    fleet_id: str | None = None


@dataclass(frozen=True, kw_only=True)
class StageEntry:
    """One stage of a workflow as recorded."""

    name: str
    status: str
    started_at: datetime
    finished_at: datetime
    duration: float
    detail: dict[str, Any]


class CheckpointEntry(NamedTuple):
    """A checkpoint's ``(stage, created_at)``; the state itself is ``last_checkpoint``'s."""

    stage: str
    created_at: datetime


@dataclass(frozen=True, kw_only=True)
class ArtifactEntry:
    """A script, output, facts document, ... that a stage produced."""

    stage: str
    kind: str
    name: str
    content: str
    created_at: datetime


@dataclass(frozen=True, kw_only=True)
class WorkflowRecord(WorkflowSummary):
    """Everything recorded about one workflow, in the order it was written."""

    params: dict[str, Any]
    pid: int
    host: str
    stages: list[StageEntry] = field(default_factory=list)
    checkpoints: list[CheckpointEntry] = field(default_factory=list)
    artifacts: list[ArtifactEntry] = field(default_factory=list)


def alembic_config(url: str | None = None) -> Config:
    """An Alembic ``Config`` for the packaged migrations; no ``alembic.ini`` involved.

    Importing this module does not import Alembic; calling this does. ``url`` is only
    needed to run Alembic commands standalone (e.g. ``revision --autogenerate``).
    """
    from alembic.config import Config

    config = Config()
    # Config values go through configparser interpolation: a literal % must be doubled.
    config.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    config.set_main_option("path_separator", "os")
    if url is not None:
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


class HistoryStore:
    """The history database: workflows, stages, checkpoints, artifacts and snapshots.

    Create it with a SQLAlchemy URL (or ``for_path`` for a SQLite file), ``open()`` it,
    then call the record/read methods; all are synchronous and each write commits on
    its own. Storage problems raise ``HistoryError``; a wrong argument (unknown action
    or status, naive datetime) is a bug in the caller and raises ``ValueError``.
    """

    def __init__(self, url: str | URL, *, redactor: Redactor | None = None) -> None:
        try:
            parsed = make_url(url)
        except ArgumentError as exc:
            raise HistoryError(
                f"invalid history database URL: {exc}",
                hint="Use sqlite:////path/to/history.db or postgresql+psycopg://user@host/dbname",
            ) from exc
        # Plain postgresql:// would pick psycopg2; psycopg 3 is the driver we support.
        if parsed.drivername == "postgresql":
            parsed = parsed.set(drivername="postgresql+psycopg")
        self.url: URL = parsed
        # `redactor or Redactor()` would be wrong: an empty Redactor is falsy, and the
        # caller may still add secrets to the very object it handed us.
        self.redactor: Redactor = redactor if redactor is not None else Redactor()
        self._engine: Engine | None = None
        self._lock = threading.Lock()
        self._hostname = socket.gethostname()

    @classmethod
    def for_path(cls, path: Path, *, redactor: Redactor | None = None) -> HistoryStore:
        """A store in the SQLite file ``path``; its parent directories are created on open."""
        url = URL.create("sqlite", database=str(path.expanduser().absolute()))
        return cls(url, redactor=redactor)

    # -- lifecycle -------------------------------------------------------------------

    def open(self) -> None:
        """Connect and bring the schema up to ``HEAD_REVISION``; does nothing if open."""
        with self._lock:
            if self._engine is not None:
                return
            engine = self._create_engine()
            try:
                with self._errors("open the history database"):
                    self._ensure_schema(engine)
            except BaseException:
                engine.dispose()
                raise
            self._engine = engine

    def close(self) -> None:
        """Close every connection; ``open()`` may be called again afterwards."""
        with self._lock:
            if self._engine is not None:
                self._engine.dispose()
                self._engine = None

    def __enter__(self) -> HistoryStore:
        self.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def is_open(self) -> bool:
        """True between ``open()`` and ``close()``."""
        return self._engine is not None

    # -- writing ---------------------------------------------------------------------

    def start_workflow(
        self,
        *,
        workflow_id: str,
        action: str,
        integration: str,
        target: str,
        params: Mapping[str, object],
        fleet_id: str | None = None,
    ) -> None:
        """Record a new ``running`` workflow owned by this process on this host."""
        _check_choice("action", action, ACTIONS)
        redact = self.redactor.redact
        # Ids are left unredacted: they are generated, not user text, and redacting one
        # would make every later write for the workflow miss it.
        values = {
            "id": workflow_id,
            "action": action,
            "integration": redact(integration),
            "target": redact(target),
            "status": RUNNING,
            "params_json": self._dump_json(params),
            "fleet_id": fleet_id,
            "pid": os.getpid(),
            "host": self._hostname,
            "started_at": _now(),
        }
        with self._write(f"record the start of workflow {workflow_id}") as conn:
            try:
                conn.execute(insert(workflows).values(values))
            except IntegrityError as exc:
                raise HistoryError(
                    f"workflow {workflow_id!r} is already in the history",
                    hint="Workflow ids must be unique; generate a new one.",
                ) from exc

    def record_stage(
        self,
        workflow_id: str,
        *,
        name: str,
        status: str,
        started_at: datetime,
        finished_at: datetime,
        detail: Mapping[str, object] | None = None,
    ) -> None:
        """Record one finished (or skipped) stage of a workflow."""
        _check_choice("stage status", status, STAGE_STATUSES)
        started, finished = _aware(started_at), _aware(finished_at)
        self._insert_for_workflow(
            stages,
            workflow_id,
            f"record stage {name!r}",
            name=self.redactor.redact(name),
            status=status,
            started_at=started,
            finished_at=finished,
            duration=(finished - started).total_seconds(),
            detail_json=self._dump_json(detail or {}),
        )

    def checkpoint(self, workflow_id: str, *, stage: str, state_json: str) -> None:
        """Store the whole serialized workflow state as it was after ``stage``."""
        self._insert_for_workflow(
            checkpoints,
            workflow_id,
            f"store the checkpoint after stage {stage!r}",
            stage=self.redactor.redact(stage),
            created_at=_now(),
            state_json=self._redact_json_text(state_json),
        )

    def add_artifact(
        self, workflow_id: str, *, stage: str, kind: str, name: str, content: str
    ) -> None:
        """Store a script, output, facts document, plan, finding, ... of a stage."""
        redact = self.redactor.redact
        self._insert_for_workflow(
            artifacts,
            workflow_id,
            f"store the {kind} artifact {name!r}",
            stage=redact(stage),
            kind=redact(kind),
            name=redact(name),
            content=self._redact_json_text(content),
            created_at=_now(),
        )

    def finish_workflow(
        self,
        workflow_id: str,
        *,
        status: str,
        error: str | None = None,
        exit_code: int | None = None,
    ) -> None:
        """Mark a workflow finished: final status, error text, exit code and duration."""
        _check_choice("final status", status, FINAL_STATUSES)
        finished = _now()
        with self._write(f"record the end of workflow {workflow_id}") as conn:
            # Reading then writing is safe here: the write transaction already holds
            # the lock (BEGIN IMMEDIATE on SQLite), so nobody can slip in between.
            started = conn.execute(
                select(workflows.c.started_at).where(workflows.c.id == workflow_id)
            ).scalar_one_or_none()
            if started is None:
                raise _unknown_workflow(workflow_id)
            conn.execute(
                update(workflows)
                .where(workflows.c.id == workflow_id)
                .values(
                    status=status,
                    finished_at=finished,
                    duration=(finished - started).total_seconds(),
                    error=None if error is None else self.redactor.redact(error),
                    exit_code=exit_code,
                )
            )

    def save_snapshot(
        self, *, target: str, integration: str, workflow_id: str, content: str
    ) -> None:
        """Store the pre-install file-set snapshot of ``integration`` on ``target``."""
        self._insert_for_workflow(
            snapshots,
            workflow_id,
            f"store the snapshot of {integration!r}",
            target=self.redactor.redact(target),
            integration=self.redactor.redact(integration),
            created_at=_now(),
            content=self._redact_json_text(content),
        )

    # -- reading ---------------------------------------------------------------------

    def latest_snapshot(self, *, target: str, integration: str) -> str | None:
        """The newest snapshot content for ``integration`` on ``target``, if any."""
        # Stored values were redacted, so the lookup keys must be too.
        query = (
            select(snapshots.c.content)
            .where(
                snapshots.c.target == self.redactor.redact(target),
                snapshots.c.integration == self.redactor.redact(integration),
            )
            .order_by(snapshots.c.created_at.desc(), snapshots.c.id.desc())
            .limit(1)
        )
        with self._read("read the latest snapshot") as conn:
            content: str | None = conn.execute(query).scalar_one_or_none()
        return content

    def list_workflows(
        self,
        *,
        limit: int | None = 20,
        integration: str | None = None,
        status: str | None = None,
    ) -> list[WorkflowSummary]:
        """The newest workflows first, at most ``limit`` (``None``: all), optionally filtered.

        ``status`` may be ``running`` or ``incomplete`` too; both are derived on read.
        An unknown ``status`` raises ``InvalidInputError``.
        """
        if status is not None and status not in WORKFLOW_STATUSES:
            # Unlike the write methods' arguments, this one comes straight from the user.
            raise InvalidInputError(
                f"unknown workflow status {status!r}",
                hint="Choose one of: " + ", ".join(sorted(WORKFLOW_STATUSES)),
            )
        if limit is not None and limit <= 0:
            return []
        query = select(workflows).order_by(workflows.c.started_at.desc(), workflows.c.id.desc())
        if integration is not None:
            query = query.where(workflows.c.integration == self.redactor.redact(integration))
        derived = status in (RUNNING, INCOMPLETE)
        if status is not None:
            query = query.where(workflows.c.status == (RUNNING if derived else status))
        if limit is not None and not derived:
            query = query.limit(limit)
        with self._read("list workflows") as conn:
            rows = conn.execute(query).all()
        summaries = [self._summary(row) for row in rows]
        if derived:
            # Running rows are few, so filtering them here (after the liveness check)
            # costs nothing; the limit can only be applied afterwards.
            summaries = [s for s in summaries if s.status == status]
        return summaries if limit is None else summaries[:limit]

    def get_workflow(self, workflow_id: str) -> WorkflowRecord:
        """Everything about one workflow, by full id or a unique prefix of it.

        Raises ``HistoryError`` when no workflow (or more than one) matches.
        """
        with self._read(f"read workflow {workflow_id}") as conn:
            row = conn.execute(select(workflows).where(workflows.c.id == workflow_id)).first()
            if row is None:
                row = self._find_by_prefix(conn, workflow_id)
            wid = row.id
            stage_rows = conn.execute(
                select(stages).where(stages.c.workflow_id == wid).order_by(stages.c.id)
            ).all()
            checkpoint_rows = conn.execute(
                select(checkpoints.c.stage, checkpoints.c.created_at)
                .where(checkpoints.c.workflow_id == wid)
                .order_by(checkpoints.c.id)
            ).all()
            artifact_rows = conn.execute(
                select(artifacts).where(artifacts.c.workflow_id == wid).order_by(artifacts.c.id)
            ).all()
        summary = self._summary(row)
        return WorkflowRecord(
            **{f.name: getattr(summary, f.name) for f in fields(WorkflowSummary)},
            params=_load_json_object(row.params_json),
            pid=row.pid,
            host=row.host,
            stages=[
                StageEntry(
                    name=s.name,
                    status=s.status,
                    started_at=s.started_at,
                    finished_at=s.finished_at,
                    duration=s.duration,
                    detail=_load_json_object(s.detail_json),
                )
                for s in stage_rows
            ],
            checkpoints=[CheckpointEntry(c.stage, c.created_at) for c in checkpoint_rows],
            artifacts=[
                ArtifactEntry(
                    stage=a.stage,
                    kind=a.kind,
                    name=a.name,
                    content=a.content,
                    created_at=a.created_at,
                )
                for a in artifact_rows
            ],
        )

    def last_checkpoint(self, workflow_id: str) -> tuple[str, str] | None:
        """``(stage, state_json)`` of the workflow's newest checkpoint, or ``None``."""
        query = (
            select(checkpoints.c.stage, checkpoints.c.state_json)
            .where(checkpoints.c.workflow_id == workflow_id)
            .order_by(checkpoints.c.id.desc())
            .limit(1)
        )
        with self._read(f"read the last checkpoint of workflow {workflow_id}") as conn:
            row = conn.execute(query).first()
        return None if row is None else (row.stage, row.state_json)

    # -- connections and schema ------------------------------------------------------

    def _create_engine(self) -> Engine:
        url = self.url
        is_sqlite = url.get_backend_name() == "sqlite"
        if is_sqlite and url.database and url.database != ":memory:":
            try:
                Path(url.database).parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise HistoryError(
                    f"cannot create the directory of the history database {url.database}: "
                    f"{exc.strerror}",
                    hint="Choose a writable location for the history database.",
                ) from exc
        try:
            engine = create_engine(url)
        except (ModuleNotFoundError, NoSuchModuleError) as exc:
            raise HistoryError(
                f"no database driver for {url.drivername}: {exc}",
                hint="For PostgreSQL install psycopg: pip install 'psycopg[binary]'",
            ) from exc
        if is_sqlite:
            event.listen(engine, "connect", _sqlite_on_connect)
            event.listen(engine, "begin", _sqlite_on_begin)
        return engine

    def _ensure_schema(self, engine: Engine) -> None:
        with engine.connect() as conn:
            current = _schema_revision(conn)
        if current != HEAD_REVISION:
            self._migrate(engine)

    def _migrate(self, engine: Engine) -> None:
        # Imported here, not at the top: importing Alembic costs more than everything
        # else open() does, and an up-to-date database never needs it.
        from alembic import command
        from alembic.util import CommandError

        config = alembic_config()
        with engine.connect() as conn:
            conn.execution_options(**{_SQLITE_BEGIN: "BEGIN IMMEDIATE"})
            with conn.begin():
                # Serialise concurrent first runs: the loser waits here, then sees that
                # the winner already migrated. SQLite gets this from BEGIN IMMEDIATE.
                if conn.dialect.name == "postgresql":
                    conn.execute(
                        text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK}
                    )
                current = _schema_revision(conn)
                if current == HEAD_REVISION:
                    return
                config.attributes["connection"] = conn
                try:
                    command.upgrade(config, "head")
                except CommandError as exc:
                    raise HistoryError(
                        f"cannot migrate the history database from schema revision "
                        f"{current!r} to {HEAD_REVISION!r}: {exc}",
                        hint="If a newer workflow-agent wrote this database, upgrade this "
                        f"one; otherwise move {self._display_url()} aside to start afresh.",
                    ) from exc

    def _require_engine(self) -> Engine:
        engine = self._engine
        if engine is None:
            raise HistoryError(
                "the history store is not open", hint="Call HistoryStore.open() first."
            )
        return engine

    @contextmanager
    def _write(self, doing: str) -> Iterator[Connection]:
        """A connection inside a write transaction that commits when the block ends."""
        engine = self._require_engine()
        with self._errors(doing), engine.connect() as conn:
            # Take the SQLite write lock up front: a deferred transaction that reads and
            # then writes can fail with "database is locked" without waiting.
            conn.execution_options(**{_SQLITE_BEGIN: "BEGIN IMMEDIATE"})
            with conn.begin():
                yield conn

    @contextmanager
    def _read(self, doing: str) -> Iterator[Connection]:
        """A connection inside a read transaction (one consistent snapshot)."""
        engine = self._require_engine()
        with self._errors(doing), engine.connect() as conn, conn.begin():
            yield conn

    @contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        """Turn SQLAlchemy errors into ``HistoryError`` with a hint."""
        try:
            yield
        except SQLAlchemyError as exc:
            # The driver's message, not SQLAlchemy's: that one quotes the SQL and params.
            cause = getattr(exc, "orig", None) or exc
            detail = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
            # Redacted too: `doing` names stages and integrations, and a driver message
            # can quote the values that were refused.
            message = self.redactor.redact(f"cannot {doing}: {detail}")
            raise HistoryError(message, hint=self._hint_for(detail)) from exc

    def _hint_for(self, detail: str) -> str:
        where = self._display_url()
        lowered = detail.lower()
        if "locked" in lowered or "busy" in lowered:
            return f"Another workflow-agent is holding {where}; retry when it has finished."
        if "readonly" in lowered or "read-only" in lowered or "unable to open" in lowered:
            return f"Check that {where} and its directory are writable by this user."
        if "not a database" in lowered or "malformed" in lowered:
            return f"{where} is damaged or not a history database; move it aside."
        return f"The history database is {where}."

    def _display_url(self) -> str:
        if self.url.get_backend_name() == "sqlite" and self.url.database:
            return self.url.database
        return self.url.render_as_string(hide_password=True)

    # -- helpers -----------------------------------------------------------------------

    def _insert_for_workflow(
        self, table: Any, workflow_id: str, doing: str, **values: object
    ) -> None:
        with self._write(doing) as conn:
            try:
                conn.execute(insert(table).values(workflow_id=workflow_id, **values))
            except IntegrityError as exc:
                # The only constraint these inserts can break is the workflow foreign key.
                raise _unknown_workflow(workflow_id) from exc

    def _find_by_prefix(self, conn: Connection, prefix: str) -> Any:
        if len(prefix) < MIN_ID_PREFIX:
            raise HistoryError(
                f"no workflow with id {prefix!r}",
                hint=f"{_FIND_IDS_HINT} (an id prefix needs at least {MIN_ID_PREFIX} characters).",
            )
        rows = conn.execute(
            select(workflows)
            .where(workflows.c.id.startswith(prefix, autoescape=True))
            .order_by(workflows.c.started_at.desc())
            .limit(5)
        ).all()
        if not rows:
            raise _unknown_workflow(prefix)
        if len(rows) > 1:
            shown = ", ".join(r.id for r in rows[:4]) + (", ..." if len(rows) > 4 else "")
            raise HistoryError(
                f"workflow id prefix {prefix!r} is ambiguous: it matches {shown}",
                hint="Give more characters of the id. " + _FIND_IDS_HINT,
            )
        return rows[0]

    def _summary(self, row: Any) -> WorkflowSummary:
        return WorkflowSummary(
            id=row.id,
            action=row.action,
            integration=row.integration,
            target=row.target,
            status=self._derive_status(row.status, row.pid, row.host),
            started_at=row.started_at,
            finished_at=row.finished_at,
            duration=row.duration,
            error=row.error,
            exit_code=row.exit_code,
            fleet_id=row.fleet_id,
        )

    def _derive_status(self, status: str, pid: int, host: str) -> str:
        # Another host's processes cannot be checked from here: trust the row.
        if status != RUNNING or host != self._hostname:
            return status
        return RUNNING if _pid_alive(pid) else INCOMPLETE

    def _dump_json(self, value: object) -> str:
        """``value`` as JSON text, every string in it (keys too) redacted."""
        # Redacting the structure, not just the JSON text, matters: a secret containing
        # a quote, a backslash or a control character is escaped in JSON, so the text
        # no longer contains it literally and a text-only redaction would miss it.
        dumped = json.dumps(self._redact_value(value), ensure_ascii=False)
        return self.redactor.redact(dumped)

    def _redact_json_text(self, content: str) -> str:
        """``content`` redacted; if it is JSON, also the strings escaped inside it."""
        redacted = self.redactor.redact(content)
        if not self.redactor or not redacted.lstrip().startswith(("{", "[", '"')):
            return redacted
        try:
            parsed = json.loads(redacted)
        except ValueError:
            return redacted
        cleaned = self._redact_value(parsed)
        if cleaned == parsed:
            # Keep the caller's exact text (formatting, key order) when nothing changed.
            return redacted
        return self.redactor.redact(json.dumps(cleaned, ensure_ascii=False))

    def _redact_value(self, value: object) -> object:
        if isinstance(value, str):
            return self.redactor.redact(value)
        if value is None or isinstance(value, bool | int | float):
            return value
        if isinstance(value, Mapping):
            return {
                self.redactor.redact(str(key)): self._redact_value(item)
                for key, item in value.items()
            }
        if isinstance(value, list | tuple):
            return [self._redact_value(item) for item in value]
        if isinstance(value, set | frozenset):
            return sorted((self._redact_value(item) for item in value), key=str)
        if isinstance(value, datetime):
            return value.isoformat()
        # Paths, enums, ...: stored as their text, like json.dumps(default=str) would.
        return self.redactor.redact(str(value))


def _sqlite_on_connect(dbapi_connection: Any, connection_record: ConnectionPoolEntry) -> None:
    # SQLAlchemy emits BEGIN itself (see _sqlite_on_begin); the sqlite3 module's own
    # transaction handling skips BEGIN for reads and DDL, which breaks both the
    # migration lock and consistent multi-query reads.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys = ON")
        # WAL: readers (`workflow-agent history`) never block the running workflow.
        cursor.execute("PRAGMA journal_mode = WAL")
        # FULL: each commit is fsynced, so not even a power cut loses a recorded step.
        # (NORMAL would survive a killed process but not the machine going down.) It
        # costs about 0.25 ms per commit on an SSD, ~1.3 ms for a whole small workflow.
        cursor.execute("PRAGMA synchronous = FULL")
    finally:
        cursor.close()


def _sqlite_on_begin(conn: Connection) -> None:
    conn.exec_driver_sql(conn.get_execution_options().get(_SQLITE_BEGIN, "BEGIN"))


def _schema_revision(conn: Connection) -> str | None:
    """The Alembic revision the database is at, ``None`` for an empty database."""
    if not inspect(conn).has_table("alembic_version"):
        return None
    versions = conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
    # More than one row would mean merged branches; let Alembic sort that out.
    return versions[0] if len(versions) == 1 else None


def _pid_alive(pid: int) -> bool:
    """True if process ``pid`` exists on this host and is not a zombie."""
    if pid <= 0:
        # os.kill(0, ...) would signal our whole process group.
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, it just belongs to another user
    # A killed process nobody has reaped yet still answers signals; on Linux its state
    # in /proc says Z. Elsewhere there is no cheap way to tell, so it counts as alive.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


def _check_choice(what: str, value: str, allowed: frozenset[str]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; expected one of {sorted(allowed)}")


def _aware(value: datetime) -> datetime:
    if value.tzinfo is None:
        raise ValueError(f"naive datetime {value!r}: pass an aware datetime (UTC)")
    return value.astimezone(UTC)


def _now() -> datetime:
    return datetime.now(UTC)


def _unknown_workflow(workflow_id: str) -> HistoryError:
    return HistoryError(f"no workflow with id {workflow_id!r} in the history", hint=_FIND_IDS_HINT)


def _load_json_object(raw: str) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise HistoryError(
            f"the history holds invalid JSON: {exc}",
            hint="The history database may be damaged; move it aside to start afresh.",
        ) from exc
    if not isinstance(value, dict):
        raise HistoryError(
            f"the history holds {type(value).__name__} where an object was expected",
            hint="The history database may be damaged; move it aside to start afresh.",
        )
    return value
