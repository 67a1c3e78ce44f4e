"""The history store: every workflow, stage, checkpoint, artifact and snapshot, recorded.

``history.HistoryStore`` is the only way in; ``records`` holds what it reads back,
``tables`` describes the schema, ``migrations`` (an Alembic environment shipped inside the
package) creates and evolves it, and ``engine`` connects and runs those migrations.
Nothing here is imported eagerly because SQLAlchemy is slow to import and not every
command needs the history.
"""
