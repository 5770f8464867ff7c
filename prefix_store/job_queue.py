"""JobQueue: personalization jobs on a Redis Stream read by a consumer group of workers.

    ps:{jobs}:stream            stream  one entry {job: <job_id>} per job waiting or running
    ps:{jobs}:job:<job_id>      hash    the job (prefix_store.job.Job); expires after it finishes
    ps:{jobs}:active:<tenant>   set     ids of the tenant's queued and running jobs (the limit)
    ps:{jobs}:tenant:<tenant>   zset    ids of all the tenant's jobs, by creation time (deletion)
    ps:{jobs}:sync              string  written just before a WAIT (connection.wait_for_replicas)

# NOTE: invariants
# - Every state change is one Lua script, so a reader never sees half of one (e.g. a job
#   finished but still counted against its tenant's limit). All keys share the hash tag
#   `{jobs}`, so the scripts stay legal in Redis Cluster.
# - A worker owns a job through its stream entry (pending in the group) and a lease token
#   written into the job at claim time. Heartbeats reset the entry's idle time and check
#   the token; an entry idle longer than `claim_timeout_s` belongs to a dead worker and is
#   taken over (XAUTOCLAIM) by another one as a new attempt, with a new token, so the old
#   worker (if it was only slow) finds its lease LOST and publishes nothing.
# - After `max_attempts` starts the job is failed with the reason instead of run again.
# - A finished job's entry is acknowledged and deleted, so the stream holds only live work.
# - With `wait_replicas` > 0 a submission is acknowledged only once that many replicas of
#   the master hold it (WAIT), so a failover keeps every job the API said it queued. Later
#   state changes are not waited for: one lost in a failover at worst runs a job again
#   (the lease then looks silent and the job is taken over) or loses a cancel.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any

import redis

from prefix_store.connection import make_client, unavailable_as_error, wait_for_replicas
from prefix_store.job import Job, JobStatus, LeaseState, TooManyJobsError
from prefix_store.keys import Keys
from server.prefix.ids import validate_tenant

JOB_ID_RULE = re.compile(r"job-[0-9a-f]{32}")
MAX_BLOCK_MS = 1000  # stays below the client's socket timeout (connection.SOCKET_TIMEOUT_S)

# KEYS job, active, stream, tenant jobs | ARGV limit, job_id, now, forget_before, field, value, ...
_SUBMIT = """
local active = redis.call('SCARD', KEYS[2])
if active >= tonumber(ARGV[1]) then return {0, active} end
local fields = {}
for i = 5, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('SADD', KEYS[2], ARGV[2])
redis.call('ZADD', KEYS[4], ARGV[3], ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', ARGV[4])
local entry = redis.call('XADD', KEYS[3], '*', 'job', ARGV[2])
redis.call('HSET', KEYS[1], 'entry', entry)
return {1, active + 1}
"""

# KEYS job, active, stream | ARGV group, entry, consumer, lease, now, max_attempts, ttl, job_id
_CLAIM = """
local function drop()
  redis.call('XACK', KEYS[3], ARGV[1], ARGV[2])
  redis.call('XDEL', KEYS[3], ARGV[2])
end
local function finish(status, err, attempts)
  redis.call('HSET', KEYS[1], 'status', status, 'error', err, 'finished_at', ARGV[5], 'lease', '',
             'attempts', attempts)
  redis.call('SREM', KEYS[2], ARGV[8])
  drop()
  redis.call('EXPIRE', KEYS[1], ARGV[7])
end
if redis.call('EXISTS', KEYS[1]) == 0 then drop() return 'gone' end
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'queued' and status ~= 'running' then drop() return 'finished' end
if redis.call('HGET', KEYS[1], 'entry') ~= ARGV[2] then drop() return 'stale' end
local attempts = tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0')
if redis.call('HGET', KEYS[1], 'cancel') == '1' then finish('cancelled', '', attempts) return 'cancelled' end
if attempts >= tonumber(ARGV[6]) then
  local last = redis.call('HGET', KEYS[1], 'worker') or '?'
  finish('failed', 'the worker running this job stopped responding (killed, or cut off from Redis) ' ..
         attempts .. ' time(s), last ' .. last .. '; gave up after max_attempts=' .. ARGV[6], attempts)
  return 'failed'
end
redis.call('HSET', KEYS[1], 'status', 'running', 'worker', ARGV[3], 'lease', ARGV[4], 'started_at', ARGV[5],
           'heartbeat_at', ARGV[5], 'progress', '0', 'step', '0', 'loss', '', 'attempts', attempts + 1)
return 'claimed'
"""

# KEYS job, stream | ARGV group, entry, consumer, lease, now, step, progress, loss
_HEARTBEAT = """
if redis.call('HGET', KEYS[1], 'lease') ~= ARGV[4] then return 'lost' end
redis.call('XCLAIM', KEYS[2], ARGV[1], ARGV[3], 0, ARGV[2], 'JUSTID')
redis.call('HSET', KEYS[1], 'heartbeat_at', ARGV[5])
if ARGV[6] ~= '' then redis.call('HSET', KEYS[1], 'step', ARGV[6], 'progress', ARGV[7], 'loss', ARGV[8]) end
if redis.call('HGET', KEYS[1], 'cancel') == '1' then return 'cancel' end
return 'ok'
"""

# KEYS job, active, stream | ARGV group, entry, lease, status, error, prefix_id, version, now, ttl, job_id
_FINISH = """
if redis.call('HGET', KEYS[1], 'lease') ~= ARGV[3] then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[4], 'error', ARGV[5], 'prefix_id', ARGV[6], 'version', ARGV[7],
           'finished_at', ARGV[8], 'lease', '')
