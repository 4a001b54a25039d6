"""The job store's schema under Alembic, on SQLite and on a real PostgreSQL server (`job_database`):
the revisions make exactly the models' table, a store written before Alembic or at an older
revision is upgraded when opened without losing a job, services opening one store at once do not
break each other, and the store's conditional writes have one winner on both databases."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

import pytest
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.pool import NullPool

from service import migrations
from service.store import FINISHED, Base, JobStore, store_url

# The `jobs` table as the store's create_all made it before Alembic, as its DDL was (one per dialect).
LEGACY_DDL = {
    "sqlite": """CREATE TABLE jobs (
        id VARCHAR(32) NOT NULL, kind VARCHAR(16) NOT NULL, name VARCHAR(64) NOT NULL, spec JSON NOT NULL,
        status VARCHAR(16) NOT NULL, submission_id VARCHAR(128), idempotency_key VARCHAR(128), error TEXT,
        result JSON, created_at DATETIME NOT NULL, updated_at DATETIME NOT NULL,
        PRIMARY KEY (id), UNIQUE (idempotency_key))""",
    "postgresql": """CREATE TABLE jobs (
        id VARCHAR(32) NOT NULL, kind VARCHAR(16) NOT NULL, name VARCHAR(64) NOT NULL, spec JSON NOT NULL,
        status VARCHAR(16) NOT NULL, submission_id VARCHAR(128), idempotency_key VARCHAR(128), error TEXT,
        result JSON, created_at TIMESTAMP WITH TIME ZONE NOT NULL, updated_at TIMESTAMP WITH TIME ZONE NOT NULL,
        PRIMARY KEY (id), UNIQUE (idempotency_key))""",
}
LEGACY_INDEXES = ["CREATE INDEX ix_jobs_kind ON jobs (kind)", "CREATE INDEX ix_jobs_status ON jobs (status)"]

SPEC = {"kind": "pretrain", "name": "old", "data": {"num_images": 256, "image_size": 16}, "optim": {"lr": 0.06}}


def _at(minute: int) -> datetime:
    return datetime(2025, 3, 1, 10, minute, 7, 123456, tzinfo=timezone.utc)


# One job in each state a store holds, with every optional field used somewhere.
OLD_JOBS = [
    dict(id="a" * 32, kind="pretrain", name="waiting", spec=SPEC, status="queued", submission_id=None,
         idempotency_key="key-1", error="waiting: larger than the cluster is now", result=None, created_at=_at(1)),
    dict(id="b" * 32, kind="tune", name="searching", spec={**SPEC, "kind": "tune"}, status="running",
         submission_id="leoclr-" + "b" * 32, idempotency_key=None, error=None, result=None, created_at=_at(2)),
    dict(id="c" * 32, kind="pretrain", name="done", spec=SPEC, status="succeeded", submission_id="leoclr-c",
         idempotency_key="key-3", error=None, created_at=_at(3),
         result={"registry_uri": "models:/leoclr-demo@candidate", "knn_top1": 41.5, "model_version": "3"}),
    dict(id="d" * 32, kind="evaluate", name="broke", spec={"kind": "evaluate"}, status="failed",
         submission_id="leoclr-d", idempotency_key=None, error="Traceback ...\nValueError: \u00e9\u4e2d", result=None,
         created_at=_at(4)),
    dict(id="e" * 32, kind="embed", name="stopped", spec=SPEC, status="cancelled", submission_id=None,
         idempotency_key=None, error=None, result=None, created_at=_at(5)),
    dict(id="f" * 32, kind="pretrain", name="gone", spec=SPEC, status="lost", submission_id="leoclr-f",
         idempotency_key=None, error="lost: Ray has no record of its job", result=None, created_at=_at(6)),
]


def _engine(url: str):
    return create_engine(store_url(url), poolclass=NullPool)


def _write_old_jobs(conn, dialect: str) -> None:
    for job in OLD_JOBS:
        when = job["created_at"]
        # what SQLAlchemy wrote: SQLite a naive text timestamp, PostgreSQL a timestamptz
        stamp = when.replace(tzinfo=None).isoformat(" ") if dialect == "sqlite" else when.isoformat(" ")
        conn.execute(text("INSERT INTO jobs (id, kind, name, spec, status, submission_id, idempotency_key, error, "
                          "result, created_at, updated_at) VALUES (:id, :kind, :name, :spec, :status, :submission_id, "
                          ":idempotency_key, :error, :result, :created_at, :created_at)"),
                     {**job, "spec": json.dumps(job["spec"]),
                      "result": None if job["result"] is None else json.dumps(job["result"]), "created_at": stamp})


def _aware(dt: datetime) -> datetime:
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=timezone.utc)


def _schema_differences(url: str) -> list:
    """What Alembic's autogenerate would change to make the database match the models: nothing, if
    the revisions and the models agree."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    engine = _engine(url)
    try:
        with engine.connect() as conn:
            return compare_metadata(MigrationContext.configure(conn, opts={"version_table": migrations.VERSION_TABLE}),
                                    Base.metadata)
    finally:
        engine.dispose()


