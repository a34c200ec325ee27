"""Host stages of the device-crop FFCV pipeline, against stock FFCV, libjpeg-turbo and torchvision."""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import pipelines.ffcv_import  # noqa: F401 - first: FFCV's import compiles, cached on disk from there
from ffcv.fields import IntField, RGBImageField
from ffcv.fields.decoders import SimpleRGBImageDecoder
from ffcv.libffcv import imdecode
from ffcv.loader import Loader, OrderOption
from ffcv.loader.epoch_iterator import EpochIterator
from ffcv.pipeline import PipelineSpec
from ffcv.pipeline.compiler import Compiler
from ffcv.reader import Reader
from ffcv.transforms import ToTensor
from ffcv.writer import DatasetWriter
from numba.core.errors import NumbaPerformanceWarning
from PIL import Image
from torchcodec.decoders import decode_jpeg

from bt_fast.errors import DataError
from pipelines import ffcv_decoders as D
from pipelines.crop_sampling import random_resized_crop, sample_seed

pytestmark = [pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
              pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")]

# (height, width): odd, non-square, both orientations, one image that sets neither maximum alone
SIZES = [(37, 53), (64, 48), (20, 90), (90, 20), (33, 33), (48, 64), (41, 77), (71, 29)]
SCALE, RATIO = (0.08, 1.0), (3 / 4, 4 / 3)
EPOCH_SEED = 1234567


def smooth_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    low = rng.integers(0, 256, size=(4, 4, 3)).astype(np.uint8)
    return np.asarray(Image.fromarray(low).resize((width, height), Image.BICUBIC))


class _Images:
    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index], index


def write_beton(path: Path, images: list[np.ndarray], write_mode: str = "jpg") -> Path:
    writer = DatasetWriter(str(path), {"image": RGBImageField(write_mode=write_mode, jpeg_quality=90),
                                       "label": IntField()}, num_workers=1)
    writer.from_indexed_dataset(_Images(images))
    return path


@pytest.fixture(scope="module")
def beton(module_tmp) -> Path:
    rng = np.random.default_rng(0)
    return write_beton(module_tmp("decoders") / "mixed.beton",
                       [smooth_image(rng, h, w) for h, w in SIZES])


def stored(beton: Path, index: int) -> np.ndarray:
    """Sample `index`'s stored bytes, read from the file at its allocation-table entry."""
    reader = Reader(str(beton))
    pointer = int(reader.metadata[index]["f0"]["data_ptr"])
    table = reader.alloc_table
    size = int(table["size"][table["ptr"] == pointer][0])
    return np.fromfile(beton, dtype=np.uint8, count=size, offset=pointer)


def ffcv_decode(beton: Path, index: int) -> np.ndarray:
    """What FFCV's `SimpleRGBImageDecoder` writes for one sample (its libjpeg-turbo call, unpadded)."""
    height, width = SIZES[index]
    image = np.zeros((height, width, 3), dtype=np.uint8)
    assert imdecode(stored(beton, index), image, height, width, height, width, 0, 0, 1, 1, False, False) == 0
    return image


class _InlineEpoch(EpochIterator):
    """FFCV's epoch iterator without its thread: batches run in the caller, so errors surface."""

    def start(self):
        pass


def run_epoch(beton: Path, image_op, boxes: D.TwoCropBoxes | None = None, batch_size: int = 3,
              order=None, workers: int = 1):
    """[(images, rows)] per batch, read by a stock FFCV Loader with our operations."""
    pipelines = {"image": [image_op, ToTensor()], "label": None}
    if boxes is not None:
        pipelines["boxes"] = PipelineSpec("image", decoder=boxes, transforms=[ToTensor()])
    loader = Loader(str(beton), batch_size=batch_size, num_workers=workers, order=OrderOption.SEQUENTIAL,
                    drop_last=False, pipelines=pipelines, os_cache=True)
    order = np.arange(len(SIZES)) if order is None else np.asarray(order)
    epoch = _InlineEpoch(loader, order)
    if boxes is not None:
        boxes.set_epoch_seed(loader.graph, epoch.memory_allocations, EPOCH_SEED)
    Compiler.set_num_threads(workers)
    slots = loader.batches_ahead + 2
    batches = []
    for b_ix, start in enumerate(range(0, len(order), batch_size)):
        out = epoch.run_pipeline(b_ix, order[start:start + batch_size], b_ix % slots, None)
        batches.append(tuple(t.clone() for t in out))
    epoch.close()
    return batches


