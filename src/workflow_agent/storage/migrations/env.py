"""Alembic environment for the history store, shipped inside the package.

There is no ``alembic.ini``: ``HistoryStore`` builds an ``alembic.config.Config`` in code
(see ``workflow_agent.storage.engine.alembic_config``) and hands over its own open
connection in ``config.attributes["connection"]``, inside a transaction it already holds
the migration lock for. For development (``alembic revision --autogenerate``), build the
same config with a URL instead and call ``alembic.command`` on it; a throw-away engine is
then created here.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, create_engine, pool

from workflow_agent.storage.tables import metadata


def _configure_and_run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        # SQLite cannot ALTER most things; batch mode rebuilds the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_offline() -> None:
    """Emit the migration SQL as text (``alembic upgrade --sql``)."""
    context.configure(
        url=context.config.get_main_option("sqlalchemy.url"),
        target_metadata=metadata,
        literal_binds=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Migrate through the caller's connection, or a throw-away one from the URL."""
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _configure_and_run(connection)
        return
    url = context.config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("set sqlalchemy.url or attributes['connection'] on the config")
    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        with engine.connect() as own_connection:
            _configure_and_run(own_connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
