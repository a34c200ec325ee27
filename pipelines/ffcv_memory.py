"""FFCV's memory managers with their per-sample page tables built when first read, not at start.

`ffcv.memory_managers.base.MemoryManager.__init__` runs a Python loop over every allocation of the
`.beton` to fill three dicts (`ptr_to_size`, `sample_to_pages`, `page_to_samples`), on every loader
of every rank: seconds of each start at ImageNet's size (docs/performance.md, start-up at scale). Reading
through the OS page cache (`ffcv.os_cache=true`, the default) with the random order uses only the
sorted pointer and size arrays. The dicts are read by FFCV's own process cache (`os_cache=false`)
and the quasi-random order, which now build them on first use, with FFCV's loop.
"""
from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterator
from functools import cached_property

import numpy as np

import pipelines.ffcv_import  # noqa: F401 - first: FFCV's import side effects, undone
import ffcv.loader.loader as ffcv_loader
from ffcv.memory_managers import OSCacheManager, ProcessCacheManager
from ffcv.memory_managers.base import MemoryManager


class LazyPageTables(MemoryManager):
    """`MemoryManager` whose constructor sorts the allocation table and nothing more."""

    def __init__(self, reader):  # in place of MemoryManager.__init__, which it does not call
        self.reader = reader
        table = reader.alloc_table
        order = np.argsort(table["ptr"])
        self.ptrs = table["ptr"][order]
        self.sizes = table["size"][order]

    @cached_property
    def ptr_to_size(self) -> dict:
        return dict(zip(self.ptrs, self.sizes))

    @cached_property
    def _page_tables(self) -> tuple[dict, dict]:
        """(sample_to_pages, page_to_samples), as FFCV builds them."""
        table = self.reader.alloc_table
        pages = table["ptr"] >> int(np.log2(self.reader.page_size))
        sample_to_pages, page_to_samples = defaultdict(set), defaultdict(set)
        for sample, page in zip(table["sample_id"], pages):
            sample_to_pages[sample].add(page)
            page_to_samples[page].add(sample)
        return sample_to_pages, page_to_samples

    @property
    def sample_to_pages(self) -> dict:
        return self._page_tables[0]

    @property
    def page_to_samples(self) -> dict:
        return self._page_tables[1]


class LazyOSCacheManager(OSCacheManager, LazyPageTables):
    pass


class LazyProcessCacheManager(ProcessCacheManager, LazyPageTables):
    pass


@contextlib.contextmanager
def lazy_page_tables() -> Iterator[None]:
    """Loaders constructed inside get the lazy managers: FFCV's `Loader.__init__` picks its memory manager
    by these module-level names."""
    stock = ffcv_loader.OSCacheManager, ffcv_loader.ProcessCacheManager
    ffcv_loader.OSCacheManager, ffcv_loader.ProcessCacheManager = LazyOSCacheManager, LazyProcessCacheManager
    try:
        yield
    finally:
        ffcv_loader.OSCacheManager, ffcv_loader.ProcessCacheManager = stock
