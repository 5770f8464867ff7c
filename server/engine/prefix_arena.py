"""The shared-memory arena that carries prefix tensors from the API process to the engine
process, so the pipe carries only where a tensor lies (an ArenaSlot), never its bytes.

    API process (owner)                      engine process (reader)
    slot = arena.put(kv)      # copy in      kv = reader.take(slot)   # copy out, on receipt
    send(cmd with slot)  ───── pipe ─────▶   send(SlotsFreed([slot.id]))
    arena.free(slot.id)  ◀──── pipe ──────

# NOTE: ownership, and what happens when things go wrong
# - One segment, created once by the API process (`create`) and attached by its engine
#   process (`attach`); only the owner allocates and frees, under a lock (the writer and the
#   reader threads of the channel both touch it). The engine copies a slot's bytes out as
#   soon as the command arrives and says so; the slot is then free for the next prefix. A
#   slot is never written while it is allocated, so the engine never reads torn bytes.
# - Full: `put` returns None and the caller sends the tensor through the pipe as before (a
#   request never waits for room).
# - The engine process dies: its slots are never freed; nothing else is sent, and the
#   owner unlinks the segment at shutdown. The API process dies: multiprocessing's resource
#   tracker (shared by the engine process) unlinks the segment. A restarted API process
#   makes a segment of its own under a new name.
# - First fit over free extents kept sorted by offset, merged with their neighbours on
#   free; extents are 64-byte aligned so that any dtype's view of a slot is aligned.
"""

from __future__ import annotations

import bisect
import itertools
import os
import secrets
import threading
from dataclasses import dataclass
from multiprocessing import shared_memory

import torch

ALIGN = 64
SEGMENT_PREFIX = "prefix-serve-"  # every segment's name starts so (tests look for leftovers in /dev/shm)


@dataclass(frozen=True)
class ArenaSlot:
    """Where one tensor lies in the arena: what the pipe carries instead of its bytes."""

    id: int  # the owner's handle, to free it
    offset: int  # bytes from the segment's start, a multiple of ALIGN
    shape: tuple[int, ...]
    dtype: str  # torch dtype name, e.g. "bfloat16"

    @property
    def nbytes(self) -> int:
        return _numel(self.shape) * getattr(torch, self.dtype).itemsize


