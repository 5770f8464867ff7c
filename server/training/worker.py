"""The personalization worker: claims jobs from the Redis queue, trains, publishes `user:<id>`.

It runs in its own process (`prefix-serve worker`), never in the serving loop, with its
own copy of the base model (float32 is fine for training; the server may serve another
dtype of the same weights).

    loop: job = queue.claim()                  # while busy too, up to max_jobs held at once
          on a thread of its own, taking turns (turns.py) with the other jobs held:
            examples, task prefix (if any) <- the job's spec, the store
            plan = recipe.plan_job(examples)     # forms, held-out split, steps, regulariser
            train_prefix(progress=...)           # progress, loss, cancel, heartbeat, and at
                                                 # every step the turn goes to the tenant owed it
            queue.report(job, metrics)           # held-out loss and the base model's, steps
            store.put(tenant, "user:<user_id>", kv, trained_after=task prefix@version or ())
            queue.finish(job, succeeded)         # atomic put: the old version serves until here

The frozen model trains in `train_dtype` (bfloat16 where the CPU computes it natively:
about 2x faster per example, bench/train_speed.py); its fingerprints are taken from the
float32 weights first, so jobs from a server of any dtype are recognised.

# NOTE: nothing is published unless the whole job ran and this worker still holds the
# job's lease right before the put; a cancelled, failed, stopped or taken-over job
# publishes nothing. A background thread heartbeats while a job runs or waits for its
# turn, so a slow step (or a long wait) never makes a live worker look dead.
#
# Fair training: one tenant's long job (2,000 steps of ~20 s) must not hold the worker
# while another tenant's 1-step job waits. The worker keeps claiming while busy, and its
# jobs take turns one optimizer step at a time, least-served tenant first, each waiting
# with its state in memory. A job held here is leased as before: if the worker is killed,
# every job it held is taken over by another worker (from its start); on SIGTERM each is
# given back to the queue.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from prefix_store import PrefixStore, StoreUnavailableError, TenantDeletedError
from prefix_store.job import Job, JobStatus, LeaseState
from prefix_store.job_queue import JobQueue
from server.prefix import ModelSpec, PrefixRef, model_fingerprint, user_prefix_id
from server.training.job_spec import BasePrefix, JobSpec
from server.training.recipe import Plan, plan_job
from server.training.trainer import TrainResult, evaluate_loss, train_prefix
from server.training.turns import Turns

log = logging.getLogger(__name__)


class JobError(ValueError):
    """The job cannot run as asked (its message becomes the job's error)."""


@dataclass(frozen=True)
class WorkerConfig:
    consumer: str  # this worker's name in the consumer group (unique per process)
    mid_dim: int = 512  # width of the MLP reparameterization
    batch_size: int = 8  # examples per step
    heartbeat_s: float = 5.0  # lease refresh while a job runs; well under the claim timeout
    progress_every_s: float = 0.25  # how often progress and loss are written
    idle_block_ms: int = 1000  # how long one claim waits for a job (when none is held)
    max_jobs: int = 4  # jobs held at once, taking turns (each keeps its optimizer state in memory)
    busy_poll_s: float = 1.0  # while jobs are held: how often the queue is asked for another
    train_dtype: torch.dtype | None = None  # the frozen model's dtype while training (None: as loaded)


def serving_fingerprints(model: torch.nn.Module) -> set[str]:
    """The fingerprints a server gives these weights in each dtype it may serve them in."""
    return {model_fingerprint(_CastView(model, dtype)) for dtype in (torch.float32, torch.bfloat16, torch.float16)}


class _CastView:
    """`model` as model_fingerprint sees it, with its weights cast to `dtype`. Only the
    first values of each parameter are hashed, so only those are cast (no model copy)."""

    HEAD = 1 << 16

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype):
        self.config = model.config
        self._model, self._dtype = model, dtype

    def named_parameters(self):
        for name, p in self._model.named_parameters():
            yield name, p.detach().flatten()[:self.HEAD].to(self._dtype)


