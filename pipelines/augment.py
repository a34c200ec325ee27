"""The paper's per-view distortions as batched tensor ops on any torch device.

Per-sample random choices are drawn first (`sample_params`, from an explicit
`torch.Generator`) and applied afterwards (`apply`), so every step can be checked
against `torchvision.transforms.functional` with the same parameters. Each step is a
fixed sequence of tensor ops whose count does not depend on the batch size: per-sample
choices are applied with masks, `torch.where`, per-sample broadcast factors and
grouped convolutions, never with a Python loop over samples.

Semantics (torchvision's, on float images in [0, 1]):

- flip: horizontal, p = `flip_p`.
- colour jitter (p = `jitter_p`): brightness, contrast, saturation and hue factors drawn
  as `ColorJitter.get_params` draws them, applied in a per-sample random order; each step
  clamps to [0, 1]; contrast blends with the mean of the grayscale image, saturation with
  the grayscale image, hue rotates H in HSV exactly as `adjust_hue` (max and chroma kept).
- grayscale (p = `grayscale_p`): luma 0.2989 R + 0.587 G + 0.114 B on all three channels.
- Gaussian blur (p = `blur_p[view]`): `spec.blur_kernel_size` taps, sigma ~ U(blur_sigma),
  kernel and reflect padding as `torchvision.transforms.functional.gaussian_blur`, done as
  two 1-D depthwise convolutions with one kernel per sample (identity kernel when a sample
  is not blurred).
- solarize (p = `solarize_p[view]`): x -> 1 - x where x >= `solarize_threshold`.
- normalise with `spec.mean` / `spec.std`; output channels-last in the requested dtype.

Speed: internally the batch is kept "batch-innermost" (memory order C, H, W, B), which
makes the per-sample depthwise blur a channels-last convolution with one channel per
sample and keeps per-pixel channel ops on contiguous planes; the steps work in place on
reused buffers (`Workspace`) because fresh multi-megabyte allocations cost more than the
arithmetic on CPU. Computation is float32 on CPU and float16/bfloat16 on CUDA.

This module is the specification: `pipelines/augment_triton.py` computes the same `apply` in fused
Triton kernels and is tested against it. `TwoViewAugment(backend=...)` (config key
`augment.backend`) chooses between them.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, fields
from typing import Callable

import torch
import torch.nn.functional as F

from bt_fast.config import AugmentSpec, ConfigError, check_choice

LUMA = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights

BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3  # torchvision ColorJitter's fn_idx values


@dataclass
class AugmentParams:
    """Per-sample random choices for one view of a batch (all tensors on one device)."""

    flip: torch.Tensor        # (B,) bool
    jitter: torch.Tensor      # (B,) bool: colour jitter applied
    brightness: torch.Tensor  # (B,) float32 factor
    contrast: torch.Tensor    # (B,) float32 factor
    saturation: torch.Tensor  # (B,) float32 factor
    hue: torch.Tensor         # (B,) float32 factor in [-0.5, 0.5]
    order: torch.Tensor       # (B, 4) int64: jitter op at each position (0 b, 1 c, 2 s, 3 h)
    grayscale: torch.Tensor   # (B,) bool
    blur: torch.Tensor        # (B,) bool
    sigma: torch.Tensor       # (B,) float32 blur sigma
    solarize: torch.Tensor    # (B,) bool

    def __len__(self) -> int:
        return self.flip.shape[0]

    def to(self, device: torch.device | str) -> "AugmentParams":
        return AugmentParams(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def _jitter_range(amount: float, center: float) -> tuple[float, float]:
    """ColorJitter's range for a scalar knob: [max(0, c - a), c + a] (hue: [-a, a])."""
    if amount < 0:
        raise ValueError(f"colour jitter amount must be non-negative, got {amount}")
    return (max(0.0, center - amount), center + amount) if center else (-amount, amount)


