"""The README's "API by example" block, run command by command against a real `serve` with its
worker (tiny model), so that the README cannot drift from what the server does.

Each `curl` line of the block is parsed (method, url, headers, -d body, -F file) and sent as
it is; `VAR=$(curl ... | python3 -c '...["field"]...')` keeps that field of the answer; the
zip of the adapter folder is a PEFT adapter for the tiny model. Every answer must be a 2xx,
and the job must succeed before the commands after `GET /v1/jobs/$JOB` run (a reader waits
for it there).
"""

from __future__ import annotations

import json
import re
import shlex
import time
from pathlib import Path

import httpx

from tests.api.harness import make_adapter
from tests.personalization.conftest import ADMIN_KEY
from tests.training.conftest import make_tiny_llama

README = Path(__file__).resolve().parents[2] / "README.md"


def example_block() -> str:
    text = README.read_text()
    section = text[text.index("## The API by example"):]
    start = section.index("```bash\n") + len("```bash\n")
    return section[start:section.index("```", start)]


def commands(block: str) -> list[str]:
    """Logical lines (continuations joined), comments and blank lines dropped."""
    out, current = [], ""
    for line in block.splitlines():
        stripped = line.split("  #")[0].rstrip() if not line.lstrip().startswith("#") else ""
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        if current.strip():
            out.append(current.strip())
        current = ""
    return out


def parse_curl(words: list[str]) -> dict:
    request = {"method": None, "url": None, "headers": {}, "data": None, "file": None}
    i = 1
    while i < len(words):
        w = words[i]
        if w == "-s":
            i += 1
            continue
        if w in ("-X", "-H", "-d", "-F"):
            value = words[i + 1]
            if w == "-X":
                request["method"] = value
            elif w == "-H":
                name, _, v = value.partition(":")
                request["headers"][name.strip()] = v.strip()
            elif w == "-d":
                request["data"] = value
            else:
                field, _, path = value.partition("=@")
                request["file"] = (field, path)
            i += 2
            continue
        assert w.startswith("http"), f"an argument the test does not know: {w!r}"
        request["url"] = w
        i += 1
    request["method"] = request["method"] or ("POST" if request["data"] or request["file"] else "GET")
    return request


def test_the_readme_api_example_runs_as_written(service, tmp_path):
    variables = {"URL": service.url, "ADMIN": ADMIN_KEY}
    files = {"bot.zip": make_adapter(260, 4, seed=3, base=make_tiny_llama()).zip_bytes}
    ran = []
    for line in commands(example_block()):
        if line.startswith("URL=") or line.startswith("(cd my-adapter"):
            continue  # the test's own address and keys; the adapter zip is made above
        assign = re.match(r"^(\w+)=\$\((curl .*?)\|\s*python3 -c '.*?\[\"(\w+)\"\].*'\)$", line)
        command, var, field = (assign.group(2), assign.group(1), assign.group(3)) if assign else (line, None, None)
        assert command.startswith("curl "), f"a README command the test does not know: {line!r}"
        for name, value in variables.items():
            command = command.replace(f"${name}", value)
        req = parse_curl(shlex.split(command))
        sent = {"headers": req["headers"], "timeout": 120}
        if req["data"] is not None:
            sent["content"] = req["data"].encode()
        if req["file"] is not None:
            field_name, path = req["file"]
            sent["files"] = {field_name: (path, files[path])}
        r = httpx.request(req["method"], req["url"], **sent)
        assert 200 <= r.status_code < 300, (line, r.status_code, r.text)
        ran.append((req["method"], req["url"].removeprefix(service.url)))
        if var is not None:
            variables[var] = r.json()[field]
        if re.match(r"^/v1/jobs/[\w-]+$", ran[-1][1]):  # wait for the job, as a reader would
            deadline = time.monotonic() + 300
            while r.json()["status"] in ("queued", "running"):
                assert time.monotonic() < deadline, f"the README's job never finished: {r.text}"
                time.sleep(0.5)
                r = httpx.request(req["method"], req["url"], **sent)
            assert r.json()["status"] == "succeeded", r.text
    last = json.loads(r.text)
    assert "text" in last and [p["id"] for p in last["prefix"]] == ["support-bot", "user:bob"]
    # every command of the block ran: tenant, rotation, upload, prompt prefix, generate, job, generate
    assert [m for m, _ in ran] == ["POST", "POST", "PUT", "PUT", "POST", "POST", "GET", "POST"], ran
