"""FFCV pipeline: host-crop sampling and resize, sharding, output contract, the beton itself.

The modes' wiring (decode once, device crop, device decode, memory, cap) is in tests/test_ffcv_modes.py.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from bt_fast.config import Config
from bt_fast.errors import DataError
from pipelines import ffcv as P
from pipelines.base import Placement
from pipelines.crop_sampling import random_resized_crop, sample_seed
from pipelines.ffcv_format import open_beton
from pipelines.image_folder import find_image_folder

REPO = Path(__file__).resolve().parents[1]

IMAGES = 24
SIZE = (64, 48)  # width, height
CROP_BOUND = 0.01  # grey levels (0..255): device crops against torchvision's float resized_crop, float32 rounding


def write_traceable_folder(root: Path) -> Path:
    """Images whose pixels say where they come from: R = column, G = row, B = 10 * id + 5.

    Ids follow the ImageFolder (= beton) order: 3 classes of 8, sorted.
    """
    width, height = SIZE
    columns = np.linspace(0, 255, width).round().astype(np.uint8)
    rows = np.linspace(0, 255, height).round().astype(np.uint8)
    for k in range(IMAGES):
        pixels = np.empty((height, width, 3), dtype=np.uint8)
        pixels[..., 0] = columns[None, :]
        pixels[..., 1] = rows[:, None]
        pixels[..., 2] = 10 * k + 5
        folder = root / f"class{k // 8}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"img{k:03d}.png")  # lossless source; the beton stores JPEG
    return root


@pytest.fixture(scope="module")
def dataset(module_tmp) -> tuple[Path, Path]:
    """(ImageFolder, beton) written with the project's converter."""
    from pipelines.convert import convert
    base = module_tmp("ffcv")
    folder = write_traceable_folder(base / "train")
    beton = base / "train.beton"
    convert(folder, beton, "ffcv", jpeg_quality=95, workers=1, progress=False)
    return folder, beton


def make_config(beton: Path, image_size: int = 16, **ffcv) -> Config:
    config = Config()
    config.ffcv = dataclasses.replace(config.ffcv, beton=str(beton), **ffcv)
    config.workers = 1
    config.seed = 3
    config.augment = dataclasses.replace(config.augment, image_size=image_size)
    return config


def cpu(rank: int = 0, world_size: int = 1, dtype=torch.float32) -> Placement:
    return Placement(torch.device("cpu"), dtype, rank, world_size)


MODES = {"device_crop": dict(decode="host", crop="device"), "device_decode": dict(decode="device", crop="device"),
         "host_crop": dict(decode="host", crop="host")}


@pytest.fixture
def python_mode():
    """FFCV's compiler off: the loader's operations run as plain Python (countable, no numba compile time)."""
    P.Compiler.set_enabled(False)
    yield
    P.Compiler.set_enabled(True)


def image_ids(crops: torch.Tensor) -> np.ndarray:
    """(B, 2, S, S, 3) grey levels -> (B, 2) source ids from the blue channel."""
    blue = crops[..., 2].double().mean(dim=(2, 3)).numpy()
    return np.rint((blue - 5) / 10).astype(int)


def epoch_crops(pipeline: P.FFCVPipeline) -> np.ndarray:
    """The current epoch's crops before augmentation, (N, 2, S, S, 3): uint8 for crop=host, else float grey levels."""
    batches = []
    for batch in pipeline.host_batches():
        crops = pipeline.device_crops(batch).permute(0, 1, 3, 4, 2)
        batches.append(crops.numpy().copy() if crops.dtype == torch.uint8 else crops.double().numpy() * 255)
    return np.concatenate(batches)


# ------------------------------------------------------------------------------------------
# Host crops (crop=host)
# ------------------------------------------------------------------------------------------

def stored_bytes(beton: Path, index: int) -> np.ndarray:
    """Sample `index`'s stored JPEG, read from the file at its allocation-table entry."""
    reader = P.Reader(str(beton))
    field = reader.metadata[index]["f0"]
    table = reader.alloc_table
    size = int(table["size"][np.nonzero(table["ptr"] == field["data_ptr"])[0][0]])
    return np.fromfile(beton, dtype=np.uint8, count=size, offset=int(field["data_ptr"]))


