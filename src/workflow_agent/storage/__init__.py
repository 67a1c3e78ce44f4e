"""The history store: every workflow, stage, checkpoint, artifact and snapshot, recorded.

``history.HistoryStore`` is the only way in; ``tables`` describes the schema and
``migrations`` (an Alembic environment shipped inside the package) creates and evolves it.
Nothing here is imported eagerly because SQLAlchemy is slow to import and not every
command needs the history.
"""
