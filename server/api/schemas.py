"""Request and response bodies of the HTTP API (docs/api.md). Only the api uses pydantic models;
routes convert them to engine types (SamplingParams, token ids) and back.

Our own routes forbid unknown fields (a typo is a 400 naming it); the OpenAI-compatible
ones ignore them, as clients send fields we have no use for.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from server.engine.sampling_params import MAX_LOGPROBS, MAX_SAMPLES

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


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str = "response"
    # `schema` is the OpenAI name; pydantic reserves it on models, hence the alias
    schema_: dict = Field(default_factory=lambda: {"type": "object"}, alias="schema")
    strict: bool | None = None  # output always follows the schema here; the flag changes nothing


class ResponseFormat(BaseModel):
    """OpenAI's response_format: plain text, any JSON object, or JSON following a schema."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> "ResponseFormat":
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type json_schema needs a json_schema object with a schema")
        return self


class SamplingFields(BaseModel):
    """Sampling knobs shared by every generation route (checked again by SamplingParams)."""

    temperature: float = Field(0.0, ge=0.0, le=100.0, description="0 = greedy, deterministic")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="0 = off")
    seed: int | None = None
    stop: str | list[str] | None = None
    ignore_eos: bool = Field(False, description="keep going past EOS (benchmarks)")
    response_format: ResponseFormat | None = Field(
        None, description="structured output: {'type': 'json_object'} or {'type': 'json_schema', 'json_schema': "
                          "{'schema': {...}}}; the output is held to it token by token")

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
    allow_untrained_composition: bool = Field(
        False, description="serve a prefix after other prefixes than the ones it was trained after "
                           "(default: refused with 400 untrained_composition)")
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
    n: int = Field(1, ge=1, le=MAX_SAMPLES, description="choices per prompt; they share the prompt's KV blocks")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # OpenAI's end-user tag: selects `user:<user>` if the tenant opted in (routes_openai)
    user_id: str | None = Field(None, description="extension: append the prefix 'user:<user_id>'")
    allow_untrained_composition: bool = Field(
        False, description="extension: serve a prefix after other prefixes than the ones it was trained after")


class CompletionRequest(OpenAIFields):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="text, token ids, or a list of either (one completion per prompt)")
    max_tokens: int | None = Field(16, ge=0, description="0 with echo scores the prompt only")
    echo: bool = Field(False, description="prepend the prompt (and, with logprobs, its tokens' logprobs)")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS,
                                 description="each token's logprob and this many most likely tokens")
    best_of: int | None = Field(None, ge=1, le=MAX_SAMPLES,
                                description="sample this many, return the n with the highest logprob per token")
    parse_special_tokens: bool = Field(
        False, description="extension: read special tokens' spellings in the prompt as the tokens (default: as text)")

    @model_validator(mode="after")
    def _consistent(self) -> "CompletionRequest":
        if self.best_of is not None and self.best_of < self.n:
            raise ValueError(f"best_of ({self.best_of}) must be at least n ({self.n})")
        if self.stream and (self.best_of or self.n) > self.n:
            raise ValueError("best_of > n cannot be streamed: the best are known only at the end")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens 0 generates nothing: set echo (with logprobs, to score the prompt)")
        if isinstance(self.prompt, list) and len(self.prompt) == 0:
            raise ValueError("prompt is an empty list")
        return self

    def prompts(self) -> list[str | list[int]]:
        """Each prompt of the request: text or token ids."""
        p = self.prompt
        if isinstance(p, str) or isinstance(p[0], int):
            return [p]
        return list(p)


class ChatCompletionRequest(OpenAIFields):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = Field(False, description="each output token's logprob")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="with logprobs: the most likely tokens")

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> "ChatCompletionRequest":
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    # extensions: what the id serves (a prefix's length and version; the base model's context)
    max_model_len: int | None = None
    prefix_length: int | None = None
    version: str | None = None
    kind: str | None = None  # the base model's kind (causal_lm, seq2seq_lm, seq_cls): which routes fit it


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: a text prompt, or chat messages through the chat template."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = None
    add_special_tokens: bool = Field(True, description="the tokenizer's BOS/EOS, as a prompt gets them")
    add_generation_prompt: bool = Field(True, description="with messages: end with the assistant turn's opening")
    parse_special_tokens: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> "TokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' and 'messages'")
        return self


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# --- /v1/classify