@pytest.fixture
def python_mode():
    """FFCV's compiler off: operations run as plain Python, so calls can be counted."""
    Compiler.set_enabled(False)
    yield
    Compiler.set_enabled(True)


def padded_and_bytes(beton: Path, order=None):
    layout = D.PaddedLayout.of(Reader(str(beton)))
    padded = run_epoch(beton, D.PaddedDecoder(), D.TwoCropBoxes(SCALE, RATIO), order=order)
    raw = run_epoch(beton, D.JPEGBytesDecoder(layout.max_bytes), D.TwoCropBoxes(SCALE, RATIO), order=order)
    images, rows = (torch.cat(t) for t in zip(*padded))
    jpegs, rows_again = (torch.cat(t) for t in zip(*raw))
    return layout, images, rows, jpegs, rows_again


# ------------------------------------------------------------------------------------------
# Padded decode and stored bytes
# ------------------------------------------------------------------------------------------

def test_padded_images_and_stored_bytes_match_ffcv(beton, python_mode):
    order = [5, 0, 7, 2, 1, 6, 3, 4]
    layout, images, rows, jpegs, rows_again = padded_and_bytes(beton, order)
    assert (layout.max_height, layout.max_width) == (90, 90)
    assert images.shape == (8, 90, 90, 3) and images.dtype == torch.uint8
    assert jpegs.shape == (8, layout.max_bytes)
    assert torch.equal(rows, rows_again)  # the same boxes whichever decoder runs beside them
    for position, index in enumerate(order):
        height, width, size = rows[position, :3].tolist()
        assert (height, width) == SIZES[index]
        expected = stored(beton, index)
        assert size == expected.size
        assert np.array_equal(jpegs[position, :size].numpy(), expected)
        # bit-exact with FFCV's own decode of the sample, in the top-left corner of the slot
        assert np.array_equal(images[position, :height, :width].numpy(), ffcv_decode(beton, index))
        # libjpeg-turbo (accurate DCT, through TorchCodec) on the copied bytes differs by FFCV's fast IDCT only
        reference = decode_jpeg(jpegs[position, :size].clone()).permute(1, 2, 0)
        error = (reference.int() - images[position, :height, :width].int()).abs()
        assert error.max() <= 6 and error.float().mean() < 1.5, (index, error.max(), error.float().mean())


def test_stock_simple_decoder_agrees_on_a_constant_size_dataset(tmp_path, python_mode):
    """The padded slot of equal-size images is exactly FFCV's own `SimpleRGBImageDecoder` batch."""
    rng = np.random.default_rng(1)
    path = write_beton(tmp_path / "square.beton", [smooth_image(rng, 24, 40) for _ in range(4)])
    ours = run_epoch(path, D.PaddedDecoder(), batch_size=4, order=range(4))
    theirs = run_epoch(path, SimpleRGBImageDecoder(), batch_size=4, order=range(4))
    assert torch.equal(ours[0][0], theirs[0][0])


def test_padding_is_never_read_by_a_box(beton, python_mode):
    """Every box lies inside its image, so the padding's content (stale bytes) cannot reach a crop."""
    _, _, rows, _, _ = padded_and_bytes(beton)
    height, width = rows[:, 0:1], rows[:, 1:2]
    boxes = rows[:, D.BOXES].view(-1, 2, 4)
    top, left, h, w = boxes.unbind(-1)
    assert (top >= 0).all() and (left >= 0).all() and (h > 0).all() and (w > 0).all()
    assert (top + h <= height).all() and (left + w <= width).all()