if ARGV[4] == 'succeeded' then redis.call('HSET', KEYS[1], 'progress', '1') end
redis.call('SREM', KEYS[2], ARGV[10])
redis.call('XACK', KEYS[3], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[3], ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[9])
return 1
"""

# KEYS job, stream | ARGV group, entry, lease, job_id
_RELEASE = """
if redis.call('HGET', KEYS[1], 'lease') ~= ARGV[3] then return 0 end
redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[2], ARGV[2])
local entry = redis.call('XADD', KEYS[2], '*', 'job', ARGV[4])
redis.call('HSET', KEYS[1], 'status', 'queued', 'lease', '', 'entry', entry, 'progress', '0', 'step', '0', 'loss', '')
redis.call('HINCRBY', KEYS[1], 'attempts', -1)
return 1
"""

# KEYS job | ARGV lease, metrics (JSON)
_REPORT = """
if redis.call('HGET', KEYS[1], 'lease') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'metrics', ARGV[2])
return 1
"""

# KEYS job, active | ARGV tenant, now, ttl, job_id
# KEYS tenant jobs, active, stream | ARGV job key prefix
_DELETE_TENANT = """
local ids = redis.call('ZRANGE', KEYS[1], 0, -1)
for _, id in ipairs(ids) do
  local key = ARGV[1] .. id
  if redis.call('HGET', key, 'status') == 'queued' then
    redis.call('XDEL', KEYS[3], redis.call('HGET', key, 'entry'))
  end
  redis.call('DEL', key)
