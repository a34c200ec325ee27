"""FFCV pipeline: one decode and two crops per image, sharding, output contract, the beton itself."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from bt_fast.config import Config
from pipelines import ffcv as P
from pipelines.base import DataError, Placement, find_image_folder

# numba 0.68's dispatcher finalizer sometimes raises KeyError while garbage-collecting the
# per-loader dispatchers FFCV (and our decoder, like FFCV's own) compile; it is ignored by
# Python ("Exception ignored in ... finalizer") and happens with stock FFCV loaders too.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

IMAGES = 24
SIZE = (64, 48)  # width, height


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
def dataset(tmp_path_factory) -> tuple[Path, Path]:
    """(ImageFolder, beton) written with the project's converter."""
    from pipelines.convert import convert
    base = tmp_path_factory.mktemp("ffcv")
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


def image_ids(crops: torch.Tensor) -> np.ndarray:
    """(B, 2, S, S, 3) uint8 -> (B, 2) source ids from the blue channel."""
    blue = crops[..., 2].float().mean(dim=(2, 3)).numpy()
    return np.rint((blue - 5) / 10).astype(int)


def epoch_crops(pipeline: P.FFCVPipeline) -> np.ndarray:
    return np.concatenate([batch.numpy().copy() for batch in pipeline.crops()])


# ------------------------------------------------------------------------------------------
# Decode once, crop twice
# ------------------------------------------------------------------------------------------

def test_two_views_come_from_one_decode(dataset, monkeypatch):
    """Run the decoder as plain Python (FFCV's compiler off) and count libjpeg-turbo decodes."""
    _, beton = dataset
    calls = []
    real_imdecode = P.imdecode

    def counting_imdecode(*args):
        calls.append(1)
        return real_imdecode(*args)

    config = make_config(beton)
    monkeypatch.setattr(P, "imdecode", counting_imdecode)
    P.Compiler.set_enabled(False)
    try:
        python_mode = P.FFCVPipeline(config, cpu(), batch_size=4)
        crops = epoch_crops(python_mode)
    finally:
        P.Compiler.set_enabled(True)
    assert crops.shape == (IMAGES, 2, 16, 16, 3) and crops.dtype == np.uint8
    assert len(calls) == IMAGES  # one decode per image, two crops each
    ids = image_ids(torch.from_numpy(crops))
    assert (ids[:, 0] == ids[:, 1]).all()                      # both crops from the same image ...
    assert sorted(ids[:, 0]) == list(range(IMAGES))            # ... every image once ...
    assert all(not np.array_equal(c[0], c[1]) for c in crops)  # ... and the two crops differ

    monkeypatch.undo()
    compiled = P.FFCVPipeline(config, cpu(), batch_size=4)
    assert np.array_equal(epoch_crops(compiled), crops)  # numba decoder == the Python run, bit for bit


