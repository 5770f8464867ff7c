"""`POST /v1/classify`: label probabilities from a seq_cls model (BERT) and a SEQ_CLS prefix
with its own classifier head; requests on different prefixes share one encoder pass."""

from __future__ import annotations

import asyncio
import uuid

from fastapi import APIRouter, Depends, Request

from server.api.auth import Caller, require_caller
from server.api.context import get_ctx
from server.api.errors import ApiError
from server.api.generation import prefix_names
from server.api.model_kind import require_kind
from server.api.schemas import ClassifyRequest, ClassifyResponse, ClassifyResult, ClassifyUsage, PrefixUsed
from server.engine.classifier import ClassifyError
from server.prefix import ModelKind

router = APIRouter(tags=["classification"], dependencies=[require_kind(ModelKind.SEQ_CLS)])


@router.post("/v1/classify", response_model=ClassifyResponse)
async def classify(body: ClassifyRequest, request: Request, caller: Caller = Depends(require_caller)):
    ctx = get_ctx(request)
    try:
        texts = body.texts()
    except ValueError as e:
        raise ApiError(400, str(e)) from e
    names = prefix_names(body.prefix_id, None)
    prefix = await ctx.resolver.resolve(caller.tenant, names)
    rows = await asyncio.to_thread(_tokenize, ctx.tokenizer, texts)
    p = prefix.length if prefix is not None else 0
    limit = ctx.spec.max_model_len
    for i, ids in enumerate(rows):
        if p + len(ids) > limit:
            raise ApiError(400, f"input {i} has {len(ids)} tokens; with the prefix's {p} the model's "
                                f"{limit} positions allow at most {limit - p}")
    tokens = sum(len(r) for r in rows)
    request_id = f"cls-{uuid.uuid4().hex}"
    await ctx.admission.admit(caller.tenant, request_id, tokens)  # 429 beyond the tenant's limits
    try:
        results = await ctx.engine.classify(request_id, rows, prefix)
    except ClassifyError as e:
        raise ApiError(400, str(e)) from e
    finally:
        ctx.admission.release(caller.tenant, request_id)
    data = []
    for i, r in enumerate(results):
        names_by_index = r.labels or tuple(str(k) for k in range(len(r.logits)))
        data.append(ClassifyResult(index=i, label=r.label, logits=r.logits.tolist(),
                                   probs={n: float(v) for n, v in zip(names_by_index, r.probs.tolist())}))
    used = [PrefixUsed(id=n, version=ref.version) for n, ref in zip(names, prefix.refs, strict=True)] if prefix else []
    return ClassifyResponse(id=request_id, model=body.prefix_id or ctx.model_name, data=data,
                            usage=ClassifyUsage(prompt_tokens=tokens, total_tokens=tokens), prefix=used)


def _tokenize(tokenizer, texts: list[str]) -> list[list[int]]:
    if tokenizer is None:
        raise ApiError(400, "this model has no tokenizer")
    rows = tokenizer(texts, add_special_tokens=True)["input_ids"]
    for i, ids in enumerate(rows):
        if not ids:
            raise ApiError(400, f"input {i} has no tokens")
    return [list(r) for r in rows]
