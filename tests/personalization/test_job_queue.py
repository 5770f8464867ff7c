"""JobQueue on a real redis-server and a real Redis Cluster: submit, tenant scoping, limits,
leases, dead workers."""

from __future__ import annotations

import time

import pytest
import redis

from prefix_store.job import JobStatus, LeaseState, TooManyJobsError
from prefix_store.job_queue import JobQueue
from tests.prefix_store.helpers import unique_namespace, wait_until

SPEC = {"examples": [{"prompt": "a", "completion": " b"}], "steps": 5}


@pytest.fixture()
def make_queue(redis_backend):
    queues: list[JobQueue] = []
    namespace = unique_namespace()

    def make(**kw) -> JobQueue:
        q = JobQueue(redis_backend.url, namespace=namespace, **kw)
        queues.append(q)
        return q

    yield make
    for q in queues:
        q.close()


@pytest.fixture()
def raw(redis_backend):
    client = redis_backend.client()
    yield client
    client.close()


def test_submit_get_is_tenant_scoped(make_queue):
    q = make_queue()
    job_id = q.submit("acme", "ada", SPEC)
    job = q.get("acme", job_id)
    assert (job.status, job.progress, job.loss, job.step, job.attempts) == (JobStatus.QUEUED, 0.0, None, 0, 0)
    assert (job.tenant, job.user_id, job.spec, job.prefix_id, job.error) == ("acme", "ada", SPEC, None, None)
    assert job.created_at <= time.time()
    assert q.get("other", job_id) is None  # another tenant's job does not exist for it
    assert q.cancel("other", job_id) is None and q.get("acme", job_id).status == JobStatus.QUEUED
    assert q.get("acme", "job-" + "0" * 32) is None
    assert q.get("acme", "../../etc") is None


def test_per_tenant_limit_counts_queued_and_running(make_queue):
    q = make_queue(max_active_per_tenant=2)
    first = q.submit("acme", "u1", SPEC)
    q.submit("acme", "u2", SPEC)
    with pytest.raises(TooManyJobsError, match=r"has 2 personalization jobs queued or running; the limit is 2"):
        q.submit("acme", "u3", SPEC)
    q.submit("globex", "u1", SPEC)  # other tenants have their own count
    running = q.claim("w1")
    assert running.job_id == first  # first in, first out
    assert q.active_count("acme") == 2  # running still counts
    with pytest.raises(TooManyJobsError):
        q.submit("acme", "u3", SPEC)
    q.finish(running, JobStatus.SUCCEEDED, prefix_id="user:u1", version="0" * 16)
    assert q.active_count("acme") == 1
    q.submit("acme", "u3", SPEC)


def test_claim_heartbeat_finish(make_queue, raw):
    q = make_queue()
    job_id = q.submit("acme", "ada", SPEC)
    job = q.claim("w1")
    assert job.job_id == job_id and job.status == JobStatus.RUNNING and job.attempts == 1 and job.worker == "w1"
    assert q.claim("w2", block_ms=10) is None  # one job, one worker
    assert q.heartbeat(job, "w1", step=2, total=5, loss=1.5) == LeaseState.ACTIVE
    seen = q.get("acme", job_id)
    assert (seen.step, seen.progress, seen.loss) == (2, 0.4, 1.5)
    assert q.finish(job, JobStatus.SUCCEEDED, prefix_id="user:ada", version="ab" * 8)
    done = q.get("acme", job_id)
    assert (done.status, done.progress, done.prefix_id, done.version) == (JobStatus.SUCCEEDED, 1.0, "user:ada", "ab" * 8)
    assert done.lease is None and done.finished_at is not None
    assert q.active_count("acme") == 0
    assert raw.xlen(q.stream) == 0  # acknowledged and deleted: the stream holds only live work
    assert 0 < raw.ttl(q.job_key(job_id)) <= q.finished_ttl_s
    assert q.heartbeat(job, "w1") == LeaseState.LOST  # a finished job has no lease
    assert not q.finish(job, JobStatus.FAILED, error="late")  # and cannot be finished twice
    assert q.get("acme", job_id).status == JobStatus.SUCCEEDED


def test_cancel_queued_is_immediate_and_workers_skip_it(make_queue, raw):
    q = make_queue()
    job_id = q.submit("acme", "ada", SPEC)
    job = q.cancel("acme", job_id)
    assert job.status == JobStatus.CANCELLED and job.finished_at is not None
    assert q.active_count("acme") == 0
    assert q.claim("w1", block_ms=10) is None
    assert raw.xlen(q.stream) == 0


