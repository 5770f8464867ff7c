"""OpenAI-compatible routes: `/v1/completions`, `/v1/chat/completions`, `/v1/models`.

`model` is a prefix id of the caller's tenant (or `shared/<id>`), or the base model's
name for no prefix. Streaming follows OpenAI: `chat.completion.chunk` /
`text_completion` chunks, an optional usage chunk (`stream_options.include_usage`), then
`data: [DONE]`. Extensions (sent with the client's `extra_body`): `top_k`, `user_id`,
`ignore_eos`. OpenAI's own `user` field selects the end user's prefix `user:<user>` (when
it exists) for a tenant that opted in (PATCH /v1/tenant/settings, `openai_user_prefix`).

Completions take a list of prompts, `n`, `best_of`, `logprobs` and `echo` (with
`max_tokens: 0` and `logprobs`, a prompt is only scored: what evaluation harnesses send);
choice `i * n + j` is sample j of prompt i. Chat takes `n`, `logprobs` and `top_logprobs`.
Logprobs are float32 log_softmax of the model's logits (before temperature, top-k, top-p).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request

from server.api.auth import Caller, require_caller
from server.api.context import ServerContext, get_ctx
from server.api.errors import ApiError
from server.api.model_kind import require_kind
from server.api.generation import (
    Completion, GenerationJob, Sample, complete, finish_reason_name, open_stream, prefix_names, prepare)
from server.api.openai_logprobs import CompletionLogprobs, TokenTexts, chat_logprobs, merge_blocks
from server.api.prefix_resolver import PrefixNotFound
from server.api.schemas import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList, OpenAIFields
from server.api.sse import sse_response
from server.engine.outputs import RequestOutput
from server.prefix import USER_PREFIX, InvalidIdError, ModelKind

router = APIRouter(tags=["openai"])


async def _names(ctx: ServerContext, caller: Caller, body: OpenAIFields) -> list[str]:
    model = None if body.model == ctx.model_name else body.model
    user_id = body.user_id
    if user_id is None and body.user and await asyncio.to_thread(_user_has_prefix, ctx, caller, body.user):
        user_id = body.user
    return prefix_names(model, user_id)


def _user_has_prefix(ctx: ServerContext, caller: Caller, user: str) -> bool:
    """Whether OpenAI's `user` selects the prefix `user:<user>`: the tenant opted in and that
    prefix exists (a `user` that names no personalized user is only a tag, as on OpenAI)."""
    if not ctx.store.tenant_settings(caller.tenant).openai_user_prefix:
        return False
    try:
        ctx.resolver.record_of(caller.tenant, USER_PREFIX + user)
    except (PrefixNotFound, InvalidIdError):
        return False
    return True


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _check_choices(ctx: ServerContext, prompts: int, per_prompt: int) -> None:
    limit = ctx.settings.max_choices
    if prompts * per_prompt > limit:
        raise ApiError(400, f"{prompts} prompts x {per_prompt} samples = {prompts * per_prompt} sequences; "
                            f"at most {limit} (max_choices) per request")


def _best(samples: list[Sample], n: int) -> list[Sample]:
    """The n samples with the highest logprob per token (best_of), best first."""
    def per_token(s: Sample) -> float:
        return (s.cumulative_logprob or 0.0) / max(1, len(s.token_ids))

    return sorted(samples, key=per_token, reverse=True)[:n]


# --- /v1/completions

@router.post("/v1/completions", dependencies=[require_kind(ModelKind.CAUSAL_LM, ModelKind.SEQ2SEQ_LM)])
async def completions(body: CompletionRequest, request: Request, caller: Caller = Depends(require_caller)):
    ctx = get_ctx(request)
    prompts = body.prompts()
    samples = body.best_of or body.n
    _check_choices(ctx, len(prompts), samples)
    # best_of ranks by logprob: computed even when the client did not ask for them
    logprobs = body.logprobs if body.logprobs is not None else (0 if samples > body.n else None)
    scoring = body.echo and body.logprobs is not None
    names = await _names(ctx, caller, body)
    jobs = await prepare(ctx, caller, names=names, prompts=prompts, fields=body,
                         max_tokens=body.max_tokens, id_prefix="cmpl", parse_special_tokens=body.parse_special_tokens,
                         n=samples, logprobs=logprobs if body.max_tokens else None,
                         prompt_logprobs=body.logprobs if scoring else (0 if body.max_tokens == 0 else None),
                         allow_untrained_composition=body.allow_untrained_composition)
    head = {"id": jobs[0].response_id, "object": "text_completion", "created": int(time.time()), "model": body.model}
    texts = TokenTexts(ctx.tokenizer)
    echoes = [_echo_text(ctx, p, job) if body.echo else "" for p, job in zip(prompts, jobs)]
    if body.stream:
        outputs = await open_stream(ctx, request, jobs)
        usage = body.stream_options is not None and body.stream_options.include_usage
        return sse_response(_completion_chunks(head, body, jobs, echoes, texts, outputs, usage))
    results = await complete(ctx, request, jobs)
    choices = []
    for i, (job, result) in enumerate(zip(jobs, results)):
        for j, sample in enumerate(_best(result.samples, body.n) if samples > body.n else result.samples):
            choices.append({"index": i * body.n + j, "text": echoes[i] + sample.text,
                            "logprobs": _choice_logprobs(body, texts, job, result, sample),
                            "finish_reason": sample.finish_reason})
    prompt_tokens = sum(r.prompt_tokens for r in results)
    return {**head, "choices": choices, "usage": _usage(prompt_tokens, sum(r.completion_tokens for r in results))}


def _echo_text(ctx: ServerContext, prompt: str | list[int], job: GenerationJob) -> str:
    if isinstance(prompt, str):
        return prompt
    return ctx.tokenizer.decode(job.prompt_token_ids) if ctx.tokenizer is not None else ""


def _choice_logprobs(body: CompletionRequest, texts: TokenTexts, job: GenerationJob, result: Completion,
                     sample: Sample) -> dict | None:
    if body.logprobs is None:
        return None
    lp = CompletionLogprobs(texts)
    prompt = lp.block(job.prompt_token_ids, result.prompt_logprobs) if body.echo else None
    own = lp.block(sample.token_ids, sample.logprobs)
    return merge_blocks(prompt, own) if prompt else own


async def _completion_chunks(head: dict, body: CompletionRequest, jobs: list[GenerationJob], echoes: list[str],
                             texts: TokenTexts, outputs: AsyncIterator[tuple[int, RequestOutput]],
                             include_usage: bool) -> AsyncIterator[dict]:
    extra = {"usage": None} if include_usage else {}
    started: dict[int, CompletionLogprobs] = {}  # choice index -> its logprobs (offsets keep counting)
    prompt_logprobs: dict[int, list] = {}  # job index -> its prompt's (sample 0's first output has them)
    completion_tokens = 0
    async with contextlib.aclosing(outputs):
        async for i, out in outputs:
            choice = i * body.n + out.index
            reason = finish_reason_name(out.finish_reason) if out.finished else None
            if out.prompt_logprobs is not None:
                prompt_logprobs[i] = out.prompt_logprobs
            text, logprobs = out.new_text, None
            if choice not in started:  # its first chunk: the echo first
                started[choice] = CompletionLogprobs(texts)
                text = echoes[i] + text
                if body.echo and body.logprobs is not None:
                    logprobs = started[choice].block(jobs[i].prompt_token_ids, prompt_logprobs[i])
            if body.logprobs is not None:
                block = started[choice].block(out.new_token_ids, out.logprobs or [])
                logprobs = block if logprobs is None else merge_blocks(logprobs, block)
            if text or reason or (logprobs and logprobs["tokens"]):
                yield {**head, "choices": [{"index": choice, "text": text, "logprobs": logprobs,
                                            "finish_reason": reason}], **extra}
            if out.finished:
                completion_tokens += out.num_output_tokens
    if include_usage:
        yield {**head, "choices": [], "usage": _usage(sum(len(j.prompt_token_ids) for j in jobs), completion_tokens)}


# --- /v1/chat/completions

@router.post("/v1/chat/completions", dependencies=[require_kind(ModelKind.CAUSAL_LM)])
async def chat_completions(body: ChatCompletionRequest, request: Request, caller: Caller = Depends(require_caller)):
    ctx = get_ctx(request)
    _check_choices(ctx, 1, body.n)
    max_tokens = body.max_completion_tokens or body.max_tokens
    top = body.top_logprobs or 0
    names = await _names(ctx, caller, body)
    (job,) = await prepare(ctx, caller, names=names, messages=body.messages, fields=body,
                           max_tokens=max_tokens, id_prefix="chatcmpl", n=body.n,
                           logprobs=top if body.logprobs else None,
                           allow_untrained_composition=body.allow_untrained_composition)
    head = {"id": job.request_id, "object": "chat.completion", "created": int(time.time()), "model": body.model}
    texts = TokenTexts(ctx.tokenizer)
    if body.stream:
        outputs = await open_stream(ctx, request, [job])
        usage = body.stream_options is not None and body.stream_options.include_usage
        head["object"] = "chat.completion.chunk"
        return sse_response(_chat_chunks(head, body, job, texts, outputs, usage))
    (result,) = await complete(ctx, request, [job])
    choices = [{"index": s.index, "message": {"role": "assistant", "content": s.text},
                "logprobs": chat_logprobs(texts, s.logprobs, top) if body.logprobs else None,
                "finish_reason": s.finish_reason} for s in result.samples]
    return {**head, "choices": choices, "usage": _usage(result.prompt_tokens, result.completion_tokens)}


async def _chat_chunks(head: dict, body: ChatCompletionRequest, job: GenerationJob, texts: TokenTexts,
                       outputs: AsyncIterator[tuple[int, RequestOutput]], include_usage: bool) -> AsyncIterator[dict]:
    extra = {"usage": None} if include_usage else {}
    top = body.top_logprobs or 0

    def chunk(index: int, delta: dict, reason: str | None, logprobs: dict | None = None) -> dict:
        return {**head, "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}],
                **extra}

    completion_tokens = 0
    async with contextlib.aclosing(outputs):
        for index in range(body.n):
            yield chunk(index, {"role": "assistant", "content": ""}, None)
        async for _, out in outputs:
            logprobs = chat_logprobs(texts, out.logprobs, top) if body.logprobs and out.logprobs else None
            if out.new_text or logprobs:
                yield chunk(out.index, {"content": out.new_text}, None, logprobs)
            if out.finished:
                completion_tokens += out.num_output_tokens
                yield chunk(out.index, {}, finish_reason_name(out.finish_reason))
    if include_usage:
        yield {**head, "choices": [], "usage": _usage(len(job.prompt_token_ids), completion_tokens)}


# --- /v1/models

@router.get("/v1/models", response_model=ModelList, response_model_exclude_none=True)
async def models(request: Request, caller: Caller = Depends(require_caller)) -> ModelList:
    """The base model (no prefix) and the caller's own prefixes, each usable as `model`, with
    the prefix's length and version."""
    ctx = get_ctx(request)
    records = await asyncio.to_thread(ctx.store.list, caller.tenant)
    cards = [ModelCard(id=ctx.model_name, created=int(ctx.started_at), owned_by="prefix-serve",
                       max_model_len=ctx.spec.max_model_len, kind=ctx.spec.kind.value)]
    cards += [ModelCard(id=r.prefix_id, created=int(r.created_at), owned_by=caller.tenant,
                        prefix_length=r.num_virtual_tokens, version=r.version, kind=ctx.spec.kind.value)
              for r in records]
    return ModelList(data=cards)
