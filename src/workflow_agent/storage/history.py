"""``HistoryStore``: the record of every workflow the agent ran, kept in a SQL database.

SQLite (a file, in WAL mode) by default; PostgreSQL by URL. Every write is its own short
transaction, so a crash at any point loses nothing already written, and every text or
JSON value goes through the ``Redactor`` before it reaches the database. Ingesting a spool
file (``spool.py``) is the exception: its events go in together, in one ``batch()``.

Every snapshot saved is also written to the baseline index (``baselines.py``) when the
store has one, and the first open copies the database's snapshots there.

Connecting and migrating is ``engine``'s job; the record types handed back, and the
``incomplete`` status derived for a ``running`` workflow whose process is gone, are
``records``'. Both are re-exported here, the import path callers use.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import URL, Connection, Engine, delete, func, insert, make_url, select, update
from sqlalchemy.exc import ArgumentError, IntegrityError, SQLAlchemyError

from workflow_agent.errors import HistoryError, InvalidInputError
from workflow_agent.secrets import Redactor
from workflow_agent.storage.baselines import BaselineIndex
from workflow_agent.storage.engine import (
    HEAD_REVISION,
    MIGRATIONS_DIR,
    SQLITE_BUSY_TIMEOUT_MS,
    alembic_config,
    begin_immediate,
    ensure_schema,
    open_engine,
)
from workflow_agent.storage.failures import FailureEntry, FailureHistory
from workflow_agent.storage.records import (
    ACTIONS,
    FINAL_STATUSES,
    INCOMPLETE,
    LLM_USAGE_STATUSES,
    RUNNING,
    STAGE_STATUSES,
    WORKFLOW_STATUSES,
    ArtifactEntry,
    CheckpointEntry,
    LLMCacheEntry,
    LLMUsageEntry,
    StageEntry,
    WorkflowRecord,
    WorkflowSummary,
    record_from_rows,
    summary_from_row,
)
from workflow_agent.storage.spool import Origin, ingest
from workflow_agent.storage.tables import (
    artifacts,
    checkpoints,
    llm_cache,
    llm_usage,
    snapshots,
    spool_progress,
    stages,
    workflows,
)

__all__ = [
    "ACTIONS",
    "FINAL_STATUSES",
    "HEAD_REVISION",
    "INCOMPLETE",
    "MIGRATIONS_DIR",
    "MIN_ID_PREFIX",
    "RUNNING",
    "SQLITE_BUSY_TIMEOUT_MS",
    "STAGE_STATUSES",
    "WORKFLOW_STATUSES",
    "ArtifactEntry",
    "CheckpointEntry",
    "FailureEntry",
    "HistoryStore",
    "StageEntry",
    "WorkflowRecord",
    "WorkflowSummary",
    "alembic_config",
]

#: Shortest id prefix ``get_workflow`` accepts: short enough to type, long enough that
#: a collision among a few thousand uuid4 ids is very unlikely.
MIN_ID_PREFIX = 6

_FIND_IDS_HINT = "List recent workflows and their ids with: workflow-agent history"


class HistoryStore(FailureHistory):
    """The history database: workflows, stages, checkpoints, artifacts and snapshots.

    Create it with a SQLAlchemy URL (or ``for_path`` for a SQLite file), ``open()`` it,
    then call the record/read methods; all are synchronous and each write commits on
    its own (inside ``batch()``, with the batch). Storage problems raise ``HistoryError``;
    a wrong argument (unknown action or status, naive datetime) is a bug in the caller
    and raises ``ValueError``. ``baselines``: the index each snapshot goes to as well.
    """

    def __init__(
        self,
        url: str | URL,
        *,
        redactor: Redactor | None = None,
        spool_dir: Path | None = None,
        baselines: BaselineIndex | None = None,
    ) -> None:
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
        #: Runs spool their writes here (see spool.py); opening and reading ingest them.
        self.spool_dir = spool_dir
        self.baselines = baselines
        #: The connection of this thread's ``batch()``, while one is open.
        self._batch = threading.local()

    @classmethod
    def for_path(
        cls, path: Path, *, redactor: Redactor | None = None, spool_dir: Path | None = None,
        baselines: BaselineIndex | None = None,
    ) -> HistoryStore:
        """A store in the SQLite file ``path``; its parent directories are created on open."""
        url = URL.create("sqlite", database=str(path.expanduser().absolute()))
        return cls(url, redactor=redactor, spool_dir=spool_dir, baselines=baselines)

    # -- lifecycle -------------------------------------------------------------------

    def open(self) -> None:
        """Connect and bring the schema up to ``HEAD_REVISION``, ingest the spool and
        complete the baseline index; does nothing if open."""
        with self._lock:
            if self._engine is not None:
                return
            engine = open_engine(self.url)
            try:
                with self._errors("open the history database"):
                    ensure_schema(engine, where=self._display_url())
            except BaseException:
                engine.dispose()
                raise
            self._engine = engine
        self.ingest()
        if self.baselines is not None and not self.baselines.complete:
            self._index_baselines(self.baselines)

    def ingest(self) -> int:
        """Take in every spooled event not yet stored; returns how many were taken."""
        if self.spool_dir is None:
            return 0
        return ingest(self, self.spool_dir)

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

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Make this thread's writes inside the block one transaction, committed when the
        block ends. A write that fails spoils the transaction: let its error leave the
        block, which rolls all of it back."""
        if getattr(self._batch, "conn", None) is not None:
            raise RuntimeError("HistoryStore.batch() does not nest")
        engine = self._require_engine()
        with self._errors("write to the history database"), engine.connect() as conn:
            begin_immediate(conn)
            with conn.begin():
                self._batch.conn = conn
                try:
                    yield
                finally:
                    self._batch.conn = None

    async def durable(self, workflow_id: str) -> None:
        """Nothing to wait for: each write is committed before it returns."""

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
        origin: Origin | None = None,
    ) -> None:
        """Record a new ``running`` workflow owned by this process on this host (or by
        the process ``origin`` names, when replaying a spooled record)."""
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
            "params_json": self.redactor.dump_json(params),
            "fleet_id": fleet_id,
            "pid": origin.pid if origin else os.getpid(),
            "host": origin.host if origin else self._hostname,
            "started_at": origin.at if origin else _now(),
        }
        with self._write(f"record the start of workflow {workflow_id}") as conn:
            try:
                conn.execute(insert(workflows).values(values))
            except IntegrityError as exc:
                raise HistoryError(
                    f"workflow {workflow_id!r} is already in the history",
                    hint="Workflow ids must be unique; generate a new one.",
                ) from exc

    def set_params(self, workflow_id: str, *, params: Mapping[str, object]) -> None:
        """Replace a workflow's parameters (known only once they were checked)."""
        with self._write(f"record the parameters of workflow {workflow_id}") as conn:
            done = conn.execute(
                update(workflows)
                .where(workflows.c.id == workflow_id)
                .values(params_json=self.redactor.dump_json(params))
            )
            if done.rowcount == 0:
                raise _unknown_workflow(workflow_id)

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
            detail_json=self.redactor.dump_json(detail or {}),
        )

    def checkpoint(
        self, workflow_id: str, *, stage: str, state_json: str, at: datetime | None = None
    ) -> None:
        """Store the whole serialized workflow state as it was after ``stage``."""
        self._insert_for_workflow(
            checkpoints,
            workflow_id,
            f"store the checkpoint after stage {stage!r}",
            stage=self.redactor.redact(stage),
            created_at=_aware(at) if at else _now(),
            state_json=self.redactor.redact_json_text(state_json),
        )

    def add_artifact(
        self,
        workflow_id: str,
        *,
        stage: str,
        kind: str,
        name: str,
        content: str,
        at: datetime | None = None,
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
            content=self.redactor.redact_json_text(content),
            created_at=_aware(at) if at else _now(),
        )

    def finish_workflow(
        self,
        workflow_id: str,
        *,
        status: str,
        error: str | None = None,
        exit_code: int | None = None,
        at: datetime | None = None,
    ) -> None:
        """Mark a workflow finished: final status, error text, exit code and duration."""
        _check_choice("final status", status, FINAL_STATUSES)
        finished = _aware(at) if at else _now()
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
        self,
        *,
        target: str,
        integration: str,
        workflow_id: str,
        content: str,
        at: datetime | None = None,
    ) -> None:
        """Store the pre-install file-set snapshot of ``integration`` on ``target``, and
        index it."""
        created = _aware(at) if at else _now()
        stored = {"target": self.redactor.redact(target),
                  "integration": self.redactor.redact(integration),
                  "content": self.redactor.redact_json_text(content)}
        self._insert_for_workflow(snapshots, workflow_id, f"store the snapshot of {integration!r}",
                                  created_at=created, **stored)
        if self.baselines is not None:
            self.baselines.save(**stored, at=created)

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
        fleet_id: str | None = None,
    ) -> list[WorkflowSummary]:
        """The newest workflows first, at most ``limit`` (``None``: all), optionally filtered.

        ``status`` may be ``running`` or ``incomplete`` too; both are derived on read.
        An unknown ``status`` raises ``InvalidInputError``. ``fleet_id`` (the whole id or
        a prefix of it) keeps the workflows of one fleet rollout.
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
        if fleet_id is not None:
            query = query.where(workflows.c.fleet_id.startswith(fleet_id, autoescape=True))
        derived = status in (RUNNING, INCOMPLETE)
        if status is not None:
            query = query.where(workflows.c.status == (RUNNING if derived else status))
        if limit is not None and not derived:
            query = query.limit(limit)
        with self._read("list workflows") as conn:
            rows = conn.execute(query).all()
        summaries = [summary_from_row(row, self._hostname) for row in rows]
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
        return record_from_rows(
            row,
            self._hostname,
            stage_rows=stage_rows,
            checkpoint_rows=checkpoint_rows,
            artifact_rows=artifact_rows,
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

    # -- LLM usage and response cache (see workflow_agent.llm.service) ----------------

    def record_llm_usage(
        self,
        *,
        workflow_id: str | None,
        purpose: str,
        provider: str,
        model: str,
        status: str,
        prompt_tokens: int,
        completion_tokens: int,
        latency: float,
        cost: float | None,
        error: str | None = None,
        at: datetime | None = None,
    ) -> None:
        """Record one LLM call (``status``: ok, cached or failed)."""
        _check_choice("LLM usage status", status, LLM_USAGE_STATUSES)
        redact = self.redactor.redact
        values = {
            "workflow_id": workflow_id, "purpose": redact(purpose), "provider": provider,
            "model": redact(model), "status": status, "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens, "latency": latency, "cost": cost,
            "error": None if error is None else redact(error),
            "created_at": _aware(at) if at else _now(),
        }
        with self._write("record an LLM call") as conn:
            conn.execute(insert(llm_usage).values(values))

    def list_llm_usage(self, *, workflow_id: str | None = None) -> list[LLMUsageEntry]:
        """LLM calls, oldest first; only ``workflow_id``'s when given."""
        query = select(llm_usage).order_by(llm_usage.c.created_at, llm_usage.c.id)
        if workflow_id is not None:
            query = query.where(llm_usage.c.workflow_id == workflow_id)
        with self._read("read the LLM usage") as conn:
            rows = conn.execute(query).all()
        names = [c.name for c in llm_usage.columns if c.name != "id"]
        return [LLMUsageEntry(**{name: getattr(row, name) for name in names}) for row in rows]

    def cached_llm_response(self, keys: Sequence[str]) -> LLMCacheEntry | None:
        """The cached answer under the first of ``keys`` that has one."""
        if not keys:
            return None
        # The cache is read by every LLM call; ingesting the spool first is not needed.
        with self._errors("read the LLM cache"), self._require_engine().connect() as conn:
            rows = {row.key: row for row in conn.execute(
                select(llm_cache).where(llm_cache.c.key.in_(list(keys)))
            )}
        for key in keys:
            if key in rows:
                names = [c.name for c in llm_cache.columns]
                return LLMCacheEntry(**{name: getattr(rows[key], name) for name in names})
        return None

    def cache_llm_response(
        self, *, key: str, provider: str, model: str, content: str, prompt_tokens: int,
        completion_tokens: int,
    ) -> None:
        """Keep ``content`` (redacted here too) as the answer under ``key``."""
        values = {
            "key": key, "provider": provider, "model": self.redactor.redact(model),
            "content": self.redactor.redact(content), "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens, "created_at": _now(),
        }
        with self._write("store an LLM answer in the cache") as conn:
            # Two runs may ask the same question at once: the later answer wins.
            changed = {k: v for k, v in values.items() if k != "key"}
            if conn.dialect.name == "postgresql":
                from sqlalchemy.dialects.postgresql import insert as pg_insert

                pg = pg_insert(llm_cache).values(values)
                conn.execute(pg.on_conflict_do_update(index_elements=["key"], set_=changed))
            else:
                from sqlalchemy.dialects.sqlite import insert as sqlite_insert

                lite = sqlite_insert(llm_cache).values(values)
                conn.execute(lite.on_conflict_do_update(index_elements=["key"], set_=changed))

    def forget_llm_response(self, key: str) -> None:
        """Drop the cached answer under ``key`` (e.g. it turned out to be invalid)."""
        with self._write("drop an LLM answer from the cache") as conn:
            conn.execute(delete(llm_cache).where(llm_cache.c.key == key))

    # -- the spool's progress and the baseline index (see spool.py, baselines.py) -----

    def spool_progress(self, name: str) -> int | None:
        """How many lines of the spool file ``name`` are in, if the store counted them."""
        query = select(spool_progress.c.applied).where(spool_progress.c.file == name)
        # Not _read: ingesting is what asks.
        with self._errors("read the spool progress"), self._require_engine().connect() as conn:
            applied: int | None = conn.execute(query).scalar_one_or_none()
        return applied

    def record_spool_progress(self, name: str, applied: int) -> None:
        """Count ``applied`` lines of the spool file ``name`` in (inside the ``batch()``
        that stored them, so that events and count commit together)."""
        with self._write(f"count the lines of {name} taken in") as conn:
            done = conn.execute(update(spool_progress)
                                .where(spool_progress.c.file == name).values(applied=applied))
            if done.rowcount == 0:
                conn.execute(insert(spool_progress).values(file=name, applied=applied))

    def forget_spool_progress(self, names: Sequence[str]) -> None:
        """Drop the counts of spool files that are done and deleted."""
        with self._write("forget the counts of ingested spool files") as conn:
            conn.execute(delete(spool_progress).where(spool_progress.c.file.in_(list(names))))

    def _index_baselines(self, index: BaselineIndex) -> None:
        """Copy the newest snapshot of every (target, integration) to ``index``, then mark
        it complete (entries as new, saved by a run meanwhile, stay)."""
        rank = func.row_number().over(
            partition_by=(snapshots.c.target, snapshots.c.integration),
            order_by=(snapshots.c.created_at.desc(), snapshots.c.id.desc()),
        ).label("rank")
        ranked = select(snapshots.c.id, rank).subquery()
        query = (select(snapshots.c.target, snapshots.c.integration, snapshots.c.created_at,
                        snapshots.c.content)
                 .join(ranked, ranked.c.id == snapshots.c.id).where(ranked.c.rank == 1))
        # Not _read: open() has just ingested.
        with self._errors("read the newest snapshots"), self._require_engine().connect() as conn:
            rows = conn.execute(query).all()
        for row in rows:
            index.save(target=row.target, integration=row.integration, content=row.content,
                       at=row.created_at)
        index.mark_complete()

    # -- connections and errors ------------------------------------------------------

    def _require_engine(self) -> Engine:
        engine = self._engine
        if engine is None:
            raise HistoryError(
                "the history store is not open", hint="Call HistoryStore.open() first."
            )
        return engine

    @contextmanager
    def _write(self, doing: str) -> Iterator[Connection]:
        """A connection inside a write transaction that commits when the block ends (in
        a ``batch()``, the batch's)."""
        batch: Connection | None = getattr(self._batch, "conn", None)
        if batch is not None:
            with self._errors(doing):
                yield batch
            return
        engine = self._require_engine()
        with self._errors(doing), engine.connect() as conn:
            # Take the SQLite write lock up front, so reading then writing cannot fail.
            begin_immediate(conn)
            with conn.begin():
                yield conn

    @contextmanager
    def _read(self, doing: str) -> Iterator[Connection]:
        """A connection inside a read transaction (one consistent snapshot)."""
        engine = self._require_engine()
        self.ingest()  # readers see every run, spooled or not
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
                # Values as parameters, not built into the statement: it is then compiled
                # once per table (building .values() cost as much as the rest of an insert).
                conn.execute(insert(table), {"workflow_id": workflow_id, **values})
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
