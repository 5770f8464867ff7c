"""Evaluate prefixes through the server with lm-evaluation-harness (`local-completions`).

    .venv/bin/python bench/eval_harness.py                       # base model vs a 3-shot prompt prefix
    .venv/bin/python bench/eval_harness.py --adapter my.zip      # ... and an uploaded tuned prefix
    .venv/bin/python bench/eval_harness.py --quick               # 10 items

The task is bench/eval/e2e_mc.jsonl (bench/eval/make_e2e_mc.py): for an E2E meaning
representation, pick its human description among four descriptions of the same
restaurant. lm-eval scores each choice by its loglikelihood after the prompt, which it
gets from /v1/completions (echo, logprobs, max_tokens 0 or 1) and tokenizes through the
server's /tokenize (the remote tokenizer): exactly what the server would serve. Systems:
  base        the model alone (`model` = the base model's name)
  few_shot    a prompt prefix holding 3 E2E examples not in the task
              (PUT /v1/prefixes/few-shot {"text": ...}: computed once by the server)
  adapter     with --adapter: a PEFT prefix-tuning adapter uploaded as `adapter`
Writes bench/results/eval_harness.json.

Any prefix on any server is evaluated the same way: see README, "Evaluating a prefix".
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

TASK_DATA = ROOT / "bench" / "eval" / "e2e_mc.jsonl"
TASK = "e2e_mc"


def write_task(folder: Path, data: Path, name: str = TASK) -> Path:
    """An lm-eval task config for a jsonl of {"prompt", "choices", "gold"} items."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.yaml").write_text(f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data.resolve()}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
""")
    return folder


def evaluate(url: str, key: str, model: str, task_folder: Path, name: str = TASK, limit: int | None = None,
             log_samples: bool = False) -> dict:
    """lm-eval's local-completions against a prefix-serve server; its results dict."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    os.environ["OPENAI_API_KEY"] = key  # local-completions sends it as the bearer key
    return simple_evaluate(
        model="local-completions",
        model_args={"base_url": f"{url}/v1/completions", "model": model, "tokenizer_backend": "remote",
                    "auth_token": key, "num_concurrent": 2, "batch_size": 16, "max_retries": 1, "timeout": 600},
        tasks=[name], task_manager=TaskManager(include_path=str(task_folder)), limit=limit,
        log_samples=log_samples, bootstrap_iters=0)


def few_shot_text(shots: int = 3) -> str:
    """`shots` E2E examples that are not task items, as the trainer formats them."""
    import csv

    from server.training.data import table_prompt

    items = {json.loads(line)["prompt"] for line in TASK_DATA.read_text(encoding="utf-8").splitlines()}
    out = []
    with open(ROOT.parent / "shared" / "data" / "e2e" / "devset.csv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            prompt = table_prompt(row["mr"])
            if prompt not in items and all(prompt not in o for o in out):
                out.append(f"{prompt} {row['ref'].strip()}\n\n")
            if len(out) == shots:
                break
    return "".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapter", type=Path, help="a PEFT prefix-tuning adapter (zip) to evaluate as well")
    ap.add_argument("--limit", type=int, default=None, help="items of the task (default: all 100)")
    ap.add_argument("--dtype", default="float32", help="float32: the logprobs the parity tests check")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "eval_harness.json"))
    args = ap.parse_args()
    limit = 10 if args.quick else args.limit

    import httpx

    from prefix_store.redis_process import RedisServer
    from serving_bench import ADMIN_KEY, free_port, start_server
    from server.cache_dir import default_cache_dir

    report: dict = {"task": TASK, "items": limit or 100, "dtype": args.dtype, "systems": {}}
    with tempfile.TemporaryDirectory() as tmp, RedisServer(datadir=Path(tmp) / "redis") as redis_server:
        port = free_port()
        proc = start_server(redis_server.url, args.dtype, port, str(default_cache_dir()))
        try:
            url = f"http://127.0.0.1:{port}"
            key = httpx.post(f"{url}/v1/admin/tenants", json={"tenant_id": "eval"},
                             headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()["api_key"]
            auth = {"Authorization": f"Bearer {key}"}
            base = httpx.get(f"{url}/v1/models", headers=auth).json()["data"][0]["id"]
            httpx.put(f"{url}/v1/prefixes/few-shot", headers=auth, json={"text": few_shot_text()},
                      timeout=600).raise_for_status()
            systems = {"base": base, "few_shot": "few-shot"}
            if args.adapter:
                httpx.put(f"{url}/v1/prefixes/adapter", headers=auth, timeout=600,
                          files={"file": (args.adapter.name, args.adapter.read_bytes())}).raise_for_status()
                systems["adapter"] = "adapter"
            folder = write_task(Path(tmp) / "tasks", TASK_DATA)
            for name, model in systems.items():
                start = time.perf_counter()
                result = evaluate(url, key, model, folder, limit=limit)["results"][TASK]
                report["systems"][name] = {"model": model, "acc": result["acc,none"],
                                           "acc_norm": result["acc_norm,none"],
                                           "seconds": round(time.perf_counter() - start, 1)}
                print(name, report["systems"][name], flush=True)
        finally:
            proc.terminate()
            proc.wait(60)
    report["date"] = time.strftime("%Y-%m-%d %H:%M")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
