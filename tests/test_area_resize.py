"""pipelines.area_resize: the C kernel gives cv2.resize's INTER_AREA bytes, and anything it does not
cover, or a machine where it cannot be built, gets cv2.resize itself."""
from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipelines import area_resize
from pipelines.area_resize import load_kernel, resize_area

REPO = Path(__file__).resolve().parents[1]
X86 = platform.machine() == "x86_64"


def _opencv(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def _kernel_resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The C function itself, never cv2.resize: a broken kernel cannot hide behind the fallback."""
    out = area_resize._reduced(area_resize._kernel(), image, *size)
    assert out is not None
    return out


def _reductions(rng, count: int, largest: int):
    """(image, size) pairs on the generic path: 1, 3 or 4 channels, factors from barely above 1 to 6,
    each axis on its own, one of them sometimes kept."""
    while count:
        rows, cols = (int(v) for v in rng.integers(2, largest, 2))
        channels = int(rng.choice([1, 3, 3, 4]))
        factors = rng.uniform(1.0, 6.0, 2)
        if rng.random() < 0.15:
            factors[rng.integers(2)] = 1.0
        width, height = max(1, int(cols / factors[0])), max(1, int(rows / factors[1]))
        image = rng.integers(0, 256, (rows, cols, channels), np.uint8)
        if area_resize._generic_reduction(image, width, height):
            count -= 1
            yield (image[..., 0] if channels == 1 and rng.random() < 0.5 else image), (width, height)


@pytest.mark.skipif(not X86, reason="the kernel is used on x86-64 only; the next test covers other machines")
def test_the_kernel_gives_opencvs_bytes_for_every_generic_reduction():
    assert load_kernel() is None
    rng = np.random.default_rng(7)
    for image, size in _reductions(rng, 400, 160):
        assert np.array_equal(_kernel_resize(image, size), _opencv(image, size)), (image.shape, size)
    # photograph-like content and the converter's sizes: smooth gradients put many sums near .5
    for (rows, cols), size in (((750, 1000), (512, 384)), ((1200, 1700), (512, 361)), ((513, 700), (512, 375)),
                               ((2047, 1100), (275, 512))):
        ramp = np.add.outer(np.arange(rows) * 0.37, np.arange(cols) * 0.21)
        image = np.stack([ramp % 256, (ramp * 1.7) % 256, rng.integers(0, 256, (rows, cols))], -1).astype(np.uint8)
        assert np.array_equal(_kernel_resize(image, size), _opencv(image, size)), (image.shape, size)


def test_resize_area_is_opencvs_inter_area_whichever_path_it_takes():
    """Through the public function: the kernel's cases, a view with row padding, and what goes to
    cv2.resize (whole factors, which OpenCV averages in integers, enlargements, the same size)."""
    assert (load_kernel() is None) == X86
    rng = np.random.default_rng(3)
    padded = rng.integers(0, 256, (90, 140, 3), np.uint8)[5:85, 7:131]  # rows 420 bytes apart, 372 used
    cases = [*_reductions(rng, 40, 120), (padded, (50, 33)), (padded, (62, 40)), (padded, (124, 80)),
             (padded, (200, 100)), (padded[:, :, 0], (41, 27)), (padded.astype(np.float32), (50, 33))]
    for image, size in cases:
        assert np.array_equal(resize_area(image, size), _opencv(image, size)), (image.shape, image.dtype, size)


def test_without_a_compiler_the_bytes_are_opencvs_and_the_reason_is_given(tmp_path):
    script = (
        "import numpy as np, cv2\n"
        "from pipelines.area_resize import load_kernel, resize_area\n"
        "print(load_kernel())\n"
        "image = np.random.default_rng(0).integers(0, 256, (61, 83, 3), np.uint8)\n"
        "print(np.array_equal(resize_area(image, (29, 40)), cv2.resize(image, (29, 40), interpolation=cv2.INTER_AREA)))\n")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path / "cache"),
           "CC": str(tmp_path / "no-such-cc"), "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    reason, same = done.stdout.splitlines()
    assert same == "True"
    if X86:
        assert reason.startswith("could not build area_resize.c:") and "no-such-cc" in reason, reason
    else:
        assert platform.machine() in reason


@pytest.mark.skipif(not X86, reason="the kernel is built on x86-64 only")
def test_a_built_kernel_is_loaded_from_the_cache_without_compiling(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(area_resize, "_cache_directories", lambda: [tmp_path / "bt_fast"])
    built = area_resize._built_library()
    assert built.parent == tmp_path / "bt_fast" and built.is_file()
    assert [p.name for p in built.parent.iterdir()] == [built.name]  # no temporary left behind

    def no_compiler(*args, **kwargs):
        raise AssertionError("compiled again")

    monkeypatch.setattr(subprocess, "run", no_compiler)
    assert area_resize._built_library() == built


def _no_passwd_entry(uid):
    raise KeyError(f"getpwuid(): uid not found: {uid}")


@pytest.mark.parametrize("home", [None, "relative/home"])
def test_with_no_known_home_the_users_cache_is_left_out_and_the_kernel_still_loads(monkeypatch, home):
    """A uid without a passwd entry and no $HOME (a container's `--user 12345`): Path.home() raises
    RuntimeError, which stopped the conversion with a traceback; a relative $HOME would have put the cache
    under the working directory."""
    import pwd
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setattr(pwd, "getpwuid", _no_passwd_entry)
    if home is None:
        monkeypatch.delenv("HOME", raising=False)
    else:
        monkeypatch.setenv("HOME", home)
    package_cache = REPO / "pipelines" / "__pycache__"
    assert area_resize._cache_directories() == [package_cache]
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # not absolute: ignored, as the XDG spec says
    assert area_resize._cache_directories() == [package_cache]
    kernel, reason = area_resize._load.__wrapped__()  # what the first resize_area of a process does
    assert (kernel is None, reason) == (False, None) if X86 else kernel is None


def test_the_users_cache_is_xdg_cache_home_where_absolute_else_under_the_home(monkeypatch, tmp_path):
    package_cache = REPO / "pipelines" / "__pycache__"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert area_resize._cache_directories() == [package_cache, tmp_path / "xdg" / "bt_fast"]
    for ignored in ("", "relative/cache"):
        monkeypatch.setenv("XDG_CACHE_HOME", ignored)
        assert area_resize._cache_directories() == [package_cache, tmp_path / "home" / ".cache" / "bt_fast"]
