"""Stored JPEGs decoded on the device into one padded batch (`ffcv.decode=device`).

TorchCodec's `decode_jpeg` takes the batch as a list (nvJPEG on CUDA, libjpeg-turbo on the CPU
device) and returns one (3, H, W) tensor per image; it replaces torchvision's, deprecated in
torchvision 0.29, and decodes the same pixels (`tests/test_ffcv_decoders.py -k torchcodec`). They are padded into the
(B, Hmax, Wmax, 3) layout `pipelines.device_crop.resized_crops` reads with a fixed number of
ops per batch: one concatenation of all decoded pixels, then per channel one gather whose
index is built by broadcasting each image's offset, height and width (padding positions read
pixel 0 of the batch; no box reaches them). Nested tensors would be the natural container,
but `torch.nested.to_padded_tensor` pads image by image for uint8 (its fused CUDA kernel
takes floating types only), so its op count grows with the batch.
"""
from __future__ import annotations

from pathlib import Path

import torch

from bt_fast.errors import DataError, flat_message


def _decoder():
    try:
        from torchcodec.decoders import decode_jpeg
    except (ImportError, OSError, RuntimeError) as err:  # a torchcodec built for another torch fails to load
        raise DataError(f"ffcv.decode=device needs TorchCodec ({flat_message(err, 200)}); install the "
                        f"torchcodec release matching this torch (requirements.txt) or use ffcv.decode=host") from None
    return decode_jpeg


def decode_padded(jpegs: torch.Tensor, sizes: list[tuple[int, int, int]], max_height: int, max_width: int,
                  device: torch.device, path: str | Path) -> torch.Tensor:
    """Decode the stored JPEGs of a batch on `device` into one padded (B, Hmax, Wmax, 3) uint8 batch.

    `jpegs`: (B, max_bytes) uint8 on the host; `sizes`: each sample's recorded (height, width,
    stored bytes), its JPEG being `jpegs[i, :bytes]`. The result is a view of a channel-planar
    (B, 3, Hmax, Wmax) tensor; sample i's image is `[i, :H_i, :W_i]` and the rest is filler. A
    stored JPEG that does not decode, or not to its recorded size, raises DataError naming `path`.
    """
    encoded = [jpegs[i, :length] for i, (_, _, length) in enumerate(sizes)]
    decode_jpeg = _decoder()  # outside the `try`: TorchCodec missing is not a bad JPEG
    try:
        decoded = decode_jpeg(encoded, mode="RGB", device=device)
    except RuntimeError as err:
        raise DataError(f"a JPEG stored in FFCV dataset {path} cannot be decoded ({flat_message(err)}); "
                        f"reconvert it with `python -m tools.convert`") from None
    if [tuple(image.shape[1:]) for image in decoded] != [(h, w) for h, w, _ in sizes]:
        raise DataError(f"a JPEG stored in FFCV dataset {path} decodes to another size than its recorded one; "
                        f"reconvert it with `python -m tools.convert`")
    return pad_images(decoded, max_height, max_width)


def pad_images(images: list[torch.Tensor], max_height: int, max_width: int) -> torch.Tensor:
    """(3, H_i, W_i) uint8 images on one device -> (B, Hmax, Wmax, 3), image i at `[i, :H_i, :W_i]`.

    A fixed number of ops (kernels) whatever the batch size; the rest of each slot is filler.
    """
    device = images[0].device
    sizes = torch.tensor([image.shape[1:] for image in images])  # (B, 2) on the host
    if device.type == "cuda":  # GPU only: from pinned memory the copy does not wait for the stream's work
        sizes = sizes.pin_memory()
    heights, widths = sizes.to(device, non_blocking=True).view(-1, 2, 1, 1).unbind(1)
    areas = heights * widths
    flat = torch.cat([image.reshape(-1) for image in images])
    rows = torch.arange(max_height, device=device).view(1, -1, 1)
    columns = torch.arange(max_width, device=device).view(1, 1, -1)
    inside = (rows < heights) & (columns < widths)
    start = torch.cumsum(3 * areas, 0) - 3 * areas  # where each image's first plane starts in `flat`
    index = torch.where(inside, start + rows * widths + columns, 0)  # (B, Hmax, Wmax) into channel 0
    plane = torch.where(inside, areas, 0)  # from one channel's plane to the next
    padded = torch.empty(len(images), 3, max_height, max_width, dtype=torch.uint8, device=device)
    for channel in range(3):
        padded[:, channel] = flat[index]
        index += plane
    return padded.permute(0, 2, 3, 1)