class Worker:
    def __init__(self, model: torch.nn.Module, tokenizer, queue: JobQueue, store: PrefixStore, config: WorkerConfig):
        self.model, self.tokenizer, self.queue, self.store, self.config = model, tokenizer, queue, store, config
        self.spec = ModelSpec.from_hf(model)
        self.fingerprints = serving_fingerprints(model)  # before any cast: the weights as loaded
        if config.train_dtype is not None:
            self.model = model.to(config.train_dtype)
        self.stop_requested = threading.Event()  # set by SIGTERM: finish the loop, give the job back
        # Called with (status, seconds) when this worker records a job's end (metrics).
        self.on_finished: Callable[[JobStatus, float], None] | None = None
        self.turns = Turns()
        self._threads: dict[str, threading.Thread] = {}  # job id -> the thread running it
        self._slot_free = threading.Event()  # a job thread ended

    def run(self) -> None:
        """Claim and run jobs until stop_requested; then wait for the held jobs to give up."""
        log.info("worker %s: waiting for jobs (up to %d at once)", self.config.consumer, self.config.max_jobs)
        while not self.stop_requested.is_set():
            self._reap()
            if len(self._threads) >= self.config.max_jobs:
                self._wait(self.config.busy_poll_s)
                continue
            try:
                # idle: block on the queue (workers with nothing to do get new jobs first);
                # busy: only look, then train on
                job = self.queue.claim(self.config.consumer, 0 if self._threads else self.config.idle_block_ms)
            except StoreUnavailableError as e:
                # Held jobs train on; a claimed job's entry stays pending, taken over once Redis is back.
                log.warning("worker %s: %s; retrying", self.config.consumer, e)
                self._wait(1.0)
                continue
            if job is not None:
                # A job this worker still runs can come back: its lease lapsed (the process was
                # starved past the claim timeout) and the claim took it over as a new attempt.
                # The new attempt waits for the old one, which finds its lease lost and stops.
                earlier = self._threads.get(job.job_id)
                thread = threading.Thread(target=self.run_job, args=(job, earlier), name=f"job-{job.job_id}",
                                          daemon=True)
                self._threads[job.job_id] = thread
                thread.start()
            elif self._threads:
                self._wait(self.config.busy_poll_s)
        for thread in list(self._threads.values()):
            thread.join()
        self._reap()
        log.info("worker %s: stopped", self.config.consumer)

    def _wait(self, seconds: float) -> None:
        """Up to `seconds`, less if a job ends or a stop is asked for."""
        deadline = time.monotonic() + seconds
        while not self.stop_requested.is_set() and not self._slot_free.is_set() and time.monotonic() < deadline:
            self._slot_free.wait(min(0.1, seconds))
        self._slot_free.clear()

    def _reap(self) -> None:
        for job_id, thread in list(self._threads.items()):
            if not thread.is_alive():
                del self._threads[job_id]

    def run_job(self, job: Job, earlier: threading.Thread | None = None) -> JobStatus | None:
        """Run one claimed job to its end, taking turns with the worker's other jobs; the status
        recorded (None: given back or lost). `earlier`: this worker's own earlier attempt at
        the same job, still running, whose lease this attempt took over."""
        try:
            return self._run_job(job, earlier)
        except StoreUnavailableError as e:
            # The entry stays pending: another worker (or this one) takes it over once Redis is back.
            log.warning("job %s: %s; left for a retry", job.job_id, e)
            return None
        finally:
            self._slot_free.set()

    def _run_job(self, job: Job, earlier: threading.Thread | None = None) -> JobStatus | None:
        log.info("job %s (tenant %s, user %s): attempt %d", job.job_id, job.tenant, job.user_id, job.attempts)
        started = time.monotonic()
        lease = _Lease(self.queue, job, self.config, self.stop_requested)  # heartbeats from here on
        if earlier is not None:
            log.warning("job %s: this worker's lease lapsed and it took the job over as attempt %d; "
                        "waiting for the earlier attempt to stop", job.job_id, job.attempts)
            earlier.join()  # it stops at its next step or heartbeat (its lease is lost) and leaves the turns

        def should_stop() -> bool:
            return lease.state != LeaseState.ACTIVE or self.stop_requested.is_set()

        def on_step(step: int, total: int, loss: float) -> bool:
            if not lease.on_step(step, total, loss) or step == total:
                return lease.state == LeaseState.ACTIVE and not self.stop_requested.is_set()
            return self.turns.yield_turn(job.job_id, should_stop)  # other tenants' jobs may go first

        self.turns.join(job.job_id, job.tenant)
        try:
            try:
                if not self.turns.acquire(job.job_id, should_stop):
                    return self._give_up_unstarted(job, lease)
                spec = JobSpec.from_dict(job.spec)
                plan, task_kv, task_ref, description = self._plan(job, spec)
                report = _Report(self.queue, job, plan)
                report.base_loss(self.model, task_kv)
                result = train_prefix(self.model, plan.train, plan.config, tokenizer=self.tokenizer, task_kv=task_kv,
                                      progress=on_step, held_out=plan.held_out, anchors=plan.anchors,
                                      on_eval=report.on_eval)
                report.finished(self.model, task_kv, result)
            finally:
                self.turns.leave(job.job_id)
                lease.close()
        except (JobError, ValueError, FloatingPointError) as e:
            return self._finish(job, JobStatus.FAILED, error=str(e), started=started)
        except StoreUnavailableError:
            raise
        except Exception as e:  # a bug must not kill the worker: the job says what happened
            log.exception("job %s failed", job.job_id)
            return self._finish(job, JobStatus.FAILED, error=f"internal error in the worker ({type(e).__name__}: {e})",
                                started=started)

        state = lease.state if lease.state != LeaseState.ACTIVE else self.queue.heartbeat(job, self.config.consumer)
        if state == LeaseState.LOST:
            log.warning("job %s: another worker took it over; dropping this attempt", job.job_id)
            return None
        if state == LeaseState.CANCEL_REQUESTED:
            return self._finish(job, JobStatus.CANCELLED, started=started)
        if result.cancelled:  # stopped by SIGTERM: another worker runs it again
            self.queue.release(job)
            log.info("job %s: given back to the queue", job.job_id)
            return None
        description += f"; {report.summary()}"
        try:
            # the tenant's incarnation when the job was queued: a deleted (or deleted and
            # re-created) tenant gets nothing written into it
            record, _ = self.store.put(job.tenant, user_prefix_id(job.user_id), result.kv,
                                       model_fingerprint=spec.model_fingerprint,
                                       description=description, incarnation=spec.tenant_incarnation,
                                       trained_after=(task_ref,) if task_ref is not None else ())
        except TenantDeletedError as e:
            return self._finish(job, JobStatus.FAILED, error=str(e), started=started)
        return self._finish(job, JobStatus.SUCCEEDED, prefix_id=record.prefix_id, version=record.version,
                            started=started)

    def _give_up_unstarted(self, job: Job, lease: "_Lease") -> JobStatus | None:
        """The job never got its turn: stopping (give it back), cancelled or taken over."""
        if lease.state == LeaseState.CANCEL_REQUESTED:
            return self._finish(job, JobStatus.CANCELLED, started=time.monotonic())
        if lease.state == LeaseState.ACTIVE:
            self.queue.release(job)
            log.info("job %s: given back to the queue before it started", job.job_id)
        return None

    def _finish(self, job: Job, status: JobStatus, started: float, **kw: Any) -> JobStatus | None:
        if not self.queue.finish(job, status, **kw):
            log.warning("job %s: lease lost before it could be marked %s", job.job_id, status.value)
            return None
        log.info("job %s: %s%s", job.job_id, status.value, f" ({kw['error']})" if kw.get("error") else "")
        if self.on_finished is not None:
            self.on_finished(status, time.monotonic() - started)
        return status

    def _plan(self, job: Job, spec: JobSpec) -> tuple[Plan, torch.Tensor | None, PrefixRef | None, str]:
        """(the training plan, task kv or None, the task prefix's ref or None, description) for a job."""
        if spec.model_fingerprint not in self.fingerprints:
            raise JobError(f"the server that queued this job serves base model {spec.model_fingerprint}, but this "
                           "worker loaded another one; start the worker with the server's --model")
        task_kv, task_ref, base_name = None, None, None
        if spec.base_prefix is not None:
            task_kv, task_ref = self._task_prefix(spec.base_prefix, spec.model_fingerprint)
            base_name = f"{spec.base_prefix.name}@{task_ref.version}"
        plan = plan_job(self.tokenizer, list(spec.examples), max_length=self.spec.max_model_len, steps=spec.steps,
                        max_steps=spec.max_steps or 10**9, num_virtual_tokens=spec.num_virtual_tokens,
                        learning_rate=spec.learning_rate, batch_size=self.config.batch_size,
                        mid_dim=self.config.mid_dim, init_text=spec.init_text, seed=spec.seed,
                        kl_weight=spec.kl_weight, held_out_fraction=spec.held_out_fraction)
        description = (f"personalized for user {job.user_id} by job {job.job_id}: {len(spec.examples)} examples"
                       + (f", after task prefix {base_name}" if base_name else ", trained alone (no task prefix)"))
        return plan, task_kv, task_ref, description

    def _task_prefix(self, base: BasePrefix, fingerprint: str) -> tuple[torch.Tensor, PrefixRef]:
        found = self.store.get(base.tenant, base.prefix_id)
        if found is None:
            raise JobError(f"base prefix {base.name!r} was deleted before the job ran")
        record, kv = found
        if record.model_fingerprint != fingerprint:
            raise JobError(f"base prefix {base.name!r} was made for base model {record.model_fingerprint}, "
                           f"not {fingerprint}")
        if tuple(kv.shape) != self.spec.kv_shape(record.num_virtual_tokens):
            raise JobError(f"base prefix {base.name!r} has shape {tuple(kv.shape)}; this model needs "
                           f"{self.spec.kv_shape(record.num_virtual_tokens)}")
        return kv.float(), record.ref