def stored_jpeg(beton: Path, index: int) -> np.ndarray:
    """Decode sample `index`'s stored JPEG independently (OpenCV), as RGB."""
    return cv2.cvtColor(cv2.imdecode(stored_bytes(beton, index), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def test_host_crops_are_resized_boxes_of_the_decoded_image(dataset):
    _, beton = dataset
    config = make_config(beton, image_size=24, crop="host")
    pipeline = P.FFCVPipeline(config, cpu(), batch_size=4)
    pipeline.set_epoch(2)
    order = pipeline.epoch_indices()
    crops = epoch_crops(pipeline)
    seed = P.epoch_seed(config.seed, 2, P.CROP_STREAM)
    spec = config.augment
    for position in range(0, IMAGES, 5):
        index = int(order[position])
        image = stored_jpeg(beton, index)
        np.random.seed(sample_seed(seed, index))
        for view in range(2):
            top, left, h, w = random_resized_crop(SIZE[1], SIZE[0], *spec.crop_scale, np.log(spec.crop_ratio[0]),
                                                    np.log(spec.crop_ratio[1]), *spec.crop_ratio)
            expected = cv2.resize(image[top:top + h, left:left + w], (24, 24), interpolation=cv2.INTER_AREA)
            got = crops[position, view]
            error = np.abs(got.astype(int) - expected)
            # FFCV decodes with libjpeg-turbo's fast IDCT/upsampling, OpenCV with the accurate ones;
            # a box off by one source pixel would shift red or green by ~4 on average.
            assert error.max() <= 6 and error.mean() < 1.5, (index, view, error.max(), error.mean())
            # The red/green gradients place the crop where the box says (independent of any decoder).
            assert abs(got[..., 0].astype(float).mean() - 255 * (left + w / 2 - 0.5) / (SIZE[0] - 1)) < 12
            assert abs(got[..., 1].astype(float).mean() - 255 * (top + h / 2 - 0.5) / (SIZE[1] - 1)) < 12


def test_random_resized_crop_follows_torchvision():
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    args = (*scale, np.log(ratio[0]), np.log(ratio[1]), *ratio)
    # Deterministic cases: the centre-crop fallback and a full crop.
    for height, width, s, r in [(30, 300, (1.0, 1.0), (1.0, 1.0)), (300, 30, (1.0, 1.0), (1.0, 1.0)),
                                (40, 40, (1.0, 1.0), (1.0, 1.0)), (40, 200, (0.99, 1.0), (0.75, 1.25))]:
        ours = random_resized_crop(height, width, *s, np.log(r[0]), np.log(r[1]), *r)
        assert ours == tuple(T.RandomResizedCrop.get_params(torch.empty(1, height, width), list(s), list(r)))
    # Random cases: same distribution of boxes (incl. how often the fallback is taken).
    n = 3000
    for height, width in [(48, 64), (20, 200)]:
        np.random.seed(0)
        torch.manual_seed(0)
        ours = np.array([random_resized_crop(height, width, *args) for _ in range(n)], dtype=float)
        ref = np.array([T.RandomResizedCrop.get_params(torch.empty(1, height, width), list(scale), list(ratio))
                        for _ in range(n)], dtype=float)
        for column in range(4):
            spread = max(ref[:, column].std(), 0.5)
            assert abs(ours[:, column].mean() - ref[:, column].mean()) < 5 * spread * (2 / n) ** 0.5, (height, column)
        fallback = lambda boxes: np.mean((boxes[:, 2] == height) | (boxes[:, 3] == width))  # noqa: E731
        assert abs(fallback(ours) - fallback(ref)) < 0.05


# ------------------------------------------------------------------------------------------
# The modes: decode once, device crop, device decode, resume, memory, cap, bad data
# ------------------------------------------------------------------------------------------

def counted_decodes(mode: str, monkeypatch) -> list[int]:
    """Images each decode call of `mode` handles, appended as the loader (plain Python) or the device decodes."""
    from pipelines import device_decode, ffcv_decoders, ffcv_host_crop
    calls: list[int] = []

    def count(module, name, images_of):
        real = getattr(module, name)

        def counting(*args, **kwargs):
            calls.append(images_of(args))
            return real(*args, **kwargs)
        monkeypatch.setattr(module, name, counting)

    if mode == "host_crop":
        count(ffcv_host_crop, "decode_whole", lambda args: 1)
    elif mode == "device_crop":
        count(ffcv_decoders, "decode_into", lambda args: 1)
    else:
        real_decoder = device_decode._decoder
        monkeypatch.setattr(device_decode, "_decoder", lambda: (  # one batched call per batch
            lambda jpegs, **kwargs: (calls.append(len(jpegs)), real_decoder()(jpegs, **kwargs))[1]))
    return calls


@pytest.mark.parametrize("mode", sorted(MODES))
def test_each_image_is_decoded_once_for_both_views(dataset, mode, monkeypatch):
    _, beton = dataset
    config = make_config(beton, **MODES[mode])
    calls = counted_decodes(mode, monkeypatch)
    P.Compiler.set_enabled(False)
    try:
        crops = epoch_crops(P.FFCVPipeline(config, cpu(), batch_size=4))
    finally:
        P.Compiler.set_enabled(True)
    assert crops.shape == (IMAGES, 2, 16, 16, 3)
    assert sum(calls) == IMAGES  # one decode per image, two crops each
    ids = image_ids(torch.from_numpy(crops))
    assert (ids[:, 0] == ids[:, 1]).all()                      # both crops from the same image ...
    assert sorted(ids[:, 0]) == list(range(IMAGES))            # ... every image once ...
    assert all(not np.array_equal(c[0], c[1]) for c in crops)  # ... and the two crops differ
    if mode == "host_crop":  # (the device-crop modes' compiled operations: tests/test_ffcv_decoders.py)
        monkeypatch.undo()
        compiled = P.FFCVPipeline(config, cpu(), batch_size=4)
        assert np.array_equal(epoch_crops(compiled), crops)  # numba loader == the Python run, bit for bit


@pytest.mark.parametrize("mode", ["device_crop", "device_decode"])
def test_device_crops_are_torchvision_resized_crops_of_the_decoded_image(dataset, mode, python_mode):
    """torchvision's resized_crop (bicubic, antialias) of the same decoded image on the boxes the seed gives.

    The decoded image: the host stage's (libjpeg-turbo, FFCV's flags), or TorchCodec's decode_jpeg of the stored bytes.
    """
    from torchcodec.decoders import decode_jpeg
    from torchvision.transforms.v2.functional import InterpolationMode, resized_crop
    _, beton = dataset
    config = make_config(beton, image_size=24, **MODES[mode])
    pipeline = P.FFCVPipeline(config, cpu(), batch_size=4)
    pipeline.set_epoch(2)
    order = pipeline.epoch_indices()
    seed = P.epoch_seed(config.seed, 2, P.CROP_STREAM)
    spec = config.augment
    delivered = []  # (sample index, decoded image, both crops), kept past the batch's buffer
    for batch in pipeline.host_batches():
        crops = pipeline.device_crops(batch)
        for sample in range(len(crops)):
            index = int(order[len(delivered)])
            if mode == "device_crop":
                decoded = batch[0][sample, :SIZE[1], :SIZE[0]].permute(2, 0, 1).clone()
            else:
                decoded = decode_jpeg(torch.from_numpy(stored_bytes(beton, index)))
            delivered.append((index, decoded, crops[sample].clone()))
    # Replayed once the epoch's loader thread has ended: with FFCV's compiler off it draws its boxes from
    # NumPy's global generator, which the replay reseeds (compiled, each numba thread has its own).
    for index, decoded, crops in delivered:
        np.random.seed(sample_seed(seed, index))
        for view in range(2):
            box = random_resized_crop(SIZE[1], SIZE[0], *spec.crop_scale, np.log(spec.crop_ratio[0]),
                                      np.log(spec.crop_ratio[1]), *spec.crop_ratio)
            expected = resized_crop(decoded.float() / 255, *box, [24, 24], InterpolationMode.BICUBIC,
                                    antialias=True).clamp(0, 1)
            error = (crops[view] - expected).abs().max() * 255
            assert error <= CROP_BOUND, (index, view, error)
    assert len(delivered) == IMAGES


def test_the_device_crop_wiring_adds_nothing_to_resized_crops(dataset, python_mode):
    """crop=device's crops are `resized_crops` of the host stage's padded images and rows, bit for bit."""
    from pipelines.device_crop import resized_crops
    from pipelines.ffcv_decoders import BOXES
    _, beton = dataset
    pipeline = P.FFCVPipeline(make_config(beton, image_size=20, crop="device"), cpu(), batch_size=8)
    for images, rows in pipeline.host_batches():
        expected = resized_crops(images, rows[:, BOXES].reshape(-1, 2, 4), 20)
        assert torch.equal(pipeline.device_crops((images, rows)), expected)


def test_device_decode_gives_the_host_decode_boxes_and_pixels_within_a_bound(dataset, python_mode):
    _, beton = dataset
    runs = {}
    for mode in ("device_crop", "device_decode"):
        pipeline = P.FFCVPipeline(make_config(beton, image_size=24, **MODES[mode]), cpu(), batch_size=4)
        pipeline.set_epoch(1)
        rows = torch.cat([rows.clone() for _, rows in pipeline.host_batches()])
        runs[mode] = rows, epoch_crops(pipeline)
    (rows, crops), (rows_device, crops_device) = runs["device_crop"], runs["device_decode"]
    assert torch.equal(rows[:, 3:], rows_device[:, 3:])  # same samples, same boxes
    error = np.abs(crops - crops_device)
    # FFCV's libjpeg-turbo flags (fast IDCT) against decode_jpeg's accurate decode: the bound of the decodes
    # themselves (tests/test_ffcv_decoders.py), which the resize does not enlarge
    assert error.max() <= 6 and error.mean() < 1.5, (error.max(), error.mean())


@pytest.mark.parametrize("mode", sorted(MODES))
def test_resuming_mid_epoch_gives_identical_batches_without_reading_the_skipped_ones(dataset, mode, python_mode,
                                                                                    monkeypatch):
    """set_epoch(e, start_batch=k) yields the uninterrupted epoch's batches k.., decoding only their images."""
    _, beton = dataset
    config = make_config(beton, **MODES[mode])
    uninterrupted = P.FFCVPipeline(config, cpu(), batch_size=4)
    uninterrupted.set_epoch(1)
    expected = list(uninterrupted)[2:]
    calls = counted_decodes(mode, monkeypatch)
    resumed = P.FFCVPipeline(config, cpu(), batch_size=4)
    resumed.set_epoch(1, start_batch=2)
    batches = list(resumed)
    assert sum(calls) == 4 * len(expected)  # the two skipped batches' 8 images are never decoded
    assert len(batches) == len(expected) == len(uninterrupted) - 2
    for got, want in zip(batches, expected):
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("mode", ["device_crop", "host_crop"])
def test_views_are_bit_identical_with_prefetch_on_and_off(dataset, mode, python_mode):
    """prefetch=N issues the device stage of N batches ahead; the draws stay in batch order."""
    _, beton = dataset
    epochs = {}
    for depth in (0, 1, 3):
        config = make_config(beton, **MODES[mode])
        config.prefetch = depth
        pipeline = P.FFCVPipeline(config, cpu(), batch_size=4)
        pipeline.set_epoch(1)
        epochs[depth] = [(v1.clone(), v2.clone()) for v1, v2 in pipeline]
    assert len(epochs[0]) == IMAGES // 4
    for depth in (1, 3):
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(epochs[0], epochs[depth]))


def test_an_abandoned_epoch_stops_before_the_next_reuses_its_buffers(dataset, python_mode):
    """Buffers are kept across epochs: a new epoch after a partly read one still gives that epoch's batches."""
    _, beton = dataset
    pipeline = P.FFCVPipeline(make_config(beton), cpu(), batch_size=4)
    full = epoch_crops(pipeline)
    pipeline.set_epoch(1)
    next(iter(pipeline.host_batches()))  # read one batch of epoch 1, then go back to epoch 0
    pipeline.set_epoch(0)
    assert np.array_equal(epoch_crops(pipeline), full)
    assert pipeline.loader._buffers is not None
    buffers = pipeline.loader._buffers
    epoch_crops(pipeline)
    assert pipeline.loader._buffers is buffers


@pytest.mark.timeout(120)
def test_an_epoch_closed_early_stops_its_thread_within_a_batch_however_slow_its_batches(dataset, python_mode,
                                                                                      monkeypatch):
    """FFCV's thread looks at its stop flag only while its queue is full: where a batch takes longer than
    the close took to make room, it used to read the whole epoch before the close returned. Here every
    batch after the first is finished only once the close has begun, the slowest a batch can be."""
    from ffcv.loader.epoch_iterator import EpochIterator
    made = []
    original = EpochIterator.run_pipeline

    def batch_finished_after_the_close_begins(self, *args):
        made.append(args[0])
        if len(made) > 1:
            assert self.terminate_event.wait(timeout=60)
        return original(self, *args)

    monkeypatch.setattr(EpochIterator, "run_pipeline", batch_finished_after_the_close_begins)
    pipeline = P.FFCVPipeline(make_config(dataset[1]), cpu(), batch_size=4)
    next(iter(pipeline.host_batches()))
    pipeline.loader.stop_epoch()
    assert made == [0, 1] and IMAGES // 4 > 2  # the batch taken and the one being made when the close began


@pytest.mark.parametrize("mode", ["device_crop", "device_decode"])
def test_memory_line_is_printed_once_on_rank_zero(dataset, mode, capsys):
    from pipelines.ffcv_decoders import PaddedLayout
    _, beton = dataset
    config = make_config(beton, **MODES[mode])
    P.FFCVPipeline(config, cpu(1, 2), batch_size=4)
    assert "MiB" not in capsys.readouterr().err
    P.FFCVPipeline(config, cpu(0, 2), batch_size=4)
    lines = [line for line in capsys.readouterr().err.splitlines() if "MiB" in line]
    layout = PaddedLayout.of(P.Reader(str(beton)))
    host, device = layout.host_bytes_per_batch(4, MODES[mode]["decode"]), layout.device_bytes_per_batch(4)
    assert (layout.max_height, layout.max_width) == (SIZE[1], SIZE[0])
    assert lines == [f"ffcv: {beton} pads each image to 48x64: {host / 2**20:.2f} MiB on the host and "
                     f"{device / 2**20:.2f} MiB on the device per batch of 4 (decode={MODES[mode]['decode']}, "
                     f"crop=device)"]


def test_a_beton_above_the_padded_side_cap_fails_at_start(dataset):
    _, beton = dataset
    with pytest.raises(DataError, match=f"{beton} pads every image to 48x64.*cap of 32 px.*--max-resolution 32") as err:
        P.FFCVPipeline(make_config(beton, max_padded_side=32, crop="device"), cpu(), batch_size=4)
    assert "\n" not in str(err.value)
    P.FFCVPipeline(make_config(beton, max_padded_side=32, crop="host"), cpu(), batch_size=4)  # no padding there


def test_the_command_that_the_padded_side_cap_names_reconverts_within_it(dataset, tmp_path):
    """The reconversion the error line suggests (SRC filled in) replaces the .beton with one whose stored sides,
    read by FFCV's own Reader, are within the cap."""
    import shlex
    import shutil
    from ffcv.reader import Reader
    from tools.convert import main as convert_main
    folder, original = dataset
    beton = tmp_path / "train.beton"
    shutil.copy(original, beton)
    with pytest.raises(DataError) as err:
        P.FFCVPipeline(make_config(beton, max_padded_side=32, crop="device"), cpu(), batch_size=4)
    command = shlex.split(str(err.value).split("`")[1])
    assert command[:3] == ["python", "-m", "tools.convert"]
    assert convert_main([str(folder) if word == "SRC" else word for word in command[3:]] + ["--workers", "1"]) == 0
    stored = Reader(str(beton)).metadata["f0"]
    assert max(stored["width"].max(), stored["height"].max()) <= 32


def broken_beton(beton: Path, path: Path, keep: int) -> Path:
    """A copy of `beton` whose sample 5 has its stored JPEG zeroed after its first `keep` bytes."""
    blob = bytearray(beton.read_bytes())
    start = int(P.Reader(str(beton)).metadata[5]["f0"]["data_ptr"]) + keep
    blob[start:start + 64] = bytes(64)
    path.write_bytes(bytes(blob))
    return path


def test_a_beton_cut_short_anywhere_is_one_data_error_on_open(dataset, tmp_path):
    """However few bytes are missing, opening says so and what to do: FFCV's `Reader` takes a partial
    allocation table without complaint, which failed later as an IndexError in `stored_bytes`."""
    _, beton = dataset
    blob = beton.read_bytes()
    table_at = int(P.Reader(str(beton)).header["alloc_table_ptr"])
    open_beton(beton)  # the whole file opens
    for cut in (1, 10, 24, 50, 200, len(blob) - table_at, len(blob) - table_at + 1, len(blob) - 100, len(blob)):
        short = tmp_path / "short.beton"
        short.write_bytes(blob[:len(blob) - cut])
        with pytest.raises(DataError, match=rf"^cannot read FFCV dataset {short} \({len(blob) - cut} bytes, "
                                            r"(cut short|shorter).*\); write it again from its images with "
                                            rf"`python -m tools.convert SRC {short} --format ffcv --force` "
                                            r"\(or delete it") as err:
            open_beton(short)
        assert "\n" not in str(err.value), cut


def test_the_samples_missing_from_an_allocation_table_are_counted_as_np_isin_counts():
    from pipelines.ffcv_format import _count_missing, _sorted
    rng = np.random.default_rng(0)
    for table_size, wanted_size in ((0, 5), (1, 3), (50, 80), (1000, 1000)):
        table = rng.choice(10 * max(table_size, 1), size=table_size, replace=False).astype(np.uint64)
        wanted = rng.integers(0, 10 * max(table_size, 1), size=wanted_size).astype(np.uint64)
        for order in (table, np.sort(table)):  # FFCV's writer need not write its table in order
            assert _count_missing(wanted, _sorted(order)) == int((~np.isin(wanted, table)).sum())


@pytest.mark.parametrize("mode", sorted(MODES))
def test_a_corrupt_stored_jpeg_is_one_data_error(dataset, tmp_path, mode, python_mode):
    _, beton = dataset
    cases = {"no header": 0} if mode != "device_decode" else {"no header": 0, "broken body": 2}
    for case, keep in cases.items():
        broken = broken_beton(beton, tmp_path / "broken.beton", keep)
        pipeline = P.FFCVPipeline(make_config(broken, **MODES[mode]), cpu(), batch_size=4)
        with pytest.raises(DataError, match="broken.beton.*cannot be decoded") as err:
            for _ in pipeline:
                pass
        assert "\n" not in str(err.value), case


@pytest.mark.parametrize("mode", sorted(MODES))
def test_the_demo_config_trains_a_few_steps(dataset, mode, tmp_path, python_mode):
    from bt_fast.config import load_config
    from bt_fast.train import train
    _, beton = dataset
    settings = [f"{key}={value}" for key, value in MODES[mode].items()]
    config = load_config("configs/demo_cpu.yaml", [
        f"data={beton}", "pipeline=ffcv", f"out_dir={tmp_path / 'run'}", "knn_every=0", "workers=1", "batch_size=8",
        "projector=32-32", "augment.image_size=32", "max_steps=1", "device=cpu",
        *(f"ffcv.{setting}" for setting in settings)])
    summary = train(config)
    assert summary["steps"] == 1 and (tmp_path / "run" / "checkpoint.pth").is_file()


# ------------------------------------------------------------------------------------------
# Sharding and epochs
# ------------------------------------------------------------------------------------------

def test_quasi_random_order_gives_each_image_to_exactly_one_rank_per_epoch(dataset):
    """(The random order is covered for all pipelines in tests/test_epochs.py.)"""
    _, beton = dataset
    config = make_config(beton, order="quasi_random", os_cache=False)
    # Process cache; the loader runs as plain Python to save numba compile time.
    P.Compiler.set_enabled(False)
    try:
        ranks = [P.FFCVPipeline(config, cpu(rank, 2), batch_size=4) for rank in (0, 1)]
    finally:
        P.Compiler.set_enabled(True)
    assert len(ranks[0]) == len(ranks[1]) == 3
    seen = []
    for epoch in (0, 1):
        ids = []
        for pipeline in ranks:
            pipeline.set_epoch(epoch)
            crops = torch.from_numpy(epoch_crops(pipeline))
            pair = image_ids(crops)
            assert (pair[:, 0] == pair[:, 1]).all()
            ids.append(pair[:, 0])
        assert len(ids[0]) == len(ids[1]) == 12
        assert not set(ids[0]) & set(ids[1])                       # disjoint ...
        assert sorted(np.concatenate(ids)) == list(range(IMAGES))  # ... and together everything
        seen.append(np.concatenate(ids))
    assert not np.array_equal(seen[0], seen[1])  # a new order each epoch


def synthetic_reader(samples: int = 300, page_size: int = 4096, seed: int = 0) -> SimpleNamespace:
    """What a memory manager reads of a `Reader`: an allocation table (1-3 allocations per sample, rows
    shuffled, spanning many pages) and the page size."""
    from ffcv.types import ALLOC_TABLE_TYPE
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 4, samples)
    table = np.zeros(counts.sum(), dtype=ALLOC_TABLE_TYPE)
    table["sample_id"] = np.repeat(np.arange(samples), counts)
    table["size"] = rng.integers(100, 3000, len(table))
    table["ptr"] = 64 + np.concatenate([[0], np.cumsum(table["size"][:-1])])
    return SimpleNamespace(alloc_table=table[rng.permutation(len(table))], page_size=page_size)