end
redis.call('DEL', KEYS[1], KEYS[2])
return #ids
"""

_CANCEL = """
if redis.call('HGET', KEYS[1], 'tenant') ~= ARGV[1] then return 'missing' end
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'queued' then
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'cancel', '1', 'finished_at', ARGV[2])
  redis.call('SREM', KEYS[2], ARGV[4])
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  return 'cancelled'
end
if status == 'running' then redis.call('HSET', KEYS[1], 'cancel', '1') return 'requested' end
return status
"""


class JobQueue:
    """Both sides of the queue: the API submits, gets and cancels; workers claim and report."""

    def __init__(self, redis_url: str, namespace: str = "ps", *, max_active_per_tenant: int = 2,
                 claim_timeout_s: float = 60.0, max_attempts: int = 3, finished_ttl_s: int = 7 * 86400,
                 group: str = "workers", wait_replicas: int = 0, wait_timeout_ms: int = 1000):
        if max_active_per_tenant < 1 or max_attempts < 1 or claim_timeout_s <= 0 or finished_ttl_s < 1:
            raise ValueError(f"max_active_per_tenant ({max_active_per_tenant}) and max_attempts ({max_attempts}) "
                             f"must be >= 1, claim_timeout_s ({claim_timeout_s}) and finished_ttl_s "
                             f"({finished_ttl_s}) positive")
        self.redis_url = redis_url
        self.keys = Keys(namespace)  # validates the namespace
        self.max_active_per_tenant = max_active_per_tenant
        self.claim_timeout_s = claim_timeout_s
        self.max_attempts = max_attempts
        self.finished_ttl_s = int(finished_ttl_s)
        self.group = group
        self.wait_replicas = wait_replicas
        self.wait_timeout_ms = wait_timeout_ms
        self._r = make_client(redis_url)
        base = f"{namespace}:{{jobs}}"
        self.stream = f"{base}:stream"
        self._sync = f"{base}:sync"
        self._job_base = f"{base}:job:"
        self._active_base = f"{base}:active:"
        self._tenant_base = f"{base}:tenant:"
        self._scripts = {name: self._r.register_script(src) for name, src in (
            ("submit", _SUBMIT), ("claim", _CLAIM), ("heartbeat", _HEARTBEAT), ("finish", _FINISH),
            ("release", _RELEASE), ("cancel", _CANCEL), ("delete_tenant", _DELETE_TENANT))}
        self._group_ready = False

    def job_key(self, job_id: str) -> str:
        return self._job_base + job_id

    def active_key(self, tenant: str) -> str:
        return self._active_base + validate_tenant(tenant)

    def tenant_key(self, tenant: str) -> str:
        return self._tenant_base + validate_tenant(tenant)

    def _guard(self):
        return unavailable_as_error(self.redis_url)

    # ---- the API's side ------------------------------------------------------------------

    def submit(self, tenant: str, user_id: str, spec: dict[str, Any]) -> str:
        """Queue a job; its id. Raises TooManyJobsError at the tenant's limit."""
        if not isinstance(user_id, str) or not user_id:
            raise ValueError(f"user_id must be a non-empty string, got {user_id!r}")
        job_id = f"job-{uuid.uuid4().hex}"
        now = time.time()
        fields = {"tenant": tenant, "user_id": user_id, "spec": json.dumps(spec, separators=(",", ":")),
                  "status": JobStatus.QUEUED.value, "progress": "0", "step": "0", "loss": "",
                  "created_at": repr(now), "attempts": "0", "cancel": "0"}
        # ids of jobs long expired leave the tenant's index (a finished job expires after the ttl)
        args = [self.max_active_per_tenant, job_id, repr(now), repr(now - 2 * self.finished_ttl_s)]
        args += [x for kv in fields.items() for x in kv]
        with self._guard():
            self._ensure_group()
            ok, active = self._scripts["submit"](
                keys=[self.job_key(job_id), self.active_key(tenant), self.stream, self.tenant_key(tenant)],
                args=args)
            if ok:
                wait_for_replicas(self._r, self._sync, self.wait_replicas, self.wait_timeout_ms,
                                  created_key=self.job_key(job_id))
        if not ok:
            raise TooManyJobsError(tenant, int(active), self.max_active_per_tenant)
        return job_id

    def get(self, tenant: str, job_id: str) -> Job | None:
        """The job, or None if it does not exist, expired, or belongs to another tenant."""
        job = self._load(job_id)
        return job if job is not None and job.tenant == tenant else None

    def cancel(self, tenant: str, job_id: str) -> Job | None:
        """Cancel a queued job at once; ask a running one to stop. The job after it, or None."""
        if not JOB_ID_RULE.fullmatch(job_id):
            return None
        with self._guard():
            outcome = self._scripts["cancel"](
                keys=[self.job_key(job_id), self.active_key(tenant)],
                args=[tenant, repr(time.time()), self.finished_ttl_s, job_id])
        return None if _text(outcome) == "missing" else self.get(tenant, job_id)

    def delete_tenant(self, tenant: str) -> int:
        """Forget every job of `tenant`: queued ones never run, and a running one's worker
        finds its lease gone at its next heartbeat and publishes nothing. Returns how many."""
        with self._guard():
            return int(self._scripts["delete_tenant"](
                keys=[self.tenant_key(tenant), self.active_key(tenant), self.stream], args=[self._job_base]))

    def active_count(self, tenant: str) -> int:
        with self._guard():
            return int(self._r.scard(self.active_key(tenant)))

    def status_counts(self) -> dict[str, int]:
        """Jobs waiting for a worker ("queued": stream entries not yet delivered to the group,
        cancelled ones included until a worker skips them) and leased to one ("running":
        delivered, not yet acknowledged). For metrics; finished jobs are counted by workers."""
        with self._guard():
            self._ensure_group()
            for group in self._r.xinfo_groups(self.stream):
                if _text(group.get("name")) == self.group:
                    return {"queued": int(group.get("lag") or 0), "running": int(group.get("pending") or 0)}
        return {"queued": 0, "running": 0}

    # ---- the worker's side ---------------------------------------------------------------

    def claim(self, consumer: str, block_ms: int = MAX_BLOCK_MS) -> Job | None:
        """The next job to run (a dead worker's first), now leased to `consumer`; None if there
        is none within `block_ms` (0: do not wait), or the entry read was stale, cancelled or
        failed for good."""
        with self._guard():
            self._ensure_group()
            entry = self._take_abandoned(consumer)
            if entry is None:
                try:
                    reply = self._r.xreadgroup(self.group, consumer, {self.stream: ">"}, count=1,
                                               block=min(block_ms, MAX_BLOCK_MS) if block_ms > 0 else None)
                except redis.ResponseError as e:  # NOGROUP: Redis lost its data (restart without AOF)
                    if "NOGROUP" not in str(e):
                        raise
                    self._group_ready = False
                    return None
                entry = reply[0][1][0] if reply and reply[0][1] else None
            if entry is None:
                return None
            entry_id, fields = _text(entry[0]), {_text(k): _text(v) for k, v in entry[1].items()}
            job_id = fields.get("job", "")
            outcome = self._scripts["claim"](
                keys=[self.job_key(job_id), self.active_key(self._tenant_of(job_id)), self.stream],
                args=[self.group, entry_id, consumer, uuid.uuid4().hex, repr(time.time()), self.max_attempts,
                      self.finished_ttl_s, job_id])
        return self._load(job_id) if _text(outcome) == "claimed" else None

    def heartbeat(self, job: Job, consumer: str, step: int | None = None, total: int | None = None,
                  loss: float | None = None) -> LeaseState:
        """Keep the lease (and report progress when `step` is given); says whether to go on."""
        progress = "" if step is None else repr(step / total if total else 0.0)
        with self._guard():
            outcome = self._scripts["heartbeat"](
                keys=[self.job_key(job.job_id), self.stream],
                args=[self.group, job.entry_id, consumer, job.lease, repr(time.time()),
                      "" if step is None else step, progress, "" if loss is None else repr(float(loss))])
        return LeaseState(_text(outcome))

    def finish(self, job: Job, status: JobStatus, error: str | None = None, prefix_id: str | None = None,
               version: str | None = None) -> bool:
        """Record the end of the attempt and acknowledge its entry; False if the lease was lost."""
        if not status.finished:
            raise ValueError(f"finish() needs a final status, not {status.value}")
        with self._guard():
            return bool(self._scripts["finish"](
                keys=[self.job_key(job.job_id), self.active_key(job.tenant), self.stream],
                args=[self.group, job.entry_id, job.lease, status.value, error or "", prefix_id or "",
                      version or "", repr(time.time()), self.finished_ttl_s, job.job_id]))

    def release(self, job: Job) -> bool:
        """Give a job back unfinished (the worker is stopping): queued again, attempt not counted."""
        with self._guard():
            return bool(self._scripts["release"](
                keys=[self.job_key(job.job_id), self.stream],
                args=[self.group, job.entry_id, job.lease, job.job_id]))

    def report(self, job: Job, metrics: dict[str, Any]) -> bool:
        """Write what the running attempt measured (losses, steps) into the job; False if the
        lease was lost. A new attempt's reports replace an earlier attempt's."""
        with self._guard():
            return bool(self._r.register_script(_REPORT)(
                keys=[self.job_key(job.job_id)], args=[job.lease, json.dumps(metrics, sort_keys=True)]))

    def ping(self) -> bool:
        try:
            with self._guard():
                return bool(self._r.ping())
        except Exception:
            return False

    def close(self) -> None:
        self._r.close()

    # ---- internals -----------------------------------------------------------------------

    def _take_abandoned(self, consumer: str):
        """One entry whose worker has been silent for claim_timeout_s, now ours; or None."""
        try:
            reply = self._r.xautoclaim(self.stream, self.group, consumer,
                                       min_idle_time=int(self.claim_timeout_s * 1000), start_id="0-0", count=1)
        except redis.ResponseError as e:
            if "NOGROUP" not in str(e):
                raise
            self._group_ready = False
            return None
        entries = [e for e in reply[1] if e and e[1]]  # an entry deleted meanwhile has no fields
        return entries[0] if entries else None

    def _ensure_group(self) -> None:
        if self._group_ready:
            return
        try:
            # from id 0: jobs submitted before the first worker started are read too
            self._r.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
        self._group_ready = True

    def _tenant_of(self, job_id: str) -> str:
        tenant = self._r.hget(self.job_key(job_id), "tenant") if job_id else None
        # a job that expired or never existed: any valid tenant key works, the script drops it
        return _text(tenant) if tenant else "none"

    def _load(self, job_id: str) -> Job | None:
        if not isinstance(job_id, str) or not JOB_ID_RULE.fullmatch(job_id):
            return None
        with self._guard():
            raw = self._r.hgetall(self.job_key(job_id))
        if not raw or b"tenant" not in raw:
            return None
        return Job.from_hash(job_id, {_text(k): _text(v) for k, v in raw.items()})


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
