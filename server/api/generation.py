"""Generation on behalf of an HTTP request: shared by /v1/generate and the OpenAI routes.

    prepare(): tokenize each prompt, resolve (load) the prefixes once, check sampling, admit
               -> GenerationJobs
    complete(): run every job to the end, aborting all if the client disconnects -> Completions
    open_stream(): start every job, surface admission errors before any byte is sent, then
                   yield (job index, output) as outputs come

Admission (server/api/admission.py) takes one of the tenant's slots and its tokens (prompt +
max_tokens, per sample) for each job in prepare(); complete() and the stream give them back
however they end.

# NOTE: every engine iterator is closed explicitly (aclosing, or the task that iterates it
# is cancelled): an async generator left un-iterated is only finalised by the garbage
# collector, and until then its request would keep running and hold its KV blocks.
# Closing it early aborts the request.
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
from server.engine.guided_decoding import GuideError, json_schema_regex
from server.engine.outputs import FinishReason, RequestOutput, TokenLogprob
from server.engine.request import RequestError
from server.engine.sampling_params import SamplingParams
from server.engine.tokenization import ChatMessage, encode_text, render_chat
from server.prefix import USER_PREFIX, ModelKind, Prefix


@dataclass
class GenerationJob:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    prefix: Prefix | None
    prefix_used: list[PrefixUsed]  # the ids as the client wrote them, with the versions served
    tenant: str = ""  # the caller's tenant (metrics label)
    response_id: str = ""  # the id the response carries (one for all prompts of a request)


@dataclass
class Sample:
    """One of a job's n samples, run to the end."""

    index: int = 0
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "length"
    logprobs: list[TokenLogprob] = field(default_factory=list)  # with sampling.logprobs
    cumulative_logprob: float | None = None


@dataclass
class Completion:
    """A job run to the end: its samples (index order), and its prompt's logprobs if asked."""

    samples: list[Sample]
    prompt_tokens: int
    prompt_logprobs: list[TokenLogprob | None] | None = None

    @property
    def completion_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.samples)


def prefix_names(prefix_id: str | list[str] | None, user_id: str | None) -> list[str]:
    names = [] if prefix_id is None else [prefix_id] if isinstance(prefix_id, str) else list(prefix_id)
    if user_id is not None:
        names.append(USER_PREFIX + user_id)
    return names


async def prepare(ctx: ServerContext, caller: Caller, *, names: list[str],
                  prompts: list[str | list[int]] | None = None, messages: list[Message] | None = None,
                  fields: SamplingFields, max_tokens: int | None, id_prefix: str = "gen",
                  parse_special_tokens: bool = False, n: int = 1, logprobs: int | None = None,
                  prompt_logprobs: int | None = None, allow_untrained_composition: bool = False) -> list[GenerationJob]:
    """One job per prompt (or one for `messages`), all on the same prefixes."""
    inputs = [await encode(ctx, None, messages)] if messages is not None else \
        [await encode(ctx, p, None, parse_special_tokens) for p in prompts]
    prefix = await ctx.resolver.resolve(caller.tenant, names, allow_untrained_composition)
    used = [PrefixUsed(id=n, version=r.version) for n, r in zip(names, prefix.refs, strict=True)] if prefix else []
    request_id = f"{id_prefix}-{uuid.uuid4().hex}"
    limit = ctx.settings.max_output_tokens
    if max_tokens is not None and limit is not None and max_tokens > limit:
        raise ApiError(400, f"max_tokens {max_tokens} is above this server's limit of {limit} tokens per request "
                            "(max_output_tokens)")
    regex = guided_regex(fields)
    jobs = []
    for i, prompt_ids in enumerate(inputs):
        tokens = max_tokens
        if tokens is None:  # fill the context (OpenAI chat's default), up to the server's limit
            # (an encoder-decoder's prompt takes encoder positions, not decoder ones)
            prompt_len = 0 if ctx.spec.kind is ModelKind.SEQ2SEQ_LM else len(prompt_ids)
            tokens = max(1, ctx.spec.max_model_len - prompt_len - (prefix.length if prefix else 0))
            tokens = min(tokens, limit) if limit is not None else tokens
        try:
            sampling = SamplingParams(max_tokens=tokens, temperature=fields.temperature, top_p=fields.top_p,
                                      top_k=fields.top_k, seed=fields.seed, stop=fields.stop_strings(),
                                      ignore_eos=fields.ignore_eos, n=n, logprobs=logprobs,
                                      prompt_logprobs=prompt_logprobs, guided_regex=regex)
        except ValueError as e:
            raise ApiError(400, str(e)) from e
        rid = request_id if len(inputs) == 1 else f"{request_id}-{i}"
        jobs.append(GenerationJob(rid, prompt_ids, sampling, prefix, used, caller.tenant, request_id))
    admitted: list[GenerationJob] = []
    try:
        for job in jobs:  # 429 beyond a limit; the jobs admitted before it are given back
            await ctx.admission.admit(job.tenant, job.request_id,
                                      len(job.prompt_token_ids) + job.sampling.max_tokens * job.sampling.n)
            admitted.append(job)
    except BaseException:
        release(ctx, admitted)
        raise
    return jobs


def guided_regex(fields: SamplingFields) -> str | None:
    """The pattern response_format holds the output to (None: free text); 400 for a schema
    that cannot guide decoding."""
    fmt = fields.response_format
    if fmt is None or fmt.type == "text":
        return None
    try:
        return json_schema_regex(None if fmt.type == "json_object" else fmt.json_schema.schema_)
    except GuideError as e:
        raise ApiError(400, str(e)) from None


