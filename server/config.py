"""Every setting, read in one place: `PREFIX_SERVE_*` environment variables and the flags of
the commands (one flag per field, `--kv-cache-bytes` for `kv_cache_bytes`; a flag overrides
the environment). `serve` takes every server field as a flag; `worker` and the client
commands (`upload`, `prefixes`) take the fields they use (WORKER_FIELDS, CLIENT_FIELDS),
under their older flag names too.

Each component receives only its part: `engine_config()` for the engine, the rest is read
by the api and the commands. Standard library and pydantic only: the client commands
import this without torch.
"""

from __future__ import annotations

import argparse
import ipaddress
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from server.cache_dir import default_cache_dir

MiB = 1 << 20
GiB = 1 << 30


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost: treat as reachable from outside
        return False


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PREFIX_SERVE_", extra="ignore")

    # --- network and auth
    host: str = Field("127.0.0.1", description="address to bind")
    port: int = Field(8000, ge=0, le=65535, description="port to bind (0 = any free port)")
    admin_key: SecretStr | None = Field(
        None, description="the admin API key; on loopback one is generated when unset")
    redis_url: str | None = Field(
        None, description="redis://host:port/db of the prefix store, or redis+cluster://host:port[,host:port...] "
                          "for a Redis Cluster; unset = start and own a local redis-server with its data under "
                          "the cache dir")
    redis_wait_replicas: int | None = Field(
        None, ge=0, le=16, description="an upload, deletion, key change or job submission is acknowledged only once "
                                       "this many replicas of its Redis master hold it (WAIT); unset = 1 on a "
                                       "redis+cluster:// url, else 0")
    redis_wait_timeout_ms: int = Field(
        1000, ge=1, le=1500, description="how long a write waits for those replicas before it is refused (503)")
    cache_dir: Path = Field(default_factory=default_cache_dir,
                            description="converted models, the owned redis data, the generated admin key")

    # --- model and engine
    model: str | None = Field(None, description="a local HF causal-LM folder; unset = embedded SmolLM2")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="compute dtype")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:1, ...")
    kv_cache_bytes: int = Field(512 * MiB, gt=0, description="memory of the paged KV pool")
    block_size: int = Field(16, gt=0, description="tokens per KV block")
    max_num_seqs: int = Field(128, gt=0, description="requests running at once")
    kv_reserve_fraction: float = Field(
        1 / 16, ge=0, lt=1, description="the KV pool's last blocks, this fraction of it, go only to a tenant running "
                                        "fewer requests than its share if one more tenant arrived: one tenant's "
                                        "flood stops short of them and a newcomer starts at once")
    max_num_batched_tokens: int = Field(1024, gt=0, description="tokens in one forward pass")
    max_model_len: int | None = Field(None, gt=0, description="context length; unset = the model's")
    prefill_attention_budget: int = Field(
        1 << 20, gt=0, description="query x key pairs of prefill attention in one step: a long prompt's chunks shrink "
                                   "as its context grows, so that every step stays short")
    guide_compile_timeout_s: float = Field(
        20.0, gt=0, description="structured output: a response_format whose pattern takes longer to compile is a 400")

    # --- admission and limits
    max_queue: int = Field(256, ge=0, description="requests waiting for a slot before new ones get 429")
    retry_after_s: int = Field(1, ge=0, description="Retry-After sent with 429")
    max_choices: int = Field(64, ge=1, description="sequences one request may ask for: prompts x max(n, best_of)")
    request_timeout_s: float = Field(600.0, gt=0, description="a generation running longer is aborted (504)")
    max_output_tokens: int | None = Field(
        None, gt=0, description="the most tokens one request may generate (a larger max_tokens is a 400, and a chat "
                                "request without max_tokens gets at most this many); unset = up to the context")
    max_body_bytes: int = Field(4 * MiB, gt=0, description="largest JSON request body")
    max_upload_bytes: int = Field(256 * MiB, gt=0, description="largest prefix upload body")
    max_prefix_bytes: int = Field(128 * MiB, gt=0, description="largest prefix tensor (and zip member)")
    host_cache_bytes: int = Field(2 * GiB, ge=0, description="host-memory LRU of loaded prefixes")
    prefix_arena_bytes: int = Field(
        64 * MiB, ge=0, description="shared memory that carries loaded prefixes to the engine process (a prefix "
                                    "that finds no room goes through the pipe); 0 = always the pipe")
    prefix_load_concurrency: int = Field(
        4, ge=1, description="prefixes loaded from Redis at once; more cold loads wait their turn, so that a storm "
                             "of them does not stall requests on resident prefixes")

    # --- per-tenant limits: the defaults; the admin overrides them per tenant (PUT /v1/admin/tenants/{id}/limits)
    tenant_max_concurrent_requests: int = Field(
        256, ge=1, description="a tenant's requests queued or running at once, on all replicas together (429 above)")
    tenant_tokens_per_minute: int = Field(
        0, ge=0, description="a tenant's token rate (prompt + max_tokens of admitted requests; 429 with Retry-After "
                             "above); 0 = no rate limit")
    tenant_burst_tokens: int = Field(
        0, ge=0, description="most tokens a tenant may use at once after an idle spell; 0 = a minute's worth")
    tenant_max_storage_bytes: int = Field(1 * GiB, ge=0, description="bytes of prefixes a tenant may store")
    tenant_max_prefixes: int = Field(10_000, ge=0, description="prefixes a tenant may store (user prefixes included)")

    # --- tenancy
    admin_tenant: str = Field("admin", description="the tenant that the admin key acts as")
    shared_prefixes: bool = Field(
        True, description="tenants may use the admin tenant's prefixes read-only as 'shared/<id>'")

    # --- personalization jobs (routes_personalize, `prefix-serve worker`)
    workers: int | None = Field(
        None, ge=0, le=16, description="training worker processes that serve starts and restarts; unset = 1 when "
                                       "serve owns its Redis, else 0 (run `prefix-serve worker` yourself)")
    max_jobs_per_tenant: int = Field(2, ge=1, description="personalization jobs queued or running per tenant (429 above)")
    max_train_examples: int = Field(1000, ge=1, description="examples in one personalization job")
    max_train_example_tokens: int = Field(512, ge=2, description="tokens in one example (prompt + completion + EOS)")
    max_train_steps: int = Field(2000, ge=1, description="optimizer steps of one personalization job")
    max_train_virtual_tokens: int = Field(128, ge=1, description="length of a personalized prefix")
    job_claim_timeout_s: float = Field(
        60.0, gt=0, description="a job whose worker was silent this long is taken over by another worker")
    job_max_attempts: int = Field(3, ge=1, description="a job whose worker died this many times is marked failed")

    # --- operations endpoints
    metrics_key: SecretStr | None = Field(
        None, description="a key that /metrics requires as 'Authorization: Bearer <key>' (the admin key works too); "
                          "unset: /metrics is open on a loopback host and needs the admin key on any other")
    metrics_port: int | None = Field(
        None, ge=0, le=65535, description="serve /metrics on this port of metrics_host instead of the API port "
                                          "(no key asked there: keep the port private)")
    metrics_host: str = Field("127.0.0.1", description="address of the metrics_port listener")
    docs: bool = Field(True, description="serve the OpenAPI document and the /docs and /redoc pages")

    namespace: str = Field("ps", pattern=r"^[A-Za-z0-9_.-]{1,32}$",
                           description="prefix of every Redis key: servers and workers on one Redis must agree")

    # --- the training worker (`prefix-serve worker`)
    train_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="the frozen model's dtype in the worker while it trains (auto: bfloat16 where the "
                            "hardware computes it natively, ~2x faster; the prefix itself trains in float32)")
    train_mid_dim: int = Field(512, ge=1, description="hidden width of the MLP reparameterization")
    train_batch_size: int = Field(8, ge=1, description="examples per training step")
    worker_name: str | None = Field(None, description="this worker's name in the consumer group (default host-pid)")
    worker_max_jobs: int = Field(
        4, ge=1, le=64, description="jobs one worker holds at once; they take turns one training step at a time, "
                                    "the tenant with the least worker time first (each keeps its optimizer state "
                                    "in memory)")
    worker_nice: int = Field(0, ge=0, le=19, description="lower the worker's CPU priority (serve starts its own at 10)")
    torch_threads: int | None = Field(None, ge=1, description="torch CPU threads of the worker (default torch's)")

    # --- lifecycle
    drain_timeout_s: float = Field(30.0, ge=0, description="graceful shutdown waits this long for running requests")
    keep_alive_s: float = Field(
        75.0, gt=0, description="an idle client connection stays open this long: longer than client pools keep one "
                                "(httpx and the openai client: 5 s) and than load balancers' idle timeouts (60 s), "
                                "so a client never sends on a connection the server is closing")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field("info", description="uvicorn log level")

    # --- the client commands (`prefix-serve upload`, `prefix-serve prefixes`)
    url: str = Field("http://127.0.0.1:8000", description="the server the client commands talk to")
    api_key: SecretStr | None = Field(
        None, description="the key the client commands send; unset: the admin key, else the one a local serve saved")
    client_timeout_s: float = Field(300.0, gt=0, description="how long the client commands wait for the server")

    @model_validator(mode="after")
    def _check(self) -> "Settings":
        if self.admin_key is not None and len(self.admin_key.get_secret_value()) < 16:
            raise ValueError("the admin key must be at least 16 characters long")
        if self.max_upload_bytes < self.max_prefix_bytes:
            raise ValueError(f"max_upload_bytes ({self.max_upload_bytes}) must be at least max_prefix_bytes "
                             f"({self.max_prefix_bytes}), or the largest prefix could not be uploaded")
        return self

    def check_serving(self) -> None:
        """What `serve` needs beyond valid values: an open port without an admin key would let
        anyone create tenants. Raises ValueError saying what to set."""
        if self.admin_key is None and not is_loopback(self.host):
            raise ValueError(
                f"host {self.host} is not a loopback address, so an admin key is required: "
                "set PREFIX_SERVE_ADMIN_KEY or pass --admin-key")

    def wait_replicas_for(self, redis_url: str) -> int:
        """redis_wait_replicas, or its default for `redis_url` (1 for a cluster, else 0)."""
        if self.redis_wait_replicas is not None:
            return self.redis_wait_replicas
        return 1 if redis_url.split("://", 1)[0].endswith("+cluster") else 0

    @property
    def metrics_need_key(self) -> bool:
        """/metrics lists every tenant's traffic: it asks for a key unless it is on loopback."""
        return self.metrics_key is not None or not is_loopback(self.host)

    def engine_config(self):
        from server.engine.config import EngineConfig

        return EngineConfig(block_size=self.block_size, kv_cache_bytes=self.kv_cache_bytes,
                            max_num_seqs=self.max_num_seqs, kv_reserve_fraction=self.kv_reserve_fraction,
                            max_num_batched_tokens=self.max_num_batched_tokens,
                            prefill_attention_budget=self.prefill_attention_budget,
                            max_model_len=self.max_model_len, guide_compile_timeout_s=self.guide_compile_timeout_s)

    def tenant_limits(self):
        """The default TenantLimits (a tenant's overrides replace some of them)."""
        from prefix_store.tenant_limits import TenantLimits

        return TenantLimits(max_concurrent_requests=self.tenant_max_concurrent_requests,
                            tokens_per_minute=self.tenant_tokens_per_minute, burst_tokens=self.tenant_burst_tokens,
                            max_storage_bytes=self.tenant_max_storage_bytes, max_prefixes=self.tenant_max_prefixes)


