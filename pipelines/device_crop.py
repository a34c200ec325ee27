"""Random-resized crops of a padded uint8 batch, cut and resized on the device in one batched pass.

The host decodes each image once into a padded buffer `images` (B, Hmax, Wmax, 3) and samples
V boxes per image (top, left, height, width), each inside that image's stored region. Every
box is resized to `size` x `size` with torchvision's antialiased bicubic filter, so that each
output equals

    torchvision.transforms.v2.functional.resized_crop(image.float() / 255, top, left, height,
        width, [size, size], InterpolationMode.BICUBIC, antialias=True).clamp(0, 1)

up to float rounding. The clamp is what torchvision's uint8 path does before it rounds; no
rounding to 8 bits happens here, so the crops keep the filter's sub-grey-level precision.

The filter (PyTorch's antialiased bicubic, the PIL convention): an output of length S is
taken from an input run of length n, with ratio r = n / S. Output i is centred at input
coordinate r * (i + 0.5); the kernel is Keys' cubic with a = -0.5, stretched by max(r, 1)
(so it also low-passes when shrinking), evaluated at pixel centres k + 0.5, cut to the run
[0, n) and renormalised to sum 1.

Design: the resize is separable, so each box becomes two resampling matrices, Wx (S, Wmax)
and Wy (S, Hmax), zero outside the box, and the crop is Wy @ image @ Wx^T per channel. Every
box of the batch is done by the same two batched matmuls over the padded buffer (the padding
meets only zero weights, so it never leaks in), and the matrices come from one batched
computation of the few non-zero taps per output. The op count is therefore fixed per batch,
whatever its size.

Why dense matmuls: they spend most multiply-adds on zero weights, but a matmul is the one
kernel every device runs near its peak (on a GPU, tensor cores, where by arithmetic on
`flops_per_image` these FLOPs are a negligible share of a training step). The banded
alternative, which gathers each output's taps and accumulates them, does far fewer
multiply-adds but measured slower than the dense form on the CPU (its gathers are bound by
memory traffic), and its op count grows with the largest downscale factor. A Python loop of
torchvision's resize, one box at a time, has an op count that grows with the batch; on a
CPU it is nonetheless cheaper than this operator, because it touches only each box, so
CPU-only runs are better served by cropping on the host. The columns are contracted first,
the cheaper order for landscape buffers.
"""
from __future__ import annotations

import math

import torch

CUBIC_A = -0.5  # Keys' coefficient in PyTorch's (and PIL's) antialiased bicubic


def cubic(x: torch.Tensor) -> torch.Tensor:
    """Keys' cubic convolution kernel with a = CUBIC_A; zero for |x| >= 2."""
    x = x.abs()
    a = CUBIC_A
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def max_taps(extent: int, size: int) -> int:
    """Most non-zero taps one output can have along an axis of `extent` pixels resized to `size`."""
    support = 2 * max(extent / size, 1.0)
    return math.ceil(2 * support) + 1


def resampling_matrices(start: torch.Tensor, length: torch.Tensor, size: int, extent: int,
                        gain: float = 1.0) -> torch.Tensor:
    """(N, size, extent) float32 matrices resizing the runs [start, start + length) to `size`.

    Row i holds output i's weights over the padded axis (multiplied by `gain`); they are
    zero outside the run. `start` and `length` are (N,) integer tensors on the target device.
    """
    taps = max_taps(extent, size)
    start = start.to(torch.float32).view(-1, 1, 1)
    length = length.to(torch.float32).view(-1, 1, 1)
    ratio = length / size
    stretch = ratio.clamp(min=1)
    centre = ratio * (torch.arange(size, dtype=torch.float32, device=start.device).view(1, -1, 1) + 0.5)
    first = torch.floor(centre - 2 * stretch + 0.5).clamp(min=0)
    end = torch.minimum(torch.floor(centre + 2 * stretch + 0.5), length)
    source = first + torch.arange(taps, dtype=torch.float32, device=start.device)  # (N, size, taps)
    weight = torch.where(source < end, cubic((source + 0.5 - centre) / stretch), 0.0)
    weight = weight * (gain / weight.sum(-1, keepdim=True))
    # Taps past the run carry zero weight; clamping their index keeps them inside the axis.
    index = (source + start).clamp(max=extent - 1).to(torch.int64)
    matrices = torch.zeros(weight.shape[0], size, extent, dtype=torch.float32, device=start.device)
    return matrices.scatter_add_(2, index, weight)


