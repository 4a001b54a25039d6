"""Alembic's entry for the job store's revisions. `service.migrations.upgrade` hands it the connection
to use (inside its locked transaction); run from `python -m service.migrations`, it connects to the
URL given there. Offline (--sql) mode is not offered: the service upgrades its database itself."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool

from service.store import Base

cfg = context.config


def run(connection) -> None:
    context.configure(connection=connection, target_metadata=Base.metadata,
                      version_table=cfg.get_main_option("version_table"),
                      render_as_batch=True)  # SQLite alters a table by copying it: Alembic's batch mode
    with context.begin_transaction():
        context.run_migrations()


if cfg.attributes.get("connection") is not None:
    run(cfg.attributes["connection"])
else:
    engine = create_engine(cfg.get_main_option("sqlalchemy.url"), poolclass=NullPool)
    with engine.connect() as conn:
        run(conn)
        conn.commit()
    engine.dispose()
