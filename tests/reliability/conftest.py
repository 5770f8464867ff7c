"""A server under attack: the real app (tiny Llama, real uvicorn, real Redis) with two tenants,
`acme` (the attacker's key) and a victim whose prefixes, user prefix and jobs must stay out
of reach, and the check that no answer leaks a secret.

Limits are small on purpose, so fuzzing hits them: max_tokens above 16 is refused by
configuration (max_output_tokens), bodies above 64 KiB and uploads above 256 KiB are 413.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.api.harness import ADMIN_KEY, Stack, make_adapter, start_stack, upload

REPO = Path(__file__).resolve().parents[2]
MAX_OUTPUT_TOKENS = 16
VICTIM = "zeta-victim"  # a tenant id the attacker must never read anywhere
VICTIM_DESCRIPTION = "victim-private-description-7f3a"
# PREFIX_SERVE_LONG_RUN=1: the documented longer fuzzing run (10x the examples)
SCALE = 10 if os.environ.get("PREFIX_SERVE_LONG_RUN") else 1


@dataclass
class World:
    stack: Stack
    attacker_key: str
    victim_key: str
    victim_prefixes: dict[str, str]  # id -> version
    victim_jobs: list[str]
    attacker_prefix: str = "mine"
    secrets: set[str] = field(default_factory=set)  # what the attacker must never see

    def victim_state(self) -> tuple:
        """Everything of the victim that the attacker must not be able to change."""
        records = self.stack.store.list(VICTIM)
        jobs = [self.stack.ctx.jobs.get(VICTIM, j) for j in self.victim_jobs]
        return (tuple((r.prefix_id, r.version, r.description) for r in records),
                tuple((j.job_id, j.status, j.cancel_requested) for j in jobs))


@pytest.fixture(scope="module")
def world(redis_server, vocab, tokenizer) -> Iterator[World]:
    stack = start_stack(redis_server.url, vocab, tokenizer, max_output_tokens=MAX_OUTPUT_TOKENS, max_queue=64)
    try:
        attacker = stack.create_tenant("acme")
        victim = stack.create_tenant(VICTIM)
        adapter = make_adapter(vocab, 4, seed=5)
        versions = {}
        with stack.client(victim) as c:
            for pid in ("secret", "shared-looking", "user:bob"):
                r = upload(c, pid, adapter.zip_bytes if pid != "secret" else make_adapter(vocab, 5, seed=6).zip_bytes,
                           description=VICTIM_DESCRIPTION)
                assert r.status_code == 201, r.text
                versions[pid] = r.json()["version"]
            jobs = []
            for user in ("bob", "carol"):  # no worker runs here: they stay queued
                r = c.post(f"/v1/users/{user}/personalize",
                           json={"examples": [{"prompt": "hi", "completion": "there"}], "steps": 5})
                assert r.status_code == 202, r.text
                jobs.append(r.json()["job_id"])
        with stack.client(attacker) as c:  # its own tensor: versions are content hashes
            assert upload(c, "mine", make_adapter(vocab, 4, seed=7).zip_bytes).status_code == 201
        secrets = {ADMIN_KEY, victim, VICTIM, VICTIM_DESCRIPTION, *versions.values()}
        yield World(stack, attacker, victim, versions, jobs, secrets=secrets)
    finally:
        stack.stop()


# Internals that no answer may show: server paths, tracebacks, the Redis address and key names.
_INTERNALS = re.compile(r"Traceback|File \"|site-packages|/tmp/|/root/|/home/|redis://|\{t:|"
                        + re.escape(str(REPO)))


def leaks(text: str, secrets: set[str], namespace: str, sent: str = "") -> list[str]:
    """The secrets and internals found in an answer (empty: clean); an error may quote what
    the client sent (`sent`), nothing else."""
    found = [s for s in secrets if s and s in text and s not in sent]
    found += [m for m in _INTERNALS.findall(text) if m not in sent]
    if f"{namespace}:" in text:
        found.append(f"the store namespace {namespace}:")
    return found


def check_answer(status: int, content_type: str, text: str, secrets: set[str], namespace: str,
                 sent: str = "") -> list[str]:
    """What is wrong with one answer: a 5xx, an error that is not our JSON shape, a leak."""
    problems = []
    if status >= 500:
        problems.append(f"status {status}")
    if 400 <= status < 500 and status != 499:
        if not content_type.startswith("application/json"):
            problems.append(f"{status} error is not JSON")
        else:
            import json

            try:
                error = json.loads(text)["error"]
                assert isinstance(error["type"], str) and isinstance(error["message"], str)
            except (ValueError, KeyError, TypeError, AssertionError):
                problems.append(f"{status} body is not {{error: {{type, message}}}}")
    problems += [f"leaks {s!r}" for s in leaks(text, secrets, namespace, sent)]
    return problems