@pytest.mark.parametrize("mode", ["device_crop", "host_crop"])
def test_ffcvs_own_process_cache_reads_what_the_os_cache_reads(dataset, mode):
    """os_cache=false reads the .beton into FFCV's page slots, through the page reader of
    `pipelines.ffcv_memory` (compiled once per page size): the same crops as through the OS page cache."""
    _, beton = dataset
    crops = [epoch_crops(P.FFCVPipeline(make_config(beton, os_cache=os_cache, **MODES[mode]), cpu(), batch_size=4))
             for os_cache in (True, False)]
    assert np.array_equal(crops[0], crops[1])


def test_lazy_page_tables_are_ffcvs_own(dataset):
    from ffcv.memory_managers import OSCacheManager, ProcessCacheManager
    import ffcv.loader.loader
    from pipelines.ffcv_memory import LazyOSCacheManager, LazyProcessCacheManager
    reader = synthetic_reader()
    for stock, lazy in ((OSCacheManager, LazyOSCacheManager), (ProcessCacheManager, LazyProcessCacheManager)):
        want, got = stock(reader), lazy(reader)
        assert np.array_equal(got.ptrs, want.ptrs) and np.array_equal(got.sizes, want.sizes)
        assert len(want.page_to_samples) > 50  # the table spans many pages
        for table in ("ptr_to_size", "sample_to_pages", "page_to_samples"):
            assert getattr(got, table) == getattr(want, table), table

    # The default (OS cache, random order) never builds the page tables; the stock names are put back.
    _, beton = dataset
    pipeline = P.FFCVPipeline(make_config(beton), cpu(), batch_size=4)
    pipeline.set_epoch(0)
    next(iter(pipeline))
    manager = pipeline.loader.memory_manager
    assert type(manager) is LazyOSCacheManager and "_page_tables" not in vars(manager)
    assert (ffcv.loader.loader.OSCacheManager, ffcv.loader.loader.ProcessCacheManager) == \
        (OSCacheManager, ProcessCacheManager)


