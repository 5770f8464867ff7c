"""`/v1/prefixes`: create (PUT: a multipart upload of a tuned prefix, or JSON with a text the
model computes a prompt prefix from), list, get and delete the caller's prefixes.

A tenant only ever sees its own namespace: another tenant's prefix is simply not there
(404), never forbidden (403), so its existence is not revealed.
"""

from __future__ import annotations

import asyncio
import uuid

from fastapi import APIRouter, Depends, Request, Response
from pydantic import ValidationError

from prefix_store import PrefixRecord
from prefix_store.store import MAX_DESCRIPTION_CHARS
from server.api.auth import Caller, require_caller
from server.api.context import ServerContext, get_ctx
from server.api.errors import ApiError, describe_validation_errors
from server.api.generation import encode
from server.api.routes_admin import storage_info
from server.api.schemas import PrefixInfo, PrefixList, PromptPrefixRequest
from server.api.model_kind import check_kind
from server.api.upload import ParsedUpload, UploadError, parse_prefix_upload
from server.prefix import ModelKind, shorten, validate_prefix_id

router = APIRouter(tags=["prefixes"])


def prefix_info(r: PrefixRecord) -> PrefixInfo:
    return PrefixInfo(id=r.prefix_id, version=r.version, num_virtual_tokens=r.num_virtual_tokens, dtype=r.dtype,
                      bytes=r.bytes, created_at=r.created_at, description=r.description, shared=r.shared,
                      kind=r.kind, encoder_tokens=r.encoder_tokens, cross_tokens=r.cross_tokens)


_UPLOAD_FORM = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {
        "type": "object", "required": ["file"], "properties": {
            "file": {"type": "string", "format": "binary",
                     "description": "zip of a PEFT prefix-tuning adapter folder, or a .safetensors file "
                                    "(prefix_kv; for a seq2seq model also encoder_kv, cross_kv)"},
            "description": {"type": "string"},
            "num_virtual_tokens": {"type": "integer", "description": "rows of prompt_embeddings (optional check)"},
            "shared": {"type": "boolean", "description": "admin only: every tenant may use it as shared/<id>"},
        }}},
    "application/json": {"schema": {"$ref": "#/components/schemas/PromptPrefixRequest"}},
}}}


@router.put("/v1/prefixes/{prefix_id}", response_model=PrefixInfo, status_code=201, openapi_extra=_UPLOAD_FORM,
            responses={200: {"model": PrefixInfo, "description": "replaced"}})
async def upload_prefix(prefix_id: str, request: Request, response: Response,
                        caller: Caller = Depends(require_caller)) -> PrefixInfo:
    ctx: ServerContext = get_ctx(request)
    validate_prefix_id(prefix_id)
    if request.headers.get("content-type", "").startswith("application/json"):
        kv, description, shared, kind = await _prompt_prefix(ctx, request, caller)
        parsed = ParsedUpload(kv)
    else:
        parsed, description, shared, kind = await _uploaded_prefix(ctx, request, caller)
    limits = await ctx.admission.limits_of(caller.tenant)  # its storage quota: 403 above it, nothing stored
    record, created = await asyncio.to_thread(ctx.store.put, caller.tenant, prefix_id, parsed.kv,
                                              model_fingerprint=ctx.spec.fingerprint, description=description,
                                              shared=shared, kind=kind, limits=limits, head=parsed.head,
                                              encoder_kv=parsed.encoder_kv, cross_kv=parsed.cross_kv,
                                              serving_dtype=ctx.engine.dtype)  # the copy this server reads
    response.status_code = 201 if created else 200
    return prefix_info(record)


def _check_share(shared: bool, caller: Caller) -> None:
    if shared and not caller.is_admin:
        raise ApiError(403, "only the admin key can share a prefix with every tenant ('shared')", "permission_error")


async def _uploaded_prefix(ctx: ServerContext, request: Request, caller: Caller):
    # The form is read here, after the key was checked: a stranger cannot make us read a
    # large body (FastAPI reads declared form parameters before running dependencies).
    data, filename, description, num_virtual_tokens, shared = await _read_form(request)
    _check_share(shared, caller)
    try:
        parsed = await asyncio.to_thread(parse_prefix_upload, data, ctx.spec, filename=filename,
                                         num_virtual_tokens=num_virtual_tokens,
                                         max_prefix_bytes=ctx.settings.max_prefix_bytes)
    except UploadError as e:
        raise ApiError(e.status, str(e), e.kind) from e
    return parsed, description, shared, "tuned"


