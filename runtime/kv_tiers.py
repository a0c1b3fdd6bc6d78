"""KV tiers: allocator accounting per tier, and compressed entries paged across tiers.

`TierAllocator` counts the bytes of every state tensor a session places on a tier and refuses an
allocation over budget; its high-water mark is what the plan promises to stay under.

`PagedEntries` holds one layer's CSA entries for a batch: every page (page_entries entries) lives
on the host tier; a `PagePool` of device slots, shared by the session's tiered layers, caches the
pages queries pick, with LRU eviction. Attention gathers only the picked entries, fetching the pages
that are not resident (counted). The `Prefetcher` loads the next tiered layer's previous picks from
a worker thread while the current layer computes; values never depend on where a page sits, so
tiered runs are bit-identical to all-device runs.
"""

import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import torch

from .errors import V4CError


class TierFull(V4CError):
    pass


class TierAllocator:
    def __init__(self, name: str, budget: int | None, device: str = "cpu", pinned: bool = False):
        self.name, self.budget, self.where, self.pinned = name, budget, device, pinned
        self.used = self.high_water = 0

    def alloc(self, shape, dtype: torch.dtype, what: str) -> torch.Tensor:
        n = dtype.itemsize
        for d in shape:
            n *= d
        if self.budget is not None and self.used + n > self.budget:
            raise TierFull(f"{self.name} tier: {what} needs {n:,} bytes but only {self.budget - self.used:,} of its "
                           f"{self.budget:,} remain; the KV plan (v4c plan) must fit this budget")
        self.used += n
        self.high_water = max(self.high_water, self.used)
        if self.pinned:  # host pages that move to a GPU: page-locked, so copies can overlap compute
            return torch.zeros(shape, dtype=dtype).pin_memory()
        return torch.zeros(shape, dtype=dtype, device=self.where)

    def release(self, t: torch.Tensor) -> None:
        self.used -= t.numel() * t.element_size()

    def report(self) -> dict:
        return {"budget": self.budget, "used": self.used, "high_water": self.high_water}


class TierStats:
    def __init__(self):
        self.lock = threading.Lock()
        self.pages_fetched = self.bytes_fetched = self.prefetched_pages = self.hits = self.misses = 0

    def report(self) -> dict:
        return {"pages_fetched": self.pages_fetched, "bytes_fetched": self.bytes_fetched,
                "prefetched_pages": self.prefetched_pages, "page_hits": self.hits, "page_misses": self.misses}


class PagePool:
    """The device slots that cache host pages, shared by every tiered layer of a session: one
    LRU across layers, so the layers that pick more pages get more room."""

    def __init__(self, slots: int, page_shape, dtype: torch.dtype, device: TierAllocator, stats: TierStats):
        if slots < 1:
            raise TierFull("the device tier has no room for a single KV page")
        self.cache = device.alloc((slots, *page_shape), dtype, "KV page cache")
        self.slot_of: OrderedDict[tuple, int] = OrderedDict()  # (store, sequence, page) -> slot, LRU order
        self.free = list(range(slots))
        self.lock = threading.Lock()
        self.stats = stats

    @property
    def slots(self) -> int:
        return self.cache.shape[0]

    def resident(self, key: tuple, host_page: torch.Tensor, prefetch: bool = False) -> int:
        """The slot holding page `key` (call with the lock held), fetching it if needed."""
        slot = self.slot_of.get(key)
        if slot is not None:
            self.slot_of.move_to_end(key)
            if not prefetch:
                with self.stats.lock:
                    self.stats.hits += 1
            return slot
        slot = self.free.pop() if self.free else self.slot_of.popitem(last=False)[1]
        self.cache[slot] = host_page
        self.slot_of[key] = slot
        with self.stats.lock:
            self.stats.pages_fetched += 1
            self.stats.bytes_fetched += host_page.numel() * host_page.element_size()
            if prefetch:
                self.stats.prefetched_pages += 1
            else:
                self.stats.misses += 1
        return slot

    def forget(self, store_id: int) -> None:
        with self.lock:
            for key in [k for k in self.slot_of if k[0] == store_id]:
                self.free.append(self.slot_of.pop(key))