def test_the_os_cache_reader_leaves_numbas_shared_array_type_writable(dataset, monkeypatch):
    """FFCV's own OSCacheManager marks numba's one interned type of writable uint8 vectors read-only
    when it compiles its reader; ours must not, and must still read each sample's bytes."""
    import numba
    from ffcv.memory_managers import OSCacheManager
    from pipelines.ffcv_memory import LazyOSCacheManager
    shared = numba.uint8[::1]
    assert shared is numba.typeof(np.zeros(3, np.uint8))  # numba's interning: one object for the type
    monkeypatch.setattr(shared, "mutable", True)  # as numba made it, whatever a stock loader did before
    reader = synthetic_reader()
    stock_flips_it = OSCacheManager(reader).state_type
    assert not shared.mutable and not stock_flips_it[0].mutable  # the side effect, in FFCV 1.0.2
    shared.mutable = True

    manager = LazyOSCacheManager(reader)
    read = manager.compile_reader()
    assert shared.mutable and numba.typeof(np.zeros(3, np.uint8)).mutable
    data = np.arange(reader.alloc_table["ptr"].max() + reader.alloc_table["size"].max(), dtype=np.uint64)
    data = (data % 251).astype(np.uint8)
    data.flags.writeable = False
    for ptr, size in reader.alloc_table[["ptr", "size"]][:20].tolist():
        assert np.array_equal(read(np.uint64(ptr), (data, manager.ptrs, manager.sizes)), data[ptr:ptr + size])

    _, beton = dataset  # and a whole pipeline's first batch
    pipeline = P.FFCVPipeline(make_config(beton), cpu(), batch_size=4)
    pipeline.set_epoch(0)
    next(iter(pipeline))
    assert shared.mutable


