"""What the job queue says about one personalization job, and the queue's errors.

A job moves queued -> running -> succeeded | failed | cancelled. A running job whose
worker died goes back to running under another worker (a new attempt) or, after too
many attempts, to failed; a worker that stops on SIGTERM gives it back as queued.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from typing import Any


class JobStatus(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


class LeaseState(str, Enum):
    """What a running worker learns from a heartbeat."""

    ACTIVE = "ok"  # keep going
    CANCEL_REQUESTED = "cancel"  # the owner asked to stop: finish as cancelled
    LOST = "lost"  # another worker took the job over (we were silent too long): drop it


@dataclass(frozen=True)
class Job:
    job_id: str
    tenant: str
    user_id: str
    spec: dict[str, Any]  # what to train (the API's validated request, as JSON)
    status: JobStatus
    progress: float  # 0.0-1.0: steps done / steps
    step: int  # optimizer steps done in the current attempt
    loss: float | None  # the last step's training loss
    error: str | None  # why it failed
    prefix_id: str | None  # the published prefix (succeeded only)
    version: str | None  # its version
    created_at: float
    started_at: float | None  # of the current (last) attempt
    finished_at: float | None
    attempts: int  # how many times a worker started it
    worker: str | None  # the consumer running it (or that ran it last)
    cancel_requested: bool
    lease: str | None  # the current attempt's token; only its holder may report or finish
    entry_id: str | None  # the stream entry that carries it
    metrics: dict[str, Any] | None = None  # what the worker measured (server/training/worker.py: JobMetrics)

    @classmethod
    def from_hash(cls, job_id: str, h: dict[str, str]) -> "Job":
        def opt_float(name: str) -> float | None:
            value = h.get(name, "")
            return float(value) if value else None

        def opt_str(name: str) -> str | None:
            return h.get(name) or None

        return cls(
            job_id=job_id, tenant=h["tenant"], user_id=h["user_id"], spec=json.loads(h["spec"]),
            status=JobStatus(h["status"]), progress=float(h.get("progress") or 0.0), step=int(h.get("step") or 0),
            loss=opt_float("loss"), error=opt_str("error"), prefix_id=opt_str("prefix_id"),
            version=opt_str("version"), created_at=float(h["created_at"]), started_at=opt_float("started_at"),
            finished_at=opt_float("finished_at"), attempts=int(h.get("attempts") or 0), worker=opt_str("worker"),
            cancel_requested=h.get("cancel") == "1", lease=opt_str("lease"), entry_id=opt_str("entry"),
            metrics=json.loads(h["metrics"]) if h.get("metrics") else None)


class TooManyJobsError(RuntimeError):
    """submit() when the tenant already has `limit` jobs queued or running (the API's 429)."""

    def __init__(self, tenant: str, active: int, limit: int):
        self.tenant = tenant
        self.active = active
        self.limit = limit
        super().__init__(f"tenant {tenant!r} has {active} personalization jobs queued or running; the limit is "
                         f"{limit}: wait for one to finish or cancel one (DELETE /v1/jobs/<job_id>)")
