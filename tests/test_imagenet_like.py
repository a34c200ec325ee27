"""pipelines.imagenet_like: the statistics its docstring promises, read back from the files alone."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from bt_fast.errors import DataError
from bt_fast.host import usable_cores
from pipelines import imagenet_like
from pipelines.image_folder import find_image_folder
from pipelines.imagenet_like import BLOCK, MANIFEST, _write_image, write_imagenet_like

# JPEG standard (ITU T.81 Annex K.1) luminance table, natural order, and libjpeg's quality scaling.
ANNEX_K_LUMINANCE = np.array([
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99])


def ijg_table(quality: int) -> np.ndarray:
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    return np.clip((ANNEX_K_LUMINANCE * scale + 50) // 100, 1, 255)


def jpeg_quality(image: Image.Image) -> int | None:
    table = np.array(list(image.quantization[0]))
    return next((q for q in range(1, 101) if np.array_equal(ijg_table(q), table)), None)


@pytest.fixture(scope="module")
def block(module_tmp):
    return write_imagenet_like(module_tmp("inl") / "set", BLOCK, num_classes=10, seed=0, workers=2)


def test_one_block_has_the_stated_sizes_modes_qualities_and_classes(block):
    classes, samples = find_image_folder(block)
    assert classes == [f"n{c:08d}" for c in range(10)] and len(samples) == BLOCK
    longer, ratios, landscape, modes, progressive, qualities = [], [], 0, [], 0, []
    for path, label in samples:
        assert int(os.path.basename(path)[:-4]) % 10 == label
        with Image.open(path) as image:
            assert image.format == "JPEG"
            w, h = image.size
            longer.append(max(w, h))
            ratios.append(max(w, h) / min(w, h))
            landscape += w >= h
            modes.append(image.mode)
            progressive += bool(image.info.get("progressive"))
            qualities.append(jpeg_quality(image))
    longer = np.array(longer)
    # exact counts per block: 70% at 500, 18% in 300..499, 10% in 501..1500, 2% in 1501..4000
    assert (longer == 500).sum() == 0.70 * BLOCK
    assert ((longer >= 300) & (longer < 500)).sum() == 0.18 * BLOCK
    assert ((longer > 500) & (longer <= 1500)).sum() == 0.10 * BLOCK
    assert ((longer > 1500) & (longer <= 4000)).sum() == 0.02 * BLOCK
    assert longer.max() > 2000  # the long tail reaches thousands
    assert modes.count("L") == 0.02 * BLOCK and modes.count("CMYK") == 0.002 * BLOCK
    assert modes.count("RGB") == BLOCK - 0.022 * BLOCK
    assert progressive == 0.05 * BLOCK
    assert None not in qualities and min(qualities) >= 75 and max(qualities) <= 95
    assert min(qualities) <= 77 and max(qualities) >= 93  # the whole range is used
    # drawn per image: 50% 4:3, 75% landscape (binomial, n=500: 4.5 standard deviations)
    four_three = np.isclose(ratios, 4 / 3, atol=0.01).mean()
    assert abs(four_three - 0.50) < 0.10 and abs(landscape / BLOCK - 0.75) < 0.09


def test_a_complete_set_is_kept_and_an_incomplete_one_completed_identically(block, tmp_path):
    files = sorted(block.rglob("*.jpg"))
    stamps = {p: p.stat().st_mtime_ns for p in files}
    write_imagenet_like(block, BLOCK, num_classes=10, seed=0)
    assert {p: p.stat().st_mtime_ns for p in files} == stamps

    small = write_imagenet_like(tmp_path / "small", 30, num_classes=10, seed=0)  # the first 30 of the block
    originals = {p.relative_to(small): p.read_bytes() for p in small.rglob("*.jpg")}
    assert len(originals) == 30 and all((block / name).read_bytes() == data for name, data in originals.items())

    killed = sorted(originals)[::7]
    for name in killed:
        (small / name).unlink()
    (small / killed[0]).with_name(".00000000.jpg.host.1.ab.tmp").write_bytes(b"partial")
    manifest = json.loads((small / MANIFEST).read_text())
    (small / MANIFEST).write_text(json.dumps({**manifest, "complete": False}))
    kept = sorted(set(originals) - set(killed))
    kept_stamps = [(small / name).stat().st_mtime_ns for name in kept]
    write_imagenet_like(small, 30, num_classes=10, seed=0)
    assert {p.relative_to(small): p.read_bytes() for p in small.rglob("*.jpg")} == originals
    assert [(small / name).stat().st_mtime_ns for name in kept] == kept_stamps
    assert not list(small.rglob("*.tmp")) and json.loads((small / MANIFEST).read_text())["complete"]

    write_imagenet_like(small, 12, num_classes=10, seed=0)  # trimmed to the first 12
    assert len(list(small.rglob("*.jpg"))) == 12


def test_refuses_a_directory_it_did_not_write(block, tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "mine.jpg").write_bytes(b"x")
    with pytest.raises(DataError, match="not empty"):
        write_imagenet_like(tmp_path / "photos", 10)
    with pytest.raises(DataError, match="other settings"):
        write_imagenet_like(block, 10, num_classes=10, seed=1)
    with pytest.raises(DataError, match="mine.jpg is not a directory"):
        write_imagenet_like(tmp_path / "photos" / "mine.jpg", 10)


@pytest.mark.parametrize("manifest", ["not JSON", "[1]", '{"version": 1, "num_classes": 10, "seed": 0, "count": "x"}'])
def test_a_manifest_it_did_not_write_is_refused_in_one_line(tmp_path, manifest):
    (tmp_path / "set").mkdir()
    (tmp_path / "set" / MANIFEST).write_text(manifest)
    with pytest.raises(DataError, match=f"^{tmp_path / 'set' / MANIFEST} is not the manifest of an ImageNet-like set"):
        write_imagenet_like(tmp_path / "set", 3, workers=1)
    assert [p.name for p in (tmp_path / "set").iterdir()] == [MANIFEST]


def test_the_files_do_not_depend_on_the_number_of_workers(block, tmp_path, monkeypatch):
    started = []

    class Recorded(imagenet_like.WorkerPool):  # starts at most the usable cores, the count asked recorded
        def __init__(self, processes: int):
            started.append(processes)
            super().__init__(min(processes, usable_cores()))

    monkeypatch.setattr(imagenet_like, "WorkerPool", Recorded)
    one = write_imagenet_like(tmp_path / "one", 24, num_classes=10, seed=0, workers=1)
    two = write_imagenet_like(tmp_path / "two", 24, num_classes=10, seed=0, workers=3000)
    assert started == ([usable_cores()] if usable_cores() > 1 else [])  # no more processes than cores
    files = {p.relative_to(one): p.read_bytes() for p in one.rglob("*.jpg")}
    assert len(files) == 24 and {p.relative_to(two): p.read_bytes() for p in two.rglob("*.jpg")} == files
    assert all((block / name).read_bytes() == data for name, data in files.items())  # the block's first 24
    with pytest.raises(DataError, match="workers >= 1"):
        write_imagenet_like(tmp_path / "none", 4, workers=0)


@pytest.mark.timeout(180)
def test_ctrl_c_is_one_line_and_the_same_command_completes_the_set(block, tmp_path):
    """Ctrl-C reaches the tool and its worker processes (one process group): exit 130 with one error line
    and no worker traceback; the same command then completes the set with the block's files."""
    import subprocess
    import sys
    from conftest import REPO, ctrl_c_once
    root = tmp_path / "set"
    slowed = ("import sys, time\n"
              "import pipelines.imagenet_like as gen\n"
              "write = gen._write_image\n"
              "def slowed(root, num_classes, seed, index):  # from image 8 on they wait: still running at the signal\n"
              "    time.sleep(60 if index >= 8 else 0.01)\n"
              "    return write(root, num_classes, seed, index)\n"
              "gen._write_image = slowed\n"
              "sys.argv[0] = 'make_demo_data'\n"
              "from tools.make_demo_data import main\n"
              "main()\n")
    command = ["--imagenet-like", "40", str(root), "--workers", "2"]
    stopped = ctrl_c_once(slowed, command, lambda: any(root.rglob("*.jpg")))
    assert stopped.returncode == 130, stopped.stderr
    assert stopped.stderr.splitlines() == [f"error: interrupted; the images written to {root} are kept and the "
                                           f"same command writes the rest"]
    assert 0 < len(list(root.rglob("*.jpg"))) < 40

    rerun = subprocess.run([sys.executable, "-m", "tools.make_demo_data", *command], cwd=REPO,
                           capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    written = {p.relative_to(root): p.read_bytes() for p in root.rglob("*.jpg")}
    assert len(written) == 40 and all((block / name).read_bytes() == data for name, data in written.items())


def _killed_at_seven(root, num_classes, seed, index):
    """`_write_image`, except that the worker writing image 7 dies as the out-of-memory killer ends it."""
    import signal
    if index == 7:
        os.kill(os.getpid(), signal.SIGKILL)
    _write_image(root, num_classes, seed, index)


@pytest.mark.timeout(120)  # CPython's pool waits forever for the images of a worker that died
def test_a_worker_killed_by_the_oom_killer_is_an_error_and_the_rerun_completes_the_set(block, tmp_path, monkeypatch):
    import pipelines.imagenet_like as imagenet_like
    from bt_fast.errors import WorkerLost
    monkeypatch.setattr(imagenet_like, "_write_image", _killed_at_seven)  # the workers are forked with it
    root = tmp_path / "set"
    with pytest.raises(WorkerLost, match=rf"^writing the ImageNet-like set {root}: worker process \d+ was killed by "
                                         r"SIGKILL .*The images written so far are kept; the same command writes"):
        write_imagenet_like(root, 24, num_classes=10, seed=0, workers=2)
    monkeypatch.setattr(imagenet_like, "_write_image", _write_image)
    write_imagenet_like(root, 24, num_classes=10, seed=0, workers=2)
    assert json.loads((root / MANIFEST).read_text())["complete"] is True
    files = {p.relative_to(root): p.read_bytes() for p in root.rglob("*.jpg")}
    assert len(files) == 24 and all((block / name).read_bytes() == data for name, data in files.items())


def _importing_nothing(root, num_classes, seed, index):
    """`_write_image`, refused where it imports a module or loads a photograph in a worker process."""
    import sys
    modules = set(sys.modules)
    _write_image(root, num_classes, seed, index)
    assert set(sys.modules) == modules, f"a worker imported {sorted(set(sys.modules) - modules)}"


def test_the_workers_are_forked_with_the_photographs_and_codecs_loaded(tmp_path, monkeypatch):
    """A first import or file read in a forked child can wait forever on a lock that another thread of the
    parent held at the fork (one full-suite run hung in this pool): the children only render and write."""
    parent, load = os.getpid(), imagenet_like.load_photograph

    def in_the_parent_only(name):
        assert os.getpid() == parent, f"worker {os.getpid()} loaded the photograph {name}"
        return load(name)
    imagenet_like._photograph.cache_clear()
    monkeypatch.setattr(imagenet_like, "load_photograph", in_the_parent_only)
    monkeypatch.setattr(imagenet_like, "_write_image", _importing_nothing)
    write_imagenet_like(tmp_path / "set", 12, num_classes=10, seed=0, workers=2)
    assert len(list((tmp_path / "set").rglob("*.jpg"))) == 12