# --- CLI: one flag per field, generated so the two can never drift apart

WORKER_FIELDS = {  # field -> the worker's older flag name, kept working
    "model": None, "redis_url": None, "redis_wait_replicas": None, "redis_wait_timeout_ms": None,
    "namespace": None, "train_dtype": "--dtype", "device": None,
    "worker_name": "--consumer", "worker_max_jobs": None, "job_claim_timeout_s": "--claim-timeout",
    "job_max_attempts": "--max-attempts",
    "train_mid_dim": "--mid-dim", "train_batch_size": "--batch-size", "torch_threads": "--threads",
    "worker_nice": "--nice", "cache_dir": None, "metrics_port": None, "metrics_host": "--metrics-addr",
    "log_level": None,
}
CLIENT_FIELDS = {"url": None, "api_key": "--key", "client_timeout_s": "--timeout"}
SERVER_FIELDS = {name: None for name in ("host", "port", "admin_key", "redis_url", "redis_wait_replicas",
                                         "redis_wait_timeout_ms", "cache_dir", "model", "dtype",
                                         "device", "kv_cache_bytes", "block_size", "max_num_seqs", "kv_reserve_fraction",
                                         "max_num_batched_tokens", "prefill_attention_budget", "max_model_len",
                                         "guide_compile_timeout_s",
                                         "max_queue", "retry_after_s", "max_choices", "request_timeout_s",
                                         "max_output_tokens", "max_body_bytes", "max_upload_bytes", "max_prefix_bytes",
                                         "host_cache_bytes", "prefix_arena_bytes", "prefix_load_concurrency",
                                         "tenant_max_concurrent_requests",
                                         "tenant_tokens_per_minute", "tenant_burst_tokens", "tenant_max_storage_bytes",
                                         "tenant_max_prefixes", "admin_tenant", "shared_prefixes", "workers",
                                         "max_jobs_per_tenant", "worker_max_jobs", "max_train_examples", "max_train_example_tokens",
                                         "max_train_steps", "max_train_virtual_tokens", "job_claim_timeout_s",
                                         "job_max_attempts", "namespace", "metrics_key", "metrics_port",
                                         "metrics_host", "docs", "drain_timeout_s", "keep_alive_s", "log_level")}


