"""The shared-memory arena: slots in and out (every dtype, across processes), exact offsets of
first fit, merging on free, exhaustion (None: the caller falls back to the pipe), bad frees
and slots, and no segment left behind."""

from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys

import pytest
import torch

from server.engine.prefix_arena import ALIGN, SEGMENT_PREFIX, ArenaSlot, PrefixArena


@pytest.fixture
def arena():
    a = PrefixArena.create(16 * ALIGN)
    yield a
    a.close()
    a.unlink()


def _tensor(nbytes: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    n = nbytes // torch.empty((), dtype=dtype).element_size()
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)).to(dtype)


def test_a_slot_gives_back_the_exact_tensor_in_every_dtype(arena):
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        kv = torch.randn(2, 2, 3, 5, 4, generator=torch.Generator().manual_seed(1)).to(dtype)
        slot = arena.put(kv)
        back = arena.take(slot)
        assert back.dtype == dtype and back.shape == kv.shape and torch.equal(back, kv)
        kv.zero_()  # the arena holds its own copy
        arena.free(slot.id)
        assert not torch.equal(back, kv)


def test_first_fit_offsets_and_merging_on_free(arena):
    a = arena.put(_tensor(4 * ALIGN))
    b = arena.put(_tensor(ALIGN + 4))  # rounded up to 2 * ALIGN
    c = arena.put(_tensor(4 * ALIGN))
    assert (a.offset, b.offset, c.offset) == (0, 4 * ALIGN, 6 * ALIGN)
    assert arena.used_bytes == 10 * ALIGN and len(arena) == 3
    arena.free(b.id)
    d = arena.put(_tensor(ALIGN))  # first fit: the hole b left
    assert d.offset == 4 * ALIGN
    arena.free(a.id)
    arena.free(d.id)  # a's extent, d's and the rest of b's hole merge into one of 6 * ALIGN
    e = arena.put(_tensor(6 * ALIGN))
    assert e.offset == 0
    arena.free(c.id)
    arena.free(e.id)
    assert arena.used_bytes == 0 and len(arena) == 0
    assert arena.put(_tensor(16 * ALIGN)).offset == 0  # everything merged back into one extent


def test_a_full_arena_says_so_and_counts_the_fallback(arena):
    big = arena.put(_tensor(12 * ALIGN))
    assert arena.put(_tensor(8 * ALIGN)) is None  # 4 * ALIGN are left
    assert arena.fallbacks == 1
    small = arena.put(_tensor(4 * ALIGN))
    assert small is not None and small.offset == 12 * ALIGN
    assert arena.put(_tensor(4)) is None  # not a byte left
    arena.free(big.id)
    assert arena.put(_tensor(8 * ALIGN)) is not None  # room again once the engine copied one out
    assert arena.fallbacks == 2


def test_bad_frees_and_slots_are_refused_with_the_numbers(arena):
    slot = arena.put(_tensor(ALIGN))
    arena.free(slot.id)
    with pytest.raises(ValueError, match=f"slot {slot.id} is not allocated"):
        arena.free(slot.id)
    with pytest.raises(ValueError, match="does not fit arena .* of 1024 bytes"):
        arena.take(ArenaSlot(99, 15 * ALIGN, (2 * ALIGN,), "float32"))
    with pytest.raises(ValueError, match="holds host tensors"):
        arena.put(torch.zeros(4, device="meta"))


def test_a_closed_arena_takes_nothing_and_frees_quietly():
    a = PrefixArena.create(4 * ALIGN)
    slot = a.put(_tensor(ALIGN))
    a.close()
    a.close()  # idempotent
    assert a.put(_tensor(ALIGN)) is None
    a.free(slot.id)  # nothing to give back to
    with pytest.raises(ValueError, match="is closed"):
        a.take(slot)
    a.unlink()
    assert not os.path.exists(f"/dev/shm/{a.name}")


def _read_in_child(name: str, slot: ArenaSlot, out) -> None:
    reader = PrefixArena.attach(name)
    out.send(reader.take(slot).tolist())
    reader.close()


def test_another_process_reads_the_slot_and_nothing_is_left_in_dev_shm():
    a = PrefixArena.create(1 << 16)
    assert a.name.startswith(SEGMENT_PREFIX) and os.path.exists(f"/dev/shm/{a.name}")
    kv = torch.randn(3, 7, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    a.put(_tensor(100))  # the slot under test does not start at offset 0
    slot = a.put(kv)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_read_in_child, args=(a.name, slot, child))
    proc.start()
    got = parent.recv()
    proc.join(30)
    assert proc.exitcode == 0
    assert torch.equal(torch.tensor(got, dtype=torch.bfloat16), kv)
    a.close()
    a.unlink()
    assert not os.path.exists(f"/dev/shm/{a.name}")


def test_a_new_arena_unlinks_the_segments_of_dead_owners_only():
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = f"/dev/shm/{SEGMENT_PREFIX}{dead.pid}-deadbeef"
    alive = f"/dev/shm/{SEGMENT_PREFIX}{os.getpid()}-0badf00d"
    for path in (stale, alive):
        with open(path, "wb") as f:
            f.write(b"x" * 64)
    try:
        a = PrefixArena.create(1 << 12)
        assert not os.path.exists(stale)  # its owner is gone: swept
        assert os.path.exists(alive)  # its owner (this test) lives: kept
        a.close()
        a.unlink()
    finally:
        for path in (stale, alive):
            if os.path.exists(path):
                os.unlink(path)
