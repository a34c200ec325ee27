import math
import os

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF

from bt_fast.config import AugmentSpec, Config
from bt_fast.errors import DataError
from pipelines import reference
from pipelines.base import Placement
from pipelines.reference import PILGaussianBlur, ReferencePipeline, TwoViewImageFolder
from tests.conftest import REPO

SPEC = AugmentSpec(image_size=32)


def _config(image_folder) -> Config:
    return Config(data=str(image_folder), pipeline="reference", workers=0, augment=SPEC)


def test_batches_are_two_normalised_channels_last_views(image_folder):
    pipeline = ReferencePipeline(_config(image_folder), Placement(torch.device("cpu")), batch_size=4)
    assert len(pipeline) == 24 // 4
    pipeline.set_epoch(0)
    batches = list(pipeline)
    assert len(batches) == len(pipeline)
    view1, view2 = batches[0]
    assert view1.shape == view2.shape == (4, 3, 32, 32)
    assert view1.is_contiguous(memory_format=torch.channels_last)
    assert not torch.equal(view1, view2)
    # normalised with ImageNet statistics: values span roughly [-2.1, 2.6]
    assert view1.min() >= -2.2 and view1.max() <= 2.7 and view1.min() < 0 < view1.max()


def test_distortions_depend_only_on_seed_epoch_and_index(image_folder):
    dataset = TwoViewImageFolder(str(image_folder), SPEC, seed=5)
    a, b = dataset[(1, 3)], dataset[(1, 3)]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(dataset[(2, 3)][0], a[0])


def test_unreadable_image_names_the_file(image_folder, tmp_path):
    broken = tmp_path / "folder" / "class0"
    broken.mkdir(parents=True)
    (broken / "bad.jpg").write_bytes(b"not a jpeg")
    dataset = TwoViewImageFolder(str(tmp_path / "folder"), SPEC)
    with pytest.raises(DataError) as error:
        dataset[(0, 0)]
    assert str(error.value) == (f"cannot read image {broken / 'bad.jpg'}: not a recognised image file; remove or "
                                f"replace the file (tools.convert's report lists every unreadable image of a folder)")
    (broken / "bad.jpg").write_bytes(b"")  # was "not a recognised image file" too; the converter's words
    with pytest.raises(DataError, match=r"bad\.jpg: empty file \(0 bytes\); remove"):
        dataset[(0, 0)]


def test_an_exif_rotated_or_16_bit_image_is_read_as_the_converter_stores_it(tmp_path):
    """The reference pipeline and the evaluations (`load_rgb`) read the pixels FFCV's and DALI's inputs hold:
    an image with EXIF orientation 6 turned upright (a quarter turn clockwise), 16-bit grayscale scaled by
    255/65535, where Pillow's plain convert('RGB') left the first on its side and clipped the second to white."""
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (12, 20, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(tmp_path / "rotated.png", exif=exif)  # lossless: the pixels are known exactly
    assert np.array_equal(np.asarray(reference.load_rgb(str(tmp_path / "rotated.png"))), np.rot90(pixels, k=-1))

    deep = np.random.default_rng(1).integers(0, 65536, (9, 7), dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    eight = ((deep.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)  # rounded, never clipped
    assert np.array_equal(np.asarray(reference.load_rgb(str(tmp_path / "deep.png"))), np.repeat(eight[..., None], 3, 2))


def test_empty_data_directory_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="holds no images"):
        TwoViewImageFolder(str(tmp_path), SPEC)


@pytest.mark.parametrize("fault", ["unreadable class", "unreadable sub-folder", "broken link", "socket",
                                   "link to the root", "link above the root"])
def test_a_class_entry_that_cannot_be_read_is_named_with_the_reason(image_folder, tmp_path, monkeypatch, fault):
    """Such an entry was left out without a word: its images dropped, or 'holds no images' when it was the only
    class. Root reads any folder whatever its permissions, so a folder's EACCES is simulated at os.scandir."""
    import errno
    import shutil
    import socket
    root = tmp_path / "folder"
    shutil.copytree(image_folder, root)
    bad = {"unreadable class": root / "class1", "unreadable sub-folder": root / "class1" / "deeper",
           "broken link": root / "class9", "socket": root / "class9", "link to the root": root / "class9",
           "link above the root": root / "class9"}[fault]
    above = {"link to the root": root, "link above the root": tmp_path}.get(fault)
    expected = {"broken link": f"class folder {bad} is a broken symbolic link (to {tmp_path / 'gone'}); restore "
                               f"its target or remove the link",
                "socket": f"{bad} is a socket, not a class folder; remove it or move it out of the data directory",
                }.get(fault, f"cannot read {bad} ({os.strerror(errno.EACCES)}); make it readable or move it out of "
                             f"the data directory")
    if above:
        expected = (f"class folder {bad} links to {above.resolve()}, which holds the data directory itself: every "
                    f"image would be read again as this class; remove the link")
    listener = socket.socket(socket.AF_UNIX)
    if fault == "broken link":
        bad.symlink_to(tmp_path / "gone")
    elif fault == "socket":
        listener.bind(str(bad))
    elif above:  # the link's class held a copy of every image (and, above the root, of every other folder's)
        bad.symlink_to(above)
    else:
        bad.mkdir(exist_ok=True)
        scandir = os.scandir

        def denied(path="."):
            if not isinstance(path, int) and os.fspath(path) == str(bad):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
            return scandir(path)
        monkeypatch.setattr(os, "scandir", denied)
    with listener, pytest.raises(DataError) as error:
        TwoViewImageFolder(str(root), SPEC)
    assert str(error.value) == expected


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0])
def test_blur_is_the_gaussian_of_the_drawn_sigma(sigma):
    """The official code's PIL blur against torchvision's Gaussian with a kernel wide enough to be untruncated."""
    g = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.interpolate(torch.rand(1, 3, 8, 8, generator=g), size=64, mode="bicubic")
    image = (smooth + 0.2 * torch.rand(1, 3, 64, 64, generator=g)).clamp(0, 1)[0]
    pil = TF.to_pil_image(image)
    blurred = TF.pil_to_tensor(PILGaussianBlur((sigma, sigma))(pil)).float()
    kernel = 2 * math.ceil(4 * sigma) + 1
    expected = TF.gaussian_blur(TF.pil_to_tensor(pil).float(), [kernel, kernel], [sigma, sigma])
    inner = (slice(None), slice(8, -8), slice(8, -8))  # the filters pad the borders differently
    difference = (blurred - expected)[inner].abs()
    # (a sigma 25% off gives a mean difference of 1.5 levels or more)
    assert difference.mean() < 0.8 and difference.max() <= 3, (difference.mean(), difference.max())
    assert (blurred - TF.pil_to_tensor(pil).float())[inner].abs().mean() > 2  # it does blur


