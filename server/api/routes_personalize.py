"""Personalization (docs/api.md): queue a job that trains `user:<user_id>`, watch it, cancel it.

    POST   /v1/users/{user_id}/personalize  -> 202 {"job_id", "status"}
    GET    /v1/jobs/{job_id}                -> status, progress, loss, metrics, prefix_id, error
    DELETE /v1/jobs/{job_id}                -> cancels (200 cancelled, 202 stop requested, 409 finished)

Examples are prompt/completion pairs or chats (`messages`); the worker trains what will be
served (server/training/data.py) with defaults that need no tuning (server/training/recipe.py:
held-out early stopping, steps from the data, a KL regulariser that keeps the base model's
knowledge). The route checks everything it can before queueing (limits, token lengths, the base
prefix), so a bad request is a 4xx with the numbers and never a failed job. Training runs
in `prefix-serve worker` processes; the serving loop never trains. Jobs are tenant-scoped:
another tenant's job id is simply not found.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from prefix_store import storage_usage
from prefix_store.job import Job, JobStatus
from server.api.auth import Caller, require_caller
from server.api.context import ServerContext, get_ctx
from server.api.errors import ApiError
from server.api.model_kind import require_kind
from server.api.prefix_resolver import PrefixNotFound
from server.prefix import InvalidIdError, ModelKind, shorten, user_prefix_id
from server.training.data import Example, tokenize
from server.training import recipe
from server.training.job_spec import BasePrefix, JobSpec

router = APIRouter(tags=["personalization"])
MAX_LEARNING_RATE = 0.1  # above this prefix-tuning diverges; the paper uses 5e-5 to 8e-5 with larger batches


class ChatTurn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str


class TrainingExample(BaseModel):
    """A prompt/completion pair, or a chat whose assistant turns are trained."""

    model_config = ConfigDict(extra="forbid")
    prompt: str | None = Field(None, min_length=1, description="what the user sends")
    completion: str | None = Field(None, min_length=1,
                                   description="what the model should answer (the trained tokens)")
    messages: list[ChatTurn] | None = Field(None, min_length=2, description="a chat; its assistant turns are trained")

    def to_example(self) -> Example:
        """Raises ValueError saying what is wrong."""
        if self.messages is not None:
            if self.prompt is not None or self.completion is not None:
                raise ValueError("give either messages or prompt and completion, not both")
            return Example.chat([m.model_dump() for m in self.messages])
        return Example.from_dict({"prompt": self.prompt, "completion": self.completion})


class PersonalizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    examples: list[TrainingExample] = Field(min_length=1)
    base_prefix_id: str | None = Field(None, description="a task prefix trained before the user's (composed first)")
    num_virtual_tokens: int = Field(10, description="length of the user's prefix")
    steps: int | None = Field(None, description="optimizer steps (default: derived from the data, with "
                                                "early stopping on held-out examples)")
    learning_rate: float | None = Field(None, description="peak AdamW learning rate, decayed linearly to 0 "
                                                          f"(default {recipe.LEARNING_RATE})")
    init_text: str | None = Field(None, min_length=1, max_length=2000,
                                  description="real words the prefix starts from (default: the first example)")
    seed: int = Field(0, ge=0, le=2**31 - 1)
    kl_weight: float | None = Field(None, ge=0, le=100, description="weight of the KL to the base model that keeps "
                                                                    "its knowledge (default 1; 0 = off)")
    held_out_fraction: float | None = Field(None, ge=0, lt=1, description="share of the examples held out for "
                                                                          "early stopping (default 0.2; 0 = none)")


class JobAccepted(BaseModel):
    job_id: str
    status: str


class JobInfo(BaseModel):
    job_id: str
    user_id: str
    status: str  # queued | running | succeeded | failed | cancelled
    progress: float  # 0.0-1.0
    loss: float | None  # the last training step's loss
    metrics: dict[str, Any] | None  # what the worker measured: held-out loss, the base model's, steps (docs/api.md)
    prefix_id: str | None  # "user:<user_id>" once succeeded
    version: str | None  # the published prefix version
    error: str | None
    step: int
    steps: int | None  # the job's maximum (None until the worker derived it from the data)
    attempts: int
    cancel_requested: bool
    created_at: float
    started_at: float | None
    finished_at: float | None


def job_info(job: Job) -> JobInfo:
    steps = JobSpec.from_dict(job.spec).steps
    if steps is None and job.metrics:
        steps = job.metrics.get("max_steps")
    return JobInfo(job_id=job.job_id, user_id=job.user_id, status=job.status.value, progress=job.progress,
                   loss=job.loss, metrics=job.metrics,
                   prefix_id=job.prefix_id if job.status == JobStatus.SUCCEEDED else None,
                   version=job.version, error=job.error, step=job.step, steps=steps,
                   attempts=job.attempts, cancel_requested=job.cancel_requested, created_at=job.created_at,
                   started_at=job.started_at, finished_at=job.finished_at)


@router.post("/v1/users/{user_id}/personalize", status_code=202, response_model=JobAccepted,
             dependencies=[require_kind(ModelKind.CAUSAL_LM)])
async def personalize(user_id: str, body: PersonalizeRequest, request: Request, response: Response,
                      caller: Caller = Depends(require_caller)) -> JobAccepted:
    ctx: ServerContext = get_ctx(request)
    try:
        user_prefix_id(user_id)
    except InvalidIdError as e:
        raise ApiError(400, f"user id {shorten(user_id)} cannot name a prefix: {e}") from e
    _check_numbers(ctx, body)
    examples = _examples(body)
    base, base_len = await _base_prefix(ctx, caller, body.base_prefix_id)
    await asyncio.to_thread(_check_lengths, ctx, examples, body.num_virtual_tokens, base_len)
    await _check_storage_quota(ctx, caller.tenant, user_id, body.num_virtual_tokens)
    spec = JobSpec(examples=examples, num_virtual_tokens=body.num_virtual_tokens, steps=body.steps,
                   learning_rate=recipe.LEARNING_RATE if body.learning_rate is None else body.learning_rate,
                   model_fingerprint=ctx.spec.fingerprint, init_text=body.init_text,
                   seed=body.seed, base_prefix=base,
                   tenant_incarnation=await asyncio.to_thread(ctx.store.tenant_incarnation, caller.tenant),
                   max_steps=ctx.settings.max_train_steps, kl_weight=body.kl_weight,
                   held_out_fraction=body.held_out_fraction)
    job_id = await asyncio.to_thread(ctx.jobs.submit, caller.tenant, user_id, spec.to_dict())
    response.headers["Location"] = f"/v1/jobs/{job_id}"
    return JobAccepted(job_id=job_id, status=JobStatus.QUEUED.value)


@router.get("/v1/jobs/{job_id}", response_model=JobInfo)
async def get_job(job_id: str, request: Request, caller: Caller = Depends(require_caller)) -> JobInfo:
    job = await asyncio.to_thread(get_ctx(request).jobs.get, caller.tenant, job_id)
    if job is None:
        raise ApiError(404, f"job {shorten(job_id)} not found (finished jobs are kept for a week)", "not_found_error")
    return job_info(job)


@router.delete("/v1/jobs/{job_id}", response_model=JobInfo,
               responses={202: {"model": JobInfo, "description": "running: the worker stops at its next step"},
                          409: {"description": "the job already succeeded or failed"}})
async def cancel_job(job_id: str, request: Request, response: Response,
                     caller: Caller = Depends(require_caller)) -> JobInfo:
    job = await asyncio.to_thread(get_ctx(request).jobs.cancel, caller.tenant, job_id)
    if job is None:
        raise ApiError(404, f"job {shorten(job_id)} not found", "not_found_error")
    if job.status in (JobStatus.SUCCEEDED, JobStatus.FAILED):
        raise ApiError(409, f"job {job_id} already {job.status.value}; there is nothing to cancel", "conflict_error")
    response.status_code = 202 if job.status == JobStatus.RUNNING else 200
    return job_info(job)


def _check_numbers(ctx: ServerContext, body: PersonalizeRequest) -> None:
    s = ctx.settings
    if len(body.examples) > s.max_train_examples:
        raise ApiError(400, f"{len(body.examples)} examples; at most {s.max_train_examples} are allowed "
                            "(max_train_examples)")
    if body.steps is not None and not 1 <= body.steps <= s.max_train_steps:
        raise ApiError(400, f"steps must be between 1 and {s.max_train_steps}, got {body.steps}")
    if not 1 <= body.num_virtual_tokens <= s.max_train_virtual_tokens:
        raise ApiError(400, f"num_virtual_tokens must be between 1 and {s.max_train_virtual_tokens}, "
                            f"got {body.num_virtual_tokens}")
    if body.learning_rate is not None and not 0 < body.learning_rate <= MAX_LEARNING_RATE:
        raise ApiError(400, f"learning_rate must be in (0, {MAX_LEARNING_RATE}], got {body.learning_rate}")
    if ctx.tokenizer is None:
        raise ApiError(400, "this server's model has no tokenizer; personalization needs one to read the examples")


async def _base_prefix(ctx: ServerContext, caller: Caller, name: str | None) -> tuple[BasePrefix | None, int]:
    """The base prefix (and its length), after checking the caller may train on top of it."""
    if name is None:
        return None, 0
    try:
        record = await asyncio.to_thread(ctx.resolver.record_of, caller.tenant, name)
    except PrefixNotFound as e:
        raise ApiError(404, f"base_prefix_id: {e}", "not_found_error") from e
    except InvalidIdError as e:
        raise ApiError(400, f"base_prefix_id: {e}") from e
    if record.model_fingerprint != ctx.spec.fingerprint:
        raise ApiError(422, f"base_prefix_id: prefix {shorten(name)} was made for base model "
                            f"{record.model_fingerprint}; this server runs {ctx.spec.fingerprint}", "model_mismatch")
    return BasePrefix(name=name, tenant=record.tenant, prefix_id=record.prefix_id), record.num_virtual_tokens


async def _check_storage_quota(ctx: ServerContext, tenant: str, user_id: str, num_virtual_tokens: int) -> None:
    """The prefix the job will store must fit the tenant's storage quota now (403 with the
    numbers), so that a job is not trained for nothing. (Uploads stored meanwhile may still
    fill the quota before the job ends.)"""
    limits = await ctx.admission.limits_of(tenant)
    prefix_id = user_prefix_id(user_id)
    nbytes = math.prod(ctx.spec.kv_shape(num_virtual_tokens)) * 4  # the worker stores float32 at most
    usage = await asyncio.to_thread(ctx.store.storage_usage, tenant)
    old = await asyncio.to_thread(ctx.store.get_record, tenant, prefix_id)
    after = storage_usage.usage_after_put(usage, old, nbytes)
    storage_usage.check_quota(tenant, prefix_id, nbytes, usage, after, limits)


def _examples(body: PersonalizeRequest) -> tuple[Example, ...]:
    examples = []
    for index, e in enumerate(body.examples):
        try:
            examples.append(e.to_example())
        except ValueError as err:
            raise ApiError(400, f"examples[{index}]: {err}") from err
    return tuple(examples)


def _check_lengths(ctx: ServerContext, examples: tuple[Example, ...], num_virtual_tokens: int, base_len: int) -> None:
    """Token counts as the trainer will see them, in every form it trains (text, and chat
    through the template): within the limit and, after the prefixes, within the context."""
    tok, limit = ctx.tokenizer, ctx.settings.max_train_example_tokens
    room = ctx.spec.max_model_len - base_len - num_virtual_tokens
    try:
        sequences = tokenize(tok, list(examples), max_length=10**9, chat_too=True)
    except ValueError as e:  # no chat template for chat examples, an empty prompt
        raise ApiError(400, f"examples: {e}") from e
    for seq in sequences:
        form = " (as a chat turn)" if seq.chat and not examples[seq.source].is_chat else ""
        prompt, completion, total = len(seq.prompt_ids), len(seq.completion_ids) - 1, len(seq)
        end = "end of turn" if seq.chat else "EOS"
        if total > limit:
            raise ApiError(400, f"examples[{seq.source}]{form} has {total} tokens (prompt {prompt} + completion "
                                f"{completion} + {end}); at most {limit} are allowed (max_train_example_tokens)")
        if total > room:
            raise ApiError(400, f"examples[{seq.source}]{form} has {total} tokens, but the model's context "
                                f"({ctx.spec.max_model_len}) leaves {room} after the base prefix ({base_len}) "
                                f"and num_virtual_tokens ({num_virtual_tokens})")
