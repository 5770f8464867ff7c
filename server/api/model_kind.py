"""Which routes fit the loaded base model's kind, and the 400 for those that do not.

One server serves one base model (`serve --model FOLDER` takes whichever kind the folder
holds): a causal LM generates and chats, an encoder-decoder (seq2seq_lm) generates from a
prompt (its encoder's input), a seq_cls encoder classifies. A route for another kind
answers 400 `wrong_model_kind`, naming the kind loaded and the routes that work with it.
"""

from __future__ import annotations

from fastapi import Depends, Request

from server.api.context import get_ctx
from server.api.errors import ApiError
from server.prefix import ModelKind

COMMON_ROUTES = ("/v1/prefixes", "/v1/models", "/tokenize", "/detokenize", "/v1/admin/...", "/health", "/metrics")
ROUTES_OF = {
    ModelKind.CAUSAL_LM: ("/v1/generate", "/v1/completions", "/v1/chat/completions",
                          "/v1/users/{user_id}/personalize", "PUT /v1/prefixes/{id} with a prompt (JSON)"),
    ModelKind.SEQ_CLS: ("/v1/classify",),
    ModelKind.SEQ2SEQ_LM: ("/v1/generate (a prompt)", "/v1/completions"),
}


def check_kind(request: Request, what: str, *kinds: ModelKind) -> None:
    """Raise the 400 unless the loaded model is of one of `kinds`."""
    ctx = get_ctx(request)
    kind = ctx.spec.kind
    if kind in kinds:
        return
    routes = ", ".join(ROUTES_OF[kind] + COMMON_ROUTES)
    needs = " or ".join(k.value for k in kinds)
    raise ApiError(400, f"{what} needs a {needs} model; this server runs {ctx.model_name}, a {kind.value} model. "
                        f"Routes that work with it: {routes}", "wrong_model_kind")


def require_kind(*kinds: ModelKind):
    """A route dependency: the 400 above for a model of another kind."""

    def dependency(request: Request) -> None:
        check_kind(request, request.url.path, *kinds)

    return Depends(dependency)