def test_epoch_sharding_deals_contiguous_blocks_of_one_global_order():
    parts = [P.EpochSharding(10, rank, 3, seed=0).indices(4) for rank in range(3)]
    # The convention written out: one permutation of range(10) seeded by (seed, epoch), 10 // 3 per rank.
    permutation = np.random.default_rng([0, 4, 0]).permutation(10)
    assert [p.tolist() for p in parts] == [permutation[0:3].tolist(), permutation[3:6].tolist(),
                                           permutation[6:9].tolist()]
    with pytest.raises(DataError, match="ffcv.order"):
        P.EpochSharding(10, 0, 1, seed=0, order="sorted")


# ------------------------------------------------------------------------------------------
# The output contract
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode, dtype", [("device_crop", torch.float32), ("device_crop", torch.bfloat16),
                                         ("device_decode", torch.float32), ("host_crop", torch.float32)])
def test_views_are_normalised_channels_last_batches(dataset, mode, dtype, python_mode):
    folder, beton = dataset
    config = make_config(beton, image_size=32, **MODES[mode])
    pipeline = P.FFCVPipeline(config, cpu(dtype=dtype), batch_size=8)
    assert len(pipeline) == 3 and pipeline.num_samples == len(list(folder.rglob("*.png")))  # what a resume compares
    batches = list(pipeline)
    assert len(batches) == 3
    mean = torch.tensor(config.augment.mean).view(1, 3, 1, 1)
    std = torch.tensor(config.augment.std).view(1, 3, 1, 1)
    for view1, view2 in batches:
        for view in (view1, view2):
            assert view.shape == (8, 3, 32, 32) and view.dtype == dtype and view.device.type == "cpu"
            assert view.is_contiguous(memory_format=torch.channels_last)
            pixels = view.float() * std + mean
            assert pixels.min() > -0.02 and pixels.max() < 1.02  # normalised [0, 1] images
        assert not torch.equal(view1, view2)
    again = list(pipeline)  # same epoch: same crops and distortions
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again))
    pipeline.set_epoch(1)
    assert not torch.equal(next(iter(pipeline))[0], batches[0][0])


def test_stock_ffcv_loader_reads_the_beton_and_our_pipelines_work_after_it(dataset):
    """Also: FFCV's stock OS-cache reader retypes numba's shared uint8 vector type, which the code our
    operations compile once per process was typed with (`pipelines.ffcv_compile`); every mode still runs,
    with the same crops, after each stock loader run in the process (numba's KeyError without the guard)."""
    from ffcv.fields.decoders import CenterCropRGBImageDecoder, IntDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import ToTensor
    folder, beton = dataset
    before = {mode: epoch_crops(P.FFCVPipeline(make_config(beton, **MODES[mode]), cpu(), batch_size=4))
              for mode in MODES}
    for batch_size in (6, 8):  # new batch sizes: code compiled anew, calling helpers compiled before
        loader = Loader(str(beton), batch_size=6, num_workers=1, order=OrderOption.SEQUENTIAL, drop_last=False,
                        os_cache=True, pipelines={"image": [CenterCropRGBImageDecoder((16, 16), 1.0), ToTensor()],
                                                  "label": [IntDecoder(), ToTensor()]})
        images, labels = zip(*[(x.clone(), y.clone()) for x, y in loader])
        images, labels = torch.cat(images), torch.cat(labels).view(-1)
        _, samples = find_image_folder(folder)
        assert labels.tolist() == [label for _, label in samples]
        assert image_ids(images.unsqueeze(1)).ravel().tolist() == list(range(IMAGES))
        for mode, crops in before.items():
            pipeline = P.FFCVPipeline(make_config(beton, **MODES[mode]), cpu(), batch_size=batch_size)
            assert np.array_equal(epoch_crops(pipeline), crops), (mode, batch_size)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_a_second_pipeline_in_a_process_compiles_nothing_and_gives_the_same_crops(dataset, mode):
    """FFCV compiles each loader's operations afresh; ours are compiled once per process
    (`pipelines.ffcv_compile`): a second pipeline, also one with another crop side, makes numba compile nothing."""
    from numba.core import event
    _, beton = dataset
    first = epoch_crops(P.FFCVPipeline(make_config(beton, **MODES[mode]), cpu(), batch_size=4))
    compiled = []

    class Compiles(event.Listener):
        def on_start(self, event):
            compiled.append(event.data["dispatcher"].py_func.__qualname__)

        def on_end(self, event):
            pass
    with event.install_listener("numba:compile", Compiles()):
        again = epoch_crops(P.FFCVPipeline(make_config(beton, **MODES[mode]), cpu(), batch_size=4))
        other_side = epoch_crops(P.FFCVPipeline(make_config(beton, image_size=24, **MODES[mode]), cpu(), batch_size=4))
    assert compiled == []
    assert np.array_equal(again, first) and other_side.shape[2:4] == (24, 24)