def resized_crops(images: torch.Tensor, boxes: torch.Tensor, size: int, *,
                  dtype: torch.dtype | None = None) -> torch.Tensor:
    """Cut `boxes` out of a padded uint8 batch and resize each to `size` x `size` (bicubic, antialiased).

    Parameters
    ----------
    images : (B, Hmax, Wmax, 3) uint8 on the device; padding may hold anything.
    boxes : (B, V, 4) integer (top, left, height, width) per image and view, each inside that
        image's stored region and at least one pixel high and wide (any device).
    size : output side S.
    dtype : compute and output dtype, float32 by default. On CUDA pass float16: the matmuls
        run on tensor cores and the crops stay within a fraction of a grey level of float32;
        bfloat16 keeps only 8 significant bits, so it drifts by a few grey levels.

    Returns
    -------
    (B, V, 3, S, S) float in [0, 1], a channels-last view (memory order B, V, S, S, 3), as
    `pipelines.augment.TwoViewAugment` takes it (`crops[:, v]` is view v's batch).
    """
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 (B, H, W, 3), got {images.dtype} {tuple(images.shape)}")
    if boxes.ndim != 3 or boxes.shape[0] != images.shape[0] or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be (B, V, 4) with B = {images.shape[0]}, got {tuple(boxes.shape)}")
    dtype = dtype or torch.float32
    batch, height, width, _ = images.shape
    views = boxes.shape[1]
    flat = boxes.to(images.device).reshape(-1, 4)
    columns = resampling_matrices(flat[:, 1], flat[:, 3], size, width, gain=1 / 255)
    rows = resampling_matrices(flat[:, 0], flat[:, 2], size, height)
    columns = columns.to(dtype).view(batch, views * size, width)
    rows = rows.to(dtype).view(batch * views, size, height)

    pixels = torch.empty(batch, width, 3, height, dtype=dtype, device=images.device)
    pixels.copy_(images.permute(0, 2, 3, 1))  # (B, W, 3, H): columns contracted first
    narrowed = torch.bmm(columns, pixels.view(batch, width, 3 * height))  # (B, V*S, 3*H)
    narrowed = narrowed.view(batch * views, size * 3, height).transpose(1, 2)  # (B*V, H, S*3)
    crops = torch.bmm(rows, narrowed).clamp_(0, 1)  # (B*V, S rows, S columns * 3)
    return crops.view(batch, views, size, size, 3).permute(0, 1, 4, 2, 3)


def flops_per_image(max_height: int, max_width: int, size: int, views: int = 2) -> int:
    """Floating-point operations (2 per multiply-add) of `resized_crops`' two matmuls per image.

    Columns first: views * S * Wmax * 3 * Hmax multiply-adds, then views * S * Hmax * 3 * S.
    """
    return 2 * views * size * 3 * max_height * (max_width + size)


def random_boxes(batch: int, height: int, width: int, generator: torch.Generator, min_fraction: float = 0.0,
                 views: int = 2) -> torch.Tensor:
    """(batch, views, 4) int64 (top, left, h, w) boxes inside a height x width image, each side uniform
    from `min_fraction` of the image's (at least 1 pixel) to all of it, positions uniform: inputs for
    measuring and checking `resized_crops`."""
    heights = torch.randint(max(1, int(height * min_fraction)), height + 1, (batch, views), generator=generator)
    widths = torch.randint(max(1, int(width * min_fraction)), width + 1, (batch, views), generator=generator)
    tops = (torch.rand((batch, views), generator=generator) * (height - heights + 1)).long()
    lefts = (torch.rand((batch, views), generator=generator) * (width - widths + 1)).long()
    return torch.stack([tops, lefts, heights, widths], dim=-1)
