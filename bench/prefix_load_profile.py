"""Where a cold prefix load spends its time, stage by stage, for a SmolLM2-135M prefix of
16 virtual tokens in bfloat16 (kv [30, 2, 3, 16, 64], 360 KiB), the way serve loads one:

    API process:    HGET the record -> GET the serving copy -> sha256 (once per process)
                    -> safetensors decode -> Prefix.make (check, contiguous)
                    -> hand-off to the engine process (pipe: pickle + send; shm: copy into a slot)
    engine process: receive (pipe: recv + unpickle; shm: view of the slot) -> host copy
                    -> copy into the KV pool's blocks

    .venv/bin/python bench/prefix_load_profile.py [--n 200]

Each stage is timed alone over `n` distinct prefixes (median and p90, microseconds), on an
otherwise idle server: what a load costs, not what it costs beside a running batch.
Prints a table; nothing is written.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import pickle
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PREFIX_LEN = 16


def _timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, (time.perf_counter() - t0) * 1e6


def _child(conn) -> None:
    """The engine side of the pipe: receive, unpickle, answer the two times."""
    while True:
        conn.poll(None)  # the first bytes are there: time the read, not the wait for them
        t0 = time.perf_counter()
        data = conn.recv_bytes()
        t1 = time.perf_counter()
        message = pickle.loads(data)
        t2 = time.perf_counter()
        if message is None:
            return
        conn.send(((t1 - t0) * 1e6, (t2 - t1) * 1e6))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (serve's processes: the cores, 2 here)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from prefix_store import PrefixStore, codec
    from prefix_store.redis_process import RedisServer
    from server.engine.config import EngineConfig
    from server.engine.engine_core import AddRequest, EngineCore, PrefixPayload
    from server.engine.llm_engine import LLMEngine
    from server.engine.model_loader import load_model
    try:
        from server.engine.prefix_arena import PrefixArena
    except ImportError:  # before the shared-memory hand-off
        PrefixArena = None
    from server.engine.sampling_params import SamplingParams
    from server.prefix import Prefix

    loaded = load_model(None, "bfloat16", "cpu")
    engine = LLMEngine(loaded.model, loaded.tokenizer, EngineConfig(kv_cache_bytes=160 << 20))
    core = EngineCore(engine)
    spec = engine.spec
    g = torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = {}

    def add(stage: str, us: float) -> None:
        times.setdefault(stage, []).append(us)

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=True)
    proc = ctx.Process(target=_child, args=(child,), daemon=True)
    proc.start()
    arena = None if PrefixArena is None else PrefixArena.create(64 * 360 * 1024)
    try:
        with tempfile.TemporaryDirectory() as tmp, RedisServer(datadir=Path(tmp) / "redis") as redis_server:
            store = PrefixStore(redis_server.url)
            records = []
            for i in range(args.n):
                kv = (torch.randn(30, 2, 3, PREFIX_LEN, 64, generator=g) * 0.5).to(torch.bfloat16)
                record, _ = store.put("bench", f"p{i}", kv, model_fingerprint="f", serving_dtype=torch.bfloat16)
                records.append(record)
            store.forget_verified()
            for i, record in enumerate(records):
                _, us = _timed(store.get_record, "bench", f"p{i}")
                add("1 HGET record", us)
                key = store.keys.tensor(record.tenant, record.prefix_id, record.version)
                data, us = _timed(store._r.get, key)
                add("2 GET tensor bytes", us)
                _, us = _timed(codec.check_version, data, record.version)
                add("3 sha256 (first read only)", us)
                kv, us = _timed(codec.load, data)
                add("4 safetensors decode", us)
                prefix, us = _timed(Prefix.make, kv, spec, (record.ref,), torch.bfloat16)
                add("5 Prefix.make (check, contiguous)", us)
                # the pipe hand-off: the whole command, pickled with the tensor's bytes
                add_cmd = AddRequest("r", [1, 2, 3], SamplingParams(max_tokens=1),
                                     PrefixPayload(prefix.key, prefix.refs, prefix.kv), 0.0)
                data, us = _timed(pickle.dumps, add_cmd, pickle.HIGHEST_PROTOCOL)
                add("6a pipe: pickle (API)", us)
                _, us = _timed(parent.send_bytes, data)
                add("6b pipe: send_bytes (API)", us)
                recv_us, unpickle_us = parent.recv()
                add("6c pipe: recv_bytes (engine)", recv_us)
                add("6d pipe: unpickle (engine)", unpickle_us)
                # the shared-memory hand-off: copy into a slot; the message carries its place
                if arena is not None:
                    t0 = time.perf_counter()
                    slot = arena.put(prefix.kv)
                    shm_cmd = AddRequest("r", [1, 2, 3], SamplingParams(max_tokens=1),
                                         PrefixPayload(prefix.key, prefix.refs, None, slot=slot), 0.0)
                    data = pickle.dumps(shm_cmd, pickle.HIGHEST_PROTOCOL)
                    add("7a shm: copy into slot + pickle (API)", (time.perf_counter() - t0) * 1e6)
                    t0 = time.perf_counter()
                    host = arena.take(pickle.loads(data).prefix.slot)
                    add("7b shm: unpickle + copy out (engine)", (time.perf_counter() - t0) * 1e6)
                    arena.free(slot.id)
                    assert torch.equal(host, prefix.kv)
                payload = PrefixPayload(prefix.key, prefix.refs, prefix.kv)
                held, us = _timed(core._prefix, payload)
                add("8 EngineCore host copy", us)
                _, us = _timed(engine.kv.prefixes.acquire, held)
                add("9 copy into the KV pool", us)
                engine.kv.prefixes.release(held.key)
                engine.kv.prefixes.drop(held.key)
            store.close()
    finally:
        parent.send_bytes(pickle.dumps(None))
        proc.join(10)
        if arena is not None:
            arena.close()
            arena.unlink()
    print(f"{'stage':<42} {'p50 us':>9} {'p90 us':>9}   (n={args.n}, prefix {PREFIX_LEN} tokens bf16, 360 KiB)")
    for stage, us in sorted(times.items()):
        us = sorted(us)
        print(f"{stage:<42} {statistics.median(us):>9.1f} {us[int(0.9 * (len(us) - 1))]:>9.1f}")


if __name__ == "__main__":
    main()
