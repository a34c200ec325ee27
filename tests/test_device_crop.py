"""The batched device crop against torchvision's resized_crop (bicubic, antialias), box by box."""
from __future__ import annotations

import pytest
import skimage.data
import torch
import torchvision.transforms as T
import torchvision.transforms.v2.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from pipelines.device_crop import flops_per_image, resized_crops

# Largest difference from torchvision's float path, in grey levels (0..255): float32 rounding
# of the same weights summed in another order (twice the largest seen over many boxes).
FLOAT_BOUND = 5e-4


def padded_batch(images: list[torch.Tensor], seed: int = 0) -> torch.Tensor:
    """(H, W, 3) uint8 images -> one (B, Hmax, Wmax, 3) buffer whose padding is random garbage."""
    g = torch.Generator().manual_seed(seed)
    height = max(image.shape[0] for image in images)
    width = max(image.shape[1] for image in images)
    buffer = torch.randint(0, 256, (len(images), height, width, 3), generator=g, dtype=torch.uint8)
    for slot, image in zip(buffer, images):
        slot[: image.shape[0], : image.shape[1]] = image
    return buffer


def smooth_image(height: int, width: int, g: torch.Generator) -> torch.Tensor:
    """A photograph-like (H, W, 3) uint8 image: a bicubic blow-up of a coarse colour grid plus noise."""
    coarse = torch.rand(1, 3, 5, 5, generator=g) * 255
    field = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)
    noise = torch.randn(1, 3, height, width, generator=g) * 20
    return (field + noise).clamp(0, 255).round().to(torch.uint8)[0].permute(1, 2, 0).contiguous()


def boxes_for(height: int, width: int, g: torch.Generator) -> list[list[int]]:
    """Whole image, a 1x1 and a 2x3 (clipped) crop, a one-row strip, and two RandomResizedCrop boxes."""
    def corner(h: int, w: int) -> list[int]:
        top = int(torch.randint(0, height - h + 1, (1,), generator=g))
        left = int(torch.randint(0, width - w + 1, (1,), generator=g))
        return [top, left, h, w]

    with torch.random.fork_rng():  # get_params draws from the global RNG
        torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=g)))
        sampled = [list(T.RandomResizedCrop.get_params(torch.empty(1, height, width), (0.08, 1.0), (3 / 4, 4 / 3)))
                   for _ in range(2)]
    return [[0, 0, height, width], corner(1, 1), corner(min(2, height), min(3, width)), corner(1, width)] + sampled


def reference_crops(image: torch.Tensor, boxes: list[list[int]], size: int, uint8: bool = False) -> torch.Tensor:
    """torchvision's resized_crop of each box: (V, 3, S, S) in grey levels (float path clamped, as uint8 clamps)."""
    chw = image.permute(2, 0, 1)
    chw = chw if uint8 else chw.float() / 255
    crops = [F.resized_crop(chw, top, left, h, w, [size, size], T.InterpolationMode.BICUBIC, antialias=True)
             for top, left, h, w in boxes]
    return torch.stack(crops).float() if uint8 else torch.stack(crops).clamp(0, 1) * 255


@pytest.mark.parametrize("size", [17, 32])
def test_matches_torchvision_per_sample(size):
    """Sizes differ inside one padded buffer: odd and non-square, narrower and lower than the output,
    larger than it (antialiased shrink), a single pixel; boxes from a pixel (upsampling) to the whole image."""
    g = torch.Generator().manual_seed(size)
    shapes = [(37, 53), (64, 48), (9, 20), (40, 11), (1, 7), (size, size)]
    images = [smooth_image(h, w, g) for h, w in shapes]
    boxes = [boxes_for(h, w, g) for h, w in shapes]

    crops = resized_crops(padded_batch(images), torch.tensor(boxes), size)

    assert crops.shape == (len(shapes), len(boxes[0]), 3, size, size) and crops.dtype == torch.float32
    for i, (image, image_boxes) in enumerate(zip(images, boxes)):
        error = (crops[i] * 255 - reference_crops(image, image_boxes, size)).abs().max().item()
        assert error <= FLOAT_BOUND, (shapes[i], error)


