"""`POST /tokenize`, `POST /detokenize`, `GET /tokenizer_info`: vLLM's shapes, so clients
and evaluation harnesses (lm-evaluation-harness's remote tokenizer) can use the server's
tokenizer. /tokenize gives exactly the ids a prompt or messages are served with."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from server.api.auth import Caller, require_caller
from server.api.context import ServerContext, get_ctx
from server.api.errors import ApiError
from server.api.generation import encode
from server.api.schemas import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from server.engine.tokenization import ChatMessage, encode_text, render_chat

router = APIRouter(tags=["tokenizer"])


def _tokenizer(ctx: ServerContext):
    if ctx.tokenizer is None:
        raise ApiError(400, "this model has no tokenizer: prompts are token ids")
    return ctx.tokenizer


@router.post("/tokenize", response_model=TokenizeResponse)
async def tokenize(body: TokenizeRequest, request: Request, caller: Caller = Depends(require_caller)):
    ctx = get_ctx(request)
    tok = _tokenizer(ctx)
    if body.messages is not None:
        try:
            chat = [ChatMessage(m.role, m.text()) for m in body.messages]
        except ValueError as e:
            raise ApiError(400, str(e)) from e
        ids = render_chat(tok, chat, body.add_generation_prompt)
    elif body.add_special_tokens:
        ids = await encode(ctx, body.prompt, None, body.parse_special_tokens)
    else:
        ids = encode_text(tok, body.prompt, body.parse_special_tokens, add_special_tokens=False)
    return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=ctx.spec.max_model_len)


@router.post("/detokenize", response_model=DetokenizeResponse)
async def detokenize(body: DetokenizeRequest, request: Request, caller: Caller = Depends(require_caller)):
    ctx = get_ctx(request)
    tok = _tokenizer(ctx)
    vocab = ctx.engine.limits.vocab_size
    bad = [t for t in body.tokens if not 0 <= t < vocab]
    if bad:
        raise ApiError(400, f"token id {bad[0]} is outside the vocabulary [0, {vocab})")
    return DetokenizeResponse(prompt=tok.decode(body.tokens))


@router.get("/tokenizer_info")
async def tokenizer_info(request: Request, caller: Caller = Depends(require_caller)) -> dict:
    ctx = get_ctx(request)
    tok = _tokenizer(ctx)
    return {"tokenizer_class": type(tok).__name__, "eos_token": tok.eos_token, "bos_token": tok.bos_token,
            "pad_token": tok.pad_token, "chat_template": getattr(tok, "chat_template", None),
            "model_max_length": ctx.spec.max_model_len, "vocab_size": ctx.engine.limits.vocab_size}