def add_settings_arguments(parser: argparse.ArgumentParser, fields: dict[str, str | None] | None = None) -> None:
    """A flag for each of `fields` (default: the server's), plus the older name where one is given."""
    for name, old_flag in (fields if fields is not None else SERVER_FIELDS).items():
        field = Settings.model_fields[name]
        flags = ["--" + name.replace("_", "-")] + ([old_flag] if old_flag else [])
        help_text = f"{field.description} (env PREFIX_SERVE_{name.upper()})"
        if _base_type(field.annotation) is bool:
            parser.add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction,
                                default=None, help=help_text)
        else:
            # Strings go to pydantic, which converts and checks them like env values.
            parser.add_argument(*flags, dest=name, default=None, metavar=name.upper(), help=help_text)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings from the environment, overridden by the flags that were given."""
    given: dict[str, Any] = {k: getattr(args, k) for k in Settings.model_fields
                             if getattr(args, k, None) is not None}
    return Settings(**given)


def _base_type(annotation: Any) -> Any:
    args = getattr(annotation, "__args__", None)
    if args:
        non_none = [a for a in args if a is not type(None)]
        return non_none[0] if len(non_none) == 1 else annotation
    return annotation


def first_error(e: ValidationError) -> str:
    """The first problem of a ValidationError in one line: 'port: Input should be a valid integer'."""
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err.get("loc", ()))
    msg = err.get("msg", str(e)).removeprefix("Value error, ")
    return f"{loc}: {msg}" if loc else msg

