"""FFCV's memory managers with their per-sample page tables built when first read, not at start.

`ffcv.memory_managers.base.MemoryManager.__init__` runs a Python loop over every allocation of the
`.beton` to fill three dicts (`ptr_to_size`, `sample_to_pages`, `page_to_samples`), on every loader
of every rank: seconds of each start at ImageNet's size (docs/performance.md, start-up at scale). Reading
through the OS page cache (`ffcv.os_cache=true`, the default) with the random order uses only the
sorted pointer and size arrays. The dicts are read by FFCV's own process cache (`os_cache=false`)
and the quasi-random order, which now build them on first use, with FFCV's loop.

The OS-cache manager also types its reader without FFCV's side effect: FFCV 1.0.2's
`OSCacheManager.state_type` sets `mutable = False` on `numba.uint8[::1]`, which is numba's one shared
(interned) type of every writable contiguous uint8 vector in the process. Its hash changes under the
dispatchers keyed by it, and every later `typeof` of a writable uint8 buffer says read-only. Seen as
"Exception ignored ... KeyError" from numba's dispatcher finalizer once a second loader is built in a
process (the benchmark, the GPU checks). Here the read-only types are types of their own.
"""
from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterator
from functools import cached_property

import numba
import numpy as np

import pipelines.ffcv_import  # noqa: F401 - first: FFCV's import side effects, undone
import ffcv.loader.loader as ffcv_loader
from ffcv.memory_managers import OSCacheManager, ProcessCacheManager
from ffcv.memory_managers.base import MemoryManager
from ffcv.pipeline.compiler import Compiler

from pipelines.ffcv_compile import code_once, compile_cached


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


def _read_only_vector(dtype) -> numba.types.Array:
    return numba.types.Array(dtype, 1, "C", readonly=True)


class LazyOSCacheManager(OSCacheManager, LazyPageTables):
    """The OS-cache manager; its state is (the file's bytes, read-only; sample pointers; their sizes)."""

    @property
    def state_type(self) -> numba.types.Tuple:
        pointers = numba.types.Array(numba.uint64, 1, "C")
        return numba.types.Tuple([_read_only_vector(numba.uint8), pointers, pointers])

    def compile_reader(self):
        return Compiler.compile(_os_cache_read, _read_only_vector(numba.uint8)(numba.uint64, self.state_type))


class LazyProcessCacheManager(ProcessCacheManager, LazyPageTables):
    def compile_reader(self):
        return Compiler.compile(_process_cache_reader(int(np.log2(self.reader.page_size))))


# One reader per process and page size (`pipelines.ffcv_compile`): the code reading the samples is
# then the same for every loader.

@compile_cached
def _os_cache_read(address, state):
    data, pointers, sizes = state
    return data[address:address + sizes[np.searchsorted(pointers, address)]]


@code_once
def _process_cache_reader(page_size_log2: int):
    """FFCV's `ProcessCacheManager` reader: a sample lies within one page of the slots in `state[0]`."""
    shift = np.uint32(page_size_log2)

    def read(address, state):
        size = state[2][np.searchsorted(state[1], address)]
        page = address >> shift
        offset = address - (page << shift)
        return state[0][state[3][page], offset:offset + size]

    return read


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
