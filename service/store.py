"""The job store (SQLAlchemy): SQLite by default, any database SQLAlchemy speaks (PostgreSQL) by URL.

A job row is written before anything is submitted, so a job the API accepted is never lost: if
the submission to Ray fails, the row says so (status `failed`, the error), and a restarted API
finds every job where it left it.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import JSON, DateTime, String, Text, create_engine, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from leoclr_core.settings import prepare_sqlite

STATUSES = ("queued", "running", "succeeded", "failed", "cancelled", "lost")
# `lost`: Ray no longer knows the job (its head died or was replaced); the error says what was seen.
FINISHED = ("succeeded", "failed", "cancelled", "lost")


class IdempotencyConflict(ValueError):
    """An Idempotency-Key already used for a different spec."""


class Base(DeclarativeBase):
    pass


def _now() -> datetime:
    return datetime.now(timezone.utc)


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=lambda: uuid.uuid4().hex)
    kind: Mapped[str] = mapped_column(String(16), index=True)
    name: Mapped[str] = mapped_column(String(64))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), index=True, default="queued")
    submission_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(128), unique=True, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now, onupdate=_now)


class JobStore:
    def __init__(self, url: str):
        prepare_sqlite(url)
        # A pooled connection to a database server can go stale and is tested before use; to a
        # SQLite file it cannot, and the test (a SELECT 1 per session) was about a tenth of the
        # server's time per job read in a profile.
        self.engine = create_engine(url, pool_pre_ping=not url.startswith("sqlite"))
        Base.metadata.create_all(self.engine)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

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
            rows = s.scalars(q.order_by(Job.created_at.desc(), Job.id).limit(limit).offset(offset)).all()
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
        with self.sessions() as s:
            return list(s.scalars(select(Job).where(Job.status.not_in(FINISHED))).all())


def _same_request(found: Job, spec: dict[str, Any], key: str) -> Job:
    if found.spec != spec:
        raise IdempotencyConflict(f"Idempotency-Key {key!r} was already used for job {found.id} with a different "
                                  "spec; send that spec again, or use a new key for a new job")
    return found
