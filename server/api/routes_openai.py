"""OpenAI-compatible routes: `/v1/completions`, `/v1/chat/completions`, `/v1/models`.

`model` is a prefix id of the caller's tenant (or `shared/<id>`), or the base model's
name for no prefix. Streaming follows OpenAI: `chat.completion.chunk` /
`text_completion` chunks, an optional usage chunk (`stream_options.include_usage`), then
`data: [DONE]`. Extensions (sent with the client's `extra_body`): `top_k`, `user_id`,
`ignore_eos`. OpenAI's own `user` field selects the end user's prefix `user:<user>` (when
it exists) for a tenant that opted in (PATCH /v1/tenant/settings, `openai_user_prefix`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request

from server.api.auth import Caller, require_caller
from server.api.context import ServerContext, get_ctx
from server.api.generation import (
    GenerationJob, complete, finish_reason_name, open_stream, prefix_names, prepare)
from server.api.prefix_resolver import PrefixNotFound
from server.api.schemas import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList, OpenAIFields
from server.api.sse import sse_response
from server.engine.outputs import RequestOutput
from server.prefix import USER_PREFIX, InvalidIdError

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


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request, caller: Caller = Depends(require_caller)):
    ctx = get_ctx(request)
    names = await _names(ctx, caller, body)
    job = await prepare(ctx, caller, names=names, prompt=body.single_prompt(), messages=None, fields=body,
                        max_tokens=body.max_tokens, id_prefix="cmpl", parse_special_tokens=body.parse_special_tokens)
    created = int(time.time())
    head = {"id": job.request_id, "object": "text_completion", "created": created, "model": body.model}
    if body.stream:
        outputs = await open_stream(ctx, request, job)
        usage = body.stream_options is not None and body.stream_options.include_usage
        return sse_response(_completion_chunks(head, job, outputs, usage))
    r = await complete(ctx, request, job)
    return {**head, "choices": [{"index": 0, "text": r.text, "logprobs": None, "finish_reason": r.finish_reason}],
            "usage": _usage(r.prompt_tokens, r.completion_tokens)}


async def _completion_chunks(head: dict, job: GenerationJob, outputs: AsyncIterator[RequestOutput],
                             include_usage: bool) -> AsyncIterator[dict]:
    extra = {"usage": None} if include_usage else {}
    async with contextlib.aclosing(outputs):
        async for out in outputs:
            reason = finish_reason_name(out.finish_reason) if out.finished else None
            if out.new_text or reason:
                yield {**head, "choices": [{"index": 0, "text": out.new_text, "logprobs": None,
                                            "finish_reason": reason}], **extra}
            if out.finished and include_usage:
                yield {**head, "choices": [], "usage": _usage(len(job.prompt_token_ids), out.num_output_tokens)}


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request, caller: Caller = Depends(require_caller)):
    ctx = get_ctx(request)
    max_tokens = body.max_completion_tokens or body.max_tokens
    names = await _names(ctx, caller, body)
    job = await prepare(ctx, caller, names=names, prompt=None, messages=body.messages, fields=body,
                        max_tokens=max_tokens, id_prefix="chatcmpl")
    created = int(time.time())
    head = {"id": job.request_id, "object": "chat.completion", "created": created, "model": body.model}
    if body.stream:
        outputs = await open_stream(ctx, request, job)
        usage = body.stream_options is not None and body.stream_options.include_usage
        head["object"] = "chat.completion.chunk"
        return sse_response(_chat_chunks(head, job, outputs, usage))
    r = await complete(ctx, request, job)
    return {**head, "choices": [{"index": 0, "message": {"role": "assistant", "content": r.text},
                                 "logprobs": None, "finish_reason": r.finish_reason}],
            "usage": _usage(r.prompt_tokens, r.completion_tokens)}


async def _chat_chunks(head: dict, job: GenerationJob, outputs: AsyncIterator[RequestOutput],
                       include_usage: bool) -> AsyncIterator[dict]:
    extra = {"usage": None} if include_usage else {}

    def chunk(delta: dict, reason: str | None) -> dict:
        return {**head, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}],
                **extra}

    async with contextlib.aclosing(outputs):
        yield chunk({"role": "assistant", "content": ""}, None)
        async for out in outputs:
            if out.new_text:
                yield chunk({"content": out.new_text}, None)
            if out.finished:
                yield chunk({}, finish_reason_name(out.finish_reason))
                if include_usage:
                    yield {**head, "choices": [], "usage": _usage(len(job.prompt_token_ids), out.num_output_tokens)}


@router.get("/v1/models", response_model=ModelList)
async def models(request: Request, caller: Caller = Depends(require_caller)) -> ModelList:
    """The base model (no prefix) and the caller's own prefixes, each usable as `model`."""
    ctx = get_ctx(request)
    records = await asyncio.to_thread(ctx.store.list, caller.tenant)
    cards = [ModelCard(id=ctx.model_name, created=int(ctx.started_at), owned_by="prefix-serve")]
    cards += [ModelCard(id=r.prefix_id, created=int(r.created_at), owned_by=caller.tenant) for r in records]
    return ModelList(data=cards)