class PagedEntries:
    """One layer's compressed entries for a batch: every page on the host tier, the picked ones
    cached in the session's shared `PagePool` on the device tier."""

    def __init__(self, name: str, batch: int, capacity: int, width: int, dtype: torch.dtype, page_entries: int,
                 pool: PagePool, host: TierAllocator):
        self.name, self.page_entries, self.pool = name, page_entries, pool
        n_pages = -(-capacity // page_entries)
        self.host = host.alloc((batch, n_pages, page_entries, width), dtype, f"{name} (host pages)")
        self.last_pages: list[tuple[int, int]] = []  # what the previous gather used: the prefetch guess

    @property
    def flat_host(self) -> torch.Tensor:  # [B, n_pages * page_entries, W]
        return self.host.view(self.host.shape[0], -1, self.host.shape[-1])

    def write(self, start: int, rows: torch.Tensor) -> None:
        n = rows.shape[1]
        with self.pool.lock:
            self.flat_host[:, start:start + n] = rows
            for page in range(start // self.page_entries, (start + n - 1) // self.page_entries + 1):
                for b in range(rows.shape[0]):  # keep cached copies current (write-through)
                    slot = self.pool.slot_of.get((id(self), b, page))
                    if slot is not None:
                        self.pool.cache[slot] = self.host[b, page]

    def read(self, n: int) -> torch.Tensor:
        return self.flat_host[:, :n]

    def gather(self, idx: torch.Tensor) -> torch.Tensor:
        """idx [B, S, K] -> [B, S, K, W]; zeros where idx < 0. Pages are brought in group by group, so
        a step may pick more pages than the pool holds."""
        n_pages, where_out = self.host.shape[1], self.pool.cache.device
        idx = idx.cpu()  # page bookkeeping runs on the host
        valid = idx >= 0
        key = torch.arange(idx.shape[0])[:, None, None] * n_pages + torch.where(valid, idx // self.page_entries, 0)
        offset = torch.where(valid, idx % self.page_entries, 0)
        pages = torch.unique(key[valid])  # sorted (sequence, page) keys this call needs
        out = torch.zeros(*idx.shape, self.host.shape[-1], dtype=self.host.dtype, device=where_out)
        capacity = self.pool.slots
        with self.pool.lock:
            for g in range(0, len(pages), capacity):
                group = pages[g:g + capacity]
                slots = torch.tensor([self.pool.resident((id(self), k // n_pages, k % n_pages),
                                                         self.host[k // n_pages, k % n_pages])
                                      for k in group.tolist()], dtype=torch.long)
                where = torch.searchsorted(group, key).clamp(max=len(group) - 1)
                take = valid & (group[where] == key)
                rows = self.pool.cache[slots[where[take]].to(where_out), offset[take].to(where_out)]
                out[take.to(where_out)] = rows
            self.last_pages = [(k // n_pages, k % n_pages) for k in pages[-capacity:].tolist()]
        return out

    def prefetch(self, keys: list[tuple[int, int]]) -> None:
        with self.pool.lock:
            for b, p in keys[: self.pool.slots]:
                self.pool.resident((id(self), b, p), self.host[b, p], prefetch=True)

    def reset(self) -> None:
        self.pool.forget(id(self))
        with self.pool.lock:
            self.host.zero_()
            self.last_pages = []


class Prefetcher:
    """Brings in the next tiered layer's pages on a worker thread while the current layer computes."""

    def __init__(self, stores: list[PagedEntries]):
        self.next_of = {id(a): b for a, b in zip(stores, stores[1:] + stores[:1])} if len(stores) > 1 else {}
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="v4c-prefetch") if self.next_of else None
        self.pending = None

    def after(self, store: PagedEntries) -> None:
        nxt = self.next_of.get(id(store))
        if nxt is not None and nxt.last_pages:
            self.wait()
            self.pending = self.pool.submit(nxt.prefetch, list(nxt.last_pages))

    def wait(self) -> None:
        if self.pending is not None:
            self.pending.result()
            self.pending = None

    def close(self) -> None:
        self.wait()
        if self.pool:
            self.pool.shutdown()
