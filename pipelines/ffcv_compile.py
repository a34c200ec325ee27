"""bt_fast's FFCV operations compiled once per process, not once per Loader.

Every FFCV `Loader` asks each operation for its code (`Operation.generate_code`) and has numba
compile what it gets (`Compiler.compile`), afresh: seconds of numba work before each loader's first
batch, paid again for every pipeline a process builds (the benchmark and the GPU checks build
several, the test suite dozens). Here:

- `code_once(build)` makes an operation's code builder return the same function for the same
  captured values (the memory reader, the compiled helpers, the loop kind, the crop ranges);
- `compile_once(function)` marks a module-level helper the same way, and `compile_cached(function)`
  one whose machine code holds no address of this process (no ctypes call), which numba's on-disk
  cache then also keeps: compiled by the first process on a machine, loaded by the next ones;
- `Compiler.compile`, wrapped when this module is imported, compiles a marked function once for
  each way FFCV asks for it (signature, compilation on or off, parallel or not) and returns the
  same dispatcher after that, so numba reuses its machine code for argument types it has met.

FFCV's own operations compile as before. numba compiles under one process-wide lock and looks for
an existing overload once it holds it, so loader threads sharing a dispatcher do not race.

A stock FFCV `OSCacheManager` (not bt_fast's, `pipelines.ffcv_memory`) retypes numba's one shared
type of writable uint8 vectors as read-only, which changes its hash under every dispatcher that has
compiled for it (numba then makes a new shared type). Dispatchers handed out before that are
then never handed out again. The shared type is held here: numba interns types weakly, so a type
nobody holds is made anew at its next use, and telling a retyping from that needs the old one alive.
"""
from __future__ import annotations

import functools
from typing import Callable

import numba

from pipelines.ffcv_import import numba_may_cache  # first: FFCV's import side effects, undone
from ffcv.pipeline.compiler import Compiler

__all__ = ["code_once", "compile_cached", "compile_once"]

_ONCE: set[Callable] = set()
_ON_DISK: set[Callable] = set()
_compiled: dict[tuple, Callable] = {}
_stock_compile = Compiler.compile  # bound to the class: (code, signature=None)
_shared_vector = numba.uint8[::1]  # numba's type of writable uint8 vectors, held (the docstring's last paragraph)
_retypings = 0  # how often a stock reader has retyped it since


def compile_once(function: Callable) -> Callable:
    """Let `Compiler.compile` compile `function` once per process (per signature and mode)."""
    _ONCE.add(function)
    return function


def compile_cached(function: Callable) -> Callable:
    """`compile_once`, with numba's on-disk cache (where numba finds a writable place for it)."""
    _ON_DISK.add(function)
    return compile_once(function)


def code_once(build: Callable[..., Callable]) -> Callable[..., Callable]:
    """`build(*captured)` returns an operation's code; the wrapper returns the same code, marked with
    `compile_once`, for equal `captured` values (which must be hashable)."""
    @functools.cache
    def built(*captured) -> Callable:
        return compile_once(build(*captured))
    return built


def _compile(code: Callable, signature=None) -> Callable:
    global _shared_vector, _retypings
    if code not in _ONCE:
        return _stock_compile(code, signature)
    parallel = getattr(code, "is_parallel", False) and Compiler.num_threads > 1  # as FFCV decides it
    if numba.uint8[::1] is not _shared_vector:  # a stock reader retyped the one held: numba made a new one
        _shared_vector, _retypings = numba.uint8[::1], _retypings + 1
    key = (code, signature, Compiler.is_enabled, parallel, _retypings)
    if key not in _compiled:
        _compiled[key] = _cached(code, signature, parallel) or _stock_compile(code, signature)
    return _compiled[key]


def _cached(code: Callable, signature, parallel: bool) -> Callable | None:
    """`code` compiled as `Compiler.compile` would, plus numba's on-disk cache; None where that does not apply."""
    if code not in _ON_DISK or not Compiler.is_enabled or not numba_may_cache():
        return None
    try:
        return numba.njit(signature, fastmath=True, nogil=True, error_model="numpy", parallel=parallel,
                          cache=True)(code)
    except RuntimeError:  # numba found no writable cache location
        return None


Compiler.compile = staticmethod(_compile)
