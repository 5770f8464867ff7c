"""One generation on behalf of an HTTP request: shared by /v1/generate and the OpenAI routes.

    prepare(): tokenize, resolve (load) the prefixes, check sampling, admit  -> GenerationJob
    complete(): run to the end, aborting if the client disconnects           -> Completion
    open_stream(): start, surface admission errors before any byte is sent, then yield deltas

Admission (server/api/admission.py) takes one of the tenant's slots and its tokens (prompt +
max_tokens) in prepare(); complete() and the stream give the slot back however they end.

# NOTE: every engine iterator is closed explicitly (aclosing): an async generator left
# un-iterated is only finalised by the garbage collector, and until then its request
# would keep running and hold its KV blocks. Closing it early aborts the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request

from server.api.auth import Caller
from server.api.context import ServerContext
from server.api.errors import ApiError, ClientGone
from server.api.schemas import Message, PrefixUsed, SamplingFields
from server.engine.async_engine import RequestTimeoutError
from server.engine.outputs import FinishReason, RequestOutput
from server.engine.request import RequestError
from server.engine.sampling_params import SamplingParams
from server.engine.tokenization import ChatMessage, encode_text, render_chat
from server.prefix import USER_PREFIX, Prefix


@dataclass
class GenerationJob:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    prefix: Prefix | None
    prefix_used: list[PrefixUsed]  # the ids as the client wrote them, with the versions served
    tenant: str = ""  # the caller's tenant (metrics label)


@dataclass
class Completion:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "length"
    prompt_tokens: int = 0
    completion_tokens: int = 0


def prefix_names(prefix_id: str | list[str] | None, user_id: str | None) -> list[str]:
    names = [] if prefix_id is None else [prefix_id] if isinstance(prefix_id, str) else list(prefix_id)
    if user_id is not None:
        names.append(USER_PREFIX + user_id)
    return names


async def prepare(ctx: ServerContext, caller: Caller, *, names: list[str], prompt: str | list[int] | None,
                  messages: list[Message] | None, fields: SamplingFields, max_tokens: int | None,
                  id_prefix: str = "gen", parse_special_tokens: bool = False) -> GenerationJob:
    prompt_ids = await encode(ctx, prompt, messages, parse_special_tokens)
    prefix = await ctx.resolver.resolve(caller.tenant, names)
    used = [PrefixUsed(id=n, version=r.version) for n, r in zip(names, prefix.refs, strict=True)] if prefix else []
    if max_tokens is None:  # fill the context (OpenAI chat's default)
        max_tokens = max(1, ctx.spec.max_model_len - len(prompt_ids) - (prefix.length if prefix else 0))
    try:
        sampling = SamplingParams(max_tokens=max_tokens, temperature=fields.temperature, top_p=fields.top_p,
                                  top_k=fields.top_k, seed=fields.seed, stop=fields.stop_strings(),
                                  ignore_eos=fields.ignore_eos)
    except ValueError as e:
        raise ApiError(400, str(e)) from e
    job = GenerationJob(f"{id_prefix}-{uuid.uuid4().hex}", prompt_ids, sampling, prefix, used, caller.tenant)
    await ctx.admission.admit(job.tenant, job.request_id, len(prompt_ids) + max_tokens)  # 429 beyond a limit
    return job


# Text longer than this is tokenized in a worker thread, so a large prompt never stalls the
# event loop (and with it every other request and /health); shorter text costs less than
# the thread hop.
INLINE_TOKENIZE_CHARS = 4096


async def encode(ctx: ServerContext, prompt: str | list[int] | None, messages: list[Message] | None,
                 parse_special_tokens: bool = False) -> list[int]:
    if isinstance(prompt, list):
        return [int(t) for t in prompt]
    tok = ctx.tokenizer
    if tok is None:
        raise ApiError(400, "this model has no tokenizer: send the prompt as a list of token ids")
    if messages is not None:
        try:
            chat = [ChatMessage(m.role, m.text()) for m in messages]
        except ValueError as e:
            raise ApiError(400, str(e)) from e
        size, work = sum(len(m.content) for m in chat), functools.partial(render_chat, tok, chat)
    else:
        size, work = len(prompt or ""), functools.partial(encode_text, tok, prompt or "", parse_special_tokens)
    return work() if size <= INLINE_TOKENIZE_CHARS else await asyncio.to_thread(work)


# --- running

async def complete(ctx: ServerContext, request: Request, job: GenerationJob) -> Completion:
    """Run to the end. Raises ApiError (429, 400, 504, 503) or ClientGone."""
    try:
        return await until_disconnect(request, _collect(ctx, job))
    except RequestTimeoutError as e:
        raise _timeout(ctx) from e
    finally:
        ctx.admission.release(job.tenant, job.request_id)


async def open_stream(ctx: ServerContext, request: Request, job: GenerationJob) -> AsyncIterator[RequestOutput]:
    """Start the request and wait for its first output, so that 429/400 can still be a status
    code; then return an iterator over all outputs (the first one included)."""
    outputs = ctx.engine.generate(job.request_id, job.prompt_token_ids, job.sampling, job.prefix,
                                  timeout_s=ctx.settings.request_timeout_s, tenant=job.tenant)
    try:
        first = await until_disconnect(request, _first(ctx, outputs))
    except RequestTimeoutError as e:
        await outputs.aclose()
        ctx.admission.release(job.tenant, job.request_id)
        raise _timeout(ctx) from e
    except BaseException:
        await outputs.aclose()
        ctx.admission.release(job.tenant, job.request_id)
        raise
    return _rest(ctx, outputs, first, job)


def _failed(out: RequestOutput) -> ApiError:
    """The request failed inside the engine (the engine and the other requests went on)."""
    return ApiError(500, f"generation failed: {out.error}; the request was stopped", "internal_error")


async def _first(ctx: ServerContext, outputs: AsyncIterator[RequestOutput]) -> RequestOutput:
    try:
        out = await anext(outputs)
    except RequestError as e:  # check_request: does not fit the context, a token id outside the vocabulary
        raise ApiError(400, str(e)) from e
    if out.finish_reason == FinishReason.ERROR:
        raise _failed(out)
    return out


async def _rest(ctx: ServerContext, outputs, first: RequestOutput, job: GenerationJob) -> AsyncIterator[RequestOutput]:
    try:
        async with contextlib.aclosing(outputs):
            out = first
            while True:
                if out.finish_reason == FinishReason.ERROR:
                    raise _failed(out)
                if out.finished:
                    ctx.metrics.observe_finished(job.tenant, out)
                yield out
                if out.finished:
                    return
                try:
                    out = await anext(outputs)
                except RequestTimeoutError as e:  # the engine's per-request timer: no timer per token
                    raise _timeout(ctx) from e
                except StopAsyncIteration:
                    return
    finally:
        ctx.admission.release(job.tenant, job.request_id)


async def _collect(ctx: ServerContext, job: GenerationJob) -> Completion:
    result = Completion(prompt_tokens=len(job.prompt_token_ids))
    # not streamed: the engine sends this request's output once, when it finishes
    outputs = ctx.engine.generate(job.request_id, job.prompt_token_ids, job.sampling, job.prefix, stream=False,
                                  timeout_s=ctx.settings.request_timeout_s, tenant=job.tenant)
    async with contextlib.aclosing(outputs):
        first = True
        while True:
            try:
                out = await (_first(ctx, outputs) if first else anext(outputs))
            except StopAsyncIteration:
                break
            if out.finish_reason == FinishReason.ERROR:
                raise _failed(out)
            first = False
            result.text += out.new_text
            result.token_ids.extend(out.new_token_ids)
            if out.finished:
                ctx.metrics.observe_finished(job.tenant, out)
                result.finish_reason = finish_reason_name(out.finish_reason)
                break
    result.completion_tokens = len(result.token_ids)
    return result


def finish_reason_name(reason: FinishReason | None) -> str:
    return "length" if reason == FinishReason.LENGTH else "stop"


async def until_disconnect(request: Request, work):
    """Await `work` unless the client disconnects first: then cancel it and raise ClientGone."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        with contextlib.suppress(BaseException):
            await task  # the cancellation closes the engine iterator, which aborts the request
        raise ClientGone()
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


async def _wait_disconnect(request: Request) -> None:
    # The body has been read already; the next ASGI message is the disconnect.
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _timeout(ctx: ServerContext) -> ApiError:
    return ApiError(504, f"the request ran longer than request_timeout_s={ctx.settings.request_timeout_s:g} "
                         "and was aborted; ask for fewer max_tokens", "timeout_error")
