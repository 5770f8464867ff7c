"""`prefix-serve worker`: run personalization jobs from the Redis queue, one at a time.

    prefix-serve worker --redis-url redis://127.0.0.1:6379/0 [--model DIR]

Start as many as you like (on any machine that reaches the Redis): they form one consumer
group, each job runs on one of them, and a job whose worker died is taken over by another
after --claim-timeout seconds. Give it the server's --model: a job queued by a server with
other weights fails with a message saying so. SIGTERM/SIGINT stop it after the current
training step; an unfinished job goes back to the queue for another worker.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    parser.add_argument("--model", default=env("PREFIX_SERVE_MODEL"),
                        help="local HF model folder, the server's (default: the embedded SmolLM2; env PREFIX_SERVE_MODEL)")
    parser.add_argument("--redis-url", default=env("PREFIX_SERVE_REDIS_URL"),
                        help="the server's Redis (env PREFIX_SERVE_REDIS_URL)")
    parser.add_argument("--namespace", default="ps", help="key namespace of the store (the server's)")
    parser.add_argument("--dtype", default="float32", help="training dtype: float32 (default), bfloat16, float16, auto")
    parser.add_argument("--device", default=env("PREFIX_SERVE_DEVICE", "auto"))
    parser.add_argument("--consumer", default=None, help="this worker's name in the group (default: host-pid)")
    parser.add_argument("--claim-timeout", type=float, default=float(env("PREFIX_SERVE_JOB_CLAIM_TIMEOUT_S", "60")),
                        help="take over a job whose worker has been silent this many seconds")
    parser.add_argument("--max-attempts", type=int, default=int(env("PREFIX_SERVE_JOB_MAX_ATTEMPTS", "3")),
                        help="mark a job failed after its worker died this many times")
    parser.add_argument("--mid-dim", type=int, default=512, help="hidden width of the MLP reparameterization")
    parser.add_argument("--batch-size", type=int, default=8, help="examples per training step")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--nice", type=int, default=0, help="lower this process's CPU priority (serve uses 10)")
    parser.add_argument("--cache-dir", default=None, help="where the embedded model is converted (env PREFIX_SERVE_CACHE_DIR)")
    parser.add_argument("--metrics-port", type=int, default=int(env("PREFIX_SERVE_METRICS_PORT", "0")),
                        help="serve Prometheus metrics of finished jobs on this port (0: off)")
    parser.add_argument("--metrics-addr", default=env("PREFIX_SERVE_METRICS_HOST", "127.0.0.1"),
                        help="address for --metrics-port (compose sets 0.0.0.0)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.redis_url:
        print("prefix-serve worker: give --redis-url (the server's Redis) or set PREFIX_SERVE_REDIS_URL",
              file=sys.stderr)
        return 2
    if args.claim_timeout <= 0 or args.max_attempts < 1:
        print(f"prefix-serve worker: --claim-timeout ({args.claim_timeout}) must be > 0 and --max-attempts "
              f"({args.max_attempts}) >= 1", file=sys.stderr)
        return 2
    stop = _StopFlag()
    previous = {sig: signal.signal(sig, stop.set) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _work(args, stop)
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


def _work(args: argparse.Namespace, stop: _StopFlag) -> int:
    from pathlib import Path

    import torch

    from prefix_store import PrefixStore
    from prefix_store.connection import redacted
    from prefix_store.jobs import JobQueue
    from server.engine.model_loader import load_model
    from server.training.worker import Worker, WorkerConfig

    if args.nice:
        os.nice(args.nice)
    if args.threads:
        torch.set_num_threads(args.threads)
    consumer = args.consumer or f"{socket.gethostname()}-{os.getpid()}"
    loaded = load_model(args.model, dtype=args.dtype, device=args.device,
                        cache_dir=Path(args.cache_dir) if args.cache_dir else None)
    if stop.count:  # a signal arrived while the model loaded
        return 0
    queue = JobQueue(args.redis_url, args.namespace, claim_timeout_s=args.claim_timeout,
                     max_attempts=args.max_attempts)
    store = PrefixStore(args.redis_url, namespace=args.namespace)
    config = WorkerConfig(consumer=consumer, mid_dim=args.mid_dim, batch_size=args.batch_size,
                          heartbeat_s=min(5.0, args.claim_timeout / 4))
    worker = Worker(loaded.model, loaded.tokenizer, queue, store, config)
    if args.metrics_port:
        from server.metrics import Metrics

        metrics = Metrics()
        metrics.serve_http(args.metrics_port, args.metrics_addr)
        worker.on_finished = metrics.record_job
    stop.worker = worker
    print(f"prefix-serve worker {consumer}: model {loaded.name} ({args.dtype}), queue at {redacted(args.redis_url)}",
          flush=True)
    try:
        worker.run()
    finally:
        queue.close()
        store.close()
    return 0