FRESH_PROCESS = """
import json, sys
from pathlib import Path
from numba.core import event
from test_ffcv_pipeline import MODES, P, cpu, epoch_crops, make_config

compiled = {"first": [], "second": []}
phase = "first"


class Compiles(event.Listener):
    def on_start(self, event):
        compiled[phase].append(event.data["dispatcher"].py_func.__qualname__)

    def on_end(self, event):
        pass


configs = [make_config(Path(sys.argv[1]), **MODES[mode]) for mode in ("device_crop", "device_decode")]
with event.install_listener("numba:compile", Compiles()):
    for config in configs:
        epoch_crops(P.FFCVPipeline(config, cpu(), batch_size=4))
    phase = "second"
    for config in configs:
        epoch_crops(P.FFCVPipeline(config, cpu(), batch_size=4))
print(json.dumps(compiled))
"""


@pytest.mark.timeout(120)
def test_a_fresh_process_compiles_its_second_pipelines_not_at_all_and_its_first_without_error_formatting(dataset):
    """As a training run, the bench or the GPU checks meet it: a process where nothing else holds numba's types
    (numba interns them weakly, so an unheld one is made anew). The second pipeline of each device mode compiles
    nothing, and the first ones none of numba's shape-mismatch message formatting, seconds of compile before the
    first batch."""
    _, beton = dataset
    result = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(beton)], cwd=REPO, capture_output=True,
                            text=True, timeout=110, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                [str(REPO / "tests"), str(REPO)])})
    assert result.returncode == 0, result.stderr[-3000:]
    compiled = json.loads(result.stdout.splitlines()[-1])
    assert compiled["second"] == []
    assert compiled["first"] and not [name for name in compiled["first"] if "shape_context" in name]


# ------------------------------------------------------------------------------------------
# Finding / converting the beton, bad input
# ------------------------------------------------------------------------------------------

def test_missing_beton_is_converted_once_on_first_use(dataset, tmp_path):
    folder, _ = dataset
    data = tmp_path / "data"
    data.symlink_to(folder, target_is_directory=True)
    config = make_config(Path(""))
    config.data = str(data) + "/"
    config.ffcv = dataclasses.replace(config.ffcv, beton="")
    pipeline = P.FFCVPipeline(config, cpu(), batch_size=4)
    beton = tmp_path / "data.beton"
    assert pipeline.path == beton and beton.is_file()
    stamp = beton.stat().st_mtime_ns
    P.FFCVPipeline(config, cpu(), batch_size=4)
    assert beton.stat().st_mtime_ns == stamp  # not converted again
    config.ffcv = dataclasses.replace(config.ffcv, beton=str(tmp_path / "new" / "folder" / "named.beton"))
    assert P.FFCVPipeline(config, cpu(), batch_size=4).path.is_file()  # its folder made, as tools.convert makes it


def test_a_beton_older_than_its_folder_is_reported(dataset, tmp_path, capsys):
    import shutil
    folder, _ = dataset
    data = tmp_path / "data"
    shutil.copytree(folder, data)
    config = make_config(Path(""))
    config.data = str(data)
    config.ffcv = dataclasses.replace(config.ffcv, beton="")
    P.FFCVPipeline(config, cpu(), batch_size=4)
    P.FFCVPipeline(config, cpu(), batch_size=4)
    assert "warning" not in capsys.readouterr().err
    first = find_image_folder(data)[1][0][0]
    shutil.copy(first, Path(first).with_name("added.jpg"))
    P.FFCVPipeline(config, cpu(), batch_size=4)
    count = sum(len(list(d.iterdir())) for d in data.iterdir())
    assert f"{data} now holds {count} images but {data}.beton was converted from {count - 1}" in capsys.readouterr().err
    P.FFCVPipeline(config, cpu(1, 2), batch_size=4)
    assert capsys.readouterr().err == ""  # said once per run, by rank 0


@pytest.mark.parametrize("converted_as,run_in,named_as", [("data", "work", "{work}/data"),
                                                          ("data", "elsewhere", "../work/data"),
                                                          ("{work}/data", "work", "data")])
def test_a_changed_folder_is_reported_however_its_path_is_spelled(dataset, tmp_path, monkeypatch, capsys,
                                                                    converted_as, run_in, named_as):
    """The report spells the source as the converting run did (relative to its directory, or absolute); a run
    naming the same folder another way, or from another directory, still notices that it changed."""
    import shutil
    folder, _ = dataset
    work = tmp_path / "work"
    shutil.copytree(folder, work / "data")
    (tmp_path / "elsewhere").mkdir()
    config = make_config(Path(""))
    config.ffcv = dataclasses.replace(config.ffcv, beton="")
    monkeypatch.chdir(work)
    config.data = converted_as.format(work=work)
    P.ensure_beton(config)
    shutil.copy(work / "data" / "class0" / "img000.png", work / "data" / "class0" / "added.png")
    count = sum(len(list(d.iterdir())) for d in (work / "data").iterdir())
    assert capsys.readouterr().err.count("warning") == 0
    monkeypatch.chdir(tmp_path / run_in)
    config.data = named_as.format(work=work)
    P.ensure_beton(config)
    assert f"now holds {count} images but {config.data}.beton was converted from {count - 1}" in capsys.readouterr().err


