"""Device augmentations against torchvision's functional ops, sample by sample, and their statistics."""
from __future__ import annotations


import pytest
import torch
import torchvision.transforms.functional as TF
from torch.utils._python_dispatch import TorchDispatchMode

from bt_fast.config import AugmentSpec
from pipelines import augment as A

ATOL = 2e-5  # float32 rounding of differently ordered but equal arithmetic


def make_images(batch: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """uint8 (B, 3, H, W): noise, smooth colour fields, and a few flat / gray / saturated ones (HSV edge cases)."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randint(0, 256, (batch, 3, size, size), generator=g, dtype=torch.uint8)
    smooth = torch.nn.functional.interpolate(torch.rand(batch, 3, 4, 4, generator=g) * 255, size=size,
                                             mode="bilinear", align_corners=False).round().to(torch.uint8)
    images = torch.where(torch.arange(batch).view(-1, 1, 1, 1) % 2 == 0, noise, smooth)
    if batch >= 5:
        images[0] = 0                                   # black: max == min == 0
        images[1] = 200                                 # flat gray
        images[2, 0], images[2, 1], images[2, 2] = 255, 0, 0   # pure red
        images[3, :, :, : size // 2] = 255              # half white, half noise
        images[4, 1] = images[4, 0]                     # ties between red and green
    return images


def reference_jitter(image: torch.Tensor, params: A.AugmentParams, i: int) -> torch.Tensor:
    if not params.jitter[i]:
        return image
    for op in params.order[i].tolist():
        if op == A.BRIGHTNESS:
            image = TF.adjust_brightness(image, params.brightness[i].item())
        elif op == A.CONTRAST:
            image = TF.adjust_contrast(image, params.contrast[i].item())
        elif op == A.SATURATION:
            image = TF.adjust_saturation(image, params.saturation[i].item())
        else:
            image = TF.adjust_hue(image, params.hue[i].item())
    return image


def reference_view(images: torch.Tensor, params: A.AugmentParams, spec: AugmentSpec) -> torch.Tensor:
    """The whole distortion with torchvision's functional ops, one sample at a time."""
    out = []
    k = spec.blur_kernel_size
    for i in range(images.shape[0]):
        x = images[i].float() / 255
        if params.flip[i]:
            x = TF.hflip(x)
        x = reference_jitter(x, params, i)
        if params.grayscale[i]:
            x = TF.rgb_to_grayscale(x, num_output_channels=3)
        if params.blur[i]:
            x = TF.gaussian_blur(x, [k, k], [params.sigma[i].item()] * 2)
        if params.solarize[i]:
            x = TF.solarize(x, spec.solarize_threshold)
        out.append(TF.normalize(x, list(spec.mean), list(spec.std)))
    return torch.stack(out)


def strong_spec(**overrides) -> AugmentSpec:
    """Wider ranges and p = 1 jitter so every branch (clamping, big hue shifts) is exercised."""
    values = dict(image_size=32, jitter_p=1.0, brightness=0.8, contrast=0.8, saturation=0.8, hue=0.5)
    values.update(overrides)
    return AugmentSpec(**values)


def params_for(batch: int, spec: AugmentSpec, view: int = 0, seed: int = 1) -> A.AugmentParams:
    return A.sample_params(batch, spec, view, torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------
# Each step against torchvision, with fixed parameters
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", [AugmentSpec(image_size=32), strong_spec()], ids=["paper", "strong"])
def test_color_jitter_matches_torchvision_in_sampled_order(spec):
    images = make_images(48)
    params = params_for(48, spec)
    assert params.jitter.any() and params.order.unique(dim=0).shape[0] > 8  # many different orders
    x = A.to_float(images, torch.zeros(48, dtype=torch.bool), torch.float32)
    A.color_jitter_(x, params)
    expected = torch.stack([reference_jitter(images[i].float() / 255, params, i) for i in range(48)])
    torch.testing.assert_close(x, expected, atol=ATOL, rtol=0)
    untouched = ~params.jitter
    if untouched.any():  # samples without jitter are bit-identical
        assert torch.equal(x[untouched], images[untouched].float() / 255)


def test_hue_alone_matches_adjust_hue_for_extreme_factors():
    images = make_images(16).float() / 255
    hue = torch.linspace(-0.5, 0.5, 16)
    x = images.clone()
    A.adjust_hue_(x, hue, torch.ones(16, dtype=torch.bool))
    expected = torch.stack([TF.adjust_hue(images[i], hue[i].item()) for i in range(16)])
    torch.testing.assert_close(x, expected, atol=ATOL, rtol=0)


def test_grayscale_flip_solarize_match_torchvision():
    images = make_images(8).float() / 255
    mask = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0], dtype=torch.bool)
    gray = A.grayscale_(images.clone(), mask)
    flipped = A.hflip(images, mask)
    solar = A.solarize_(images.clone(), mask, 128 / 255)
    for i in range(8):
        x = images[i]
        torch.testing.assert_close(gray[i], TF.rgb_to_grayscale(x, 3) if mask[i] else x, atol=ATOL, rtol=0)
        assert torch.equal(flipped[i], TF.hflip(x) if mask[i] else x)
        torch.testing.assert_close(solar[i], TF.solarize(x, 128 / 255) if mask[i] else x, atol=0, rtol=0)