@pytest.mark.timeout(120)
def test_two_loader_workers_give_the_distortions_of_none(image_folder):
    """The docstring's promise: a sample's views depend on (seed, epoch, index), not on which worker made them."""
    epochs = {}
    for workers in (0, 2):
        config = Config(data=str(image_folder), pipeline="reference", workers=workers, augment=SPEC, seed=3)
        pipeline = ReferencePipeline(config, Placement(torch.device("cpu")), batch_size=4)
        pipeline.set_epoch(1)
        epochs[workers] = list(pipeline)
    assert len(epochs[0]) == len(epochs[2]) == 6
    for (a1, a2), (b1, b2) in zip(epochs[0], epochs[2]):
        assert torch.equal(a1, b1) and torch.equal(a2, b2)
    assert not torch.equal(epochs[0][0][0], epochs[0][0][1])  # the two views differ


def test_starting_mid_epoch_reads_only_the_remaining_images_and_gives_their_batches(image_folder, monkeypatch):
    """set_epoch(e, start_batch=k): the uninterrupted epoch's batches k.., without opening the skipped images."""
    config = Config(data=str(image_folder), pipeline="reference", workers=0, augment=SPEC, seed=3, prefetch=2)
    uninterrupted = ReferencePipeline(config, Placement(torch.device("cpu")), batch_size=4)
    uninterrupted.set_epoch(1)
    expected = list(uninterrupted)[4:]
    opened = []
    real_load = reference.load_rgb
    monkeypatch.setattr(reference, "load_rgb", lambda path: (opened.append(path), real_load(path))[1])
    resumed = ReferencePipeline(config, Placement(torch.device("cpu")), batch_size=4)
    resumed.set_epoch(1, start_batch=4)
    batches = list(resumed)
    assert len(opened) == 2 * 4 and len(resumed) == 6
    assert len(batches) == len(expected) == 2
    for (a1, a2), (b1, b2) in zip(batches, expected):
        assert torch.equal(a1, b1) and torch.equal(a2, b2)


# -- the listing the DataLoader workers read ----------------------------------------------------------
def test_sample_list_holds_what_the_list_holds(image_folder):
    from pipelines.image_folder import SampleList, find_image_folder
    listed = list(find_image_folder(image_folder)[1]) + [("caf\u00e9/\udcff.jpg", 7)]  # a non-UTF-8 name, as os gives it
    compact = SampleList(listed)
    assert len(compact) == len(listed) and list(compact) == listed
    assert compact[-1] == listed[-1] and compact[3] == listed[3] and compact[2:9:3] == listed[2:9:3]
    with pytest.raises(IndexError):
        compact[len(listed)]
    assert list(SampleList([])) == [] and SampleList(listed) == listed and listed == SampleList(listed)
    assert SampleList(listed) != listed[:-1] and SampleList(listed) != "x"
    order = np.random.default_rng(0).permutation(len(listed))
    assert compact.paths(order) == [listed[i][0] for i in order] and compact.paths(order[:0]) == []
    assert compact.labels.tolist() == [label for _, label in listed] and not compact.labels.flags.writeable
    dataset = TwoViewImageFolder(str(image_folder), AugmentSpec())
    assert list(dataset.samples) == find_image_folder(image_folder)[1]