MAX_CLASSIFY_INPUTS = 256


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prefix_id: str | None = Field(None, description="a SEQ_CLS prefix (with its own head), or null for the base model")
    input: str | list[str] = Field(..., description="one text, or a list of texts (classified in one batch)")

    def texts(self) -> list[str]:
        texts = [self.input] if isinstance(self.input, str) else list(self.input)
        if not texts:
            raise ValueError("input is an empty list: give at least one text")
        if len(texts) > MAX_CLASSIFY_INPUTS:
            raise ValueError(f"input has {len(texts)} texts; at most {MAX_CLASSIFY_INPUTS} per request")
        return texts


class ClassifyResult(BaseModel):
    index: int
    label: str | int  # the most probable label: its name, or its index when the head names none
    probs: dict[str, float]  # label (name or index) -> probability
    logits: list[float]


class ClassifyUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class ClassifyResponse(BaseModel):
    id: str
    object: Literal["classification"] = "classification"
    model: str
    data: list[ClassifyResult]
    usage: ClassifyUsage
    prefix: list[PrefixUsed] = []


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
    kind: Literal["tuned", "prompt"] = "tuned"  # prompt: computed from a text by the model
    encoder_tokens: int = 0  # a seq2seq prefix's encoder self-attention part (three-prefix form), 0: none
    cross_tokens: int = 0  # a seq2seq prefix's cross-attention part (three-prefix form), 0: none


class PromptPrefixRequest(BaseModel):
    """PUT /v1/prefixes/{id} as JSON: a prefix computed from a text (a system prompt, a
    few-shot block) by the frozen model, served like any prefix."""

    model_config = ConfigDict(extra="forbid")
    text: str | None = Field(None, description="tokenized as a prompt is (the tokenizer's BOS included)")
    messages: list[Message] | None = Field(
        None, description="chat messages: the chat template up to the end of the last one")
    parse_special_tokens: bool = Field(False, description="read special tokens' spellings in `text` as the tokens")
    description: str = Field("", max_length=4096)
    shared: bool = Field(False, description="admin only: every tenant may use it as shared/<id>")

    @model_validator(mode="after")
    def _one_input(self) -> "PromptPrefixRequest":
        if (self.text is None) == (self.messages is None):
            raise ValueError("give exactly one of 'text' and 'messages'")
        return self


class StorageInfo(BaseModel):
    """What a tenant stores, and its quota."""
    bytes: int
    prefixes: int
    max_storage_bytes: int
    max_prefixes: int


class PrefixList(BaseModel):
    data: list[PrefixInfo]
    storage: StorageInfo | None = None  # the caller's own usage and quota


class CreateTenantRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tenant_id: str = Field(min_length=1, max_length=64)


class CreateTenantResponse(BaseModel):
    tenant_id: str
    api_key: str  # shown once: the store keeps only its sha256


class RotateKeyResponse(BaseModel):
    tenant_id: str
    api_key: str  # the new key, shown once; the old one no longer works on any replica


class TenantLimitsFields(BaseModel):
    """A tenant's limits (docs/api.md; the defaults are the server's tenant_* settings)."""
    max_concurrent_requests: int = Field(ge=1, description="requests queued or running at once, all replicas")
    tokens_per_minute: int = Field(ge=0, description="prompt + max_tokens of admitted requests; 0 = no rate limit")
    burst_tokens: int = Field(ge=0, description="most tokens at once after an idle spell; 0 = a minute's worth")
    max_storage_bytes: int = Field(ge=0, description="bytes of prefixes stored")
    max_prefixes: int = Field(ge=0, description="prefixes stored (user prefixes included)")


class SetTenantLimits(BaseModel):
    """PUT body: the limits to set for the tenant; a field left out (or null) takes the default."""
    model_config = ConfigDict(extra="forbid")
    max_concurrent_requests: int | None = Field(None, ge=1)
    tokens_per_minute: int | None = Field(None, ge=0)
    burst_tokens: int | None = Field(None, ge=0)
    max_storage_bytes: int | None = Field(None, ge=0)
    max_prefixes: int | None = Field(None, ge=0)


class TenantInfo(BaseModel):
    tenant_id: str
    limits: TenantLimitsFields  # in force: the defaults with the overrides
    overrides: dict[str, int]  # what the admin set for this tenant
    storage: StorageInfo
    requests_in_flight: int  # queued or running now, all replicas together


class TenantList(BaseModel):
    data: list[str]
    tenants: list[TenantInfo] = []  # each tenant's limits and usage, in the order of `data`