class PrefixArena:
    def __init__(self, segment: shared_memory.SharedMemory, owner: bool) -> None:
        self._segment = segment
        self.owner = owner
        self.capacity = segment.size
        self._lock = threading.Lock()
        self._free: list[tuple[int, int]] = [(0, self.capacity - self.capacity % ALIGN)]  # (offset, size), sorted
        self._used: dict[int, tuple[int, int]] = {}  # slot id -> (offset, size)
        self._ids = itertools.count(1)
        self.used_bytes = 0
        self.puts = 0  # tensors put in a slot
        self.fallbacks = 0  # puts that found no room (the tensor went through the pipe)
        self.closed = False

    @classmethod
    def create(cls, capacity_bytes: int) -> "PrefixArena":
        """A new segment of `capacity_bytes`, owned (allocated from, and unlinked) by this process."""
        if capacity_bytes < ALIGN:
            raise ValueError(f"a prefix arena needs at least {ALIGN} bytes, got {capacity_bytes}")
        sweep_stale_segments()
        name = f"{SEGMENT_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        return cls(shared_memory.SharedMemory(name=name, create=True, size=capacity_bytes), owner=True)

    @classmethod
    def attach(cls, name: str) -> "PrefixArena":
        """The engine process's view of the owner's segment (it only reads slots)."""
        return cls(shared_memory.SharedMemory(name=name), owner=False)

    @property
    def name(self) -> str:
        return self._segment.name

    def __len__(self) -> int:
        return len(self._used)

    # ---- the owner

    def put(self, kv: torch.Tensor) -> ArenaSlot | None:
        """Copy `kv` (a host tensor) into a free slot; None when no extent is large enough."""
        kv = kv.detach()
        if kv.device.type != "cpu":
            raise ValueError(f"the prefix arena holds host tensors; this one is on {kv.device}")
        nbytes = kv.numel() * kv.element_size()
        size = max(ALIGN, -(-nbytes // ALIGN) * ALIGN)
        with self._lock:  # the copy too: close() must not unmap the segment under it
            offset = None if self.closed else self._allocate(size)
            if offset is None:
                self.fallbacks += 1
                return None
            slot = ArenaSlot(next(self._ids), offset, tuple(kv.shape), str(kv.dtype).removeprefix("torch."))
            self._used[slot.id] = (offset, size)
            self.used_bytes += size
            self.puts += 1
            self._segment.buf[offset:offset + nbytes] = _bytes_of(kv)
        return slot

    def free(self, slot_id: int) -> None:
        """Give a slot back (the engine copied it out). An unknown id is a bug: ValueError.
        After close() there is nothing to give back to: a no-op."""
        with self._lock:
            if self.closed:
                return
            if slot_id not in self._used:
                raise ValueError(f"slot {slot_id} is not allocated in arena {self.name} "
                                 f"({len(self._used)} slots are)")
            offset, size = self._used.pop(slot_id)
            self.used_bytes -= size
            self._release(offset, size)

    def _allocate(self, size: int) -> int | None:
        for i, (offset, free) in enumerate(self._free):
            if free >= size:
                if free == size:
                    del self._free[i]
                else:
                    self._free[i] = (offset + size, free - size)
                return offset
        return None

    def _release(self, offset: int, size: int) -> None:
        i = bisect.bisect(self._free, (offset, size))
        if i < len(self._free) and offset + size == self._free[i][0]:  # merge with the next extent
            size += self._free.pop(i)[1]
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == offset:  # and with the previous one
            offset, size = self._free[i - 1][0], self._free[i - 1][1] + size
            i -= 1
            del self._free[i]
        self._free.insert(i, (offset, size))

    # ---- the reader

    def take(self, slot: ArenaSlot) -> torch.Tensor:
        """A copy of the tensor in `slot` (the slot may be reused once the owner hears of it)."""
        if self.closed:
            raise ValueError(f"arena {self.name} is closed")
        if slot.offset < 0 or slot.offset % ALIGN or slot.offset + slot.nbytes > self.capacity:
            raise ValueError(f"slot {slot.id} at offset {slot.offset} of {slot.nbytes} bytes does not fit "
                             f"arena {self.name} of {self.capacity} bytes")
        out = torch.empty(slot.shape, dtype=getattr(torch, slot.dtype))
        _bytes_of(out)[:] = self._segment.buf[slot.offset:slot.offset + slot.nbytes]
        return out

    # ---- lifetime

    def close(self) -> None:
        """Drop this process's mapping (tensors taken from it stay valid: they are copies);
        put() then finds no room, free() does nothing. Idempotent."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            self._segment.close()

    def unlink(self) -> None:
        """Remove the segment from the system (the owner, at shutdown)."""
        self._segment.unlink()


def sweep_stale_segments(folder: str = "/dev/shm") -> list[str]:
    """Unlink the segments of owners that are gone: a segment outlives its owner only when
    the owner and its resource tracker were both SIGKILLed (a whole process group). A
    segment whose owner pid is alive (or not ours to signal) is left alone."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        pid = name[len(SEGMENT_PREFIX):].split("-", 1)[0]
        if not name.startswith(SEGMENT_PREFIX) or not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # alive
        except PermissionError:
            continue  # alive, someone else's
        except ProcessLookupError:
            pass
        try:
            os.unlink(os.path.join(folder, name))
            removed.append(name)
        except OSError:
            pass
    return removed


def _bytes_of(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous host tensor, writable in place. Copies through memoryviews
    are one plain memcpy: a torch copy of 360 KiB is an OpenMP team, which on 2 cores busy
    with the model took 10 ms instead of 0.1 ms (bench/prefix_load_profile.py)."""
    return memoryview(t.contiguous().view(-1).view(torch.uint8).numpy()).cast("B")


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