@pytest.mark.parametrize("compiled", [False, True], ids=["python", "numba"])
def test_raw_samples_are_copied_into_their_slot_and_refused_for_device_decode(tmp_path, compiled):
    rng = np.random.default_rng(2)
    images = [smooth_image(rng, h, w) for h, w in [(12, 30), (25, 9), (17, 17)]]
    path = write_beton(tmp_path / "raw.beton", images, write_mode="raw")
    Compiler.set_enabled(compiled)
    try:
        ((padded,),) = run_epoch(path, D.PaddedDecoder(), batch_size=3, order=range(3))
    finally:
        Compiler.set_enabled(True)
    for slot, image in zip(padded.numpy(), images):
        assert np.array_equal(slot[:image.shape[0], :image.shape[1]], image)
    with pytest.raises(DataError, match="raw.*ffcv.decode=host"):
        run_epoch(path, D.JPEGBytesDecoder(D.PaddedLayout.of(Reader(str(path))).max_bytes),
                  batch_size=3, order=range(3))


@pytest.mark.parametrize("compiled", [False, True], ids=["python", "numba"])
def test_a_raw_sample_of_the_wrong_size_fails_its_copy_and_leaves_the_slot(compiled):
    """Its record's height x width x 3 against the bytes stored: a mismatch is a failed sample (-1), never a read
    past the sample's bytes."""
    copy = Compiler.compile(D.copy_raw) if compiled else D.copy_raw
    image = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    slot = np.zeros((6, 7, 3), dtype=np.uint8)
    assert copy(image.ravel(), slot, 4, 5) == 0
    assert np.array_equal(slot[:4, :5], image) and not slot[4:].any() and not slot[:, 5:].any()
    slot[:] = 0
    assert copy(image.ravel()[:-1], slot, 4, 5) == -1 and copy(image.ravel(), slot, 5, 5) == -1
    assert not slot.any()


# ------------------------------------------------------------------------------------------
# Boxes
# ------------------------------------------------------------------------------------------

def test_boxes_replay_the_two_crop_decoder_sampling(beton, python_mode):
    order = [3, 1, 4, 0, 6, 2, 7, 5]
    _, _, rows, _, _ = padded_and_bytes(beton, order)
    log_low, log_high = math.log(RATIO[0]), math.log(RATIO[1])
    for position, index in enumerate(order):
        height, width = SIZES[index]
        np.random.seed(sample_seed(EPOCH_SEED, index))
        expected = [random_resized_crop(height, width, *SCALE, log_low, log_high, *RATIO) for _ in range(2)]
        assert rows[position, D.BOXES].view(2, 4).tolist() == [list(box) for box in expected]
    assert not torch.equal(rows[:, 3:7], rows[:, 7:11])  # two independent views


def test_compiled_parallel_operations_equal_the_python_run(beton):
    """numba (2 threads where available) gives the same batches as the plain-Python run."""
    layout = D.PaddedLayout.of(Reader(str(beton)))
    runs = []
    for compiled in (False, True):
        Compiler.set_enabled(compiled)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", NumbaPerformanceWarning)  # e.g. a parallel loop run serially
                padded = run_epoch(beton, D.PaddedDecoder(), D.TwoCropBoxes(SCALE, RATIO), batch_size=4, workers=2)
                raw = run_epoch(beton, D.JPEGBytesDecoder(layout.max_bytes), batch_size=4, workers=2)
        finally:
            Compiler.set_enabled(True)
        assert not [w for w in caught if issubclass(w.category, NumbaPerformanceWarning)]
        images, rows = (torch.cat(t) for t in zip(*padded))
        jpegs = torch.cat([b[0] for b in raw])
        sizes = rows[:, 2]
        runs.append((images, rows, [jpegs[i, :n] for i, n in enumerate(sizes.tolist())]))
    (images, rows, jpegs), (images_c, rows_c, jpegs_c) = runs
    assert torch.equal(rows, rows_c)
    for i, (height, width) in enumerate(rows[:, :2].tolist()):
        assert torch.equal(images[i, :height, :width], images_c[i, :height, :width])
        assert torch.equal(jpegs[i], jpegs_c[i])