async def _prompt_prefix(ctx: ServerContext, request: Request, caller: Caller):
    """A prefix computed from a text by the model: its keys and values, as the cache holds them."""
    check_kind(request, "a prompt prefix (PUT /v1/prefixes/{id} with JSON)", ModelKind.CAUSAL_LM)
    try:
        body = PromptPrefixRequest.model_validate_json(await request.body())
    except ValidationError as e:
        raise ApiError(400, f"invalid prompt prefix body: {describe_validation_errors(e.errors())}") from e
    _check_share(body.shared, caller)
    ids = await encode(ctx, body.text, body.messages, body.parse_special_tokens, add_generation_prompt=False)
    spec, limit = ctx.spec, ctx.spec.max_model_len
    if not ids:
        raise ApiError(400, "the text has no tokens")
    if len(ids) + 1 > limit:
        raise ApiError(400, f"the text has {len(ids)} tokens; a prompt prefix must leave room in the context of "
                            f"{limit} tokens (at most {limit - 1} tokens)")
    nbytes = len(ids) * spec.kv_bytes_per_token(ctx.engine.dtype)
    if nbytes > ctx.settings.max_prefix_bytes:
        raise ApiError(413, f"the text's {len(ids)} tokens make a prefix of {nbytes} bytes; the limit is "
                            f"{ctx.settings.max_prefix_bytes} (max_prefix_bytes)", "payload_too_large")
    kv = await ctx.engine.prompt_kv(f"kv-{uuid.uuid4().hex}", ids)
    return kv, body.description, body.shared, "prompt"


async def _read_form(request: Request) -> tuple[bytes, str | None, str, int | None, bool]:
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise ApiError(415, "send the prefix as multipart/form-data with the file in the field 'file' "
                            "(curl -F file=@adapter.zip), or as JSON {\"text\": ...} to compute it from a text",
                       "unsupported_media_type")
    try:
        form = await request.form(max_files=1, max_fields=8)
    except ApiError:
        raise
    except Exception as e:  # malformed multipart, too many parts
        raise ApiError(400, f"the multipart body cannot be read: {e}") from e
    file = form.get("file")
    if file is None or isinstance(file, str):
        raise ApiError(400, "the multipart field 'file' (the adapter zip or .safetensors file) is missing")
    description = form.get("description") or ""
    if not isinstance(description, str) or len(description) > MAX_DESCRIPTION_CHARS:
        raise ApiError(400, f"description must be text of at most {MAX_DESCRIPTION_CHARS} characters")
    nvt_raw = form.get("num_virtual_tokens")
    num_virtual_tokens = None
    if nvt_raw not in (None, ""):
        if not isinstance(nvt_raw, str) or not nvt_raw.strip().isdigit() or int(nvt_raw) < 1:
            raise ApiError(400, f"num_virtual_tokens must be a positive integer, got {shorten(nvt_raw)}")
        num_virtual_tokens = int(nvt_raw)
    shared_raw = form.get("shared") or "false"
    if not isinstance(shared_raw, str) or shared_raw.lower() not in ("true", "false", "1", "0"):
        raise ApiError(400, f"shared must be true or false, got {shorten(shared_raw)}")
    data = await file.read()
    await form.close()
    return data, file.filename, description, num_virtual_tokens, shared_raw.lower() in ("true", "1")


@router.get("/v1/prefixes", response_model=PrefixList)
async def list_prefixes(request: Request, caller: Caller = Depends(require_caller)) -> PrefixList:
    """The caller's prefixes, and what it stores against its quota."""
    ctx = get_ctx(request)
    records = await asyncio.to_thread(ctx.store.list, caller.tenant)
    limits = await ctx.admission.limits_of(caller.tenant)
    storage = await asyncio.to_thread(storage_info, ctx, caller.tenant, limits)
    return PrefixList(data=[prefix_info(r) for r in records], storage=storage)


@router.get("/v1/prefixes/{prefix_id}", response_model=PrefixInfo)
async def get_prefix(prefix_id: str, request: Request, caller: Caller = Depends(require_caller)) -> PrefixInfo:
    validate_prefix_id(prefix_id)
    record = await asyncio.to_thread(get_ctx(request).store.get_record, caller.tenant, prefix_id)
    if record is None:
        raise ApiError(404, f"prefix {shorten(prefix_id)} not found", "not_found_error")
    return prefix_info(record)


@router.delete("/v1/prefixes/{prefix_id}", status_code=204)
async def delete_prefix(prefix_id: str, request: Request, caller: Caller = Depends(require_caller)) -> Response:
    validate_prefix_id(prefix_id)
    if not await asyncio.to_thread(get_ctx(request).store.delete, caller.tenant, prefix_id):
        raise ApiError(404, f"prefix {shorten(prefix_id)} not found", "not_found_error")
    return Response(status_code=204)