@pytest.mark.parametrize("kernel_size", [3, 9, 23])
def test_gaussian_blur_matches_torchvision(kernel_size):
    images = make_images(6).float() / 255
    sigma = torch.tensor([0.1, 0.5, 1.0, 1.7, 2.0, 0.3])
    mask = torch.tensor([1, 1, 1, 1, 1, 0], dtype=torch.bool)
    x = A.to_float(make_images(6), torch.zeros(6, dtype=torch.bool), torch.float32)  # batch-last layout
    out = A.gaussian_blur(x, sigma, mask, kernel_size)
    for i in range(6):
        expected = TF.gaussian_blur(images[i], [kernel_size] * 2, [sigma[i].item()] * 2) if mask[i] else images[i]
        torch.testing.assert_close(out[i], expected, atol=ATOL, rtol=0)
    assert torch.equal(out[5], images[5])  # identity kernel: exact


def test_gaussian_kernels_are_torchvisions():
    from torchvision.transforms._functional_tensor import _get_gaussian_kernel1d
    sigma = torch.tensor([0.1, 0.77, 2.0])
    kernels = A.gaussian_kernels(sigma, 23)
    for i in range(3):
        expected = _get_gaussian_kernel1d(23, sigma[i].item(), torch.float32, torch.device("cpu"))
        torch.testing.assert_close(kernels[i], expected, atol=1e-7, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_normalize_is_channels_last_in_dtype(dtype):
    spec = AugmentSpec()
    x = A.to_float(make_images(4), torch.zeros(4, dtype=torch.bool), torch.float32)
    out = A.normalize(x, spec.mean, spec.std, dtype)
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    expected = torch.stack([TF.normalize(x[i], list(spec.mean), list(spec.std)) for i in range(4)]).to(dtype)
    torch.testing.assert_close(out, expected, atol=ATOL if dtype == torch.float32 else 2e-2, rtol=0)


@pytest.mark.parametrize("view", [0, 1])
@pytest.mark.parametrize("spec", [AugmentSpec(image_size=32), strong_spec(grayscale_p=0.5, solarize_p=(0.5, 0.5))],
                         ids=["paper", "strong"])
def test_whole_view_matches_torchvision_chain(spec, view):
    images = make_images(32, seed=view)
    params = params_for(32, spec, view, seed=7 + view)
    out = A.apply(images, params, spec, workspace=A.Workspace())
    assert out.shape == (32, 3, 32, 32) and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, reference_view(images, params, spec), atol=1e-4, rtol=0)


def test_channels_last_uint8_input_and_workspace_reuse_give_same_result():
    spec = strong_spec(grayscale_p=0.5, solarize_p=(0.5, 0.5))
    images = make_images(8)
    params = params_for(8, spec)
    hwc = images.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # the loader's layout
    ws = A.Workspace()
    first = A.apply(hwc, params, spec, workspace=ws)
    second = A.apply(images, params, spec, workspace=ws)
    fresh = A.apply(images, params, spec, workspace=None)
    assert torch.equal(first, second) and torch.equal(first, fresh)
    assert first.data_ptr() != second.data_ptr()  # outputs never live in the workspace


# ------------------------------------------------------------------------------------------
# Randomness: rates, ranges, generator
# ------------------------------------------------------------------------------------------

def test_sampled_rates_and_ranges_follow_the_spec():
    spec = AugmentSpec()
    n = 4000
    g = torch.Generator().manual_seed(3)
    v1, v2 = A.sample_params(n, spec, 0, g), A.sample_params(n, spec, 1, g)
    # 5 standard deviations at most; a rate off by 0.1 (e.g. grayscale 0.1 or 0.3) fails.
    def rate_ok(mask, p):
        tol = max(5 * (p * (1 - p) / n) ** 0.5, 1e-9)
        return abs(mask.float().mean().item() - p) <= tol
    assert rate_ok(v1.grayscale, 0.2) and rate_ok(v2.grayscale, 0.2)
    assert rate_ok(v1.flip, 0.5) and rate_ok(v1.jitter, 0.8)
    assert v1.blur.all() and rate_ok(v2.blur, 0.1)
    assert not v1.solarize.any() and rate_ok(v2.solarize, 0.2)
    for values, low, high in [(v1.brightness, 0.6, 1.4), (v1.contrast, 0.6, 1.4), (v1.saturation, 0.8, 1.2),
                              (v1.hue, -0.1, 0.1), (v1.sigma, 0.1, 2.0)]:
        assert values.min() >= low and values.max() <= high
        assert abs(values.mean().item() - (low + high) / 2) < 0.02 * (high - low) + 1e-3
    assert torch.equal(v1.order.sort(dim=1).values, torch.arange(4).expand(n, 4))
    position_rates = torch.stack([(v1.order == op).float().mean(0) for op in range(4)])
    assert (position_rates - 0.25).abs().max() < 0.04  # every op equally likely at every position