def test_noise_overshoot_is_clamped_like_torchvision():
    """Bicubic rings past [0, 1] on noise; the crops clamp there, as torchvision's uint8 path does."""
    g = torch.Generator().manual_seed(1)
    image = torch.randint(0, 256, (30, 26, 3), generator=g, dtype=torch.uint8)
    boxes = boxes_for(30, 26, g)
    crops = resized_crops(image[None], torch.tensor([boxes]), 40)[0]
    unclamped = torch.stack([F.resized_crop(image.permute(2, 0, 1).float() / 255, *box, [40, 40],
                                            T.InterpolationMode.BICUBIC, antialias=True) for box in boxes])
    assert unclamped.min() < 0 and unclamped.max() > 1
    assert (crops * 255 - unclamped.clamp(0, 1) * 255).abs().max() <= FLOAT_BOUND


def test_photograph_at_full_size_against_both_torchvision_paths():
    """A real photograph at 224 px. torchvision's uint8 path rounds and clamps to 8 bits between its
    two passes, so the float crops differ from it by a fraction of a grey level on average and by
    a few at most (at sharp edges)."""
    photo = torch.from_numpy(skimage.data.chelsea()).contiguous()  # 300 x 451
    boxes = boxes_for(*photo.shape[:2], torch.Generator().manual_seed(2))
    crops = resized_crops(photo[None], torch.tensor([boxes]), 224)[0] * 255
    assert (crops - reference_crops(photo, boxes, 224)).abs().max() <= FLOAT_BOUND
    difference = (crops - reference_crops(photo, boxes, 224, uint8=True)).abs()
    assert difference.mean() < 0.5
    assert difference.max() < 3


@pytest.mark.parametrize("dtype, bound", [
    (torch.float16, 0.5),   # 11 significant bits: an eighth of a grey level per rounding near white
    (torch.bfloat16, 2.0),  # 8 significant bits: half a grey level per rounding near white
])
def test_half_precision_bound(dtype, bound):
    g = torch.Generator().manual_seed(3)
    image = smooth_image(45, 60, g)
    boxes = boxes_for(45, 60, g)
    crops = resized_crops(image[None], torch.tensor([boxes]), 24, dtype=dtype)[0]
    assert crops.dtype == dtype
    assert (crops.float() * 255 - reference_crops(image, boxes, 24)).abs().max() <= bound


def aten_ops(batch: int) -> list[str]:
    """The aten ops (below autograd) one call dispatches, in order."""
    ops = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops.append(str(func))
            return func(*args, **(kwargs or {}))

    g = torch.Generator().manual_seed(batch)
    images = torch.randint(0, 256, (batch, 40, 50, 3), generator=g, dtype=torch.uint8)
    boxes = torch.tensor([boxes_for(40, 50, g) for _ in range(batch)])
    with Record():
        resized_crops(images, boxes, 16)
    return ops


def test_op_count_does_not_depend_on_batch_size():
    small, large = aten_ops(2), aten_ops(16)
    assert "aten.bmm.default" in small and len(small) > 10
    assert small == large


def test_flops_per_image_counts_the_two_matmuls():
    batch, views, height, width, size = 3, 2, 30, 44, 20
    images = torch.zeros(batch, height, width, 3, dtype=torch.uint8)
    boxes = torch.tensor([[[0, 0, height, width]] * views] * batch)
    with FlopCounterMode(display=False) as counter:
        resized_crops(images, boxes, size)
    # Columns: (views*S x W) @ (W x 3H); rows: (S x H) @ (H x 3S) per view; 2 FLOPs per multiply-add.
    by_hand = 2 * (views * size * width * 3 * height + views * size * height * 3 * size)
    assert counter.get_total_flops() == batch * by_hand
    assert flops_per_image(height, width, size, views) == by_hand


@pytest.mark.parametrize("images, boxes", [
    (torch.zeros(2, 8, 8, 3, dtype=torch.float32), torch.zeros(2, 2, 4, dtype=torch.int64)),
    (torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.zeros(2, 2, 4, dtype=torch.int64)),
    (torch.zeros(2, 8, 8, 3, dtype=torch.uint8), torch.zeros(3, 2, 4, dtype=torch.int64)),
    (torch.zeros(2, 8, 8, 3, dtype=torch.uint8), torch.zeros(2, 4, dtype=torch.int64)),
])
def test_bad_shapes_are_rejected(images, boxes):
    with pytest.raises(ValueError, match="must be"):
        resized_crops(images, boxes, 4)
