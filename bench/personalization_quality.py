"""Personalization quality through `serve`: does a persona carry to chat, does the model keep its knowledge?

    .venv/bin/python bench/personalization_quality.py              # 4 personas, ~10 min on 2 idle cores
    .venv/bin/python bench/personalization_quality.py --personas robot --questions 10   # smoke run

A real `prefix-serve serve` (SmolLM2-135M-Instruct, its own training worker, a real Redis)
is driven over HTTP as a user would: for each persona of bench/persona_data.py, its eight
prompt/completion examples go to `POST /v1/users/<persona>/personalize` with no training
settings at all (the defaults: text and chat forms, held-out early stopping, steps from
the data, the KL regulariser). Once the job succeeds, the QA set's unseen questions are
asked greedily with the official openai client:

  chat   /v1/chat/completions, the persona selected by OpenAI's `user` field (the tenant
         opted in: PATCH /v1/tenant/settings)
  text   /v1/completions with the question as a plain prompt, same `user`

  style      share of replies with the persona's marker (target: >= 90% through chat)
  accuracy   share of replies with a right answer, against the base model's own accuracy
             on the same questions and route (target: >= 90% of the base model's)
  job        the job's wall time (started -> finished) and what it reports: held-out loss
             and the base model's loss on the same examples, steps (target: < 3 minutes)

`--issue-job` also trains each persona as the issue's report did (10 virtual tokens, 120
steps, lr 5e-3, no held-out set, no regulariser), for comparison.
Writes bench/results/personalization_quality.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai

from persona_data import PERSONAS, QA, Persona, is_correct  # bench/ is this script's folder

ROOT = Path(__file__).resolve().parents[1]
ADMIN_KEY = "bench-admin-key-0123456789abcdef"
ISSUE_JOB = {"num_virtual_tokens": 10, "steps": 120, "learning_rate": 5e-3, "kl_weight": 0, "held_out_fraction": 0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(redis_url: str, port: int, args, log_path: Path) -> subprocess.Popen:
    env = {**os.environ, "PREFIX_SERVE_ADMIN_KEY": ADMIN_KEY, "PREFIX_SERVE_TRAIN_DTYPE": args.train_dtype}
    if args.threads:
        env["PREFIX_SERVE_TORCH_THREADS"] = str(args.threads)
    log = log_path.open("w")
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--redis-url", redis_url, "--port", str(port),
                             "--dtype", args.serve_dtype, "--workers", "1", "--log-level", "warning"],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("the server did not become ready in 600 s")


def train(http: httpx.Client, user: str, persona: Persona, extra: dict) -> dict:
    """Run a personalization job for `user` to the end; the finished job (GET /v1/jobs/<id>)."""
    r = http.post(f"/v1/users/{user}/personalize", json={"examples": persona.examples(), **extra})
    r.raise_for_status()
    job_id = r.json()["job_id"]
    while True:
        job = http.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(1.0)
    if job["status"] != "succeeded":
        raise RuntimeError(f"the job for {user} ended {job['status']}: {job['error']}")
    return job


def ask(client: openai.OpenAI, model: str, questions: list[str], user: str | None, max_tokens: int) -> dict:
    """Greedy replies through chat and as plain prompts, all sent at once (the engine batches them)."""
    extra = {"user": user} if user else {}

    def chat(q: str) -> str:
        reply = client.chat.completions.create(model=model, temperature=0, max_tokens=max_tokens,
                                               messages=[{"role": "user", "content": q}], **extra)
        return reply.choices[0].message.content.strip()

    def text(q: str) -> str:
        reply = client.completions.create(model=model, prompt=q, temperature=0, max_tokens=max_tokens, **extra)
        return reply.choices[0].text.strip()

    with ThreadPoolExecutor(16) as pool:
        return {"chat": list(pool.map(chat, questions)), "text": list(pool.map(text, questions))}


def ask_led(http: httpx.Client, client: openai.OpenAI, model: str, questions: list[str], lead: str,
            max_tokens: int) -> list[str]:
    """The base model's chat replies when made to start with `lead` (a persona's opening
    words): the chat prompt's tokens (/tokenize) plus the lead's, sent as token ids."""
    lead_ids = http.post("/tokenize", json={"prompt": lead, "add_special_tokens": False}).json()["tokens"]

    def one(q: str) -> str:
        ids = http.post("/tokenize", json={"messages": [{"role": "user", "content": q}]}).json()["tokens"]
        reply = client.completions.create(model=model, prompt=ids + lead_ids, temperature=0, max_tokens=max_tokens)
        return (lead + reply.choices[0].text).strip()

    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(one, questions))


def score(replies: dict, qa, persona: Persona | None) -> dict:
    out = {}
    for form, texts in replies.items():
        right = [is_correct(t, accepted) for t, (_, accepted) in zip(texts, qa)]
        out[form] = {"accuracy": sum(right) / len(qa), "right": right, "samples": texts[:3]}
        if persona is not None:
            out[form]["style"] = sum(persona.has_style(t) for t in texts) / len(qa)
    return out


def job_summary(job: dict) -> dict:
    return {"seconds": round(job["finished_at"] - job["started_at"], 1), **(job["metrics"] or {})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--personas", default=",".join(p.name for p in PERSONAS), help="comma-separated names")
    ap.add_argument("--questions", type=int, default=len(QA), help="the first N questions of the QA set")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--train-dtype", default="auto", help="the worker's (auto: bfloat16 on CPUs that compute it)")
    ap.add_argument("--serve-dtype", default="auto")
    ap.add_argument("--issue-job", action="store_true", help="also train each persona as the issue's report did")
    ap.add_argument("--threads", type=int, default=None, help="the worker's torch threads")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "personalization_quality.json"))
    ap.add_argument("--note", default="", help="a line about the machine, recorded with the results")
    args = ap.parse_args()
    personas = [p for p in PERSONAS if p.name in args.personas.split(",")]
    qa = QA[:args.questions]
    questions = [q for q, _ in qa]

    from prefix_store.redis_process import RedisServer

    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp, RedisServer(datadir=Path(tmp) / "redis") as redis:
        port = free_port()
        proc = start_server(redis.url, port, args, Path(tmp) / "serve.log")
        try:
            url = f"http://127.0.0.1:{port}"
            key = httpx.post(f"{url}/v1/admin/tenants", json={"tenant_id": "bench"},
                             headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()["api_key"]
            http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=600)
            http.patch("/v1/tenant/settings", json={"openai_user_prefix": True}).raise_for_status()
            client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=600)
            model = client.models.list().data[0].id
            base = score(ask(client, model, questions, None, args.max_tokens), qa, None)
            print(f"base model: accuracy chat {base['chat']['accuracy']:.0%}, text {base['text']['accuracy']:.0%}",
                  flush=True)
            # What the base model knows once its reply starts the persona's way: how much
            # accuracy the style itself costs this model, whatever the prefix does.
            for persona in personas:
                lead = persona.template.split("{answer}")[0]
                if lead:
                    led = score({"chat": ask_led(http, client, model, questions, lead, args.max_tokens)}, qa, None)
                    base[f"chat_led_{persona.name}"] = led["chat"]
                    print(f"base model led by {lead!r}: accuracy chat {led['chat']['accuracy']:.0%}", flush=True)
            results = {}
            for persona in personas:
                for name, extra in [(persona.name, {})] + ([(persona.name + "-issue-job", ISSUE_JOB)]
                                                           if args.issue_job else []):
                    job = train(http, name, persona, extra)
                    s = score(ask(client, model, questions, name, args.max_tokens), qa, persona)
                    kept = {form: _kept(base[form]["right"], s[form]["right"]) for form in s}
                    results[name] = {"job": job_summary(job), **{f: {**s[f], "knowledge_kept": kept[f]} for f in s}}
                    print(f"{name}: chat style {s['chat']['style']:.0%} accuracy {s['chat']['accuracy']:.0%} | text "
                          f"style {s['text']['style']:.0%} accuracy {s['text']['accuracy']:.0%} | "
                          f"{results[name]['job']}", flush=True)
        finally:
            proc.terminate()
            proc.wait(60)
    summary = {
        "model": model, "questions": len(qa), "max_tokens": args.max_tokens, "train_dtype": args.train_dtype,
        "serve_dtype": args.serve_dtype, "base": base, "personas": results,
        "wall_s": round(time.monotonic() - started, 1),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "note": args.note},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(summary))
    print("\n" + markdown(summary))
    print(f"wrote {out} and {out.with_suffix('.md')}")


def _kept(base_right: list[bool], right: list[bool]) -> float | None:
    """Of the questions the base model answers right, the share still answered right."""
    known = [r for b, r in zip(base_right, right) if b]
    return sum(known) / len(known) if known else None


def markdown(summary: dict) -> str:
    base = summary["base"]
    lines = [
        f"# Personalization quality: {summary['model']} through serve",
        "",
        f"Each persona: 8 prompt/completion examples sent to `POST /v1/users/<persona>/personalize` with default "
        f"settings; {summary['questions']} unseen QA questions asked with the openai client (chat: "
        "`/v1/chat/completions`; text: `/v1/completions`; the persona selected by OpenAI's `user`), greedy, at most "
        f"{summary['max_tokens']} tokens. Style = replies with the persona's marker; accuracy = right answers; "
        "relative = accuracy / the base model's through the same route; base model led by the opening = the base "
        "model's chat accuracy when its reply is made to start with the persona's opening words (what the style "
        "itself costs this model, whatever the prefix does); job = the job's own time and report.",
        "",
        "| persona | style (chat) | style (text) | accuracy (chat) | relative | base model led by the opening "
        "| accuracy (text) | relative | job | steps (best) | held-out loss (base model's) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| base model | | | {base['chat']['accuracy']:.0%} | | | {base['text']['accuracy']:.0%} | | | | |",
    ]
    for name, r in summary["personas"].items():
        j = r["job"]
        rel = {f: format(r[f]["accuracy"] / base[f]["accuracy"], ".0%") if base[f]["accuracy"] else "n/a"
               for f in ("chat", "text")}
        steps = f"{j.get('steps')}" + (f" ({j['best_step']})" if j.get("best_step") is not None else "")
        losses = f"{j.get('loss')} ({j.get('base_loss')}, {j.get('evaluated_on', '').replace('_', '-')})"
        led = base.get(f"chat_led_{name}")
        lines.append(f"| {name} | {r['chat']['style']:.0%} | {r['text']['style']:.0%} | {r['chat']['accuracy']:.0%} | "
                     f"{rel['chat']} | {'' if led is None else format(led['accuracy'], '.0%')} | "
                     f"{r['text']['accuracy']:.0%} | {rel['text']} | {j['seconds']:.0f} s | {steps} | {losses} |")
    m = summary["machine"]
    lines += ["", f"Training dtype {summary['train_dtype']}, serving dtype {summary['serve_dtype']}; whole run "
              f"{summary['wall_s']:.0f} s; machine: {m['cores']} CPU cores ({m['cpu']})."
              + (f" {m['note']}" if m["note"] else ""), "", "Samples (chat, first questions):", ""]
    for name, r in summary["personas"].items():
        lines.append(f"- {name}: {r['chat']['samples'][:2]!r}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
