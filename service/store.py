"""The job store (SQLAlchemy): SQLite by default, PostgreSQL (or another database SQLAlchemy
speaks) by URL. Its schema is versioned with Alembic (service/migrations): a store is upgraded to
the newest revision when it is opened, so `leoclr serve` brings an older database up to date on start.

A job row is written before anything is submitted, so a job the API accepted is never lost: if
the submission to Ray fails, the row says so (status `failed`, the error), and a restarted API
finds every job where it left it.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import JSON, DateTime, Index, String, Text, create_engine, func, select, update
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from leoclr_core.settings import prepare_sqlite

STATUSES = ("queued", "running", "succeeded", "failed", "cancelled", "lost")
# `lost`: Ray no longer knows the job (its head died or was replaced); the error says what was seen.
FINISHED = ("succeeded", "failed", "cancelled", "lost")
UNFINISHED = tuple(s for s in STATUSES if s not in FINISHED)
# Connections a store may open: the API's sync routes run on anyio's 40 worker threads, the
# reconcile loop and a metrics scrape on their own, so a burst of requests never waits for one (a
# wait would end in a 500 after SQLAlchemy's 30 s). 10 stay open between bursts; the rest are
# closed when returned. Two services on one PostgreSQL server stay under its default 100.
POOL_SIZE, MAX_OVERFLOW = 10, 32


class IdempotencyConflict(ValueError):
    """An Idempotency-Key already used for a different spec."""


class Base(DeclarativeBase):
    pass


def _now() -> datetime:
    return datetime.now(timezone.utc)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (  # what the frequent reads filter and order by (migration 0002 says which)
        Index("ix_jobs_status_created_at", "status", "created_at"),
        Index("ix_jobs_created_at_id", "created_at", "id"),
    )
    # A change here is a new revision in service/migrations/versions (tests/unit/test_store.py
    # checks that the revisions make exactly this table).

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=lambda: uuid.uuid4().hex)
    kind: Mapped[str] = mapped_column(String(16), index=True)
    name: Mapped[str] = mapped_column(String(64))
    # JSON, not PostgreSQL's JSONB: JSONB refuses "\u0000", which a spec's free-text fields may hold.
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), default="queued")
    submission_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(128), unique=True, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now, onupdate=_now)


def store_url(url: str) -> URL:
    """The job store's SQLAlchemy URL. `postgres://` and `postgresql://` (as many hosts hand them out)
    mean PostgreSQL through psycopg, the driver of the `postgres` extra (SQLAlchemy's default for
    them would be psycopg2). Errors never repeat the URL: it may carry a password."""
    try:
        parsed = make_url(url)
    except Exception:  # noqa: BLE001 - SQLAlchemy's ArgumentError, or a bad port number
        raise ValueError("the job store's URL (LEOCLR_DATABASE_URL) is not a database URL; e.g. "
                         "postgresql+psycopg://user:password@host:5432/leoclr or sqlite:////path/to/jobs.db") from None
    if parsed.drivername in ("postgres", "postgresql"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def shown(url: str | URL) -> str:
    """The URL with its password masked, fit for logs and errors."""
    try:
        return (store_url(url) if isinstance(url, str) else url).render_as_string(hide_password=True)
    except ValueError:
        return "(not a database URL)"


class JobStore:
    def __init__(self, url: str):
        from service import migrations

        prepare_sqlite(url)
        self.url = store_url(url)
        try:
            # A pooled connection to a database server can go stale and is tested before use; to a
            # SQLite file it cannot, and the test (a SELECT 1 per session) was about a tenth of the
            # server's time per job read in a profile.
            self.engine = create_engine(self.url, pool_pre_ping=self.url.get_backend_name() != "sqlite",
                                        pool_size=POOL_SIZE, max_overflow=MAX_OVERFLOW)
            if not migrations.at_head(self.engine):
                migrations.upgrade(self.url)
        except ImportError as exc:
            raise RuntimeError(f"the job store at {shown(self.url)} needs a driver that is not installed ({exc}); "
                               "for PostgreSQL: pip install 'leoclr[postgres]'") from None
        except OperationalError as exc:
            raise RuntimeError(f"the job store at {shown(self.url)} could not be opened: {exc.orig}") from None
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    def close(self) -> None:
        """Close its pooled connections (a database server counts them against its limit)."""
        self.engine.dispose()

    def create(self, kind: str, name: str, spec: dict[str, Any], idempotency_key: str | None = None) -> tuple[Job, bool]:
        """(job, created). With a key already used for this spec, the job it created and False; for
        another spec, IdempotencyConflict (the key names one request, not whatever comes with it)."""
        spec = json.loads(json.dumps(spec))
        with self.sessions() as s:
            if idempotency_key is not None:
                found = s.scalars(select(Job).where(Job.idempotency_key == idempotency_key)).first()
                if found is not None:
                    return _same_request(found, spec, idempotency_key), False
            job = Job(kind=kind, name=name, spec=spec, idempotency_key=idempotency_key)
            s.add(job)
            try:
                s.commit()
            except IntegrityError:  # the same key raced in from another request
                s.rollback()
                found = s.scalars(select(Job).where(Job.idempotency_key == idempotency_key)).one()
                return _same_request(found, spec, idempotency_key), False
            return job, True

    def get(self, job_id: str) -> Job | None:
        with self.sessions() as s:
            return s.get(Job, job_id)

    def list(self, status: str | None = None, kind: str | None = None, limit: int = 50,
             offset: int = 0) -> tuple[list[Job], int]:
        with self.sessions() as s:
            q = select(Job)
            if status:
                q = q.where(Job.status == status)
            if kind:
                q = q.where(Job.kind == kind)
            total = s.scalar(select(func.count()).select_from(q.subquery())) or 0
            rows = s.scalars(q.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit).offset(offset)).all()
            return list(rows), total

    def update(self, job_id: str, **fields: Any) -> Job:
        with self.sessions() as s:
            job = s.get(Job, job_id)
            if job is None:
                raise KeyError(job_id)
            for k, v in fields.items():
                setattr(job, k, v)
            s.commit()
            return job

    def finish(self, job_id: str, status: str, **fields: Any) -> Job | None:
        """Move an unfinished job to the finished `status` in one conditional UPDATE: of callers
        racing to finish the same job, exactly one gets the job back, the others None."""
        if status not in FINISHED:
            raise ValueError(f"status must be one of {list(FINISHED)}, got {status!r}")
        return self.advance(job_id, status, **fields)

    def advance(self, job_id: str, status: str, **fields: Any) -> Job | None:
        """Set `status` only if the job has not finished meanwhile (a cancel between a read and this
        write stays); None if it had."""
        with self.sessions() as s:
            done = s.execute(update(Job).where(Job.id == job_id, Job.status.not_in(FINISHED))
                             .values(status=status, updated_at=_now(), **fields))
            s.commit()
            return s.get(Job, job_id) if done.rowcount == 1 else None

    def counts(self) -> dict[tuple[str, str], int]:
        """{(status, kind): number of jobs}."""
        with self.sessions() as s:
            rows = s.execute(select(Job.status, Job.kind, func.count()).group_by(Job.status, Job.kind)).all()
            return {(st, kind): n for st, kind, n in rows}

    def unfinished(self) -> list[Job]:
        """Jobs queued or running, oldest first. `IN (queued, running)`, not `NOT IN (finished)`: an
        index serves the first, while the second reads every job the store ever had."""
        with self.sessions() as s:
            return list(s.scalars(select(Job).where(Job.status.in_(UNFINISHED))
                                  .order_by(Job.created_at, Job.id)).all())


def _same_request(found: Job, spec: dict[str, Any], key: str) -> Job:
    if found.spec != spec:
        raise IdempotencyConflict(f"Idempotency-Key {key!r} was already used for job {found.id} with a different "
                                  "spec; send that spec again, or use a new key for a new job")
    return found