def sample_params(batch: int, spec: AugmentSpec, view: int, generator: torch.Generator | None = None,
                  device: torch.device | str | None = None) -> AugmentParams:
    """Draw the per-sample choices of view `view` (0 or 1) for `batch` images.

    All draws come from `generator` (on `device`, default the generator's device) in two
    calls, so the op count does not depend on `batch`.
    """
    if view not in (0, 1):
        raise ValueError(f"view must be 0 or 1, got {view}")
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand((batch, 10), generator=generator, device=device)
    order = torch.rand((batch, 4), generator=generator, device=device).argsort(dim=1)  # uniform permutations

    def between(column: int, low_high: tuple[float, float]) -> torch.Tensor:
        low, high = low_high
        return u[:, column] * (high - low) + low

    return AugmentParams(
        flip=u[:, 0] < spec.flip_p,
        jitter=u[:, 1] < spec.jitter_p,
        brightness=between(2, _jitter_range(spec.brightness, 1.0)),
        contrast=between(3, _jitter_range(spec.contrast, 1.0)),
        saturation=between(4, _jitter_range(spec.saturation, 1.0)),
        hue=between(5, _jitter_range(spec.hue, 0.0)),
        order=order,
        grayscale=u[:, 6] < spec.grayscale_p,
        blur=u[:, 7] < spec.blur_p[view],
        sigma=between(8, tuple(spec.blur_sigma)),
        solarize=u[:, 9] < spec.solarize_p[view],
    )


# --------------------------------------------------------------------------------------------
# Buffers
# --------------------------------------------------------------------------------------------

class Workspace:
    """Reused scratch tensors, keyed by name, shape, dtype and device, and device constants.

    Not thread-safe: one augmentation at a time per workspace. Results returned to callers
    never live in it.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple, torch.Tensor] = {}
        self._constants: dict[tuple, object] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (name, tuple(shape), dtype, torch.device(device))
        buffer = self._buffers.get(key)
        if buffer is None:
            buffer = self._buffers[key] = torch.empty(shape, dtype=dtype, device=device)
        return buffer

    def constant(self, key: tuple, make: Callable[[], object]) -> object:
        """`make()`, made once per `key` (which names the device and dtype) and kept: the hot path
        then makes no host-to-device copy."""
        if key not in self._constants:
            self._constants[key] = make()
        return self._constants[key]

    def clear(self) -> None:
        """Drop the buffers (a new image size); the constants do not depend on the size and stay."""
        self._buffers.clear()


def scratch(ws: Workspace | None, name: str, shape: tuple[int, ...], dtype: torch.dtype,
            device: torch.device) -> torch.Tensor:
    """`ws`'s reused buffer `name`, or a fresh tensor without a workspace (contents undefined)."""
    if ws is None:
        return torch.empty(shape, dtype=dtype, device=device)
    return ws.get(name, shape, dtype, device)


def batch_last(ws: Workspace | None, name: str, shape: tuple[int, ...], dtype: torch.dtype,
               device: torch.device) -> torch.Tensor:
    """A tensor of logical `shape` (B, ...) whose memory has the batch dimension innermost, except while
    torch.compile traces (`augment.backend=compile`): it cannot write a strided tensor through `out=`, and
    the compiled code picks its own layouts."""
    if torch.compiler.is_compiling():
        return torch.empty(shape, dtype=dtype, device=device)
    rest = tuple(shape[1:])
    storage = scratch(ws, name, rest + (shape[0],), dtype, device)
    return storage.permute(len(rest), *range(len(rest)))


def default_compute_dtype(device: torch.device | str, out_dtype: torch.dtype = torch.float32) -> torch.dtype:
    """float32 on CPU; on CUDA bfloat16 when the output is bfloat16, else float16."""
    if torch.device(device).type == "cuda":
        return torch.bfloat16 if out_dtype == torch.bfloat16 else torch.float16
    return torch.float32


