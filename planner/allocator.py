"""A model of PyTorch's CUDA caching allocator: how many bytes it reserves for a sequence of
tensor allocations and frees.

NVML's figure for a training process is the memory outside the allocator (the CUDA context,
kernels, cuBLAS handles) plus what the caching allocator has reserved, and what it reserves
exceeds the live tensors by the gaps it cannot reuse (fragmentation). This module replays an
allocation sequence (from a GPU trace, `torch.cuda.memory._record_memory_history`, or from the
simulator's fake-tensor step on CPU) through the allocator's rules, as written in
c10/cuda/CUDACachingAllocator.cpp (torch 2.11):

- sizes are rounded up to 512 bytes (`round_size`, kMinBlockSize);
- requests up to 1 MiB (kSmallSize) come from the small pool, larger ones from the large pool;
- a request takes the best-fitting free block of its pool (`get_free_block`: the smallest
  block at least as large, lowest address first), split when the rest is worth keeping
  (`should_split`: small pool, at least 512 bytes left; large pool, more than 1 MiB left);
- freed blocks merge with free neighbours of the same segment (`try_merge_blocks`), and stay
  reserved (nothing is returned to the driver before `empty_cache` or an out-of-memory retry);
- with `expandable_segments:True` each pool is one virtual segment whose end is mapped in pages
  of 20 MiB (large pool, kLargeBuffer) or 2 MiB (small pool, kSmallBuffer) when no free block
  fits; a free block at the end is extended rather than left behind
  (`try_allocate_expandable_block`, `find_expandable_block`, `map_block`);
- without it, a request no free block fits gets a new segment from cudaMalloc of
  `get_allocation_size`: 2 MiB for small requests, 20 MiB up to 10 MiB (kMinLargeAlloc),
  larger ones rounded up to 2 MiB (kRoundLarge); blocks never merge across segments.

Checked against the H200 traces in tables/gpu/ (`python -m planner.measure.replay`).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

MIN_BLOCK = 512
SMALL_SIZE = 2**20          # kSmallSize: the small pool's largest request
SMALL_BUFFER = 2 * 2**20    # kSmallBuffer: a small segment, and the small pool's expandable page
LARGE_BUFFER = 20 * 2**20   # kLargeBuffer: a mid-size segment, and the large pool's expandable page
MIN_LARGE_ALLOC = 10 * 2**20  # kMinLargeAlloc
ROUND_LARGE = 2 * 2**20     # kRoundLarge


def round_size(size: int) -> int:
    """CUDACachingAllocator `round_size`: at least 512 bytes, a multiple of 512."""
    return MIN_BLOCK if size < MIN_BLOCK else -(-size // MIN_BLOCK) * MIN_BLOCK


def allocation_size(size: int) -> int:
    """`get_allocation_size`: the cudaMalloc segment a request that fits no free block gets."""
    if size <= SMALL_SIZE:
        return SMALL_BUFFER
    if size < MIN_LARGE_ALLOC:
        return LARGE_BUFFER
    return -(-size // ROUND_LARGE) * ROUND_LARGE


def _up(n: int, to: int) -> int:
    return -(-n // to) * to


@dataclass
class _Block:
    seg: int
    start: int
    size: int
    free: bool = True
    prev: "_Block | None" = None
    next: "_Block | None" = None


@dataclass
class _Pool:
    split_rest: int                      # the smallest remainder worth splitting off
    page: int                            # expandable mapping granularity
    free: list = field(default_factory=list)   # sorted (size, seg, start, id) of free blocks
    tail: "_Block | None" = None         # expandable: the last mapped block


class Allocator:
    """The caching allocator's reserved bytes over a sequence of `malloc(key, size)` and
    `free(key)`; `peak_reserved` is what `torch.cuda.max_memory_reserved` reports."""

    def __init__(self, expandable: bool = True):
        self.expandable = expandable
        self.pools = {True: _Pool(split_rest=MIN_BLOCK, page=SMALL_BUFFER),
                      False: _Pool(split_rest=SMALL_SIZE + 1, page=LARGE_BUFFER)}
        self.live: dict = {}
        self.reserved = self.allocated = 0
        self.peak_reserved = self.peak_allocated = 0
        self._segments = 0
        self._mapped_end = {True: 0, False: 0}

    # -- free-block index
    def _add_free(self, pool: _Pool, b: _Block) -> None:
        b.free = True
        bisect.insort(pool.free, (b.size, b.seg, b.start, id(b), b))

    def _drop_free(self, pool: _Pool, b: _Block) -> None:
        i = bisect.bisect_left(pool.free, (b.size, b.seg, b.start, id(b)))
        del pool.free[i]

    def _best_fit(self, pool: _Pool, size: int) -> _Block | None:
        i = bisect.bisect_left(pool.free, (size,))
        if i == len(pool.free):
            return None
        if self.expandable and pool.free[i][4] is pool.tail:  # the growable end goes last
            for j in range(i + 1, len(pool.free)):
                return pool.free[j][4]
        return pool.free[i][4]

    def _new_block(self, small: bool, size: int) -> _Block:
        """A request no free block fits: map more of the expandable segment, or cudaMalloc."""
        pool = self.pools[small]
        if not self.expandable:
            seg = allocation_size(size)
            self.reserved += seg
            self._segments += 1
            return _Block(seg=self._segments, start=0, size=seg)
        tail = pool.tail
        have = tail.size if tail is not None and tail.free else 0
        grow = _up(size - have, pool.page)
        self.reserved += grow
        self._mapped_end[small] += grow
        if have:
            self._drop_free(pool, tail)
            tail.size += grow
            return tail
        b = _Block(seg=0, start=self._mapped_end[small] - grow, size=grow, prev=tail)
        if tail is not None:
            tail.next = b
        pool.tail = b
        return b

    def malloc(self, key, size: int) -> None:
        size = round_size(size)
        small = size <= SMALL_SIZE
        pool = self.pools[small]
        b = self._best_fit(pool, size)
        if b is not None:
            self._drop_free(pool, b)
        else:
            b = self._new_block(small, size)
        rest = b.size - size
        if rest >= pool.split_rest:
            r = _Block(seg=b.seg, start=b.start + size, size=rest, prev=b, next=b.next)
            if b.next is not None:
                b.next.prev = r
            b.next = r
            b.size = size
            if pool.tail is b:
                pool.tail = r
            self._add_free(pool, r)
        b.free = False
        self.live[key] = (b, small)
        self.allocated += b.size
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        self.peak_reserved = max(self.peak_reserved, self.reserved)

    @staticmethod
    def _absorb(pool: _Pool, left: _Block, right: _Block) -> None:
        """`left` takes in its free neighbour `right` (`try_merge_blocks`)."""
        left.size += right.size
        left.next = right.next
        if right.next is not None:
            right.next.prev = left
        if pool.tail is right:
            pool.tail = left

    def free(self, key) -> None:
        item = self.live.pop(key, None)
        if item is None:  # freed before the trace began
            return
        b, small = item
        pool = self.pools[small]
        self.allocated -= b.size
        prev, nxt = b.prev, b.next
        if prev is not None and prev.free and prev.seg == b.seg:
            self._drop_free(pool, prev)
            self._absorb(pool, prev, b)
            b = prev
        if nxt is not None and nxt.free and nxt.seg == b.seg:
            self._drop_free(pool, nxt)
            self._absorb(pool, b, nxt)
        self._add_free(pool, b)


def replay(events, expandable: bool = True) -> Allocator:
    """`events`: (is_alloc, key, size) in order; the allocator after them all."""
    a = Allocator(expandable)
    for is_alloc, key, size in events:
        if is_alloc:
            a.malloc(key, size)
        else:
            a.free(key)
    return a
