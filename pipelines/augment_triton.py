"""One view's distortions (`pipelines.augment.apply`) as four fused Triton kernels.

`pipelines/augment.py` is the specification: same `AugmentParams` in, same view out, within
the rounding of the intermediate storage dtype. Every kernel computes in float32 registers;
images are read as uint8 (0..255) or float ([0, 1]) of any strides and the view is written
channels-last in the requested dtype. One program handles `BLOCK` pixels of one sample, so
every per-sample choice is a uniform branch inside the program (no host sync, no divergence).

Kernels, in launch order (grid: samples x pixel tiles):

1. `_contrast_mean_kernel`: contrast blends with the mean of the grayscale image *at the
   contrast step*, so this pass replays the jitter ops that precede contrast (with their
   clamps) and writes per-tile sums of the luma; the next pass adds the tiles of its sample in
   a fixed order (deterministic, no atomics). Samples without jitter only write zeros.
2. `_colour_kernel`: read each pixel once (flipped where drawn), colour jitter in the sample's
   order (hue in closed form, as `augment.adjust_hue_`), grayscale. A sample without blur is
   finished here (solarize, normalise, channels-last store); a blurred one is stored planar in
   the storage dtype for the blur.
3. `_blur_rows_kernel`: the horizontal pass of the separable Gaussian with the sample's own
   kernel (`augment.gaussian_kernels`) and reflect padding through an index table made once per
   size on the device (`reflect_table`, from torch's own reflect `F.pad`).
4. `_blur_cols_kernel`: the vertical pass, then solarize, normalise and the channels-last store.

Passes 3 and 4 return at once for samples whose blur was not drawn (an in-kernel branch on the
per-sample flag). Under `TRITON_INTERPRET=1` (read by triton when this module decorates its
kernels, i.e. at import) the same kernels run on CPU tensors through Triton's interpreter.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from bt_fast.config import AugmentSpec
from pipelines import augment as A

INTERPRETED = bool(triton.knobs.runtime.interpret)  # how the kernels below were decorated

_BRIGHTNESS = tl.constexpr(A.BRIGHTNESS)
_CONTRAST = tl.constexpr(A.CONTRAST)
_SATURATION = tl.constexpr(A.SATURATION)
_HUE = tl.constexpr(A.HUE)
_LUMA_R = tl.constexpr(A.LUMA[0])
_LUMA_G = tl.constexpr(A.LUMA[1])
_LUMA_B = tl.constexpr(A.LUMA[2])
_TINY = tl.constexpr(torch.finfo(torch.float32).tiny)


# --------------------------------------------------------------------------------------------
# Per-pixel helpers (inlined into the kernels)
# --------------------------------------------------------------------------------------------

@triton.jit
def _luma(r, g, b):
    return r * _LUMA_R + g * _LUMA_G + b * _LUMA_B


@triton.jit
def _load_rgb(src, sample, h, w, flip, size, s_b, s_c, s_h, s_w, mask, IS_UINT8: tl.constexpr):
    """The pixels (h, w) of `sample`, mirrored horizontally where `flip`, as float32 in [0, 1]."""
    col = tl.where(flip != 0, size - 1 - w, w)
    ptr = src + sample.to(tl.int64) * s_b + h * s_h + col * s_w
    r = tl.load(ptr, mask=mask, other=0).to(tl.float32)
    g = tl.load(ptr + s_c, mask=mask, other=0).to(tl.float32)
    b = tl.load(ptr + 2 * s_c, mask=mask, other=0).to(tl.float32)
    if IS_UINT8:
        r, g, b = r / 255.0, g / 255.0, b / 255.0
    return r, g, b


@triton.jit
def _hue(r, g, b, shift):
    """`augment.adjust_hue_` with `shift` = 6 hue + 12: V and chroma kept, H6 rotated."""
    maxc = tl.maximum(tl.maximum(r, g), b)
    minc = tl.minimum(tl.minimum(r, g), b)
    chroma = maxc - minc
    h = tl.where(maxc == g, (b - r) + chroma * 2.0, (r - g) + chroma * 4.0)
    h = tl.where(maxc == r, g - b, h)
    h = h / tl.maximum(chroma, _TINY)
    h = (h + shift) * (1.0 / 6.0)
    h = (h - tl.floor(h)) * 6.0  # positive, so floor is torch's trunc in frac_
    a_r = tl.minimum(tl.maximum(tl.abs(h - 3.0) - 1.0, 0.0), 1.0)
    a_g = tl.minimum(tl.maximum(2.0 - tl.abs(h - 2.0), 0.0), 1.0)
    a_b = tl.minimum(tl.maximum(2.0 - tl.abs(h - 4.0), 0.0), 1.0)
    return minc + chroma * a_r, minc + chroma * a_g, minc + chroma * a_b


@triton.jit
def _jitter_op(r, g, b, op, brightness, contrast, saturation, shift, mean):
    """One ColorJitter op (`op` a per-sample scalar): hue, or the blend f x + (1 - f) target
    clamped to [0, 1] with target 0 (brightness), the mean gray (contrast) or the gray image."""
    if op == _HUE:
        r, g, b = _hue(r, g, b, shift)
    else:
        f = tl.where(op == _BRIGHTNESS, brightness, tl.where(op == _CONTRAST, contrast, saturation))
        gray_weight = tl.where(op == _SATURATION, 1.0 - f, 0.0)
        offset = tl.where(op == _CONTRAST, (1.0 - f) * mean, 0.0)
        target = _luma(r, g, b) * gray_weight + offset
        r = tl.minimum(tl.maximum(target + r * f, 0.0), 1.0)
        g = tl.minimum(tl.maximum(target + g * f, 0.0), 1.0)
        b = tl.minimum(tl.maximum(target + b * f, 0.0), 1.0)
    return r, g, b


@triton.jit
def _solarize_normalise_store(out, sample, pix, mask, r, g, b, solarize, threshold,
                              scale_r, scale_g, scale_b, bias_r, bias_g, bias_b, size):
    """x -> 1 - x where x >= threshold (if `solarize`), x * scale + bias, channels-last store."""
    hit = solarize != 0
    r = tl.where(hit & (r >= threshold), 1.0 - r, r)
    g = tl.where(hit & (g >= threshold), 1.0 - g, g)
    b = tl.where(hit & (b >= threshold), 1.0 - b, b)
    ptr = out + sample.to(tl.int64) * size * size * 3 + pix * 3
    ty = out.dtype.element_ty
    tl.store(ptr, (r * scale_r + bias_r).to(ty), mask=mask)
    tl.store(ptr + 1, (g * scale_g + bias_g).to(ty), mask=mask)
    tl.store(ptr + 2, (b * scale_b + bias_b).to(ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------

@triton.jit
def _contrast_mean_kernel(src, partial, flip, jitter, order, brightness, contrast, saturation, hue,
                          size, s_b, s_c, s_h, s_w, tiles, IS_UINT8: tl.constexpr, BLOCK: tl.constexpr):
    sample, tile = tl.program_id(0), tl.program_id(1)
    pix = tile * BLOCK + tl.arange(0, BLOCK)
    mask = pix < size * size
    h, w = pix // size, pix % size
    gray = tl.zeros([BLOCK], dtype=tl.float32)
    if tl.load(jitter + sample) != 0:
        r, g, b = _load_rgb(src, sample, h, w, tl.load(flip + sample), size, s_b, s_c, s_h, s_w, mask, IS_UINT8)
        contrast_at = 0
        for pos in tl.static_range(4):
            contrast_at += tl.where(tl.load(order + sample * 4 + pos) == _CONTRAST, pos, 0)
        bri, con, sat = tl.load(brightness + sample), tl.load(contrast + sample), tl.load(saturation + sample)
        shift = tl.load(hue + sample) * 6.0 + 12.0
        for pos in tl.static_range(4):
            if pos < contrast_at:
                op = tl.load(order + sample * 4 + pos)
                r, g, b = _jitter_op(r, g, b, op, bri, con, sat, shift, 0.0)
        gray = _luma(r, g, b)
    tl.store(partial + sample * tiles + tile, tl.sum(tl.where(mask, gray, 0.0), axis=0))


@triton.jit
def _colour_kernel(src, planes, out, partial, flip, jitter, order, brightness, contrast, saturation, hue,
                   grayscale, blur, solarize, threshold, scale_r, scale_g, scale_b, bias_r, bias_g, bias_b,
                   size, s_b, s_c, s_h, s_w, tiles,
                   IS_UINT8: tl.constexpr, BLOCK: tl.constexpr, TILES: tl.constexpr):
    sample, tile = tl.program_id(0), tl.program_id(1)
    pix = tile * BLOCK + tl.arange(0, BLOCK)
    mask = pix < size * size
    h, w = pix // size, pix % size
    r, g, b = _load_rgb(src, sample, h, w, tl.load(flip + sample), size, s_b, s_c, s_h, s_w, mask, IS_UINT8)
    if tl.load(jitter + sample) != 0:
        t = tl.arange(0, TILES)
        mean = tl.sum(tl.load(partial + sample * tiles + t, mask=t < tiles, other=0.0), axis=0) / (size * size)
        bri, con, sat = tl.load(brightness + sample), tl.load(contrast + sample), tl.load(saturation + sample)
        shift = tl.load(hue + sample) * 6.0 + 12.0
        for pos in tl.static_range(4):
            op = tl.load(order + sample * 4 + pos)
            r, g, b = _jitter_op(r, g, b, op, bri, con, sat, shift, mean)
    if tl.load(grayscale + sample) != 0:
        r = _luma(r, g, b)
        g, b = r, r
    if tl.load(blur + sample) != 0:
        ptr = planes + sample.to(tl.int64) * 3 * size * size + pix
        ty = planes.dtype.element_ty
        tl.store(ptr, r.to(ty), mask=mask)
        tl.store(ptr + size * size, g.to(ty), mask=mask)
        tl.store(ptr + 2 * size * size, b.to(ty), mask=mask)
    else:
        _solarize_normalise_store(out, sample, pix, mask, r, g, b, tl.load(solarize + sample), threshold,
                                  scale_r, scale_g, scale_b, bias_r, bias_g, bias_b, size)


@triton.jit
def _blur_rows_kernel(planes, rows, blur, kernels, reflect, size, K: tl.constexpr, BLOCK: tl.constexpr):
    sample, tile = tl.program_id(0), tl.program_id(1)
    if tl.load(blur + sample) != 0:
        pix = tile * BLOCK + tl.arange(0, BLOCK)
        mask = pix < size * size
        w = pix % size
        src_r = planes + sample.to(tl.int64) * 3 * size * size + (pix - w)  # the row starts
        src_g = src_r + size * size
        src_b = src_g + size * size
        taps = kernels + sample * K
        columns = reflect + w  # columns[j]: the source column of tap j
        r = tl.zeros([BLOCK], dtype=tl.float32)
        g = tl.zeros([BLOCK], dtype=tl.float32)
        b = tl.zeros([BLOCK], dtype=tl.float32)
        for j in range(K):  # a loop: unrolled, every tap's loads would be hoisted into registers and spill
            weight = tl.load(taps + j)
            col = tl.load(columns + j, mask=mask, other=0)
            r = tl.fma(tl.load(src_r + col, mask=mask, other=0.0).to(tl.float32), weight, r)
            g = tl.fma(tl.load(src_g + col, mask=mask, other=0.0).to(tl.float32), weight, g)
            b = tl.fma(tl.load(src_b + col, mask=mask, other=0.0).to(tl.float32), weight, b)
        dst = rows + sample.to(tl.int64) * 3 * size * size + pix
        ty = rows.dtype.element_ty
        tl.store(dst, r.to(ty), mask=mask)
        tl.store(dst + size * size, g.to(ty), mask=mask)
        tl.store(dst + 2 * size * size, b.to(ty), mask=mask)


@triton.jit
def _blur_cols_kernel(rows, out, blur, kernels, reflect, solarize, threshold, scale_r, scale_g, scale_b,
                      bias_r, bias_g, bias_b, size, K: tl.constexpr, BLOCK: tl.constexpr):
    sample, tile = tl.program_id(0), tl.program_id(1)
    if tl.load(blur + sample) != 0:
        pix = tile * BLOCK + tl.arange(0, BLOCK)
        mask = pix < size * size
        h = pix // size
        src_r = rows + sample.to(tl.int64) * 3 * size * size + (pix - h * size)  # the column starts
        src_g = src_r + size * size
        src_b = src_g + size * size
        taps = kernels + sample * K
        offsets = reflect + (size + K - 1) + h  # offsets[j]: the source row of tap j, times `size`
        r = tl.zeros([BLOCK], dtype=tl.float32)
        g = tl.zeros([BLOCK], dtype=tl.float32)
        b = tl.zeros([BLOCK], dtype=tl.float32)
        for j in range(K):
            weight = tl.load(taps + j)
            offset = tl.load(offsets + j, mask=mask, other=0)
            r = tl.fma(tl.load(src_r + offset, mask=mask, other=0.0).to(tl.float32), weight, r)
            g = tl.fma(tl.load(src_g + offset, mask=mask, other=0.0).to(tl.float32), weight, g)
            b = tl.fma(tl.load(src_b + offset, mask=mask, other=0.0).to(tl.float32), weight, b)
        _solarize_normalise_store(out, sample, pix, mask, r, g, b, tl.load(solarize + sample), threshold,
                                  scale_r, scale_g, scale_b, bias_r, bias_g, bias_b, size)


# --------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------

_WARPS = 8  # 4 pixels per thread at BLOCK 1024: the blur passes then need no register spills on sm_90


def _block(pixels: int) -> int:
    return min(1024, triton.next_power_of_2(pixels))


@functools.lru_cache(maxsize=None)
def _affine(mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[list[float], list[float]]:
    """`augment.normalization_affine` in float32 as Python floats (kernel arguments: no device copy)."""
    scale, bias = A.normalization_affine(mean, std, torch.float32)
    return scale.flatten().tolist(), bias.flatten().tolist()


def reflect_table(size: int, kernel_size: int, device: torch.device) -> torch.Tensor:
    """(2, size + kernel_size - 1) int32: for each position of a row reflect-padded by kernel_size // 2
    (torch's 'reflect', as `F.pad` does it), the source index, and that index times `size`."""
    pad = kernel_size // 2
    index = torch.arange(size, dtype=torch.float32, device=device).view(1, 1, size)
    source = torch.nn.functional.pad(index, (pad, pad), mode="reflect").view(-1).to(torch.int32)
    return torch.stack([source, source * size]).contiguous()


def _flag(mask: torch.Tensor) -> torch.Tensor:
    """A (B,) bool tensor as uint8 without a copy (Triton loads it as a byte)."""
    return mask.contiguous().view(torch.uint8)


def apply(images: torch.Tensor, params: A.AugmentParams, spec: AugmentSpec, *, dtype: torch.dtype = torch.float32,
          compute_dtype: torch.dtype | None = None, workspace: A.Workspace | None = None) -> torch.Tensor:
    """`pipelines.augment.apply` with the fused kernels: (B, 3, S, S) uint8/float images of any
    strides -> (B, 3, S, S) normalised, channels-last, in `dtype`.

    `compute_dtype` is the storage dtype of the blurred samples' intermediate planes (default
    float16 on CUDA whatever `dtype`, being the more precise in [0, 1]; float32 on the CPU); all
    arithmetic is float32. The images must be on CUDA, or on the CPU with this module imported
    under `TRITON_INTERPRET=1`. Launches four kernels and makes no host-device synchronisation.
    """
    A.check_images(images)
    batch, _, height, width = images.shape
    if height != width:
        raise ValueError(f"the fused augmentation takes square crops, got {height}x{width}")
    size, k = height, spec.blur_kernel_size
    A.check_blur_size(k, height, width)
    device = images.device
    compute_dtype = compute_dtype or A.default_compute_dtype(device)
    ws = workspace
    block = _block(size * size)
    tiles = triton.cdiv(size * size, block)
    grid = (batch, tiles)
    p = params
    order = p.order.contiguous()
    sigma_kernels = A.gaussian_kernels(p.sigma, k, p.blur).contiguous()  # (B, K) float32
    reflect = (reflect_table(size, k, device) if ws is None
               else ws.constant(("triton_reflect", size, k, device), lambda: reflect_table(size, k, device)))
    scale, bias = _affine(tuple(spec.mean), tuple(spec.std))
    partial = A.scratch(ws, "triton_partial", (batch, tiles), torch.float32, device)
    planes = A.scratch(ws, "triton_planes", (batch, 3, size, size), compute_dtype, device)
    rows = A.scratch(ws, "triton_rows", (batch, 3, size, size), compute_dtype, device)
    out = torch.empty((batch, 3, size, size), dtype=dtype, device=device, memory_format=torch.channels_last)
    is_uint8 = images.dtype == torch.uint8
    strides = images.stride()
    threshold = spec.solarize_threshold  # a float32 kernel argument, as the eager path's float32 threshold
    jitter = _flag(p.jitter)
    factors = (p.brightness.contiguous(), p.contrast.contiguous(), p.saturation.contiguous(), p.hue.contiguous())
    flip = _flag(p.flip)
    _contrast_mean_kernel[grid](images, partial, flip, jitter, order, *factors, size, *strides, tiles,
                                IS_UINT8=is_uint8, BLOCK=block, num_warps=_WARPS)
    _colour_kernel[grid](images, planes, out, partial, flip, jitter, order, *factors,
                         _flag(p.grayscale), _flag(p.blur), _flag(p.solarize), threshold, *scale, *bias,
                         size, *strides, tiles, IS_UINT8=is_uint8, BLOCK=block,
                         TILES=triton.next_power_of_2(tiles), num_warps=_WARPS)
    _blur_rows_kernel[grid](planes, rows, _flag(p.blur), sigma_kernels, reflect, size, K=k, BLOCK=block,
                            num_warps=_WARPS)
    _blur_cols_kernel[grid](rows, out, _flag(p.blur), sigma_kernels, reflect, _flag(p.solarize), threshold,
                            *scale, *bias, size, K=k, BLOCK=block, num_warps=_WARPS)
    return out