# ------------------------------------------------------------------------------------------
# Decode once, bad data, memory
# ------------------------------------------------------------------------------------------

def test_each_image_is_decoded_once_on_the_host_and_never_in_bytes_mode(beton, python_mode, monkeypatch):
    calls = []
    real = D.decode_into

    def counting(jpeg, slot, height, width):
        calls.append((jpeg.size, height, width))
        return real(jpeg, slot, height, width)

    monkeypatch.setattr(D, "decode_into", counting)
    padded_and_bytes(beton)  # host decode and bytes mode, each with its boxes
    assert sorted(calls) == sorted((stored(beton, i).size, *SIZES[i]) for i in range(len(SIZES)))


@pytest.mark.parametrize("mode", ["host", "device"])
def test_a_corrupt_stored_jpeg_raises(beton, tmp_path, python_mode, mode):
    broken = tmp_path / "broken.beton"
    blob = bytearray(beton.read_bytes())
    start = int(Reader(str(beton)).metadata[5]["f0"]["data_ptr"])
    blob[start:start + 64] = bytes(64)  # no JPEG header any more
    broken.write_bytes(bytes(blob))
    op = D.PaddedDecoder() if mode == "host" else D.JPEGBytesDecoder(D.PaddedLayout.of(Reader(str(broken))).max_bytes)
    with pytest.raises(ValueError, match="cannot be decoded"):
        run_epoch(broken, op)
    if mode == "device":  # and the device decoder would refuse those bytes too
        with pytest.raises(RuntimeError):
            decode_jpeg(torch.from_numpy(stored(broken, 5)))


def test_memory_report_and_resolution_cap(beton):
    reader = Reader(str(beton))
    layout = D.PaddedLayout.of(reader)
    sizes = [stored(beton, i).size for i in range(len(SIZES))]
    assert layout == D.PaddedLayout(90, 90, max(sizes))
    assert D.stored_bytes(reader).tolist() == sizes
    assert layout.host_bytes_per_batch(64, "host") == 64 * (90 * 90 * 3 + 44)
    assert layout.host_bytes_per_batch(64, "device") == 64 * (max(sizes) + 44)
    assert layout.device_bytes_per_batch(64) == 64 * (90 * 90 * 3 + 44)
    layout.check_side(beton, 90)
    with pytest.raises(DataError, match=f"{beton}.*90x90.*cap of 64 px.*--max-resolution 64") as err:
        layout.check_side(beton, 64)
    assert "\n" not in str(err.value)


@pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning")
def test_torchcodec_decodes_the_stored_jpegs_as_torchvision_did(beton):
    """The parity that moved ffcv.decode=device from torchvision's deprecated decode_jpeg to TorchCodec's:
    on the CPU both run libjpeg-turbo, and every stored JPEG decodes to the same pixels, alone and batched."""
    from torchvision.io import decode_jpeg as torchvision_decode_jpeg
    stored_jpegs = [torch.from_numpy(stored(beton, index)) for index in range(len(SIZES))]
    batched = decode_jpeg(stored_jpegs, mode="RGB")
    for jpeg, ours in zip(stored_jpegs, batched):
        theirs = torchvision_decode_jpeg(jpeg)
        assert theirs.shape == ours.shape and torch.equal(theirs, ours)
        assert torch.equal(decode_jpeg(jpeg), ours)


