"""Redis going away and coming back: clear errors meanwhile, recovery without a new store."""

from __future__ import annotations

import queue

import pytest
import redis
import torch

from prefix_store.errors import StoreUnavailableError
from prefix_store.redis_process import RedisServer
from prefix_store.store import PrefixStore
from tests.prefix_store.helpers import FINGERPRINT, drain, make_kv, wait_until


@pytest.fixture()
def own_redis():
    server = RedisServer()
    server.start()
    yield server
    server.close()


def test_every_call_raises_store_unavailable_while_redis_is_down(own_redis):
    store = PrefixStore(own_redis.url)
    record, _ = store.put("acme", "p", make_kv(0), model_fingerprint=FINGERPRINT)
    own_redis.stop()
    calls = [
        lambda: store.get("acme", "p"), lambda: store.get_record("acme", "p"),
        lambda: store.get_version("acme", "p", record.version), lambda: store.list("acme"),
        lambda: store.put("acme", "p", make_kv(1), model_fingerprint=FINGERPRINT),
        lambda: store.delete("acme", "p"), lambda: store.create_tenant("acme"),
        lambda: store.tenant_for_key("ps-" + "a" * 32), lambda: store.list_tenants(),
    ]
    for call in calls:
        with pytest.raises(StoreUnavailableError, match=f"127.0.0.1:{own_redis.port}") as info:
            call()
        assert isinstance(info.value.__cause__, (redis.ConnectionError, redis.TimeoutError))
    assert store.ping() is False
    store.close()


def test_the_same_store_works_again_after_redis_restarts(own_redis):
    store = PrefixStore(own_redis.url)
    store.put("acme", "p", make_kv(0), model_fingerprint=FINGERPRINT)
    own_redis.stop()
    with pytest.raises(StoreUnavailableError):
        store.get("acme", "p")
    own_redis.start()  # same port; no persistence here, so the data is gone
    assert store.ping() is True
    assert store.get("acme", "p") is None
    record, created = store.put("acme", "p", make_kv(1), model_fingerprint=FINGERPRINT)
    assert created and torch.equal(store.get("acme", "p")[1], make_kv(1))
    store.close()


def test_append_only_redis_keeps_prefixes_and_tenants_across_restarts(tmp_path):
    server = RedisServer(datadir=tmp_path / "redis", appendonly=True)
    server.start()
    try:
        store = PrefixStore(server.url)
        record, _ = store.put("acme", "p", make_kv(0, torch.bfloat16), model_fingerprint=FINGERPRINT)
        key = store.create_tenant("acme")
        server.stop()
        server.start()
        got_record, kv = store.get("acme", "p")
        assert got_record == record and torch.equal(kv, make_kv(0, torch.bfloat16))
        assert store.tenant_for_key(key) == "acme"
        store.close()
    finally:
        server.close()
    assert (tmp_path / "redis").exists()  # a caller's data directory is never removed


def test_subscription_resubscribes_after_redis_restarts(own_redis):
    store = PrefixStore(own_redis.url)
    events: queue.Queue = queue.Queue()
    reconnected = []
    sub = store.subscribe(events.put, on_reconnect=lambda: reconnected.append(True))
    try:
        assert sub.ready
        own_redis.stop()
        assert wait_until(lambda: not sub.ready)
        own_redis.start()
        assert wait_until(lambda: sub.ready)
        assert reconnected == [True]
        store.put("acme", "after", make_kv(0), model_fingerprint=FINGERPRINT)
        got = drain(events, 1)
        assert [e.prefix_id for e in got] == ["after"]
    finally:
        sub.close()
        store.close()


def test_redis_server_listens_on_loopback_only_with_protected_mode(tmp_path):
    with RedisServer(datadir=tmp_path, appendonly=True) as server:
        client = redis.Redis.from_url(server.url)
        config = {k: v for name in ["bind", "protected-mode", "appendonly", "dir", "maxmemory-policy"]
                  for k, v in client.config_get(name).items()}
        client.close()
        assert server.url.startswith("redis://127.0.0.1:")
        assert config["bind"] == "127.0.0.1" and config["protected-mode"] == "yes"
        assert config["appendonly"] == "yes" and config["dir"] == str(tmp_path)
        assert config["maxmemory-policy"] == "noeviction"
    assert not server.running


def test_a_redis_server_that_cannot_start_says_why(own_redis):
    clash = RedisServer(port=own_redis.port)  # the port is taken
    try:
        with pytest.raises(RuntimeError, match=f"port {own_redis.port} exited") as info:
            clash.start()
        assert "Address already in use" in str(info.value)  # the log tail says why
        assert not clash.running
    finally:
        clash.close()


def test_a_port_chosen_here_and_taken_before_redis_binds_it_moves(own_redis, monkeypatch):
    # free_port() gave a port that another socket (here: own_redis) holds by the time redis
    # binds it; a RedisServer that chose its port itself starts on another one
    import prefix_store.redis_process as redis_process

    ports = iter([own_redis.port])
    real = redis_process.free_port
    monkeypatch.setattr(redis_process, "free_port", lambda host="127.0.0.1": next(ports, None) or real(host))
    moved = RedisServer()
    try:
        assert moved.port == own_redis.port
        moved.start()
        assert moved.port != own_redis.port and moved.running
        assert redis.Redis.from_url(moved.url).ping()
    finally:
        moved.close()