def test_grayscale_rate_holds_end_to_end():
    """Count gray outputs of the full augmentation on colourful images (jitter cannot make them gray)."""
    spec = AugmentSpec(image_size=8)
    n = 3000
    images = torch.zeros(n, 3, 8, 8, dtype=torch.uint8)
    images[:, 0], images[:, 1], images[:, 2] = 220, 60, 20
    aug = A.TwoViewAugment(spec)
    v1, v2 = aug(images, images, torch.Generator().manual_seed(5))
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    for view in (v1, v2):
        pixels = view * std + mean
        gray = (pixels.amax(1) - pixels.amin(1)).amax(dim=(1, 2)) < 1e-4
        rate = gray.float().mean().item()
        assert abs(rate - 0.2) < 5 * (0.16 / n) ** 0.5, rate


def test_generator_drives_all_randomness():
    spec = AugmentSpec(image_size=32)
    images = make_images(8)
    aug = A.TwoViewAugment(spec)
    a = aug(images, images, torch.Generator().manual_seed(11))
    b = aug(images, images, torch.Generator().manual_seed(11))
    c = aug(images, images, torch.Generator().manual_seed(12))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert not torch.equal(a[0], a[1])  # the two views differ


def test_disabled_augmentation_is_plain_normalisation():
    spec = AugmentSpec(image_size=16, flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=(0.0, 0.0),
                       solarize_p=(0.0, 0.0))
    images = make_images(4, size=16)
    v1, v2 = A.TwoViewAugment(spec, torch.bfloat16)(images, images)
    expected = TF.normalize(images.float() / 255, list(spec.mean), list(spec.std))
    for view in (v1, v2):
        assert view.dtype == torch.bfloat16 and view.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(view.float(), expected, atol=3e-2, rtol=0)  # bfloat16 rounding


# ------------------------------------------------------------------------------------------
# Batch-size independence of the op count
# ------------------------------------------------------------------------------------------

class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_op_count_does_not_depend_on_batch_size():
    spec = AugmentSpec(image_size=32)
    aug = A.TwoViewAugment(spec)
    counts = {}
    for batch in (4, 64):
        images = make_images(batch)
        aug(images, images, torch.Generator().manual_seed(0))  # warm the workspace
        with CountOps() as counter:
            aug(images, images, torch.Generator().manual_seed(0))
        counts[batch] = counter.ops
    assert len(counts[4]) > 50
    assert counts[4] == counts[64]


def test_bad_input_is_rejected():
    spec = AugmentSpec(image_size=32)
    with pytest.raises(ValueError, match="shape"):
        A.TwoViewAugment(spec)(torch.zeros(2, 32, 32, 3, dtype=torch.uint8), torch.zeros(2, 32, 32, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="too large"):
        A.gaussian_blur(torch.rand(2, 3, 8, 8), torch.ones(2), torch.ones(2, dtype=torch.bool), 23)


def test_compiled_augmentation_matches_eager_and_is_one_graph():
    """Traced by dynamo and functionalised (aot_eager: the inductor C++ build takes ~40 s on 2 cores), as
    one graph: a graph break (an op dynamo cannot trace, such as an `out=` into a strided view) would
    leave the compiled backend running dozens of small graphs with eager code between them."""
    from torch._dynamo.backends.registry import lookup_backend
    graphs = []

    def counting_aot_eager(graph, example_inputs):
        graphs.append(graph)
        return lookup_backend("aot_eager")(graph, example_inputs)

    spec = strong_spec(image_size=16, grayscale_p=0.5, solarize_p=(0.5, 0.5))
    images = make_images(8, size=16)
    eager = A.TwoViewAugment(spec)(images, images, torch.Generator().manual_seed(2))
    compiled = A.TwoViewAugment(spec, backend="compile", compile_backend=counting_aot_eager)(
        images, images, torch.Generator().manual_seed(2))
    assert len(graphs) == 1  # both views' calls run the one graph
    for a, b in zip(eager, compiled):
        assert b.is_contiguous(memory_format=torch.channels_last) and b.dtype == torch.float32
        torch.testing.assert_close(b, a, atol=1e-4, rtol=0)
