"""The host-crop FFCV stage (`ffcv.crop=host`): decode once, cut and resize both views on the host.

`TwoCropRGBDecoder` decodes the stored JPEG with libjpeg-turbo (`ffcv.libffcv.imdecode`) into
a per-thread scratch buffer, draws both views' boxes (`pipelines.crop_sampling`: torchvision's
RandomResizedCrop sampling with the scale and ratio of the `AugmentSpec`) and resizes each to
the output size with FFCV's OpenCV INTER_AREA resize. A batch is one uint8 array
(B, 2, S, S, 3). The boxes are those `pipelines.ffcv_decoders.TwoCropBoxes` draws for the
device-crop modes.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

import pipelines.ffcv_import  # noqa: F401 - first: FFCV's import side effects, undone
from ffcv.fields.rgb_image import IMAGE_MODES, SimpleRGBImageDecoder
from ffcv.libffcv import ctypes_imdecode, ctypes_resize
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.state import State

from pipelines.crop_sampling import random_resized_crop, sample_seed
from pipelines.ffcv_compile import code_once, compile_cached, compile_once
from pipelines.ffcv_decoders import raise_if_failed

compile_cached(random_resized_crop)
compile_cached(sample_seed)


# libffcv's decode and resize, called as FFCV's `imdecode` and `resize_crop` call them, through
# functions of this module's own: FFCV's operations compile those two afresh per loader.
@compile_once
def decode_whole(jpeg, buffer, height, width):
    """Decode `jpeg` unscaled, uncropped and unflipped into `buffer` (1-D uint8); 0 on success."""
    return ctypes_imdecode(jpeg.ctypes.data, jpeg.size, height, width, buffer.ctypes.data, height, width,
                           0, 0, 1, 1, False, False)


@compile_once
def resize_box(image, top, bottom, left, right, destination):
    """OpenCV INTER_AREA resize of `image[top:bottom, left:right]` into `destination` (S, S, 3)."""
    ctypes_resize(0, image.ctypes.data, image.shape[0], image.shape[1], top, bottom, left, right,
                  destination.ctypes.data, destination.shape[0], destination.shape[1])


class TwoCropRGBDecoder(SimpleRGBImageDecoder):
    """Decode an `RGBImageField` once and emit two random-resized crops: (2, S, S, 3) uint8 per sample.

    Scratch space is one full-size image per parallel lane (not per sample, as FFCV's own
    crop decoders allocate). The epoch's crop seed is read at run time from a small
    buffer that `set_epoch_seed` fills before each epoch starts.
    """

    VIEWS = 2

    def __init__(self, output_size: int, scale: tuple[float, float], ratio: tuple[float, float], batch_size: int):
        super().__init__()
        if not (0 < scale[0] <= scale[1]) or not (0 < ratio[0] <= ratio[1]):
            raise ValueError(f"crop scale {scale} and ratio {ratio} must be positive (low, high) pairs")
        self.output_size = int(output_size)
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.batch_size = int(batch_size)

    def _lanes(self) -> int:
        return max(1, min(Compiler.num_threads, self.batch_size))

    def declare_state_and_memory(self, previous_state: State):
        heights, widths = self.metadata["height"], self.metadata["width"]
        self.max_pixels = int(heights.astype(np.int64).max()) * int(widths.astype(np.int64).max()) * 3
        # Lanes * one image of scratch, spread over the per-sample rows FFCV allocates.
        self.scratch_per_sample = math.ceil(self._lanes() * self.max_pixels / self.batch_size)
        shape = (self.VIEWS, self.output_size, self.output_size, 3)
        uint8 = np.dtype("<u1")
        return (
            State(jit_mode=True, device=previous_state.device, shape=shape, dtype=uint8),
            (AllocationQuery(shape, uint8),
             AllocationQuery((self.scratch_per_sample,), uint8),
             AllocationQuery((2,), np.dtype("<i8"))),  # [0, 0]: epoch crop seed; [i, 1]: decode status
        )

    def set_epoch_seed(self, graph, memory_allocations: dict, seed: int) -> None:
        """Write the epoch's crop seed into an `EpochIterator`'s buffers (before its thread starts)."""
        for node in graph.operation_to_node[self]:
            memory_allocations["operation"][node.id][2][..., 0] = seed

    def generate_code(self) -> Callable:
        return _two_crops_code(self.memory_read, Compiler.compile(decode_whole), Compiler.compile(resize_box),
                               Compiler.compile(random_resized_crop), Compiler.compile(sample_seed),
                               Compiler.compile(raise_if_failed), Compiler.get_iterator(), self._lanes(),
                               self.max_pixels, self.scratch_per_sample, self.scale, self.ratio)


@code_once
def _two_crops_code(mem_read, decode_jpeg, resize, crop_box, seed_of, raise_failed, lane_range, lanes: int,
                    max_pixels: int, per_sample: int, scale, ratio) -> Callable:
    views = TwoCropRGBDecoder.VIEWS
    jpg = IMAGE_MODES["jpg"]
    scale_low, scale_high = scale
    ratio_min, ratio_max = ratio
    log_low, log_high = math.log(ratio_min), math.log(ratio_max)

    def decode(batch_indices, my_storage, metadata, storage_state):
        destination, scratch, seeds = my_storage
        count = len(batch_indices)
        usable = min(lanes, (count * per_sample) // max_pixels)
        if usable < 1:
            raise ValueError("TwoCropRGBDecoder: batch smaller than the scratch layout (use drop_last)")
        flat = scratch.reshape(-1)
        epoch_seed = seeds[0, 0]
        for lane in lane_range(usable):
            buffer = flat[lane * max_pixels:(lane + 1) * max_pixels]
            for dst_ix in range(lane, count, usable):
                source_ix = batch_indices[dst_ix]
                field = metadata[source_ix]
                height = np.int64(field["height"])
                width = np.int64(field["width"])
                data = mem_read(field["data_ptr"], storage_state)
                if field["mode"] == jpg:
                    # (no raise inside the parallel loop: numba would run it serially)
                    seeds[dst_ix, 1] = decode_jpeg(data, buffer, height, width)
                    image = buffer[:height * width * 3].reshape(height, width, 3)
                else:
                    seeds[dst_ix, 1] = 0
                    image = data.reshape(height, width, 3)
                np.random.seed(seed_of(epoch_seed, source_ix))
                for view in range(views):
                    top, left, h, w = crop_box(height, width, scale_low, scale_high, log_low, log_high,
                                               ratio_min, ratio_max)
                    resize(image, top, top + h, left, left + w, destination[dst_ix, view])
        raise_failed(seeds[:, 1:], count)
        return destination[:count]

    decode.is_parallel = True
    return decode
