"""A persona trained from prompt/completion pairs and a chat works through every way a client
asks (issue 13): `/v1/generate` with `prompt` or `messages`, and the official openai client
on `/v1/chat/completions` and `/v1/completions`, with `user_id` or, once the tenant opts in,
OpenAI's own `user` field. A real `serve` with its worker, on a tiny Llama whose tokenizer
has a chat template."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from tests.personalization.conftest import Service, start_service, wait_for
from tests.training.conftest import MEMORY_EXAMPLES

PAIRS = [{"prompt": p, "completion": c} for p, c in MEMORY_EXAMPLES]
CHAT = {"messages": [{"role": "user", "content": "name: Cy"}, {"role": "assistant", "content": "see you soon"}]}


@pytest.fixture(scope="module")
def chat_service(tmp_path_factory) -> Iterator[Service]:
    with start_service(tmp_path_factory.mktemp("chat-persona"), chat_template=True) as service:
        yield service


@pytest.fixture(scope="module")
def trained(chat_service) -> tuple[str, dict]:
    """(tenant key, the finished job) of user ada's persona."""
    key = chat_service.create_tenant("acme")
    with chat_service.client(key) as c:
        # kl_weight 0: a random tiny model has no knowledge to keep (the term is tested in
        # tests/training/test_recipe.py); memorising exactly is what shows each form is trained
        r = c.post("/v1/users/ada/personalize", json={"examples": PAIRS + [CHAT], "steps": 300, "kl_weight": 0,
                                                            "learning_rate": 5e-3})
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
        job = wait_for(lambda: (j := c.get(f"/v1/jobs/{job_id}").json())["status"] in ("succeeded", "failed") and j,
                       600, "the job to finish", chat_service)
    assert job["status"] == "succeeded", job
    return key, job


def test_the_job_reports_its_loss_and_the_base_models(trained):
    _, job = trained
    m = job["metrics"]
    assert m["examples"] == 3 and m["train_sequences"] == 5  # each pair as text and as a chat turn, one chat
    assert m["held_out_examples"] == 0 and m["evaluated_on"] == "training"  # too few examples to hold any out
    assert m["steps"] == m["max_steps"] == job["steps"] == 300
    assert m["loss"] < 0.5 < 2.0 < m["base_loss"]  # the prefix learned what the bare model cannot say


def test_the_persona_answers_prompts_and_messages_on_generate(chat_service, trained):
    key, _ = trained
    with chat_service.client(key) as c:
        for pair in PAIRS:
            body = {"user_id": "ada", "max_tokens": 30, "temperature": 0.0}
            as_text = c.post("/v1/generate", json={**body, "prompt": pair["prompt"]}).json()
            assert as_text["text"] == pair["completion"] and as_text["finish_reason"] == "stop"
            messages = [{"role": "user", "content": pair["prompt"]}]
            as_chat = c.post("/v1/generate", json={**body, "messages": messages}).json()
            assert as_chat["text"] == pair["completion"].strip() and as_chat["finish_reason"] == "stop"
            bare = c.post("/v1/generate", json={"messages": messages, "max_tokens": 30, "temperature": 0.0}).json()
            assert bare["text"] != as_chat["text"]  # the prefix is what answers


def test_the_openai_client_reaches_the_persona_by_user_id_and_by_user_once_opted_in(chat_service, trained):
    key, _ = trained
    client = openai.OpenAI(base_url=f"{chat_service.url}/v1", api_key=key, max_retries=0)
    base_model = client.models.list().data[0].id

    def chat(content: str, **extra) -> str:
        reply = client.chat.completions.create(model=base_model, temperature=0, max_tokens=30,
                                               messages=[{"role": "user", "content": content}], **extra)
        return reply.choices[0].message.content

    prompt, answer = PAIRS[0]["prompt"], PAIRS[0]["completion"].strip()
    assert chat(prompt, extra_body={"user_id": "ada"}) == answer
    assert chat("name: Cy", extra_body={"user_id": "ada"}) == "see you soon"  # the chat example
    bare = chat(prompt)
    assert bare != answer
    with chat_service.client(key) as c:
        assert c.get("/v1/tenant/settings").json() == {"openai_user_prefix": False}
        assert chat(prompt, user="ada") == bare  # off by default: `user` is only a tag
        r = c.patch("/v1/tenant/settings", json={"openai_user_prefix": True})
        assert r.status_code == 200 and r.json() == {"openai_user_prefix": True}
        assert c.patch("/v1/tenant/settings", json={"nope": True}).status_code == 400
    assert chat(prompt, user="ada") == answer
    assert chat(prompt, user="someone-without-a-prefix") == bare  # no such user prefix: the bare model
    completion = client.completions.create(model=base_model, prompt=PAIRS[1]["prompt"], temperature=0,
                                           max_tokens=30, user="ada")
    assert completion.choices[0].text == PAIRS[1]["completion"]
    # the setting is the tenant's own
    other = chat_service.create_tenant("globex")
    with chat_service.client(other) as c:
        assert c.get("/v1/tenant/settings").json() == {"openai_user_prefix": False}


def test_bad_chat_examples_are_refused_before_queueing(chat_service, trained):
    key, _ = trained
    cases = [
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]},
         "needs an assistant message"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}]}, "role"),
        ({"prompt": "hi", "completion": "yo", "messages": CHAT["messages"]}, "either messages or prompt"),
        ({"prompt": "x" * 40, "completion": "y" * 10}, "examples[0] (as a chat turn) has"),
    ]
    with chat_service.client(key) as c:
        for example, message in cases:
            r = c.post("/v1/users/bo/personalize", json={"examples": [example]})
            assert r.status_code in (400, 422), (example, r.text)
            assert message in r.text, (example, r.text)