def _indexes(engine) -> set[str]:
    """The indexes of `jobs`, without the one PostgreSQL keeps for its unique constraint."""
    return {ix["name"] for ix in inspect(engine).get_indexes("jobs") if "duplicates_constraint" not in ix}


def test_a_store_from_before_alembic_keeps_every_job_and_field_and_ends_at_head(job_database):
    dialect = store_url(job_database).get_backend_name()
    engine = _engine(job_database)
    with engine.begin() as conn:
        conn.execute(text(LEGACY_DDL[dialect]))
        for ddl in LEGACY_INDEXES:
            conn.execute(text(ddl))
        _write_old_jobs(conn, dialect)
    engine.dispose()

    store = JobStore(job_database)
    try:
        assert migrations.current(job_database) == migrations.HEAD
        # Stamped at 0001 and upgraded: only if 0001 is exactly the table create_all made does the
        # result match the models with nothing left over or missing.
        assert _schema_differences(job_database) == []
        for old in OLD_JOBS:
            job = store.get(old["id"])
            got = {k: getattr(job, k) for k in old}
            assert _aware(got.pop("created_at")) == old["created_at"] and _aware(job.updated_at) == old["created_at"]
            assert got == {k: v for k, v in old.items() if k != "created_at"}
        assert [j.id for j in store.unfinished()] == ["a" * 32, "b" * 32]  # in order of submission
        rows, total = store.list()
        assert total == len(OLD_JOBS) and [j.id for j in rows] == [j["id"] for j in reversed(OLD_JOBS)]
        assert store.list(status="succeeded")[0][0].result["registry_uri"] == "models:/leoclr-demo@candidate"
        # the unique key still holds: the request again is the same job
        again, created = store.create("pretrain", "waiting", SPEC, idempotency_key="key-1")
        assert not created and again.id == "a" * 32
        new, created = store.create("pretrain", "new", SPEC)
        assert created and store.finish(new.id, "cancelled") is not None and store.finish("b" * 32, "lost") is not None
        assert store.counts()[("lost", "pretrain")] == 1 and store.counts()[("lost", "tune")] == 1
    finally:
        store.close()


def test_a_store_at_an_older_revision_is_upgraded_when_opened_and_a_newer_one_refused(job_database):
    assert migrations.upgrade(job_database, migrations.FIRST) == (None, migrations.FIRST)
    dialect = store_url(job_database).get_backend_name()
    engine = _engine(job_database)
    with engine.begin() as conn:
        _write_old_jobs(conn, dialect)
    assert _indexes(engine) == {"ix_jobs_kind", "ix_jobs_status"}

    store = JobStore(job_database)
    assert len(store.list(limit=100)[0]) == len(OLD_JOBS)
    store.close()
    assert migrations.current(job_database) == migrations.HEAD
    assert _indexes(engine) == {"ix_jobs_kind", "ix_jobs_status_created_at", "ix_jobs_created_at_id"}

    with engine.begin() as conn:  # as a later leoclr would leave it
        conn.execute(text(f"UPDATE {migrations.VERSION_TABLE} SET version_num = '0099'"))
    engine.dispose()
    with pytest.raises(migrations.SchemaError, match="revision 0099, which this version of leoclr does not know"):
        JobStore(job_database)


