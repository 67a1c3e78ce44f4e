"""Connecting to the history database and bringing its schema up to date.

SQLite (a file, in WAL mode) by default; PostgreSQL by URL. Start-up is kept cheap:
``ensure_schema`` looks at ``alembic_version`` with plain SQLAlchemy and imports Alembic
(slow to import) only when the schema is missing or behind ``HEAD_REVISION``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import URL, Connection, Engine, create_engine, event, inspect, text
from sqlalchemy.exc import NoSuchModuleError
from sqlalchemy.pool import ConnectionPoolEntry

from workflow_agent.errors import HistoryError

if TYPE_CHECKING:
    from alembic.config import Config

#: The newest Alembic revision in ``migrations/versions``. A database at this revision is
#: used as is, without importing Alembic. Bump it with every new migration (a test checks).
HEAD_REVISION = "0004"

#: The Alembic environment shipped inside the package.
MIGRATIONS_DIR = Path(__file__).with_name("migrations")

#: How long a writer waits for another process holding the SQLite write lock.
SQLITE_BUSY_TIMEOUT_MS = 10_000

#: Key of the PostgreSQL advisory lock held while migrating (arbitrary, fixed).
_PG_MIGRATION_LOCK = 0x57464147  # "WFAG"

#: Connection execution option naming the statement that begins a SQLite transaction.
_SQLITE_BEGIN = "workflow_agent_sqlite_begin"


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


def open_engine(url: URL) -> Engine:
    """An engine for ``url``; for a SQLite file, its directory is created and WAL set up.

    Raises ``HistoryError`` when the directory cannot be created or the driver is missing.
    """
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


def begin_immediate(conn: Connection) -> None:
    """Make transactions on ``conn`` take the SQLite write lock when they begin.

    A deferred transaction that reads and then writes can fail with "database is
    locked" without waiting; other databases ignore this.
    """
    conn.execution_options(**{_SQLITE_BEGIN: "BEGIN IMMEDIATE"})


def ensure_schema(engine: Engine, *, where: str) -> None:
    """Bring the schema up to ``HEAD_REVISION``, importing Alembic only if it is behind.

    ``where`` names the database in the hint of a failed migration. SQLAlchemy errors
    are left to the caller to translate.
    """
    with engine.connect() as conn:
        current = _schema_revision(conn)
    if current != HEAD_REVISION:
        _migrate(engine, where)


def _migrate(engine: Engine, where: str) -> None:
    # Imported here, not at the top: importing Alembic costs more than everything
    # else open() does, and an up-to-date database never needs it.
    from alembic import command
    from alembic.util import CommandError

    config = alembic_config()
    with engine.connect() as conn:
        begin_immediate(conn)
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
                    f"one; otherwise move {where} aside to start afresh.",
                ) from exc


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