def test_device_decode_pads_each_image_into_its_slot(beton, python_mode):
    """`decode_padded` of the copied bytes equals decode_jpeg of each stored JPEG alone, at the top left of its slot."""
    from pipelines.device_decode import decode_padded
    layout, _, rows, jpegs, _ = padded_and_bytes(beton)
    sizes = [tuple(row) for row in rows[:, :3].tolist()]
    padded = decode_padded(jpegs, sizes, layout.max_height, layout.max_width, torch.device("cpu"), beton)
    assert padded.shape == (len(SIZES), 90, 90, 3) and padded.dtype == torch.uint8
    for position, (height, width, _) in enumerate(sizes):
        alone = decode_jpeg(torch.from_numpy(stored(beton, position))).permute(1, 2, 0)
        assert torch.equal(padded[position, :height, :width], alone)
    with pytest.raises(DataError, match=f"{beton}.*another size than its recorded one"):
        decode_padded(jpegs, [(h + 1, w, n) for h, w, n in sizes], 91, 90, torch.device("cpu"), beton)


def test_padding_decoded_images_takes_the_same_kernels_at_any_batch_size():
    """Non-view ops of `pad_images` (views are metadata, no kernel) at batch 3 and 9: the same list."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from pipelines.device_decode import pad_images

    def kernels(batch: int) -> list[str]:
        ops: list[str] = []

        class Record(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if not func.is_view:
                    ops.append(str(func))
                return func(*args, **(kwargs or {}))

        g = torch.Generator().manual_seed(batch)
        images = [torch.randint(0, 256, (3, 10 + i % 4, 7 + i % 3), generator=g, dtype=torch.uint8)
                  for i in range(batch)]
        with Record():
            padded = pad_images(images, 13, 9)
        for image, slot in zip(images, padded):  # and the images are where they belong
            assert torch.equal(slot[:image.shape[1], :image.shape[2]], image.permute(1, 2, 0))
        return ops

    assert kernels(3) == kernels(9)


def test_device_decode_without_torchcodec_says_so_and_blames_no_jpeg(beton, monkeypatch):
    import sys
    from pipelines.device_decode import decode_padded
    layout, _, rows, jpegs, _ = padded_and_bytes(beton)
    sizes = [tuple(row) for row in rows[:, :3].tolist()]
    monkeypatch.setitem(sys.modules, "torchcodec.decoders", None)  # what an import that fails sees
    with pytest.raises(DataError) as refused:
        decode_padded(jpegs, sizes, layout.max_height, layout.max_width, torch.device("cpu"), beton)
    assert str(refused.value).startswith("ffcv.decode=device needs TorchCodec (")
    assert str(refused.value).endswith("install the torchcodec release matching this torch (requirements.txt) or "
                                       "use ffcv.decode=host")


def test_the_turbojpeg_called_directly_is_the_one_ffcv_loaded_under_whatever_name():
    """A repaired FFCV wheel (`make offline-wheels`) bundles libturbojpeg renamed: found among the mappings."""
    system = "7f1c2000-7f1c3000 r-xp 00002000 08:01 1234  /usr/lib/x86_64-linux-gnu/libturbojpeg.so.0.2.0\n"
    bundled = "7f1c2000-7f1c3000 r-xp 00002000 08:01 1234  /venv/lib/ffcv.libs/libturbojpeg-5c4b1a2e.so.0.2.0\n"
    others = ["55d0-55e0 r--p 00000000 08:01 99  /usr/bin/python3.12\n", "7ffd-7ffe rw-p 00000000 00:00 0  [stack]\n",
              "7f00-7f01 rw-p 00000000 00:00 0\n", "7f02-7f03 r-xp 00000000 08:01 7  /usr/lib/libjpeg.so.62.3.0\n"]
    assert D.turbojpeg_in([*others, bundled]) == bundled.split()[-1]
    assert D.turbojpeg_in([system, *others]) == system.split()[-1]
    assert D.turbojpeg_in(others) is None
    with open("/proc/self/maps") as maps:  # this process: the library FFCV's extension is linked against
        assert D.turbojpeg_in(maps) == D._loaded_turbojpeg() and "libturbojpeg" in D._loaded_turbojpeg()
