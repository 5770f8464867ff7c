"""`prefix-serve worker`: run personalization jobs from the Redis queue, several tenants' jobs
taking turns one training step at a time (server/training/turns.py).

    prefix-serve worker --redis-url redis://127.0.0.1:6379/0 [--model DIR]   (every flag: --help)

Start as many as you like (on any machine that reaches the Redis): they form one consumer
group, each job runs on one of them, and a job whose worker died is taken over by another
after --claim-timeout seconds. Give it the server's --model: a job queued by a server with
other weights fails with a message saying so. SIGTERM/SIGINT stop it after the current
training step; every unfinished job it holds goes back to the queue for another worker.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys

from pydantic import ValidationError

from server.config import WORKER_FIELDS, Settings, add_settings_arguments, first_error, settings_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_settings_arguments(parser, WORKER_FIELDS)


def run(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
    except ValidationError as e:
        print(f"prefix-serve worker: {first_error(e)}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not settings.redis_url:
        print("prefix-serve worker: give --redis-url (the server's Redis) or set PREFIX_SERVE_REDIS_URL",
              file=sys.stderr)
        return 2
    stop = _StopFlag()
    previous = {sig: signal.signal(sig, stop.set) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _work(settings, stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class _StopFlag:
    """Set by a signal; the worker polls it between steps. A second signal exits at once."""

    def __init__(self) -> None:
        self.worker = None
        self.count = 0

    def set(self, signum: int, _frame) -> None:
        self.count += 1
        if self.count > 1:
            raise SystemExit(128 + signum)
        if self.worker is not None:
            self.worker.stop_requested.set()


def _work(settings: Settings, stop: _StopFlag) -> int:
    import torch

    from prefix_store import PrefixStore
    from prefix_store.connection import redacted
    from prefix_store.job_queue import JobQueue
    from server.engine.model_loader import load_model, resolve_device, resolve_dtype
    from server.training.worker import Worker, WorkerConfig

    if settings.worker_nice:
        os.nice(settings.worker_nice)
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    consumer = settings.worker_name or f"{socket.gethostname()}-{os.getpid()}"
    # float32 first: the fingerprints of every dtype a server may serve in come from the
    # weights as stored; the worker then casts its copy to the training dtype.
    loaded = load_model(settings.model, dtype="float32", device=settings.device, cache_dir=settings.cache_dir)
    train_dtype = resolve_dtype(settings.train_dtype, resolve_device(settings.device))
    if stop.count:  # a signal arrived while the model loaded
        return 0
    durability = {"wait_replicas": settings.wait_replicas_for(settings.redis_url),
                  "wait_timeout_ms": settings.redis_wait_timeout_ms}
    queue = JobQueue(settings.redis_url, settings.namespace, claim_timeout_s=settings.job_claim_timeout_s,
                     max_attempts=settings.job_max_attempts, **durability)
    store = PrefixStore(settings.redis_url, namespace=settings.namespace, **durability)
    config = WorkerConfig(consumer=consumer, mid_dim=settings.train_mid_dim, batch_size=settings.train_batch_size,
                          heartbeat_s=min(5.0, settings.job_claim_timeout_s / 4), max_jobs=settings.worker_max_jobs,
                          train_dtype=train_dtype)
    worker = Worker(loaded.model, loaded.tokenizer, queue, store, config)
    if settings.metrics_port:
        from server.metrics import Metrics

        metrics = Metrics()
        metrics.serve_http(settings.metrics_port, settings.metrics_host)
        worker.on_finished = metrics.record_job
    stop.worker = worker
    print(f"prefix-serve worker {consumer}: model {loaded.name} (training in {str(train_dtype).removeprefix('torch.')}), queue at "
          f"{redacted(settings.redis_url)}", flush=True)
    try:
        worker.run()
    finally:
        queue.close()
        store.close()
    return 0
