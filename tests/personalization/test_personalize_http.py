"""Personalization through HTTP: a real server process, its real worker process, real Redis.

A user prefix is trained on top of a task prefix from two examples the base model cannot
produce; served as task ++ user it must reproduce them. Cancelling publishes nothing, and
a worker killed in the middle of a job leaves no partial prefix: the job is finished by
the restarted worker.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
from safetensors.torch import save

from server.training.prefix_forward import prefix_past
from tests.personalization.conftest import LIMITS, is_worker, wait_for, wait_while_advancing
from tests.training.conftest import MEMORY_EXAMPLES, make_byte_tokenizer, make_tiny_llama

EXAMPLES = [{"prompt": p, "completion": c} for p, c in MEMORY_EXAMPLES]
TASK = "greeter"
FINISHED = ("succeeded", "failed", "cancelled")


@pytest.fixture(scope="module")
def acme(service) -> str:
    """A tenant with a task prefix (the model's own K/V of a few real words)."""
    key = service.create_tenant("acme")
    tok = make_byte_tokenizer()
    kv = prefix_past(make_tiny_llama(), None, tok("task: greet\n", add_special_tokens=False)["input_ids"])
    with service.client(key) as c:
        r = c.put(f"/v1/prefixes/{TASK}", files={"file": ("task.safetensors", save({"prefix_kv": kv.contiguous()}))})
    assert r.status_code == 201, r.text
    return key


def submit(c, user: str, **body) -> str:
    r = c.post(f"/v1/users/{user}/personalize", json={"examples": EXAMPLES, **body})
    assert r.status_code == 202, r.text
    assert r.headers["location"] == f"/v1/jobs/{r.json()['job_id']}"
    return r.json()["job_id"]


def job(c, job_id: str) -> dict:
    r = c.get(f"/v1/jobs/{job_id}")
    assert r.status_code == 200, r.text
    return r.json()


def published_versions(c, user: str) -> set[str]:
    """The version of `user:<user>` visible now (empty set while there is none)."""
    r = c.get(f"/v1/prefixes/user:{user}")
    assert r.status_code in (200, 404), r.text
    return {r.json()["version"]} if r.status_code == 200 else set()


def generate(c, prompt: str, **body) -> dict:
    r = c.post("/v1/generate", json={"prompt": prompt, "max_tokens": 30, "temperature": 0.0, **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_bad_requests_are_refused_before_queueing(service, acme):
    other = service.create_tenant("globex")
    cases = [
        ({"examples": EXAMPLES * 3}, 400, "6 examples; at most 4"),
        ({"examples": EXAMPLES, "steps": 30000}, 400, "steps must be between 1 and 20000, got 30000"),
        ({"examples": EXAMPLES, "num_virtual_tokens": 33}, 400, "num_virtual_tokens must be between 1 and 32, got 33"),
        ({"examples": EXAMPLES, "learning_rate": 0.5}, 400, "learning_rate must be in (0, 0.1], got 0.5"),
        ({"examples": [{"prompt": "x" * 40, "completion": "y" * 30}]}, 400,
         "examples[0] has 71 tokens (prompt 40 + completion 30 + EOS); at most 64"),
        ({"examples": []}, 400, "examples"),
        ({"examples": EXAMPLES, "epochs": 3}, 400, "epochs"),
        ({"examples": EXAMPLES, "base_prefix_id": "nope"}, 404, "base_prefix_id: prefix 'nope' not found"),
    ]
    with service.client(acme) as c:
        for body, status, message in cases:
            r = c.post("/v1/users/ada/personalize", json=body)
            assert r.status_code == status, (body, r.text)
            assert message in r.json()["error"]["message"], (body, r.text)
        r = c.post("/v1/users/a%20b/personalize", json={"examples": EXAMPLES})
        assert r.status_code == 400 and "cannot name a prefix" in r.json()["error"]["message"]
        assert c.get("/v1/jobs/job-" + "0" * 32).status_code == 404
    with service.client(other) as c:  # another tenant's task prefix is not there
        r = c.post("/v1/users/ada/personalize", json={"examples": EXAMPLES, "base_prefix_id": TASK})
        assert r.status_code == 404
    with service.client(None) as c:
        assert c.post("/v1/users/ada/personalize", json={"examples": EXAMPLES}).status_code == 401


def test_job_trains_a_user_prefix_that_serves_after_the_task_prefix(service, acme):
    with service.client(acme) as c:
        bare = generate(c, EXAMPLES[0]["prompt"], prefix_id=TASK)["text"]
        assert bare != EXAMPLES[0]["completion"]  # the base model (and task) alone do not say it
        # kl_weight 1: the default (30, tuned on SmolLM2's personas) holds a tiny random model
        # too close to its base to memorise random bytes; this test is about the job itself
        job_id = submit(c, "ada", base_prefix_id=TASK, steps=400, num_virtual_tokens=10, learning_rate=5e-3,
                        kl_weight=1)
        seen, versions = [], set()
        while True:
            j = job(c, job_id)
            seen.append((j["status"], j["progress"]))
            if j["status"] in FINISHED:
                break
            versions |= published_versions(c, "ada")
            assert len(seen) < 20000, "the job never finished"
            time.sleep(0.01)  # a bound of ~200 s at least, not a busy loop racing the worker for the cores

        assert j["status"] == "succeeded", j
        assert j["progress"] == 1.0 and j["step"] == j["steps"] == 400 and j["attempts"] == 1
        assert j["prefix_id"] == "user:ada" and j["error"] is None
        assert j["loss"] < 0.5  # from ~6.5 (uniform over 257 byte tokens)
        assert seen[0][1] == 0.0 and seen[0][0] in ("queued", "running")
        progress = [p for _, p in seen]
        assert progress == sorted(progress) and progress[-1] == 1.0
        assert any(0.0 < p < 1.0 for p in progress), seen  # reported while it trains

        # nothing half-trained was ever published: only the final version was visible, if any
        assert versions <= {j["version"]}, (versions, j["version"])
        info = c.get("/v1/prefixes/user:ada").json()
        assert info["num_virtual_tokens"] == 10 and info["version"] == j["version"]
        assert job_id in info["description"] and f"after task prefix {TASK}@" in info["description"]
        for example in EXAMPLES:
            out = generate(c, example["prompt"], prefix_id=TASK, user_id="ada")
            assert out["text"] == example["completion"] and out["finish_reason"] == "stop"
            assert [p["id"] for p in out["prefix"]] == [TASK, "user:ada"]
            listed = generate(c, example["prompt"], prefix_id=[TASK, "user:ada"])
            assert listed["token_ids"] == out["token_ids"]  # user_id = the list, in that order
        # served after anything but the task prefix it was trained after: refused, unless allowed
        for names in (["user:ada"], ["user:ada", TASK], [TASK, TASK, "user:ada"]):
            r = c.post("/v1/generate", json={"prompt": "x", "prefix_id": names, "max_tokens": 2})
            assert r.status_code == 400 and r.json()["error"]["type"] == "untrained_composition", (names, r.text)
            assert f"was trained after '{TASK}' (version" in r.json()["error"]["message"]
        r = c.post("/v1/generate", json={"prompt": "x", "user_id": "ada", "max_tokens": 2,
                                         "allow_untrained_composition": True})
        assert r.status_code == 200 and [p["id"] for p in r.json()["prefix"]] == ["user:ada"]
        r = c.post("/v1/completions", json={"model": TASK, "user_id": "ada", "max_tokens": 2, "prompt": "x"})
        assert r.status_code == 200, r.text  # the OpenAI routes check the same way
        model = c.get("/v1/models").json()["data"][0]["id"]  # the base model
        r = c.post("/v1/completions", json={"model": model, "user_id": "ada", "max_tokens": 2, "prompt": "x"})
        assert r.status_code == 400 and r.json()["error"]["type"] == "untrained_composition"
        # a finished job cannot be cancelled any more
        r = c.delete(f"/v1/jobs/{job_id}")
        assert r.status_code == 409 and "already succeeded" in r.json()["error"]["message"]
    other = service.create_tenant("initech")
    with service.client(other) as c:  # jobs and user prefixes are the tenant's own
        assert c.get(f"/v1/jobs/{job_id}").status_code == 404
        assert c.delete(f"/v1/jobs/{job_id}").status_code == 404
        r = c.post("/v1/generate", json={"prompt": "x", "user_id": "ada"})
        assert r.status_code == 404


def test_cancel_stops_the_job_and_publishes_nothing(service, acme):
    with service.client(acme) as c:
        job_id = submit(c, "cy", steps=LIMITS["--max-train-steps"])
        wait_for(lambda: job(c, job_id)["progress"] > 0, 60, "the job to start training", service)
        r = c.delete(f"/v1/jobs/{job_id}")
        assert r.status_code == 202 and r.json()["cancel_requested"], r.text  # running: stops at its next step
        j = wait_for(lambda: (j := job(c, job_id))["status"] in FINISHED and j, 60, "the job to stop", service)
        assert j["status"] == "cancelled" and j["prefix_id"] is None and j["error"] is None
        assert j["step"] < j["steps"]
        assert c.get("/v1/prefixes/user:cy").status_code == 404
        assert c.delete(f"/v1/jobs/{job_id}").status_code == 200  # cancelling again is harmless


def test_concurrent_jobs_per_tenant_are_limited(service, acme):
    with service.client(acme) as c:
        ids = [submit(c, f"limit{i}", steps=LIMITS["--max-train-steps"]) for i in range(2)]
        r = c.post("/v1/users/limit2/personalize", json={"examples": EXAMPLES})
        assert r.status_code == 429 and r.headers["retry-after"]
        assert "has 2 personalization jobs queued or running; the limit is 2" in r.json()["error"]["message"]
        for job_id in ids:
            assert c.delete(f"/v1/jobs/{job_id}").status_code in (200, 202)
        for job_id in ids:
            wait_for(lambda: job(c, job_id)["status"] == "cancelled", 60, "the cancel", service)
        assert c.get("/v1/prefixes/user:limit0").status_code == 404


def test_another_tenants_short_job_runs_while_a_long_job_trains(service, acme):
    """The issue's case through HTTP: acme's long job holds the only worker; umbrella's 1-step
    job, queued after it, finishes while acme's job is still running (they take turns)."""
    other = service.create_tenant("umbrella")
    with service.client(acme) as a, service.client(other) as g:
        long_id = submit(a, "eve", steps=LIMITS["--max-train-steps"])
        wait_for(lambda: job(a, long_id)["progress"] > 0, 60, "the long job to start training", service)
        short_id = submit(g, "fay", steps=1)
        done = wait_for(lambda: (j := job(g, short_id))["status"] in FINISHED and j, 60, "the short job", service)
        assert done["status"] == "succeeded", done
        still = job(a, long_id)
        assert still["status"] == "running" and still["step"] < still["steps"], still
        assert a.delete(f"/v1/jobs/{long_id}").status_code == 202
        wait_for(lambda: job(a, long_id)["status"] == "cancelled", 60, "the cancel", service)


def test_a_killed_workers_jobs_are_finished_by_the_restarted_worker(service, acme):
    """The worker holds two tenants' jobs (taking turns) when it is killed: both are taken
    over and finished, and no partial prefix appears."""
    other = service.create_tenant("hooli")
    with service.client(acme) as c, service.client(other) as h:
        job_id = submit(c, "dee", steps=1500)
        other_id = submit(h, "gus", steps=300)
        wait_for(lambda: job(c, job_id)["progress"] > 0 and job(h, other_id)["progress"] > 0, 60,
                 "both jobs to start training", service)
        [pid] = [p for p in service.worker_pids() if is_worker(p)]
        os.kill(pid, signal.SIGKILL)
        assert job(c, job_id)["status"] == "running", "the job finished before the worker was killed"
        assert job(h, other_id)["status"] == "running", "the job finished before the worker was killed"

        versions = set()

        def observe():
            versions.update(published_versions(c, "dee"))
            return job(c, job_id)

        # The restarted worker trains both jobs again from step 0, taking turns: on a busy
        # machine that takes minutes, so the wait is bounded by a stall in what the server
        # reports (status, attempt, step), not by a deadline.
        j = wait_while_advancing(observe, lambda j: j["status"] in FINISHED,
                                 "the job to be taken over and finished", service)
        assert j["status"] == "succeeded" and j["attempts"] == 2, j
        # while the job was retried no partial user prefix appeared: only the final one, if any
        assert versions <= {j["version"]}, (versions, j["version"])
        assert j["step"] == 1500 and j["progress"] == 1.0
        assert c.get("/v1/prefixes/user:dee").json()["num_virtual_tokens"] == 10
        g = wait_while_advancing(lambda: job(h, other_id), lambda g: g["status"] in FINISHED, "the other job", service)
        assert g["status"] == "succeeded" and g["attempts"] == 2 and g["step"] == 300, g
    assert len(service.worker_pids()) == 2  # serve started a new worker
    assert f"(pid {pid}) exited with code -9" in service.log()


def test_deleting_a_tenant_stops_its_jobs_and_nothing_comes_back_with_the_name(service):
    key = service.create_tenant("carol-co")
    with service.client(key) as c:
        running = submit(c, "carol", steps=LIMITS["--max-train-steps"])
        wait_for(lambda: job(c, running)["progress"] > 0, 60, "the job to start training", service)
        queued = submit(c, "carol2", steps=LIMITS["--max-train-steps"])
    with service.client() as admin:
        assert admin.delete("/v1/admin/tenants/carol-co").status_code == 204
        again = admin.post("/v1/admin/tenants", json={"tenant_id": "carol-co"})
        assert again.status_code == 201
        new_key = admin.post("/v1/admin/tenants", json={"tenant_id": "carol-new"}).json()["api_key"]
    with service.client(key) as old:
        assert old.get("/v1/prefixes").status_code == 401  # the old key is gone at once
    with service.client(new_key) as c:
        # the single worker runs this only after it dropped the deleted tenant's job
        done = submit(c, "zed", steps=1)
        wait_while_advancing(lambda: job(c, done), lambda j: j["status"] in FINISHED, "the next job", service)
        assert job(c, done)["status"] == "succeeded"
    with service.client(again.json()["api_key"]) as c:
        for job_id in (running, queued):
            assert c.get(f"/v1/jobs/{job_id}").status_code == 404
        assert c.get("/v1/prefixes").json()["data"] == []
        assert c.get("/v1/prefixes/user:carol").status_code == 404
