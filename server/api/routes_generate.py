"""`POST /v1/generate`: prefix-serve's own generation route, JSON or Server-Sent Events. On a
seq2seq_lm server (BART, T5) the prompt is the encoder's input; messages need a causal LM."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request

from server.api.auth import Caller, require_caller
from server.api.context import get_ctx
from server.api.generation import GenerationJob, complete, finish_reason_name, open_stream, prefix_names, prepare
from server.api.model_kind import check_kind, require_kind
from server.api.schemas import GenerateRequest, GenerateResponse, Usage
from server.api.sse import sse_response
from server.engine.outputs import RequestOutput
from server.prefix import ModelKind

router = APIRouter(tags=["generation"], dependencies=[require_kind(ModelKind.CAUSAL_LM, ModelKind.SEQ2SEQ_LM)])


_RESPONSES = {200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE when stream"}}


@router.post("/v1/generate", response_model=GenerateResponse, responses=_RESPONSES)
@router.post("/generate", response_model=GenerateResponse, responses=_RESPONSES,
             summary="Generate (the same route as /v1/generate)")
async def generate(body: GenerateRequest, request: Request, caller: Caller = Depends(require_caller)):
    ctx = get_ctx(request)
    if body.messages is not None:  # a chat template is a causal LM's; an encoder-decoder takes a prompt
        check_kind(request, "/v1/generate with messages (a chat)", ModelKind.CAUSAL_LM)
    (job,) = await prepare(ctx, caller, names=prefix_names(body.prefix_id, body.user_id),
                           prompts=None if body.prompt is None else [body.prompt], messages=body.messages,
                           fields=body, max_tokens=body.max_tokens, parse_special_tokens=body.parse_special_tokens,
                           allow_untrained_composition=body.allow_untrained_composition)
    if body.stream:
        outputs = await open_stream(ctx, request, [job])
        return sse_response(_events(job, outputs))
    (result,) = await complete(ctx, request, [job])
    (sample,) = result.samples
    return GenerateResponse(
        id=job.request_id, text=sample.text, token_ids=sample.token_ids, finish_reason=sample.finish_reason,
        usage=Usage(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
                    total_tokens=result.prompt_tokens + result.completion_tokens),
        prefix=job.prefix_used)


async def _events(job: GenerationJob, outputs: AsyncIterator[tuple[int, RequestOutput]]) -> AsyncIterator[dict]:
    """One delta per engine output; the last one carries finish_reason, usage and prefix."""
    async with contextlib.aclosing(outputs):
        async for _, out in outputs:
            event = {"id": job.request_id, "text": out.new_text, "token_ids": out.new_token_ids,
                     "finish_reason": finish_reason_name(out.finish_reason) if out.finished else None}
            if out.finished:
                prompt_tokens = len(job.prompt_token_ids)
                event["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": out.num_output_tokens,
                                  "total_tokens": prompt_tokens + out.num_output_tokens}
                event["prefix"] = [p.model_dump() for p in job.prefix_used]
            yield event