def test_cancel_running_reaches_the_worker(make_queue):
    q = make_queue()
    job_id = q.submit("acme", "ada", SPEC)
    job = q.claim("w1")
    assert q.cancel("acme", job_id).status == JobStatus.RUNNING  # the worker stops at its next step
    assert q.heartbeat(job, "w1", step=1, total=5, loss=2.0) == LeaseState.CANCEL_REQUESTED
    assert q.finish(job, JobStatus.CANCELLED)
    assert q.get("acme", job_id).status == JobStatus.CANCELLED and q.active_count("acme") == 0


def _wait_idle(raw, q: JobQueue, seconds: float) -> None:
    """Until the pending entry has been idle longer than `seconds` (read from Redis itself)."""
    assert wait_until(lambda: all(p["time_since_delivered"] > seconds * 1000
                                  for p in raw.xpending_range(q.stream, q.group, "-", "+", 10)), timeout=10)


def test_a_dead_workers_job_is_taken_over_and_the_old_lease_is_void(make_queue, raw):
    q = make_queue(claim_timeout_s=0.2)
    job_id = q.submit("acme", "ada", SPEC)
    first = q.claim("dead")
    _wait_idle(raw, q, 0.2)
    second = q.claim("alive")
    assert second.job_id == job_id and second.attempts == 2 and second.worker == "alive"
    assert second.lease != first.lease
    # the first worker, if it was only slow, learns it lost the job and cannot finish it
    assert q.heartbeat(first, "dead", step=3, total=5, loss=0.1) == LeaseState.LOST
    assert not q.finish(first, JobStatus.SUCCEEDED, prefix_id="user:ada", version="0" * 16)
    assert q.get("acme", job_id).status == JobStatus.RUNNING
    assert q.finish(second, JobStatus.SUCCEEDED, prefix_id="user:ada", version="1" * 16)
    assert q.get("acme", job_id).version == "1" * 16


def test_after_max_attempts_the_job_fails_with_the_reason(make_queue, raw):
    q = make_queue(claim_timeout_s=0.2, max_attempts=1)
    job_id = q.submit("acme", "ada", SPEC)
    q.claim("dead-worker")
    _wait_idle(raw, q, 0.2)
    assert q.claim("w2") is None
    job = q.get("acme", job_id)
    assert job.status == JobStatus.FAILED and job.attempts == 1
    assert "stopped responding" in job.error and "dead-worker" in job.error and "max_attempts=1" in job.error
    assert q.active_count("acme") == 0 and raw.xlen(q.stream) == 0


def test_heartbeats_keep_the_job(make_queue, raw):
    q = make_queue(claim_timeout_s=2.0)
    q.submit("acme", "ada", SPEC)
    job = q.claim("w1")
    _wait_idle(raw, q, 2.0)  # long enough to be taken over ...
    assert q.heartbeat(job, "w1") == LeaseState.ACTIVE  # ... but the heartbeat resets the idle time
    assert q.claim("w2", block_ms=10) is None
    assert q.heartbeat(job, "w1") == LeaseState.ACTIVE


def test_release_gives_the_job_back_without_counting_the_attempt(make_queue):
    q = make_queue()
    job_id = q.submit("acme", "ada", SPEC)
    job = q.claim("stopping")
    assert q.release(job)
    back = q.get("acme", job_id)
    assert (back.status, back.attempts, back.progress) == (JobStatus.QUEUED, 0, 0.0)
    again = q.claim("w2")
    assert again.job_id == job_id and again.attempts == 1
    assert q.heartbeat(job, "stopping") == LeaseState.LOST


def test_status_counts_follow_queue_and_leases(make_queue):
    q = make_queue(max_active_per_tenant=5)
    assert q.status_counts() == {"queued": 0, "running": 0}
    q.submit("acme", "u1", SPEC)
    q.submit("acme", "u2", SPEC)
    assert q.status_counts() == {"queued": 2, "running": 0}
    job = q.claim("w1")
    assert q.status_counts() == {"queued": 1, "running": 1}
    assert q.finish(job, JobStatus.SUCCEEDED, prefix_id="user:u1")
    assert q.status_counts() == {"queued": 1, "running": 0}
