"""Importing FFCV without its two process-wide side effects: import this module before any `ffcv` one.

1. `ffcv.pipeline.compiler` sets torch's intra-op thread count to 1 when imported. The count the
   process had is put back.
2. `ffcv.fields.rgb_image` fills a numba typed Dict (`IMAGE_MODES`) when imported, and numba compiles
   the dict's constructor and item assignment for it: the largest part of FFCV's import, paid again
   by every process (every rank, every DataLoader-free tool) because numba keeps those compiles in
   memory only. `cache_typed_dict_compiles` turns numba's own on-disk cache on for them, so they are
   compiled once per machine and numba version and loaded afterwards. The cache goes where numba
   puts any cached function: `NUMBA_CACHE_DIR` if set, else its package's `__pycache__` if writable,
   else the user's cache directory; with none writable, numba compiles as before.
   Figures: docs/performance.md (start-up at scale).
"""
from __future__ import annotations

import os

import torch


def numba_may_cache() -> bool:
    """Whether numba's on-disk cache has a place it means: `NUMBA_CACHE_DIR`, or a user cache directory that is
    an absolute path. Where the home is unknown (no $HOME, no passwd entry) numba's is a literal `~/.cache`,
    relative to the working directory, which would fill with cache folders: no on-disk cache then."""
    from numba.misc.appdirs import AppDirs
    return bool(os.environ.get("NUMBA_CACHE_DIR")) or os.path.isabs(AppDirs("numba", appauthor=False).user_cache_dir)


def cache_typed_dict_compiles() -> None:
    """Enable numba's on-disk cache for the jitted helpers behind `numba.typed.Dict` (idempotent), where
    `numba_may_cache`."""
    from numba.typed import typeddict

    if not numba_may_cache():
        return

    for name in vars(typeddict):
        helper = getattr(typeddict, name)
        if hasattr(helper, "enable_caching"):  # a numba dispatcher
            try:
                helper.enable_caching()
            except RuntimeError:  # numba found no writable cache location: it compiles, as without this
                return


cache_typed_dict_compiles()
_threads = torch.get_num_threads()
import ffcv.fields.rgb_image  # noqa: E402,F401 - the module whose import compiles
import ffcv.pipeline.compiler  # noqa: E402,F401 - the module whose import sets torch's thread count

torch.set_num_threads(_threads)