class _Report:
    """What a job measured, written into the job as it trains (GET /v1/jobs/<id>: `metrics`).

        examples, held_out_examples, train_sequences   the split (a pair trains as text and chat)
        max_steps, steps, best_step, stopped_early     the schedule, and where held-out loss was lowest
        base_loss       the frozen model's (after the task prefix) loss on the evaluation examples
        loss            the user prefix's loss on the same examples (the kv published)
        evaluated_on    "held_out" (early stopping ran), or "training" when too few examples
                        to hold any out
        train_loss      the last step's training loss; kl: its KL to the base model
    """

    MAX_TRAINING_EVAL = 64  # sequences the training-set losses are measured on, without a held-out set

    def __init__(self, queue: JobQueue, job: Job, plan: Plan) -> None:
        self.queue, self.job, self.plan = queue, job, plan
        self.eval_set = plan.held_out or plan.train[:self.MAX_TRAINING_EVAL]
        self.metrics: dict[str, Any] = {
            "examples": len({e.source for e in plan.train + plan.held_out}),
            "held_out_examples": plan.num_held_out_examples, "train_sequences": len(plan.train),
            "max_steps": plan.config.steps, "evaluated_on": "held_out" if plan.held_out else "training",
            "kl_weight": plan.config.kl_weight,
        }

    def base_loss(self, model: torch.nn.Module, task_kv: torch.Tensor | None) -> None:
        self.metrics["base_loss"] = round(evaluate_loss(model, task_kv, self.eval_set), 4)
        self._write()

    def on_eval(self, step: int, held_out_loss: float) -> None:
        best = self.metrics.get("loss")
        if best is None or held_out_loss < best:
            self.metrics.update(loss=round(held_out_loss, 4), best_step=step)
        self.metrics["steps"] = step
        self._write()

    def finished(self, model: torch.nn.Module, task_kv: torch.Tensor | None, result: TrainResult) -> None:
        if result.held_out:
            self.metrics.update(loss=round(result.best_held_out_loss, 4), best_step=result.best_step)
        else:
            kv = result.kv if task_kv is None else torch.cat([task_kv, result.kv.to(task_kv.device)], dim=3)
            self.metrics["loss"] = round(evaluate_loss(model, kv, self.eval_set), 4)
        self.metrics.update(steps=result.steps_done, stopped_early=result.stopped_early,
                            train_loss=round(result.losses[-1], 4), seconds=round(result.seconds, 1))
        if result.kl:
            self.metrics["kl"] = round(result.kl[-1], 4)
        self._write()

    def summary(self) -> str:
        m = self.metrics
        return (f"{m['steps']} of at most {m['max_steps']} steps; {m['evaluated_on'].replace('_', '-')} loss "
                f"{m['loss']:.4f} (base model {m['base_loss']:.4f})")

    def _write(self) -> None:
        self.queue.report(self.job, self.metrics)


