"""pipelines.ffcv_import: importing FFCV keeps torch's thread count, and a process that imports FFCV
after another one has loads the typed-Dict compiles from numba's on-disk cache instead of compiling;
so are bt_fast's own operations marked `compile_cached` (pipelines.ffcv_compile).

Numba's own per-dispatcher counters (`Dispatcher.stats`) are the reference for what was compiled
and what was loaded from the cache.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

IMPORT_FFCV = """
import json, torch
torch.set_num_threads(3)
import pipelines.ffcv_import
from ffcv.fields.rgb_image import IMAGE_MODES
from numba.typed import typeddict
helpers = (typeddict._make_dict, typeddict._setitem)
import pipelines.ffcv_decoders  # noqa: F401 - marks the crop sampling compile_cached
from ffcv.pipeline.compiler import Compiler
from pipelines.crop_sampling import random_resized_crop, sample_seed
ours = (Compiler.compile(random_resized_crop), Compiler.compile(sample_seed))
ours[1](7, 3)
ours[0](48, 64, 0.08, 1.0, -0.29, 0.29, 0.75, 1.33)
print(json.dumps({"threads": torch.get_num_threads(), "modes": dict(IMAGE_MODES),
                  "compiled": sum(sum(h.stats.cache_misses.values()) for h in helpers),
                  "loaded": sum(sum(h.stats.cache_hits.values()) for h in helpers),
                  "ours_compiled": sum(sum(h.stats.cache_misses.values()) for h in ours),
                  "ours_loaded": sum(sum(h.stats.cache_hits.values()) for h in ours)}))
"""


def _import_ffcv_in_a_new_process(env: dict | None = None) -> dict:
    done = subprocess.run([sys.executable, "-c", IMPORT_FFCV], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.timeout(600)
def test_a_second_process_loads_ffcvs_import_and_our_cached_compiles_from_the_cache_and_keeps_torchs_threads(
        tmp_path):
    """Against a cold cache (NUMBA_CACHE_DIR, an empty directory) the first process compiles and
    the second compiles nothing. Without the cache switched on, both would compile."""
    import os
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    first, second = _import_ffcv_in_a_new_process(env), _import_ffcv_in_a_new_process(env)
    for record in (first, second):
        assert record["threads"] == 3  # FFCV's Compiler sets 1 when imported
        assert record["modes"] == {"jpg": 0, "raw": 1}
    assert first["compiled"] >= 2 and first["loaded"] == 0
    assert second["compiled"] == 0 and second["loaded"] >= 2
    assert (first["ours_compiled"], first["ours_loaded"]) == (2, 0)
    assert (second["ours_compiled"], second["ours_loaded"]) == (0, 2)


def test_numbas_on_disk_cache_is_off_where_its_user_directory_would_be_relative_to_the_working_directory(
        monkeypatch, tmp_path):
    """With no known home numba's user cache directory is a literal `~/.cache/numba` (a relative XDG_CACHE_HOME
    gives a relative one too): a folder in whatever directory the run started from. Then nothing is cached on
    disk, unless NUMBA_CACHE_DIR names a place."""
    import pipelines.ffcv_decoders  # noqa: F401 - marks the crop sampling compile_cached
    from pipelines.crop_sampling import sample_seed
    from pipelines.ffcv_compile import _ON_DISK, _cached
    from pipelines.ffcv_import import numba_may_cache
    assert sample_seed in _ON_DISK
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")
    assert not numba_may_cache() and _cached(sample_seed, None, False) is None
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert numba_may_cache() and _cached(sample_seed, None, False) is not None
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path))
    assert numba_may_cache()