def _per_sample(values: torch.Tensor, ndim: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) with `ndim` dimensions in all, for broadcasting over samples."""
    values = values.view(-1, *([1] * (ndim - 1)))
    return values if dtype is None else values.to(dtype)


# --------------------------------------------------------------------------------------------
# The steps. `x` is a float (B, 3, H, W) batch in [0, 1] of any layout; `_` steps work in place.
# --------------------------------------------------------------------------------------------

def check_images(images: torch.Tensor) -> None:
    """Raise ValueError unless `images` is a (B, 3, H, W) uint8 or floating-point batch."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise ValueError(f"images must be uint8 or floating point, got {images.dtype}")


def to_float(images: torch.Tensor, flip: torch.Tensor, compute_dtype: torch.dtype | None = None,
             workspace: Workspace | None = None) -> torch.Tensor:
    """uint8 (0..255) or float ([0, 1]) (B, 3, H, W) images -> flipped float batch in batch-last memory."""
    check_images(images)
    compute_dtype = compute_dtype or default_compute_dtype(images.device)
    flipped = scratch(workspace, "flipped", tuple(images.shape), images.dtype, images.device)
    torch.where(_per_sample(flip, 4), images.flip(-1), images, out=flipped)
    x = batch_last(workspace, "x", tuple(images.shape), compute_dtype, images.device)
    x.copy_(flipped)  # the layout change is fastest as a plain copy; scale in place
    return x.div_(255) if images.dtype == torch.uint8 else x