class _Lease:
    """Keeps a running job's lease: heartbeats on a thread, progress from the trainer's callback."""

    def __init__(self, queue: JobQueue, job: Job, config: WorkerConfig, stop: threading.Event):
        self.queue, self.job, self.config, self.stop = queue, job, config, stop
        self.state = LeaseState.ACTIVE
        self._last_report = 0.0
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._keep, name=f"lease-{job.job_id}", daemon=True)
        self._thread.start()

    def on_step(self, step: int, total: int, loss: float) -> bool:
        """The trainer's progress callback: report (throttled; the last step always), go on?"""
        now = time.monotonic()
        if step == total or now - self._last_report >= self.config.progress_every_s:
            self._last_report = now
            self._beat(step=step, total=total, loss=loss)
        return self.state == LeaseState.ACTIVE and not self.stop.is_set()

    def close(self) -> None:
        self._closed.set()
        self._thread.join()

    def _keep(self) -> None:
        while not self._closed.wait(self.config.heartbeat_s):
            self._beat()

    def _beat(self, **progress: Any) -> None:
        try:
            state = self.queue.heartbeat(self.job, self.config.consumer, **progress)
        except StoreUnavailableError as e:
            # Train on: if Redis stays away past the claim timeout another worker takes over
            # and this attempt finds its lease lost when it reports again.
            log.warning("job %s: heartbeat failed: %s", self.job.job_id, e)
            return
        if state == LeaseState.LOST or self.state == LeaseState.ACTIVE:
            self.state = state  # LOST wins over a cancel request