def test_the_newest_revision_is_alembics_head():
    from alembic.script import ScriptDirectory

    assert migrations.HEAD == ScriptDirectory(str(migrations.SCRIPTS)).get_current_head()


def test_services_opening_one_fresh_store_at_once_all_start_and_it_is_upgraded_once(job_database):
    # Without the migration lock, the second to create the tables fails ("already exists").
    barrier = threading.Barrier(4, timeout=60)

    def open_store(_):
        barrier.wait()
        store = JobStore(job_database)
        store.close()
        return True

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(open_store, range(4))) == [True] * 4
    engine = _engine(job_database)
    with engine.connect() as conn:
        assert conn.execute(text(f"SELECT version_num FROM {migrations.VERSION_TABLE}")).scalars().all() == [
            migrations.HEAD]
    engine.dispose()
    assert _schema_differences(job_database) == []


def test_another_applications_tables_of_the_same_names_are_refused_or_left_alone(job_database):
    engine = _engine(job_database)
    with engine.begin() as conn:  # MLflow's tracking schema has both a `jobs` table and `alembic_version`
        conn.execute(text("CREATE TABLE jobs (id VARCHAR(36) PRIMARY KEY, job_name VARCHAR(50), status INTEGER)"))
        conn.execute(text("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)"))
        conn.execute(text("INSERT INTO alembic_version VALUES ('b7e2c1a4d9f3')"))
    with pytest.raises(migrations.SchemaError, match="`jobs` table that is not the job store's.*database of its own"):
        JobStore(job_database)
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE jobs"))
    JobStore(job_database).close()  # its own version table: the other schema's revision is untouched
    with engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == ["b7e2c1a4d9f3"]
    engine.dispose()


def test_of_writers_racing_to_finish_one_job_exactly_one_wins(job_database):
    store = JobStore(job_database)
    try:
        for _ in range(3):
            job, _ = store.create("pretrain", "race", SPEC)
            barrier = threading.Barrier(8, timeout=60)

            def finish(status):
                barrier.wait()
                return store.finish(job.id, status, error=f"by {status}")

            with ThreadPoolExecutor(8) as pool:
                won = [j for j in pool.map(finish, list(FINISHED) * 2) if j is not None]
            assert len(won) == 1, [j.status for j in won]
            final = store.get(job.id)
            assert final.status == won[0].status and final.error == f"by {final.status}"
            assert store.advance(job.id, "running") is None  # nothing moves a finished job
    finally:
        store.close()


def test_a_job_store_url_that_cannot_work_is_an_error_that_never_shows_its_password(tmp_path):
    assert store_url("postgres://u:pw@db:5432/leoclr").drivername == "postgresql+psycopg"
    assert store_url("postgresql://u:pw@db/leoclr").drivername == "postgresql+psycopg"
    assert store_url("postgresql+psycopg2://u@db/x").drivername == "postgresql+psycopg2"  # a driver named stays
    with pytest.raises(ValueError, match="LEOCLR_DATABASE_URL.*not a database URL") as bad:
        store_url("postgresql+psycopg://u:hunter2@db:notaport/x")
    assert "hunter2" not in str(bad.value)
    from tests.backends import free_port

    with pytest.raises(RuntimeError, match=r"could not be opened") as down:
        JobStore(f"postgresql://leoclr:hunter2@127.0.0.1:{free_port()}/jobs")
    assert "leoclr:***@127.0.0.1" in str(down.value) and "hunter2" not in str(down.value)
