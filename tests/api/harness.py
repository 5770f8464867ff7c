"""Builders for the api tests: a tiny real tokenizer, PEFT adapters zipped the way users
upload them, and a real uvicorn server running the app in a background thread."""

from __future__ import annotations

import io
import json
import socket
import tempfile
import threading
import time
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch
import uvicorn
from pydantic import SecretStr

from prefix_store import PrefixStore
from server.api.app import create_app
from server.config import Settings
from server.engine.async_engine import AsyncEngine
from server.engine.llm_engine import LLMEngine
from tests.factories import peft_prefix_model, tiny_llama
from tests.processes import START_BOUND_S

ADMIN_KEY = "test-admin-key-0123456789abcdef"
MODEL_NAME = "tiny-llama"

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
_CORPUS = [
    "the quick brown fox jumps over the lazy dog", "hello world, how are you today?",
    "prefix tuning serves many tasks with one frozen model", "Name: Alimentum; food: Chinese; area: city centre.",
    "a tenant never sees the prefixes of another tenant", "tokens stream back as server sent events",
    "the cat sat on the mat while it rained outside", "Translate to French: good morning, my friend",
]


def tiny_tokenizer():
    """A byte-level BPE tokenizer trained here on a few sentences (no hub access), with a
    ChatML template. Special tokens: 0 <|endoftext|>, 1 <|im_start|>, 2 <|im_end|> (= EOS,
    matching tiny_llama's eos_token_id)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # No full byte alphabet: every token is printable ASCII, so any sampled sequence decodes
    # to whole characters (tests compare streamed text with the decoded tokens).
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  show_progress=False)
    tok.train_from_iterator(_CORPUS * 8, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE)


@dataclass
class Adapter:
    peft_model: object  # the PeftModel (reference for greedy tokens)
    zip_bytes: bytes  # the adapter folder, zipped
    prompt_embeddings: torch.Tensor  # [P, L*2*Hkv*hd] as PEFT saved it


def make_adapter(vocab: int, num_virtual_tokens: int, seed: int, base: torch.nn.Module | None = None) -> Adapter:
    """A randomised PEFT prefix adapter on its own copy of tiny_llama(0) (or on `base`)."""
    from safetensors.torch import load_file

    peft_model = peft_prefix_model(base if base is not None else tiny_llama(0, vocab), num_virtual_tokens, seed=seed)
    with tempfile.TemporaryDirectory() as d:
        peft_model.save_pretrained(d)
        folder = Path(d)
        w = load_file(folder / "adapter_model.safetensors")["prompt_embeddings"]
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            for f in sorted(folder.rglob("*")):
                if f.is_file():
                    zf.write(f, f"my-adapter/{f.relative_to(folder)}")
    return Adapter(peft_model, buf.getvalue(), w)


def peft_greedy(adapter: Adapter, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """PEFT's own greedy generation: the reference the server must reproduce."""
    with torch.no_grad():
        out = adapter.peft_model.generate(input_ids=torch.tensor([prompt_ids]),
                                          attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                                          max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(prompt_ids):].tolist()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """uvicorn serving `app` on 127.0.0.1 in a background thread (lifespan included)."""

    def __init__(self, app) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on",
                                timeout_keep_alive=Settings.model_fields["keep_alive_s"].default,
                                timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name=f"uvicorn-{self.port}", daemon=True)

    def start(self, timeout: float = START_BOUND_S) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start on port {self.port}")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@dataclass
class Stack:
    """One running server and what the tests look at behind its back."""

    url: str
    server: ServerThread
    engine: AsyncEngine
    store: PrefixStore
    settings: Settings

    @property
    def ctx(self):
        """The app's ServerContext (resolver, host cache, settings)."""
        return self.server.server.config.app.state.ctx

    def client(self, key: str | None = ADMIN_KEY, **kw) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=kw.pop("timeout", 60.0), **kw)

    def create_tenant(self, tenant_id: str) -> str:
        with self.client() as c:
            r = c.post("/v1/admin/tenants", json={"tenant_id": tenant_id})
        assert r.status_code == 201, r.text
        return r.json()["api_key"]

    def wait_idle(self, timeout: float = 30.0) -> None:
        """Until no request runs or waits in the engine (and the stats snapshot says so)."""
        deadline = time.monotonic() + timeout
        while True:
            s = self.engine.stats()
            if s.num_running == 0 and s.num_waiting == 0 and self.engine.num_waiting == 0:
                return
            assert time.monotonic() < deadline, f"engine still busy: {s}"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.stop()
        self.store.close()


def start_stack(redis_url: str, vocab: int, tokenizer, *, slow_step_s: float = 0.0,
                model_dtype: torch.dtype = torch.float32, **overrides) -> Stack:
    values = dict(admin_key=SecretStr(ADMIN_KEY), kv_cache_bytes=4 << 20, max_upload_bytes=256 << 10,
                  max_prefix_bytes=64 << 10, max_body_bytes=64 << 10, request_timeout_s=60, drain_timeout_s=5)
    settings = Settings(**{**values, **overrides})
    model = tiny_llama(0, vocab).to(model_dtype)
    if slow_step_s:
        # Slows every step (the embedding runs once per forward) so that a long request is
        # surely still running while the test acts on it.
        model.model.embed_tokens.register_forward_hook(lambda *_: time.sleep(slow_step_s))
    engine = AsyncEngine(LLMEngine(model, tokenizer, settings.engine_config()), max_waiting=settings.max_queue)
    store = PrefixStore(redis_url, namespace=f"api-{uuid.uuid4().hex[:8]}",
                        wait_replicas=settings.wait_replicas_for(redis_url), wait_timeout_ms=settings.redis_wait_timeout_ms)
    app = create_app(settings, engine, store, model_name=MODEL_NAME)
    server = ServerThread(app).start()
    return Stack(server.url, server, engine, store, settings)


def upload(client: httpx.Client, prefix_id: str, data: bytes, filename: str = "adapter.zip", **form) -> httpx.Response:
    return client.put(f"/v1/prefixes/{prefix_id}", files={"file": (filename, data)},
                      data={k: str(v) for k, v in form.items()})


def sse_events(response: httpx.Response) -> list[dict | str]:
    """The JSON payloads of a text/event-stream response; '[DONE]' as the string."""
    events: list[dict | str] = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events
