"""The worker on a real Redis (and a real Redis Cluster): what it publishes (nothing, unless
the whole job ran), how it refuses jobs it cannot run, how its jobs take turns, and
`prefix-serve worker` stopping on SIGTERM."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import threading

import pytest
import torch

from prefix_store import PrefixStore
from prefix_store.job import JobStatus
from prefix_store.job_queue import JobQueue
from server.prefix import model_fingerprint
from server.training.turns import Turns
from server.training.worker import Worker, WorkerConfig, serving_fingerprints
from tests.personalization.conftest import ROOT, wait_for
from tests.prefix_store.helpers import unique_namespace
from tests.training.conftest import MEMORY_EXAMPLES, make_byte_tokenizer, make_tiny_llama

EXAMPLES = [{"prompt": p, "completion": c} for p, c in MEMORY_EXAMPLES]


def job_spec(fingerprint: str, steps: int = 5, base_prefix: dict | None = None) -> dict:
    return {"examples": EXAMPLES, "num_virtual_tokens": 4, "steps": steps, "learning_rate": 5e-3,
            "init_text": None, "seed": 0, "base_prefix": base_prefix, "model_fingerprint": fingerprint}


@pytest.fixture()
def parts(redis_backend):
    """A worker with its queue and store, on a single Redis and on a Redis Cluster."""
    namespace = unique_namespace()
    model = make_tiny_llama()
    queue = JobQueue(redis_backend.url, namespace)
    store = PrefixStore(redis_backend.url, namespace=namespace)
    worker = Worker(model, make_byte_tokenizer(), queue, store, WorkerConfig(consumer="w1", mid_dim=32))
    yield worker, queue, store, model_fingerprint(model)
    queue.close()
    store.close()


def test_serving_fingerprints_cover_the_same_weights_in_other_dtypes():
    model = make_tiny_llama()
    fingerprints = serving_fingerprints(model)
    assert model_fingerprint(model) in fingerprints
    assert model_fingerprint(make_tiny_llama().to(torch.bfloat16)) in fingerprints  # a bf16 server
    assert model_fingerprint(make_tiny_llama(seed=1)) not in fingerprints  # other weights


def test_a_finished_job_publishes_the_user_prefix(parts):
    from server.metrics import Metrics

    worker, queue, store, fingerprint = parts
    metrics = Metrics()
    worker.on_finished = metrics.record_job
    job_id = queue.submit("acme", "ada", job_spec(fingerprint))
    assert worker.run_job(queue.claim("w1")) == JobStatus.SUCCEEDED
    text = metrics.render()[0].decode()
    assert 'prefix_serve_training_jobs_finished_total{status="succeeded"} 1.0' in text
    record, kv = store.get("acme", "user:ada")
    assert kv.shape == (2, 2, 2, 4, 16) and record.model_fingerprint == fingerprint
    assert queue.get("acme", job_id).version == record.version


def test_a_default_job_reports_held_out_and_base_losses_and_keeps_the_best_prefix(parts):
    """No `steps`: derived from the data; one of five examples held out for early stopping;
    the job reports the published prefix's held-out loss and the base model's on the same one."""
    from server.training import recipe
    from server.training.data import Example, tokenize
    from server.training.trainer import evaluate_loss

    worker, queue, store, fingerprint = parts
    examples = EXAMPLES + [{"prompt": f"name: {n}\nsays:", "completion": f" hello {n}"} for n in ("Cy", "Di", "Ed")]
    spec = {**job_spec(fingerprint), "examples": examples, "steps": None, "max_steps": 25}
    job_id = queue.submit("acme", "ada", spec)
    assert worker.run_job(queue.claim("w1")) == JobStatus.SUCCEEDED
    m = queue.get("acme", job_id).metrics
    assert m["examples"] == 5 and m["held_out_examples"] == 1 and m["evaluated_on"] == "held_out"
    assert m["max_steps"] == 25 and 1 <= m["steps"] <= 25 and 0 <= m["best_step"] <= m["steps"]
    assert m["kl_weight"] == recipe.KL_WEIGHT
    # the numbers are those of the published prefix and of the bare model on the held-out example
    record, kv = store.get("acme", "user:ada")
    held = recipe.held_out_sources(5, recipe.HELD_OUT_FRACTION, seed=0)
    data = tokenize(make_byte_tokenizer(), [Example(**examples[i]) for i in held], 64)
    model = make_tiny_llama()
    assert m["loss"] == pytest.approx(evaluate_loss(model, kv, data), abs=2e-4)
    assert m["base_loss"] == pytest.approx(evaluate_loss(model, None, data), abs=2e-4)
    assert f"held-out loss {m['loss']:.4f} (base model {m['base_loss']:.4f})" in record.description
    assert record.trained_after == ()  # trained alone, without a task prefix


def test_a_job_for_other_weights_fails_and_publishes_nothing(parts):
    worker, queue, store, _ = parts
    job_id = queue.submit("acme", "ada", job_spec("0123456789abcdef"))
    assert worker.run_job(queue.claim("w1")) == JobStatus.FAILED
    job = queue.get("acme", job_id)
    assert "serves base model 0123456789abcdef" in job.error and "--model" in job.error
    assert store.get_record("acme", "user:ada") is None


def test_a_deleted_base_prefix_fails_the_job(parts):
    worker, queue, store, fingerprint = parts
    base = {"name": "task", "tenant": "acme", "prefix_id": "task"}
    job_id = queue.submit("acme", "ada", job_spec(fingerprint, base_prefix=base))
    assert worker.run_job(queue.claim("w1")) == JobStatus.FAILED
    assert "base prefix 'task' was deleted before the job ran" in queue.get("acme", job_id).error


def test_a_job_of_a_tenant_deleted_and_created_again_publishes_nothing(parts):
    worker, queue, store, fingerprint = parts
    store.create_tenant("acme")
    spec = {**job_spec(fingerprint), "tenant_incarnation": store.tenant_incarnation("acme")}
    job_id = queue.submit("acme", "ada", spec)
    claimed = queue.claim("w1")
    store.delete_tenant("acme")  # while the job runs
    store.create_tenant("acme")
    assert worker.run_job(claimed) == JobStatus.FAILED
    assert "tenant 'acme' was deleted" in queue.get("acme", job_id).error
    assert store.list("acme") == []


def test_a_stopping_worker_gives_the_job_back(parts):
    worker, queue, store, fingerprint = parts
    job_id = queue.submit("acme", "ada", job_spec(fingerprint, steps=100_000))
    claimed = queue.claim("w1")
    outcome = []
    thread = threading.Thread(target=lambda: outcome.append(worker.run_job(claimed)))
    thread.start()
    wait_for(lambda: queue.get("acme", job_id).step > 0, 60, "training to start")
    worker.stop_requested.set()  # what SIGTERM does
    thread.join(60)
    assert outcome == [None]
    job = queue.get("acme", job_id)
    assert (job.status, job.attempts, job.progress) == (JobStatus.QUEUED, 0, 0.0)
    assert store.get_record("acme", "user:ada") is None


def test_worker_command_stops_on_sigterm_and_requeues_its_job(redis_server, tmp_path):
    model_dir = tmp_path / "tiny-llama"
    make_tiny_llama().save_pretrained(model_dir)
    make_byte_tokenizer().save_pretrained(model_dir)
    namespace = unique_namespace()
    queue = JobQueue(redis_server.url, namespace)
    job_id = queue.submit("acme", "ada", job_spec(model_fingerprint(make_tiny_llama()), steps=100_000))
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PREFIX_SERVE_")}, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "worker", "--model", str(model_dir),
                             "--redis-url", redis_server.url, "--namespace", namespace, "--consumer", "cli-worker",
                             "--device", "cpu", "--mid-dim", "32", "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    try:
        wait_for(lambda: proc.poll() is not None or queue.get("acme", job_id).step > 0, 120, "the worker to train")
        assert proc.poll() is None, proc.stdout.read()
        assert queue.get("acme", job_id).worker == "cli-worker"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        job = queue.get("acme", job_id)
        assert (job.status, job.attempts) == (JobStatus.QUEUED, 0)  # another worker runs it from the start
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        queue.close()


def test_a_long_job_yields_to_another_tenants_short_job_and_both_go_back_on_stop(parts):
    """One worker, tenant acme's job of 100,000 steps running: globex's 3-step job, queued
    behind it, gets its turn at acme's next step boundary and finishes while acme's job
    still runs. On stop, every job the worker holds goes back to the queue."""
    worker, queue, store, fingerprint = parts
    worker.config = WorkerConfig(consumer="w1", mid_dim=32, idle_block_ms=50, busy_poll_s=0.05)
    worker.turns = Turns(clock=itertools.count().__next__)  # every turn costs 1: count, not time
    long_id = queue.submit("acme", "ada", job_spec(fingerprint, steps=100_000))
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        wait_for(lambda: queue.get("acme", long_id).step > 0, 60, "the long job to train")
        short_id = queue.submit("globex", "bo", job_spec(fingerprint, steps=3))
        wait_for(lambda: queue.get("globex", short_id).status.finished, 60, "the short job")
        assert queue.get("globex", short_id).status == JobStatus.SUCCEEDED
        long_job = queue.get("acme", long_id)
        assert long_job.status == JobStatus.RUNNING and long_job.step < 100_000
        # the turns: acme ran, globex's job came in (lifted to acme's count, and waiting
        # longer), and from then on they alternated until globex's 3 steps were done
        granted = list(worker.turns.granted)
        first_short = granted.index(short_id)
        assert granted[first_short - 1] == long_id
        assert granted[first_short:first_short + 6] == [short_id, long_id] * 3
        # another long job of a third tenant: the worker holds two jobs now
        other_id = queue.submit("initech", "cy", job_spec(fingerprint, steps=100_000))
        wait_for(lambda: queue.get("initech", other_id).step > 0, 60, "the third tenant's job to train")
    finally:
        worker.stop_requested.set()
        thread.join(60)
    assert not thread.is_alive()
    for tenant, job_id in (("acme", long_id), ("initech", other_id)):
        job = queue.get(tenant, job_id)
        assert (job.status, job.attempts) == (JobStatus.QUEUED, 0), job
    assert store.get_record("acme", "user:ada") is None and store.get_record("initech", "user:cy") is None


def test_a_job_whose_lease_lapsed_in_this_worker_is_finished_by_its_next_attempt(redis_backend):
    """Replays flake-hunt run 5's interleaving: the worker was starved past the claim timeout
    while training, so its own next claim took the job over as attempt 2 while attempt 1 still
    ran. Attempt 2 waits for attempt 1 (which finds its lease lost and stops) and finishes the
    job; before, it raised 'already joined' and the job stayed running for ever."""
    namespace = unique_namespace()
    queue = JobQueue(redis_backend.url, namespace, claim_timeout_s=0.5)
    store = PrefixStore(redis_backend.url, namespace=namespace)
    model = make_tiny_llama()
    worker = Worker(model, make_byte_tokenizer(), queue, store,
                    WorkerConfig(consumer="w1", mid_dim=32, idle_block_ms=50, busy_poll_s=0.05, heartbeat_s=0.1))
    starved = threading.Event()  # attempt 1's heartbeats hang (the starved process) until set
    real_heartbeat = queue.heartbeat

    def heartbeat(job, consumer, **progress):
        if job.attempts == 1 and not starved.wait(60):
            raise AssertionError("attempt 2 never started")
        return real_heartbeat(job, consumer, **progress)

    queue.heartbeat = heartbeat
    errors = []
    hook, threading.excepthook = threading.excepthook, lambda args: errors.append(args.exc_value)
    job_id = queue.submit("acme", "ada", job_spec(model_fingerprint(model), steps=20))
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        wait_for(lambda: queue.get("acme", job_id).attempts == 2, 60, "the worker to take its own job over")
        starved.set()  # attempt 1 reports again, finds its lease lost, and stops
        job = wait_for(lambda: (j := queue.get("acme", job_id)).status.finished and j, 60, "the job to finish")
    finally:
        starved.set()
        worker.stop_requested.set()
        thread.join(60)
        threading.excepthook = hook
    try:
        assert errors == []
        assert (job.status, job.attempts, job.step) == (JobStatus.SUCCEEDED, 2, 20)
        assert store.get_record("acme", "user:ada").version == job.version  # the finishing attempt's
    finally:
        queue.close()
        store.close()
