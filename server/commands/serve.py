"""`prefix-serve serve`: the HTTP server on the embedded default, or on what the flags say.

With no --redis-url it starts and owns a local redis-server (loopback only, append-only
file fsynced before every reply, data under <cache_dir>/redis), starts it again if it
dies, and stops it on exit; a Redis given by --redis-url that persists less is warned about. On a loopback address with no
admin key it uses the one saved in <cache_dir>/admin_key (making one the first time), so
`prefix-serve upload` on the same machine finds it. SIGINT/SIGTERM drain running requests.
With its own Redis (or --workers N) it also runs personalization training workers as child
processes (`prefix-serve worker`), restarted if they die, stopped with the server.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import signal
import sys
from pathlib import Path

from pydantic import SecretStr, ValidationError

from server.config import Settings, add_settings_arguments, first_error, settings_from_args

log = logging.getLogger("prefix_serve")
ADMIN_KEY_FILE = "admin_key"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_settings_arguments(parser)


def run(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
        settings.check_serving()
    except ValidationError as e:
        print(f"prefix-serve serve: {first_error(e)}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"prefix-serve serve: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    generated = settings.admin_key is None
    if generated:
        settings = settings.model_copy(update={"admin_key": SecretStr(local_admin_key(settings.cache_dir))})

    redis_server = None
    supervisor = None
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the signal to the
    # handler that was there before it: ours, which unwinds through the `finally` below so
    # the owned redis-server is stopped too (the default handler would just kill us).
    previous = {sig: signal.signal(sig, _raise_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        redis_url = settings.redis_url
        if redis_url is None:
            from prefix_store import RedisServer

            redis_server = RedisServer(port=None, datadir=settings.cache_dir / "redis", appendonly=True)
            redis_server.start().keep_running()  # started again if it dies
            redis_url = redis_server.url
            print(f"prefix-serve: started redis-server at {redis_url} (data in {redis_server.datadir})", flush=True)
        supervisor = _start_workers(settings, redis_url, owns_redis=redis_server is not None)
        return _serve(settings, redis_url, generated)
    except _Stop:
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if supervisor is not None:
            supervisor.stop()  # before Redis: a stopping worker gives its job back to the queue
        if redis_server is not None:
            redis_server.stop()


def _start_workers(settings: Settings, redis_url: str, owns_redis: bool):
    """Training worker processes (personalization jobs) beside the server; None for none."""
    count = settings.workers if settings.workers is not None else (1 if owns_redis else 0)
    if count == 0:
        return None
    if settings.model:
        from server.engine.model_loader import model_kind
        from server.prefix import ModelKind

        kind = model_kind(settings.model)
        if kind is not ModelKind.CAUSAL_LM:  # personalization trains causal-LM prefixes only
            print(f"prefix-serve: a {kind.value} model: no personalization workers", flush=True)
            return None
    from server.training.supervisor import WorkerSupervisor

    args = ["--device", settings.device, "--cache-dir", str(settings.cache_dir), "--namespace", settings.namespace,
            "--job-claim-timeout-s", str(settings.job_claim_timeout_s),
            "--job-max-attempts", str(settings.job_max_attempts),
            "--worker-max-jobs", str(settings.worker_max_jobs),
            "--redis-wait-replicas", str(settings.wait_replicas_for(redis_url)),
            "--redis-wait-timeout-ms", str(settings.redis_wait_timeout_ms),
            "--worker-nice", "10",  # serving latency first
            "--log-level", "error" if settings.log_level == "critical" else settings.log_level]
    if settings.model:
        args += ["--model", settings.model]
    # The workers read the same PREFIX_SERVE_* settings, but not the metrics port: that one is
    # the server's. The url goes by environment, not argv: it may hold a password, and argv
    # is world-readable.
    env = {k: v for k, v in os.environ.items() if k != "PREFIX_SERVE_METRICS_PORT"}
    return WorkerSupervisor(args, count, env={**env, "PREFIX_SERVE_REDIS_URL": redis_url}).start()


class _Stop(Exception):
    """A signal asked us to stop (after uvicorn drained, or while starting up)."""


def _raise_stop(signum: int, _frame) -> None:
    raise _Stop(signal.Signals(signum).name)


def _serve(settings: Settings, redis_url: str, generated_key: bool) -> int:
    import torch
    import uvicorn

    from prefix_store import PrefixStore, StoreUnavailableError
    from server.api.app import create_app
    from server.commands.draining_server import DrainingServer
    from server.engine.async_engine import AsyncEngine
    from server.engine.engine_process import EngineProcessConfig
    from server.engine.model_loader import load_tokenizer, model_folder

    try:
        store = PrefixStore(redis_url, namespace=settings.namespace,
                            wait_replicas=settings.wait_replicas_for(redis_url),
                            wait_timeout_ms=settings.redis_wait_timeout_ms)
    except StoreUnavailableError as e:  # a cluster is asked for its nodes at once
        print(f"prefix-serve: {e}", file=sys.stderr)
        return 1
    if not store.ping():
        print(f"prefix-serve: warning: Redis at {redis_url} does not answer yet; starting anyway", file=sys.stderr)
    elif (durability := store.durability()) is not None:
        print(f"prefix-serve: warning: Redis {durability}: an acknowledged upload, tenant or job may be lost "
              "in a crash (set appendonly yes and appendfsync always)", file=sys.stderr)
    # The model itself loads in the engine process (the step loop's own interpreter and
    # main thread); this process tokenizes, resolves prefixes and speaks HTTP.
    folder, name = model_folder(settings.model, settings.cache_dir)
    process = EngineProcessConfig(model=str(folder), dtype=settings.dtype, device=settings.device,
                                  cache_dir=str(settings.cache_dir), engine=settings.engine_config(),
                                  host_prefix_bytes=settings.host_cache_bytes,
                                  arena_bytes=settings.prefix_arena_bytes,
                                  log_level="error" if settings.log_level == "critical" else settings.log_level)
    async_engine = AsyncEngine(process=process, tokenizer=load_tokenizer(folder), max_waiting=settings.max_queue)
    # This process's tensor work is small (a loaded prefix's check, compositions, uploads) and
    # runs beside the engine process on the same cores: torch's default of a thread per core
    # made each op an OpenMP team that spun against the step loop (a 360 KiB prefix's check
    # took 15-37 ms on 2 threads beside other work on the 2 cores, 0.5 ms on one;
    # bench/prefix_load_profile.py).
    # The engine process is a fresh interpreter and keeps its own count.
    torch.set_num_threads(1)
    app = create_app(settings, async_engine, store, model_name=name)

    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    print(f"prefix-serve: model {name} ({async_engine.spec.kind.value}, {settings.dtype}, {settings.device}), "
          "an engine process of its own",
          flush=True)
    print(f"prefix-serve: serving on http://{host}:{settings.port}", flush=True)
    if generated_key:
        print(f"prefix-serve: admin key: {settings.admin_key.get_secret_value()} "
              f"(saved in {settings.cache_dir / ADMIN_KEY_FILE})", flush=True)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            timeout_keep_alive=settings.keep_alive_s,
                            timeout_graceful_shutdown=int(settings.drain_timeout_s) or None)
    try:
        DrainingServer(config, app.state.ctx.drain, settings.drain_timeout_s).run()
    finally:
        store.close()
    return 0


def local_admin_key(cache_dir: Path) -> str:
    """The admin key kept in <cache_dir>/admin_key (mode 0600), created on first use."""
    path = cache_dir / ADMIN_KEY_FILE
    if path.exists():
        key = path.read_text().strip()
        if len(key) >= 16:
            return key
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = "psa-" + secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key