def test_a_folder_with_as_many_but_other_images_is_reported(dataset, tmp_path, capsys):
    """An image moved to another class and one replaced by another name keep the count; the .beton (read by
    FFCV's own Reader) then holds other labels than the folder, which is reported. A folder touched but
    listing the same images is not."""
    import shutil
    from ffcv.reader import Reader
    folder, _ = dataset
    data = tmp_path / "data"
    shutil.copytree(folder, data)
    config = make_config(Path(""))
    config.ffcv = dataclasses.replace(config.ffcv, beton="")
    config.data = str(data)
    beton = P.ensure_beton(config)
    (data / "class1" / "scratch.png").write_bytes(b"")
    (data / "class1" / "scratch.png").unlink()
    P.ensure_beton(config)
    assert "warning" not in capsys.readouterr().err
    (data / "class0" / "img000.png").rename(data / "class2" / "img000.png")
    (data / "class1" / "img008.png").rename(data / "class1" / "renamed.png")
    now = [len(list((data / name).iterdir())) for name in ("class0", "class1", "class2")]
    stored = np.bincount(Reader(str(beton)).metadata["f1"]).tolist()
    assert sum(now) == sum(stored) and now != stored
    P.ensure_beton(config)
    assert (f"{data} holds as many images as {beton} was converted from ({sum(now)}), but not the same ones"
            in capsys.readouterr().err)


def test_bad_inputs_raise_one_line_data_errors(dataset, tmp_path):
    _, beton = dataset
    garbage = tmp_path / "garbage.beton"
    garbage.write_bytes(b"not an ffcv file" * 64)
    with pytest.raises(DataError, match=str(garbage)) as err:
        P.FFCVPipeline(make_config(garbage), cpu(), batch_size=4)
    assert "\n" not in str(err.value)
    missing = make_config(tmp_path / "absent.beton")
    with pytest.raises(DataError, match="absent.beton"):
        P.FFCVPipeline(missing, cpu(), batch_size=4)
    with pytest.raises(DataError, match="too few"):
        P.FFCVPipeline(make_config(beton), cpu(0, 2), batch_size=16)


@pytest.mark.parametrize("contents", [[], ["dataset.json"]])
def test_a_directory_named_as_the_beton_is_refused_and_kept(dataset, tmp_path, contents):
    """ffcv.beton naming a directory (empty, or such as DALI records) is one DataError naming it; the directory
    is left as it was, not replaced by a first-use conversion."""
    folder, _ = dataset
    directory = tmp_path / "records"
    directory.mkdir()
    for name in contents:
        (directory / name).write_text("{}")
    config = make_config(directory)
    config.data = str(folder)
    with pytest.raises(DataError, match=f"FFCV dataset {directory} is a directory, not a .beton file") as err:
        P.ensure_beton(config)
    assert "\n" not in str(err.value)
    assert directory.is_dir() and sorted(p.name for p in directory.iterdir()) == contents


_TRAIN_HELD = """
import sys, time
from pathlib import Path
import pipelines.convert
from pipelines.images import ImagePrep
stored, write_part = ImagePrep.stored, pipelines.convert.write_part
started = Path(sys.argv[1])
def held(self, path):  # the workers wait in their first image: the conversion is under way at the signal
    time.sleep(60)
    return stored(self, path)
def writing(*args, **kwargs):  # the converting process waits for the first image of its first part
    started.touch()
    return write_part(*args, **kwargs)
ImagePrep.stored, pipelines.convert.write_part = held, writing
from bt_fast.train import main
main(sys.argv[2:])
"""


@pytest.mark.timeout(300)
def test_sigterm_to_a_run_in_its_first_use_conversion_is_one_line_and_the_rerun_converts(tmp_path):
    """SLURM or Kubernetes stops the job (SIGTERM to its process group) while `bt_fast.train` converts its
    ImageFolder on first use: one line saying so and what is kept, exit 143 (the shell's for SIGTERM), no
    worker traceback and no worker left behind. Before, the run died of the signal without a word."""
    import signal
    from conftest import write_image_folder
    from pipelines.convert import work_dir
    from conftest import signalled_once
    from test_reliability import tiny_args
    data = write_image_folder(tmp_path / "data", classes=2, per_class=8)
    beton = Path(f"{data}.beton")
    started = tmp_path / "started"
    args = tiny_args(data, tmp_path / "run", "pipeline=ffcv", "max_steps=1", "workers=2")
    stopped = signalled_once(_TRAIN_HELD, [str(started), *args], started.exists, signal.SIGTERM, start_s=200)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert stopped.stderr.splitlines() == [
        f"converting {data} to {beton} for the FFCV pipeline (first use)",
        f"error: stopped by SIGTERM while converting {data} to {beton} (first use); no part was finished yet"]
    assert not stopped.left_behind and not beton.exists() and work_dir(beton).is_dir()

    config = make_config(Path(""))
    config.data, config.ffcv = str(data), dataclasses.replace(config.ffcv, beton="")
    assert P.ensure_beton(config, log=lambda line: None) == beton  # the same conversion, from its work directory
    assert beton.is_file() and not work_dir(beton).exists()


def _first_use_config(folder: Path, tmp_path: Path) -> tuple[Config, Path, Path]:
    """(config converting a copy of `folder` on first use, its .beton, the lock a converting process holds)."""
    import shutil
    data = tmp_path / "data"
    shutil.copytree(folder, data)
    config = make_config(Path(""))
    config.data, config.ffcv = str(data), dataclasses.replace(config.ffcv, beton="")
    return config, tmp_path / "data.beton", tmp_path / ".data.beton.lock"


@pytest.mark.timeout(120)
def test_a_run_waiting_for_another_ones_first_use_conversion_says_so_then_goes_on(dataset, tmp_path):
    """Run B starts while run A converts the same data= (A holds the lock): B says in one line whom it waits
    for instead of looking hung for the hours of A's conversion, then goes on once the lock is free. Before,
    it printed nothing. Another rank of a run (`warn=False`) waits without a word."""
    import fcntl
    import threading
    config, beton, lock = _first_use_config(dataset[0], tmp_path)
    lines: list[str] = []
    waiting = threading.Event()
    got: list[Path] = []

    def log(line: str) -> None:
        lines.append(line)
        if line.startswith("waiting"):
            waiting.set()
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # run A, converting
        run_b = threading.Thread(target=lambda: got.append(P.ensure_beton(config, log)), daemon=True)
        rank_1 = threading.Thread(target=lambda: got.append(P.ensure_beton(config, lines.append, warn=False)),
                                  daemon=True)
        run_b.start()
        assert waiting.wait(60), lines
        rank_1.start()
        assert lines == [f"waiting for another process converting {config.data} to {beton} (it holds {lock}); "
                         f"this run goes on once that conversion has finished"]
        assert run_b.is_alive() and not beton.exists()  # it waits for the lock
        fcntl.flock(held, fcntl.LOCK_UN)
    run_b.join(90)
    rank_1.join(90)
    assert not run_b.is_alive() and not rank_1.is_alive() and got == [beton, beton] and beton.is_file()
    assert lines[1] == f"converting {config.data} to {beton} for the FFCV pipeline (first use)"
    assert len(lines) == 3 and lines[2].startswith(f"wrote {IMAGES} images to {beton}")