def hflip(x: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Horizontally flip the samples where `flip` is set (new tensor)."""
    return torch.where(_per_sample(flip, x.ndim), x.flip(-1), x)


def luma(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """torchvision's grayscale of (B, 3, H, W) as (B, H, W)."""
    r, g, b = x.unbind(1)
    out = torch.mul(r, LUMA[0], out=out) if out is not None else r * LUMA[0]
    return out.add_(g, alpha=LUMA[1]).add_(b, alpha=LUMA[2])


def _plane(ws: Workspace | None, name: str, x: torch.Tensor) -> torch.Tensor:
    B, _, H, W = x.shape
    return batch_last(ws, name, (B, H, W), x.dtype, x.device)


def _jitter_slots(params: AugmentParams) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The blend steps around the single hue step, as 6 slots per sample.

    A sample with hue at position k has its first k ops in "pre" slots 0..k-1 and the
    remaining 3-k ops in "post" slots 3..5-k; unused slots (and samples without jitter) get
    factor 1, the identity. Returns (factor, is_saturation, is_contrast), each (B, 6).
    """
    batch, device = params.order.shape[0], params.order.device
    hue_pos = (params.order == HUE).to(torch.int64).argmax(dim=1, keepdim=True)      # (B, 1)
    k = torch.arange(3, device=device).unsqueeze(0)                                    # (1, 3)
    position = torch.cat([k.expand(batch, 3), hue_pos + 1 + k], dim=1)                # (B, 6)
    active = torch.cat([k < hue_pos, hue_pos + 1 + k <= 3], dim=1) & params.jitter.unsqueeze(1)
    op = params.order.gather(1, position.clamp(max=3))
    factors = torch.stack([params.brightness, params.contrast, params.saturation], dim=1)
    factor = torch.where(active, factors.gather(1, op.clamp(max=SATURATION)), 1.0)
    return factor, active & (op == SATURATION), active & (op == CONTRAST)


def adjust_hue_(x: torch.Tensor, hue: torch.Tensor, mask: torch.Tensor, workspace: Workspace | None = None) -> torch.Tensor:
    """torchvision's adjust_hue per sample (factor `hue`) where `mask`, in place.

    HSV keeps V = max and min = V - C (C the chroma); with H6 = (6 H + 6 hue) mod 6 in
    [0, 6) each channel is min + C * a, a_R = clamp(|H6 - 3| - 1, 0, 1),
    a_G = clamp(2 - |H6 - 2|, 0, 1), a_B = clamp(2 - |H6 - 4|, 0, 1): the closed form of
    torchvision's piecewise-linear `_hsv2rgb`.
    """
    ws = workspace
    r, g, b = x.unbind(1)
    maxc = torch.maximum(r, g, out=_plane(ws, "hue_max", x))
    torch.maximum(maxc, b, out=maxc)
    minc = torch.minimum(r, g, out=_plane(ws, "hue_min", x))
    torch.minimum(minc, b, out=minc)
    chroma = torch.sub(maxc, minc, out=_plane(ws, "hue_chroma", x))
    # H6 in sextants: (g-b)/C where R is max, 2 + (b-r)/C where G is max, 4 + (r-g)/C otherwise
    # (C clamped away from 0: a gray pixel has all numerators 0, so H6 = 0 as in torchvision).
    h = torch.sub(r, g, out=_plane(ws, "hue_h", x)).add_(chroma, alpha=4)
    t = torch.sub(b, r, out=_plane(ws, "hue_t", x)).add_(chroma, alpha=2)
    torch.where(maxc == g, t, h, out=h)
    torch.sub(g, b, out=t)
    torch.where(maxc == r, t, h, out=h)
    h.div_(torch.clamp(chroma, min=torch.finfo(x.dtype).tiny, out=t))
    # (H6 + 6 hue) mod 6 with cheap in-place ops: the sum lies in [-4, 8), so +12 makes it positive.
    h.add_(_per_sample(hue * 6.0 + 12.0, 3, x.dtype)).mul_(1.0 / 6.0).frac_().mul_(6.0)
    keep = _per_sample(mask, 3)
    for channel, (center, rising) in enumerate(((3.0, False), (2.0, True), (4.0, True))):
        a = torch.sub(h, center, out=t).abs_()
        (a.neg_().add_(2.0) if rising else a.sub_(1.0)).clamp_(0.0, 1.0)
        torch.addcmul(minc, chroma, a, out=a)
        plane = x[:, channel]
        plane.copy_(torch.where(keep, a, plane))  # not out=plane: torch.compile cannot write a strided slice
    return x


def color_jitter_(x: torch.Tensor, params: AugmentParams, workspace: Workspace | None = None) -> torch.Tensor:
    """ColorJitter where `params.jitter`, ops in `params.order` per sample, in place."""
    ndim = x.ndim
    factor, is_sat, is_con = _jitter_slots(params)
    # torchvision's blend f * x + (1 - f) * target, target = gray (saturation), mean gray
    # (contrast) or 0 (brightness); f = 1 for an empty slot gives x exactly.
    sat_weight = (is_sat * (1.0 - factor)).to(x.dtype)
    con_weight = (is_con * (1.0 - factor)).to(x.dtype)
    factor = factor.to(x.dtype)
    gray = _plane(workspace, "gray", x)

    def blend(slot: int) -> None:
        luma(x, out=gray)
        mean = gray.mean(dim=(1, 2))
        target = gray.mul_(_per_sample(sat_weight[:, slot], 3)).add_(_per_sample(con_weight[:, slot] * mean, 3))
        torch.addcmul(target.unsqueeze(1), x, _per_sample(factor[:, slot], ndim), out=x).clamp_(0.0, 1.0)

    for slot in range(3):
        blend(slot)
    adjust_hue_(x, params.hue, params.jitter, workspace)
    for slot in range(3, 6):
        blend(slot)
    return x


def grayscale_(x: torch.Tensor, mask: torch.Tensor, workspace: Workspace | None = None) -> torch.Tensor:
    """Replace the samples where `mask` by their 3-channel grayscale, in place."""
    gray = luma(x, out=_plane(workspace, "gray", x))
    return torch.where(_per_sample(mask, 4), gray.unsqueeze(1), x, out=x)


def gaussian_kernels(sigma: torch.Tensor, kernel_size: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, K) float32 kernels exactly as torchvision's `_get_gaussian_kernel1d`; identity where not `mask`."""
    half = (kernel_size - 1) * 0.5
    taps = torch.linspace(-half, half, steps=kernel_size, dtype=torch.float32, device=sigma.device)
    pdf = torch.exp(-0.5 * (taps.unsqueeze(0) / sigma.to(torch.float32).unsqueeze(1)).pow(2))
    kernels = pdf / pdf.sum(dim=1, keepdim=True)
    if mask is not None:
        identity = (taps == 0).to(torch.float32).unsqueeze(0)
        kernels = torch.where(mask.unsqueeze(1), kernels, identity)
    return kernels


def _reflect_pad_into(padded: torch.Tensor, x: torch.Tensor, pad: int) -> None:
    """Reflect-pad the last two dims of `x` by `pad` into `padded` (torch 'reflect' mode)."""
    H, W = x.shape[-2:]
    padded[..., pad:pad + H, pad:pad + W] = x
    padded[..., pad:pad + H, :pad] = x[..., 1:pad + 1].flip(-1)
    padded[..., pad:pad + H, pad + W:] = x[..., W - 1 - pad:W - 1].flip(-1)
    padded[..., :pad, :] = padded[..., pad + 1:2 * pad + 1, :].flip(-2)
    padded[..., pad + H:, :] = padded[..., H - 1:H - 1 + pad, :].flip(-2)


def check_blur_size(kernel_size: int, height: int, width: int) -> None:
    """Raise ValueError unless `kernel_size` is odd, positive and reflect-paddable at height x width."""
    if kernel_size % 2 != 1 or kernel_size < 1:
        raise ValueError(f"blur kernel size must be odd and positive, got {kernel_size}")
    pad = kernel_size // 2
    if pad >= height or pad >= width:
        raise ValueError(f"blur kernel {kernel_size} is too large for {height}x{width} images "
                         f"(reflect padding needs pad < size)")


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, mask: torch.Tensor, kernel_size: int,
                  workspace: Workspace | None = None) -> torch.Tensor:
    """Blur each sample where `mask` with its own sigma; returns a new batch-last tensor.

    Two 1-D depthwise convolutions over the (3, B, H, W) channels-last view, one channel
    (and kernel) per sample; numerically torchvision's 2-D kernel up to float rounding.
    """
    B, C, H, W = x.shape
    check_blur_size(kernel_size, H, W)
    pad = kernel_size // 2
    kernels = gaussian_kernels(sigma, kernel_size, mask).to(x.dtype)
    planes = x.permute(1, 0, 2, 3)                      # (3, B, H, W): channels-last iff x is batch-last
    padded = scratch(workspace, "blur_pad", (C, H + 2 * pad, W + 2 * pad, B), x.dtype, x.device).permute(0, 3, 1, 2)
    _reflect_pad_into(padded, planes, pad)
    rows = F.conv2d(padded, kernels.view(B, 1, 1, kernel_size), groups=B)
    out = F.conv2d(rows, kernels.view(B, 1, kernel_size, 1), groups=B)
    return out.permute(1, 0, 2, 3)


