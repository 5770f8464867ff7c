"""Request and response bodies of the HTTP API (docs/api.md). Only the api uses pydantic models;
routes convert them to engine types (SamplingParams, token ids) and back.

Our own routes forbid unknown fields (a typo is a 400 naming it); the OpenAI-compatible
ones ignore them, as clients send fields we have no use for.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

FinishReasonName = Literal["stop", "length"]


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]  # the chat template's roles (tokenization.CHAT_ROLES)
    # OpenAI also allows a list of content parts; only text parts can be served here.
    content: str | list[dict] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        texts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"message content part of type {str(part.get('type'))[:32]!r} is not supported; "
                                 "only text parts are")
            texts.append(part["text"])
        return "".join(texts)


class SamplingFields(BaseModel):
    """Sampling knobs shared by every generation route (checked again by SamplingParams)."""

    temperature: float = Field(0.0, ge=0.0, le=100.0, description="0 = greedy, deterministic")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="0 = off")
    seed: int | None = None
    stop: str | list[str] | None = None
    ignore_eos: bool = Field(False, description="keep going past EOS (benchmarks)")

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


# --- /v1/generate

class GenerateRequest(SamplingFields):
    model_config = ConfigDict(extra="forbid")

    prefix_id: str | list[str] | None = Field(None, description="one id, a list (composed in order), or null")
    prompt: str | list[int] | None = Field(None, description="text, or token ids")
    messages: list[Message] | None = Field(None, description="chat messages; the chat template is applied")
    max_tokens: int = Field(64, ge=1)
    stream: bool = False
    user_id: str | None = Field(None, description="append the user's prefix 'user:<user_id>'")
    parse_special_tokens: bool = Field(
        False, description="read special tokens' spellings in a text prompt as the tokens (default: as text)")

    @model_validator(mode="after")
    def _one_input(self) -> "GenerateRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' and 'messages'")
        return self


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class PrefixUsed(BaseModel):
    id: str
    version: str


class GenerateResponse(BaseModel):
    id: str
    text: str
    token_ids: list[int]
    finish_reason: FinishReasonName
    usage: Usage
    prefix: list[PrefixUsed]


# --- OpenAI-compatible

class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class OpenAIFields(SamplingFields):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(description="a prefix id of the caller's tenant, 'shared/<id>', or the base model's name")
    temperature: float = Field(1.0, ge=0.0, le=2.0)  # OpenAI's default, not ours
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # OpenAI's end-user tag: selects `user:<user>` if the tenant opted in (routes_openai)
    user_id: str | None = Field(None, description="extension: append the prefix 'user:<user_id>'")

    @model_validator(mode="after")
    def _supported(self) -> "OpenAIFields":
        if self.n != 1:
            raise ValueError(f"n={self.n} is not supported; send n=1 (or several requests)")
        return self


class CompletionRequest(OpenAIFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    parse_special_tokens: bool = Field(
        False, description="extension: read special tokens' spellings in the prompt as the tokens (default: as text)")

    @model_validator(mode="after")
    def _single_prompt(self) -> "CompletionRequest":
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], (str, list)):
            if len(self.prompt) != 1:
                raise ValueError(f"prompt holds {len(self.prompt)} prompts; send one per request")
        if self.echo or self.logprobs is not None or self.best_of not in (None, 1):
            raise ValueError("echo, logprobs and best_of are not supported")
        return self

    def single_prompt(self) -> str | list[int]:
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            return p[0]
        return p


class ChatCompletionRequest(OpenAIFields):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None

    @model_validator(mode="after")
    def _no_logprobs(self) -> "ChatCompletionRequest":
        if self.logprobs:
            raise ValueError("logprobs are not supported")
        return self


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# --- prefixes and tenants

class PrefixInfo(BaseModel):
    id: str
    version: str
    num_virtual_tokens: int
    dtype: str
    bytes: int
    created_at: float
    description: str = ""
    shared: bool = False  # the admin's prefix, usable by every tenant as shared/<id>


class PrefixList(BaseModel):
    data: list[PrefixInfo]


class CreateTenantRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tenant_id: str = Field(min_length=1, max_length=64)


class CreateTenantResponse(BaseModel):
    tenant_id: str
    api_key: str


class TenantList(BaseModel):
    data: list[str]