@pytest.mark.timeout(120)
def test_rank_0_waiting_for_its_own_runs_converting_rank_says_nothing(dataset, tmp_path, monkeypatch):
    """The ranks of one run race for the lock; rank 0 losing to rank 1 waits for its own run, not another."""
    import fcntl
    import threading
    config, beton, lock = _first_use_config(dataset[0], tmp_path)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "run-7")
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    lines: list[str] = []
    with open(lock, "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # rank 1 of the same run, converting
        held.write("run-7@10.0.0.1:29500")
        held.flush()
        rank_0 = threading.Thread(target=lambda: P.ensure_beton(config, lines.append), daemon=True)
        rank_0.start()
        rank_0.join(1.0)  # it waits for the lock: nothing to wait on but time
        assert rank_0.is_alive() and lines == []
        fcntl.flock(held, fcntl.LOCK_UN)
    rank_0.join(90)
    assert not rank_0.is_alive()
    assert lines[0] == f"converting {config.data} to {beton} for the FFCV pipeline (first use)"


_WAITING_RUN = """
import sys
from bt_fast.config import Config
from bt_fast.errors import cli_errors
from pipelines.ffcv import ensure_beton
config = Config()
config.data, config.workers = sys.argv[1], 1
with cli_errors():
    ensure_beton(config)
"""


@pytest.mark.timeout(180)
def test_sigterm_to_a_run_waiting_for_another_ones_conversion_says_that_one_goes_on(dataset, tmp_path):
    """The waiting run B is stopped (SIGTERM): one line, exit 143, saying that A's conversion goes on and the
    same command then uses its .beton."""
    import fcntl
    import signal
    config, beton, lock = _first_use_config(dataset[0], tmp_path)
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # run A, converting
        run_b = subprocess.Popen([sys.executable, "-c", _WAITING_RUN, config.data], cwd=REPO,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            said = run_b.stderr.readline()  # blocks until B says it waits
            run_b.send_signal(signal.SIGTERM)
            out, err = run_b.communicate(timeout=60)
        finally:
            run_b.kill()
    assert said.rstrip("\n") == (f"waiting for another process converting {config.data} to {beton} (it holds "
                                 f"{lock}); this run goes on once that conversion has finished"), err
    assert run_b.returncode == 143 and err.splitlines() == [
        f"error: stopped by SIGTERM while waiting for another process converting {config.data} to {beton}; that "
        f"conversion goes on, and the same command uses {beton} once it is written"]
    assert not beton.exists() and not (tmp_path / ".data.beton.parts").exists()


def test_a_beton_of_raw_images_is_refused_for_device_decode_naming_it(tmp_path):
    """A .beton written by FFCV's own DatasetWriter in raw mode decodes on the host; decode=device refuses it in
    one line that names the file."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.fields.rgb_image import IMAGE_MODES
    from ffcv.writer import DatasetWriter
    images = [np.full((12 + k, 20, 3), 40 * k, dtype=np.uint8) for k in range(4)]
    path = tmp_path / "raw.beton"
    writer = DatasetWriter(str(path), {"image": RGBImageField(write_mode="raw"), "label": IntField()}, num_workers=1)
    writer.from_indexed_dataset([(image, 0) for image in images])
    assert (open_beton(path).metadata["f0"]["mode"] == IMAGE_MODES["raw"]).all()
    with pytest.raises(DataError, match=f"FFCV dataset {path} stores some images uncompressed") as err:
        P.FFCVPipeline(make_config(path, decode="device", crop="device"), cpu(), batch_size=4)
    assert "\n" not in str(err.value)


def test_decoder_loop_compiles_parallel_with_two_workers(dataset):
    import warnings

    import numba
    from numba.core.errors import NumbaPerformanceWarning
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("numba runs a single thread here")
    _, beton = dataset
    config = make_config(beton, crop="host")  # (the device-crop modes' operations: tests/test_ffcv_decoders.py)
    config.workers = 2
    with warnings.catch_warnings(record=True) as caught:  # global: sees the loader thread's compile too
        warnings.simplefilter("always", NumbaPerformanceWarning)
        crops = epoch_crops(P.FFCVPipeline(config, cpu(), batch_size=4))
    assert crops.shape[0] == IMAGES
    assert not [w for w in caught if issubclass(w.category, NumbaPerformanceWarning)]



@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads Linux's /proc/self/task")
def test_wait_os_thread_exit_outlasts_the_thread_local_destructors():
    """Thread.join returns before pthread's thread-local destructors run (TBB's detach is one): here a
    destructor that is libc's usleep keeps the finished thread in the OS for 1.5 s after join."""
    import ctypes
    import threading
    import time
    libc = ctypes.CDLL(None, use_errno=True)
    key = ctypes.c_uint()
    assert libc.pthread_key_create(ctypes.byref(key), ctypes.cast(libc.usleep, ctypes.c_void_p)) == 0
    try:
        thread = threading.Thread(target=libc.pthread_setspecific, args=(key, ctypes.c_void_p(1_500_000)))
        thread.start()
        thread.join()
        task = Path(f"/proc/self/task/{thread.native_id}")
        assert task.exists()  # the window the fix closes; if this fails the test shows nothing
        started = time.monotonic()
        P.wait_os_thread_exit(thread, timeout=60)
        assert not task.exists() and time.monotonic() - started < 30  # it saw the thread go, not the deadline pass
    finally:
        libc.pthread_key_delete(key)



@pytest.mark.timeout(300)
def test_an_epoch_closed_early_ends_its_loader_thread_so_a_fork_is_clean(dataset, tmp_path):
    import subprocess
    import sys
    import threading
    pipeline = P.FFCVPipeline(make_config(dataset[1]), cpu(), batch_size=4)
    before = threading.active_count()
    batches = iter(pipeline)
    next(batches)
    assert threading.active_count() == before + 1  # FFCV's epoch thread, working ahead
    batches.close()
    assert threading.active_count() == before
    # A run that stops mid-epoch and then starts the k-NN monitor's DataLoader workers (a fork): numba's TBB
    # pool printed "Unable to join threads to shut down before fork()" while the epoch thread lived on.
    folder, beton = dataset
    args = ["--config", "configs/demo_cpu.yaml", f"data={folder}", f"ffcv.beton={beton}", f"out_dir={tmp_path}",
            "pipeline=ffcv", "batch_size=4", "max_steps=2", "knn_every=1", f"knn_val={folder}", "workers=2",
            "projector=32-32", "augment.image_size=32", "device=cpu"]
    result = subprocess.run([sys.executable, "-m", "bt_fast.train", *args], capture_output=True, text=True,
                            timeout=240, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr[-2000:]
    output = result.stdout + result.stderr
    assert "k-NN top-1" in output and "Unable to join threads" not in output, output
