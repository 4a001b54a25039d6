"""The job store's schema versions (Alembic): `versions/` holds one revision per change of the
`jobs` table, and `upgrade` brings a database to the newest, as `JobStore` does on every start.

Run by hand (a database account without DDL rights for the service, or to see where a database
stands): `python -m service.migrations --help`. No alembic.ini is involved: the configuration is
made here, and Alembic's version table is `leoclr_alembic_version`, so that a database which
also holds another Alembic-managed schema (MLflow's) keeps its own `alembic_version`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import create_engine, event, inspect, text
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.pool import NullPool

if TYPE_CHECKING:
    from alembic.config import Config

SCRIPTS = Path(__file__).resolve().parent
VERSION_TABLE = "leoclr_alembic_version"
# The revision that is the `jobs` table as the job store made it before Alembic (create_all):
# a database with that table and no version table is stamped here, then upgraded.
FIRST = "0001"
# The newest revision, so that a store already there is opened without importing Alembic (0.1 s
# of the service's start, more on a busy machine: it loads every dialect it supports).
# tests/unit/test_store.py checks that it is Alembic's head.
HEAD = "0002"
JOB_COLUMNS = {"id", "kind", "name", "spec", "status", "submission_id", "idempotency_key", "error", "result",
               "created_at", "updated_at"}
# Held (pg_advisory_xact_lock) for the whole upgrade: two services starting at once on one fresh
# database would otherwise both create the tables, and one would fail.
PG_LOCK = 0x6C656F636C72  # "leoclr"


class SchemaError(RuntimeError):
    """The database holds something the job store cannot take over."""


def config(connection: Connection | None = None, url: str | None = None) -> Config:
    """Alembic's configuration for the job store: scripts here, the connection to use (env.py reads it)."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(SCRIPTS))
    cfg.set_main_option("version_table", VERSION_TABLE)
    if url is not None:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    cfg.attributes["connection"] = connection
    return cfg


def current(url: str | URL) -> str | None:
    """The revision the database is at (None: no version table, e.g. a store from before Alembic)."""
    from alembic.runtime.migration import MigrationContext

    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE}).get_current_revision()
    finally:
        engine.dispose()


def at_head(engine: Engine) -> bool:
    """Whether the database is at HEAD, read with one query (no Alembic import)."""
    with engine.connect() as conn:
        if not inspect(conn).has_table(VERSION_TABLE):
            return False
        return conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalars().all() == [HEAD]


def upgrade(url: str | URL, revision: str = "head") -> tuple[str | None, str | None]:
    """Bring the job store at `url` to `revision`, in one transaction that holds a lock against other
    processes doing the same (PostgreSQL: an advisory lock; SQLite: BEGIN IMMEDIATE), so that of two
    services starting at once, one upgrades and the other finds it done. A store from before Alembic
    (a `jobs` table and no version table) is first stamped at FIRST. Returns (before, after)."""
    from alembic import command
    from alembic.runtime.migration import MigrationContext

    def revision_of(conn: Connection) -> str | None:
        return MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE}).get_current_revision()

    engine = _migration_engine(url)
    try:
        with engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({PG_LOCK})")
            before = revision_of(conn)
            if before is not None and not _known(before):
                raise SchemaError(f"the job store's schema is at revision {before}, which this version of leoclr does "
                                  f"not know (its newest is {HEAD}): a newer leoclr upgraded it; run that version")
            cfg = config(conn)
            if before is None and inspect(conn).has_table("jobs"):
                _check_ours(conn)
                command.stamp(cfg, FIRST)
            if before != revision:
                command.upgrade(cfg, revision)
            after = revision_of(conn)
    finally:
        engine.dispose()
    return before, after


def _known(revision: str) -> bool:
    from alembic.script import ScriptDirectory
    from alembic.util import CommandError

    try:
        return ScriptDirectory(str(SCRIPTS)).get_revision(revision) is not None
    except CommandError:  # the ResolutionError of an unknown revision is one
        return False


def _check_ours(conn: Connection) -> None:
    columns = {c["name"] for c in inspect(conn).get_columns("jobs")}
    if columns != JOB_COLUMNS:
        raise SchemaError(
            f"the database has a `jobs` table that is not the job store's (its columns: {', '.join(sorted(columns))}); "
            "MLflow's tracking store has a table of that name: give the job store a database of its own "
            "(LEOCLR_DATABASE_URL)")


def _migration_engine(url: str | URL):
    engine = create_engine(url, poolclass=NullPool, **({"connect_args": {"timeout": 60}}
                                                        if str(url).startswith("sqlite") else {}))
    if engine.dialect.name == "sqlite":
        # pysqlite starts no transaction before DDL: take SQLite's write lock at BEGIN, so the whole
        # upgrade is one transaction and a second process waits for it (up to the 60 s timeout).
        @event.listens_for(engine, "connect")
        def _autocommit_driver(dbapi_connection, _record):
            dbapi_connection.isolation_level = None

        @event.listens_for(engine, "begin")
        def _begin_immediate(conn):
            conn.exec_driver_sql("BEGIN IMMEDIATE")
    return engine