def stored_jpeg(beton: Path, index: int) -> np.ndarray:
    """Decode sample `index`'s stored JPEG independently (OpenCV), as RGB."""
    reader = P.Reader(str(beton))
    field = reader.metadata[index]["f0"]
    table = reader.alloc_table
    size = int(table["size"][np.nonzero(table["ptr"] == field["data_ptr"])[0][0]])
    raw = np.fromfile(beton, dtype=np.uint8, count=size, offset=int(field["data_ptr"]))
    return cv2.cvtColor(cv2.imdecode(raw, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def test_crops_are_resized_boxes_of_the_decoded_image(dataset):
    _, beton = dataset
    config = make_config(beton, image_size=24)
    pipeline = P.FFCVPipeline(config, cpu(), batch_size=4)
    pipeline.set_epoch(2)
    order = pipeline.epoch_indices()
    crops = epoch_crops(pipeline)
    seed = P.epoch_seed(config.seed, 2, P.CROP_STREAM)
    spec = config.augment
    for position in range(0, IMAGES, 5):
        index = int(order[position])
        image = stored_jpeg(beton, index)
        np.random.seed(P.sample_seed(seed, index))
        for view in range(2):
            top, left, h, w = P.random_resized_crop(SIZE[1], SIZE[0], *spec.crop_scale, np.log(spec.crop_ratio[0]),
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
        ours = P.random_resized_crop(height, width, *s, np.log(r[0]), np.log(r[1]), *r)
        assert ours == tuple(T.RandomResizedCrop.get_params(torch.empty(1, height, width), list(s), list(r)))
    # Random cases: same distribution of boxes (incl. how often the fallback is taken).
    n = 3000
    for height, width in [(48, 64), (20, 200)]:
        np.random.seed(0)
        torch.manual_seed(0)
        ours = np.array([P.random_resized_crop(height, width, *args) for _ in range(n)], dtype=float)
        ref = np.array([T.RandomResizedCrop.get_params(torch.empty(1, height, width), list(scale), list(ratio))
                        for _ in range(n)], dtype=float)
        for column in range(4):
            spread = max(ref[:, column].std(), 0.5)
            assert abs(ours[:, column].mean() - ref[:, column].mean()) < 5 * spread * (2 / n) ** 0.5, (height, column)
        fallback = lambda boxes: np.mean((boxes[:, 2] == height) | (boxes[:, 3] == width))  # noqa: E731
        assert abs(fallback(ours) - fallback(ref)) < 0.05


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

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_views_are_normalised_channels_last_batches(dataset, dtype):
    _, beton = dataset
    config = make_config(beton, image_size=32)
    pipeline = P.FFCVPipeline(config, cpu(dtype=dtype), batch_size=8)
    assert len(pipeline) == 3
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


def test_stock_ffcv_loader_reads_the_beton(dataset):
    from ffcv.fields.decoders import CenterCropRGBImageDecoder, IntDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import ToTensor
    folder, beton = dataset
    loader = Loader(str(beton), batch_size=6, num_workers=1, order=OrderOption.SEQUENTIAL, drop_last=False,
                    pipelines={"image": [CenterCropRGBImageDecoder((16, 16), 1.0), ToTensor()],
                               "label": [IntDecoder(), ToTensor()]})
    images, labels = zip(*[(x.clone(), y.clone()) for x, y in loader])
    images, labels = torch.cat(images), torch.cat(labels).view(-1)
    _, samples = find_image_folder(folder)
    assert labels.tolist() == [label for _, label in samples]
    assert image_ids(images.unsqueeze(1)).ravel().tolist() == list(range(IMAGES))


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
    count = len(find_image_folder(data)[1])
    assert f"{data} now holds {count} images but {data}.beton was converted from {count - 1}" in capsys.readouterr().err


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


def test_corrupt_stored_jpeg_raises_instead_of_hanging(dataset, tmp_path):
    _, beton = dataset
    broken = tmp_path / "broken.beton"
    blob = bytearray(beton.read_bytes())
    start = int(P.Reader(str(beton)).metadata[5]["f0"]["data_ptr"])
    blob[start:start + 64] = bytes(64)  # no JPEG header any more
    broken.write_bytes(bytes(blob))
    pipeline = P.FFCVPipeline(make_config(broken), cpu(), batch_size=4)
    with pytest.raises(DataError, match="broken.beton.*cannot be decoded"):
        for _ in pipeline.crops():
            pass


def test_decoder_loop_compiles_parallel_with_two_workers(dataset):
    import warnings

    import numba
    from numba.core.errors import NumbaPerformanceWarning
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("numba runs a single thread here")
    _, beton = dataset
    config = make_config(beton)
    config.workers = 2
    with warnings.catch_warnings(record=True) as caught:  # global: sees the loader thread's compile too
        warnings.simplefilter("always", NumbaPerformanceWarning)
        crops = epoch_crops(P.FFCVPipeline(config, cpu(), batch_size=4))
    assert crops.shape[0] == IMAGES
    assert not [w for w in caught if issubclass(w.category, NumbaPerformanceWarning)]