def solarize_(x: torch.Tensor, mask: torch.Tensor, threshold: float, workspace: Workspace | None = None) -> torch.Tensor:
    """x -> 1 - x where x >= threshold, for the samples where `mask`, in place (|x - [x >= t]|)."""
    limit = torch.where(mask, threshold, float("inf")).to(x.dtype)
    hit = batch_last(workspace, "solarize", tuple(x.shape), x.dtype, x.device)
    torch.ge(x, _per_sample(limit, x.ndim), out=hit)  # 0.0 / 1.0 in x's dtype
    return x.sub_(hit).abs_()


def normalization_affine(mean, std, dtype: torch.dtype,
                         device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(x - mean) / std as x * scale + bias: (1, C, 1, 1) `scale` = 1 / std and `bias` = -mean / std,
    computed in float32 and then rounded to `dtype`."""
    mean = torch.as_tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return (1.0 / std).to(dtype), (-mean / std).to(dtype)


def normalize(x: torch.Tensor, mean, std, dtype: torch.dtype = torch.float32,
              workspace: Workspace | None = None) -> torch.Tensor:
    """(x - mean) / std as a new channels-last tensor of `dtype` (while torch.compile traces it, in the
    layout the compiler picks: the compiled backend makes its output channels-last).

    With a workspace, scale and bias are made on the device once and kept there.
    """
    if workspace is None:
        scale, bias = normalization_affine(mean, std, x.dtype, x.device)
    else:
        key = ("normalize", tuple(mean), tuple(std), x.dtype, x.device)
        scale, bias = workspace.constant(key, lambda: normalization_affine(mean, std, x.dtype, x.device))
    if torch.compiler.is_compiling():  # no `out=` into a channels-last tensor: torch 2.11's dynamo breaks the graph
        return torch.addcmul(bias, x, scale).to(dtype)
    out = torch.empty(x.shape, dtype=dtype, device=x.device, memory_format=torch.channels_last)
    B, C, H, W = x.shape
    if B > 1 and x.permute(1, 2, 3, 0).is_contiguous():
        # Batch-last (C, H, W, B) -> (B, H, W, C) in two cheap steps instead of one scattered
        # copy: (C, HW, B) -> (HW, C, B) while normalising, then a 2-D transpose of (HW*C, B).
        staged = scratch(workspace, "normalize", (H * W, C, B), x.dtype, x.device)
        planes = x.permute(1, 2, 3, 0).reshape(C, H * W, B)
        torch.addcmul(bias.view(1, C, 1), planes.transpose(0, 1), scale.view(1, C, 1), out=staged)
        out.permute(0, 2, 3, 1).reshape(B, H * W * C).copy_(staged.view(H * W * C, B).t())
        return out
    return torch.addcmul(bias, x, scale, out=out)


def apply(images: torch.Tensor, params: AugmentParams, spec: AugmentSpec, *, dtype: torch.dtype = torch.float32,
          compute_dtype: torch.dtype | None = None, workspace: Workspace | None = None) -> torch.Tensor:
    """All of one view's distortions with fixed `params` on (B, 3, H, W) uint8/float images.

    Returns (B, 3, H, W) normalised, channels-last, in `dtype`, on the images' device.
    """
    compute_dtype = compute_dtype or default_compute_dtype(images.device, dtype)
    x = to_float(images, params.flip, compute_dtype, workspace)
    color_jitter_(x, params, workspace)
    grayscale_(x, params.grayscale, workspace)
    x = gaussian_blur(x, params.sigma, params.blur, spec.blur_kernel_size, workspace)
    solarize_(x, params.solarize, spec.solarize_threshold, workspace)
    return normalize(x, spec.mean, spec.std, dtype, workspace)


def _apply_fresh(images: torch.Tensor, params: AugmentParams, spec: AugmentSpec, dtype: torch.dtype,
                 compute_dtype: torch.dtype | None) -> torch.Tensor:
    return apply(images, params, spec, dtype=dtype, compute_dtype=compute_dtype, workspace=None)


BACKENDS = ("auto", "eager", "compile", "triton")


def triton_kernels(device: torch.device):
    """`pipelines.augment_triton` (imported on first use), or a ConfigError when its kernels cannot
    run on `device`: they need CUDA, or the CPU interpreter enabled before they were decorated."""
    try:
        from pipelines import augment_triton  # triton is imported only by this backend
    except ImportError as err:
        raise ConfigError(f"config key 'augment.backend': triton cannot be imported ({err}); install the "
                          f"triton that matches torch, or use augment.backend=eager") from None
    if torch.device(device).type != "cuda" and not augment_triton.INTERPRETED:
        raise ConfigError(f"config key 'augment.backend': triton runs on CUDA, and the images are on {device} "
                          f"(on the CPU it needs TRITON_INTERPRET=1 set before start, slow); use "
                          f"augment.backend=auto or eager")
    return augment_triton


class TwoViewAugment(torch.nn.Module):
    """Two uint8 crop batches (B, 3, S, S), any layout -> two normalised channels-last views.

    View 1 uses index 0 of `blur_p`/`solarize_p`, view 2 index 1. The spec is applied at the
    crops' side S (`spec.image_size` replaced by S), so the blur window follows the crop size of
    a resolution schedule's epoch. `backend` (config key `augment.backend`) says how:

    - `eager`: `apply`, on reused buffers;
    - `compile`: `apply` through `torch.compile` with `compile_backend` (a backend name or callable),
      traced as one graph (fresh buffers; the first call at each size compiles);
    - `triton`: the fused kernels of `pipelines.augment_triton` (CUDA; on the CPU only under
      `TRITON_INTERPRET=1`, else a ConfigError);
    - `auto`: triton for images on CUDA, eager otherwise.

    Every backend takes the same random draws (`sample_params`) and gives the same views within
    its compute dtype's rounding.
    """

    def __init__(self, spec: AugmentSpec, dtype: torch.dtype = torch.float32, *, backend: str = "eager",
                 compute_dtype: torch.dtype | None = None, compile_backend: str | Callable = "inductor"):
        super().__init__()
        check_choice("augment.backend", backend, BACKENDS)
        if backend == "triton" and not torch.cuda.is_available():
            triton_kernels(torch.device("cpu"))  # refuse now rather than at the first batch
        self.spec = spec
        self.dtype = dtype
        self.backend = backend
        self.compute_dtype = compute_dtype
        self.compile_backend = compile_backend
        self.workspace = Workspace()
        self._appliers: dict[tuple[int, str], Callable] = {}  # (crop side, backend) -> the application

    def _resolve(self, device: torch.device) -> str:
        if self.backend == "auto":
            return "triton" if device.type == "cuda" else "eager"
        return self.backend

    def _applier(self, side: int, backend: str, device: torch.device) -> Callable:
        if (side, backend) not in self._appliers:
            spec = dataclasses.replace(self.spec, image_size=side, start_image_size=0)
            if not any(key[0] == side for key in self._appliers):
                self.workspace.clear()  # a schedule moves to a new size for good: drop the last size's buffers
            settings = dict(spec=spec, dtype=self.dtype, compute_dtype=self.compute_dtype)
            if backend == "compile":
                applier = torch.compile(functools.partial(_apply_fresh, **settings), dynamic=False,
                                        backend=self.compile_backend)
            elif backend == "triton":
                applier = functools.partial(triton_kernels(device).apply, workspace=self.workspace, **settings)
            else:
                applier = functools.partial(apply, workspace=self.workspace, **settings)
            self._appliers[(side, backend)] = applier
        return self._appliers[(side, backend)]

    def view(self, images: torch.Tensor, view: int, generator: torch.Generator | None = None) -> torch.Tensor:
        params = sample_params(images.shape[0], self.spec, view, generator, device=images.device)
        backend = self._resolve(images.device)
        if backend == "triton":
            triton_kernels(images.device)  # images moved to the CPU without the interpreter: refuse
        out = self._applier(images.shape[-1], backend, images.device)(images, params)
        # A compiled graph may pick its own output strides; the interface promises channels-last.
        return out.contiguous(memory_format=torch.channels_last) if backend == "compile" else out

    def forward(self, crops1: torch.Tensor, crops2: torch.Tensor,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.view(crops1, 0, generator), self.view(crops2, 1, generator)

    def skip(self, batches: int, batch_size: int, generator: torch.Generator, device: torch.device) -> None:
        """Advance `generator` past `batches` calls of `forward` on `batch_size` images, drawing their
        parameters only (a run resumed mid-epoch)."""
        for _ in range(batches):
            for view in (0, 1):
                sample_params(batch_size, self.spec, view, generator, device=device)