def release(ctx: ServerContext, jobs: list[GenerationJob]) -> None:
    """Give the jobs' admission slots back (prepare() took them)."""
    for job in jobs:
        ctx.admission.release(job.tenant, job.request_id)


# Text longer than this is tokenized in a worker thread, so a large prompt never stalls the
# event loop (and with it every other request and /health); shorter text costs less than
# the thread hop.
INLINE_TOKENIZE_CHARS = 4096


async def encode(ctx: ServerContext, prompt: str | list[int] | None, messages: list[Message] | None,
                 parse_special_tokens: bool = False, add_generation_prompt: bool = True) -> list[int]:
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
        for index, m in enumerate(chat):
            check_text(m.content, f"messages[{index}].content")
        size = sum(len(m.content) for m in chat)
        work = functools.partial(render_chat, tok, chat, add_generation_prompt)
    else:
        check_text(prompt or "", "prompt")
        size, work = len(prompt or ""), functools.partial(encode_text, tok, prompt or "", parse_special_tokens)
    return work() if size <= INLINE_TOKENIZE_CHARS else await asyncio.to_thread(work)


def check_text(text: str, what: str) -> None:
    """400 for text that is not Unicode: JSON may escape a lone surrogate (\\ud800), which
    Python keeps in a str and every tokenizer refuses."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(400, f"{what} is not valid Unicode text: a lone surrogate (U+{ord(text[e.start]):04X}) at "
                            f"character {e.start}") from None


# --- running

async def complete(ctx: ServerContext, request: Request, jobs: list[GenerationJob]) -> list[Completion]:
    """Run every job to the end (together). Raises ApiError (429, 400, 504, 503) or
    ClientGone; either way every job is stopped."""
    async def run_all() -> list[Completion]:
        async with asyncio.TaskGroup() as group:  # one failing cancels (aborts) the others
            tasks = [group.create_task(_collect(ctx, job)) for job in jobs]
        return [t.result() for t in tasks]

    try:
        return await until_disconnect(request, run_all())
    except BaseExceptionGroup as group:
        raise _reason(ctx, group) from None
    finally:
        release(ctx, jobs)


async def open_stream(ctx: ServerContext, request: Request,
                      jobs: list[GenerationJob]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Start every job and wait for each one's first output, so that 429/400 can still be a
    status code; then an iterator over (job index, output) of all of them, as they come."""
    streams = [ctx.engine.generate(job.request_id, job.prompt_token_ids, job.sampling, job.prefix,
                                   timeout_s=ctx.settings.request_timeout_s, tenant=job.tenant) for job in jobs]

    async def firsts() -> list[RequestOutput]:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(_first(ctx, s)) for s in streams]
        return [t.result() for t in tasks]

    try:
        first = await until_disconnect(request, firsts())
    except BaseException as e:
        for stream in streams:
            await stream.aclose()
        release(ctx, jobs)
        if isinstance(e, BaseExceptionGroup):
            raise _reason(ctx, e) from None
        raise
    return _merge([_rest(ctx, s, f, job) for s, f, job in zip(streams, first, jobs)])


def _reason(ctx: ServerContext, group: BaseExceptionGroup) -> BaseException:
    """The first error of jobs run together (the others were cancelled because of it)."""
    e: BaseException = group
    while isinstance(e, BaseExceptionGroup):
        e = e.exceptions[0]
    return _timeout(ctx) if isinstance(e, RequestTimeoutError) else e


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
    """Every output of one job (the first one included), until all its samples finished;
    then (or when it fails or is closed) its admission slot is given back."""
    try:
        async with contextlib.aclosing(outputs):
            out = first
            while True:
                if out.finish_reason == FinishReason.ERROR:
                    raise _failed(out)
                if out.finished:
                    ctx.metrics.observe_finished(job.tenant, out)
                yield out
                try:
                    out = await anext(outputs)
                except RequestTimeoutError as e:  # the engine's per-request timer: no timer per token
                    raise _timeout(ctx) from e
                except StopAsyncIteration:
                    return
    finally:
        release(ctx, [job])


async def _merge(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(stream index, output) from all streams as they come; closing this closes them all."""
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]):
            async for out in streams[0]:
                yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async with contextlib.aclosing(stream):
                async for out in stream:
                    queue.put_nowait((i, out))
        except Exception as e:  # noqa: BLE001 - handed to the consumer
            queue.put_nowait((i, e))
        finally:
            queue.put_nowait((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        live = len(tasks)
        while live:
            i, item = await queue.get()
            if item is None:
                live -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _collect(ctx: ServerContext, job: GenerationJob) -> Completion:
    samples = [Sample(index=i) for i in range(job.sampling.n)]
    result = Completion(samples=samples, prompt_tokens=len(job.prompt_token_ids))
    # not streamed: the engine sends each sample's output once, when it finishes
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
            s = samples[out.index]
            s.text += out.new_text
            s.token_ids.extend(out.new_token_ids)
            s.logprobs.extend(out.logprobs or [])
            s.cumulative_logprob = out.cumulative_logprob
            result.prompt_logprobs = result.prompt_logprobs or out.prompt_logprobs
            if out.finished:
                ctx.metrics.observe_finished(job.tenant, out)
                s.finish_reason = finish_reason_name(out.finish_reason)
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