def test_a_sample_list_is_built_without_the_python_objects_of_the_whole_listing():
    """Built from a stream (a directory scan, a list file), a SampleList holds the Python objects of a few
    thousand samples at a time: the memory that allocating them takes stays with the process afterwards.
    200,000 ImageNet-like paths take about 40 MB as (path, label) tuples; the arrays take 15."""
    import tracemalloc
    from pipelines.image_folder import SampleList
    streamed = ((f"/data/imagenet/train/n{i % 1000:08d}/n{i % 1000:08d}_{i}.JPEG", i % 1000) for i in range(200_000))
    tracemalloc.start()
    try:
        compact = SampleList(streamed)
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    columns = compact._ends.nbytes + compact._labels.nbytes  # concatenated from the chunks' at the end
    arrays = compact._bytes.nbytes + columns
    assert held >= arrays and peak - arrays - columns < 2 * 2**20, (held, peak, arrays)  # + what one chunk needs
    assert compact[123_457] == (f"/data/imagenet/train/n{457:08d}/n{457:08d}_123457.JPEG", 457)


def _worker_private_growth(samples) -> float:
    """MB of private memory a DataLoader worker gains reading every (path, label) of `samples` once."""
    from torch.utils.data import DataLoader, Dataset

    def private_kb() -> int:
        with open("/proc/self/smaps_rollup") as rollup:
            return sum(int(line.split()[1]) for line in rollup if line.startswith(("Private_Clean", "Private_Dirty")))

    class ReadAll(Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, _):
            before = private_kb()
            total = sum(len(path) + label for path, label in samples)
            return (private_kb() - before) / 1024, total

    (grown, _), = DataLoader(ReadAll(), batch_size=None, num_workers=1)
    return grown


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps_rollup"), reason="needs Linux's /proc/self/smaps_rollup")
def test_a_worker_reading_the_sample_list_copies_none_of_it():
    """A DataLoader worker is a fork: reading a list of Python objects writes their reference counts and so
    copies their pages into the worker, once per worker. The SampleList the datasets keep is read without
    writes. 300,000 ImageNet-like paths: about 55 MB as a list."""
    from pipelines.image_folder import SampleList
    listed = [(f"/data/imagenet/train/n{i % 1000:08d}/n{i % 1000:08d}_{i}.JPEG", i % 1000) for i in range(300_000)]
    as_list = _worker_private_growth(listed)
    compact = _worker_private_growth(SampleList(listed))
    assert as_list > 20, as_list  # the effect is there to be removed, on this machine
    assert compact < min(5.0, as_list / 10), (compact, as_list)


@pytest.mark.timeout(120)
def test_loader_workers_outlive_a_sigterm_to_the_process_group(image_folder):
    """SLURM and torchrun signal the rank's whole process group: the stop is the rank's to make at a step
    boundary, so its loader workers must keep serving batches (torch's own handler made them die of it)."""
    import multiprocessing
    import subprocess
    config = Config(data=str(image_folder), pipeline="reference", workers=2, augment=SPEC)
    pipeline = ReferencePipeline(config, Placement(torch.device("cpu")), batch_size=4)
    pipeline.set_epoch(0)
    others = set(multiprocessing.active_children())  # persistent workers of earlier tests' pipelines
    batches = iter(pipeline)
    first = next(batches)
    workers = [child for child in multiprocessing.active_children() if child not in others]
    assert len(workers) == 2
    subprocess.run(["kill", "-TERM", *(str(worker.pid) for worker in workers)], check=True)  # not from the rank
    rest = list(batches)
    assert len(rest) == len(pipeline) - 1 and all(worker.is_alive() for worker in workers)
    pipeline.set_epoch(0)
    assert torch.equal(next(iter(pipeline))[0], first[0])


@pytest.mark.timeout(120)
def test_a_rank_that_fails_mid_epoch_still_exits(tmp_path):
    """What the rank itself sends its loader workers at exit (multiprocessing's terminate() of daemonic children,
    then an unbounded join) still ends them: ignoring every SIGTERM would hang the failed rank there."""
    import subprocess
    import sys
    script = tmp_path / "fail_mid_epoch.py"
    script.write_text(
        "from torch.utils.data import DataLoader\n"
        "from bt_fast.run_control import leave_stops_to_the_rank\n"
        "loader = DataLoader(range(64), batch_size=4, num_workers=2, persistent_workers=True,\n"
        "                    worker_init_fn=leave_stops_to_the_rank)  # as the rank's loaders are built\n"
        "batches = iter(loader)\n"
        "next(batches)\n"
        "raise SystemExit(3)  # its loader iterator still alive\n")
    result = subprocess.run([sys.executable, str(script)], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=60)
    assert result.returncode == 3, result.stderr


def test_loader_workers_are_at_most_the_cores_this_process_may_use(image_folder):
    """workers=16 on two cores started 16 processes, and torch warned in four lines that the loader might freeze."""
    import dataclasses
    cores = len(os.sched_getaffinity(0))
    for asked, started in ((cores + 3, cores), (1, 1), (0, 0)):
        config = dataclasses.replace(_config(image_folder), workers=asked)
        assert ReferencePipeline(config, Placement(torch.device("cpu")), batch_size=4).loader.num_workers == started
