"""The fused Triton augmentation (`pipelines/augment_triton.py`) against the eager specification
(`pipelines.augment.apply`) and torchvision's functional ops, on real photographs.

The kernels run on every machine through Triton's CPU interpreter, in one child process: triton reads
TRITON_INTERPRET when it decorates a kernel, and setting it here would turn every Triton kernel this
worker decorates afterwards (inductor's too) into an interpreted one. They are also compiled for an
H100/H200 (sm_90) on every machine, which needs no GPU; with CUDA present the interpreted cases also run
compiled on the GPU, in this process.
"""
from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import skimage.data
import torch
import torchvision.transforms.v2.functional as F2
from filelock import FileLock

from bt_fast.config import AugmentSpec, ConfigError
from pipelines import augment as A
from test_augment import make_images, reference_view, strong_spec

REPO = Path(__file__).resolve().parents[1]

# Bounds, in normalised units (a [0, 1] error times 1 / std, about 4.4).
EAGER_BOUND = 2e-5        # float32 against the eager path: the same arithmetic, summed in another order
TORCHVISION_BOUND = 3e-5  # float32 against torchvision's ops one sample at a time
# float16 planes (and input, output) against float32 eager: two fp16 roundings of [0, 1] values (2^-12 each)
# through the blur, times 1 / std, plus the output's rounding (2^-10 at 2.6).
FP16_BOUND = 5e-3
# GPU only: the same cases compiled on CUDA. A blurred value within fp16 rounding of the
# solarize threshold (128/255) may land on the other side: |1 - 2 x| / std, up to 0.018 at one pixel.
GPU_FLOAT32_BOUND = 1e-4
GPU_FLOAT16_MAX = 2.5e-2

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field")

# The child: run `augment_triton.apply` (or TwoViewAugment with backend triton) on each stored case.
CHILD = """
import sys, torch
from pipelines import augment as A, augment_triton as T
assert T.INTERPRETED, "TRITON_INTERPRET=1 did not reach triton"
cases, results = torch.load(sys.argv[1], weights_only=False), {}
for name, case in cases.items():
    if "crops" in case:
        augment = A.TwoViewAugment(case["spec"], case["dtype"], backend="triton")
        results[name] = augment(*case["crops"], torch.Generator().manual_seed(case["seed"]))
    else:
        results[name] = T.apply(case["images"], case["params"], case["spec"], dtype=case["dtype"],
                                compute_dtype=case["compute_dtype"])
torch.save(results, sys.argv[2])
"""


@functools.lru_cache(maxsize=None)
def photo(name: str) -> torch.Tensor:
    return torch.from_numpy(getattr(skimage.data, name)()).permute(2, 0, 1)


def photos(count: int, size: int, seed: int = 0) -> torch.Tensor:
    """uint8 (count, 3, size, size): square windows of the bundled photographs, resized with antialiasing."""
    g = torch.Generator().manual_seed(seed)
    crops = []
    for i in range(count):
        image = photo(PHOTOS[i % len(PHOTOS)])
        side = min(image.shape[1:]) // 2
        top, left = (int(torch.randint(0, n - side + 1, (1,), generator=g)) for n in image.shape[1:])
        crops.append(F2.resize(image[:, top:top + side, left:left + side], [size, size], antialias=True))
    return torch.stack(crops)


def single_distortions() -> tuple[torch.Tensor, A.AugmentParams]:
    """12 photographs, each with at most one distortion active (the other jitter factors are identities),
    and one that applies brightness (clamping) and hue before contrast, which must then blend with the
    mean of that modified image."""
    n = 12
    off = torch.zeros(n, dtype=torch.bool)

    def only(*samples: int) -> torch.Tensor:
        mask = off.clone()
        mask[list(samples)] = True
        return mask

    brightness, contrast, saturation, hue = torch.ones(n), torch.ones(n), torch.ones(n), torch.zeros(n)
    brightness[2], contrast[3], saturation[4], hue[5], hue[6] = 1.7, 0.3, 1.8, 0.37, -0.5
    brightness[11], hue[11], contrast[11], saturation[11] = 1.9, 0.2, 1.6, 0.5
    order = torch.stack([torch.randperm(4, generator=torch.Generator().manual_seed(i)) for i in range(n)])
    order[11] = torch.tensor([A.BRIGHTNESS, A.HUE, A.CONTRAST, A.SATURATION])
    sigma = torch.full((n,), 1.0)
    sigma[8], sigma[9] = 0.6, 2.0
    params = A.AugmentParams(flip=only(1), jitter=only(2, 3, 4, 5, 6, 11), brightness=brightness, contrast=contrast,
                             saturation=saturation, hue=hue, order=order, grayscale=only(7), blur=only(8, 9),
                             sigma=sigma, solarize=only(10))
    return photos(n, 32), params


def mixed_images(batch: int, size: int, seed: int) -> torch.Tensor:
    """The HSV edge cases of `make_images` (black, flat gray, pure red, half white, channel ties), then photographs."""
    return torch.cat([make_images(5, size, seed), photos(batch - 5, size, seed)])


def strided_views(images0: torch.Tensor, images1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both views as `crops[:, v]` of one channels-last (B, 2, 3, S, S) tensor, the device crop's layout."""
    batch, _, size, _ = images0.shape
    storage = torch.stack([images0, images1], dim=1).permute(0, 1, 3, 4, 2).contiguous()  # (B, 2, S, S, 3)
    crops = storage.permute(0, 1, 4, 2, 3)
    return crops[:, 0], crops[:, 1]


def build_cases() -> dict[str, dict]:
    cases = {}
    images, params = single_distortions()
    cases["single"] = dict(images=images, params=params, spec=AugmentSpec(image_size=224),  # 23 blur taps
                           dtype=torch.float32, compute_dtype=None)
    spec = strong_spec(image_size=88, grayscale_p=0.5, blur_p=(0.5, 0.5), solarize_p=(0.5, 0.5))  # 9 taps
    views = strided_views(mixed_images(6, 40, 1), mixed_images(6, 40, 2))  # 40 px: two pixel tiles per sample
    for v in (0, 1):
        params = A.sample_params(6, spec, v, torch.Generator().manual_seed(v))
        cases[f"random_view{v}"] = dict(images=views[v], params=params, spec=spec, dtype=torch.float32,
                                        compute_dtype=None)
    paper = AugmentSpec(image_size=32)
    cases["paper_float"] = dict(images=mixed_images(8, 32, 3).float() / 255,
                                params=A.sample_params(8, paper, 0, torch.Generator().manual_seed(3)),
                                spec=paper, dtype=torch.float32, compute_dtype=None)
    cases["float16"] = dict(images=(mixed_images(8, 32, 4).float() / 255).half(),
                            params=A.sample_params(8, spec, 1, torch.Generator().manual_seed(4)),
                            spec=spec, dtype=torch.float16, compute_dtype=torch.float16)
    cases["two_view"] = dict(crops=strided_views(mixed_images(6, 24, 5), mixed_images(6, 24, 6)), seed=5,
                             spec=strong_spec(image_size=24, grayscale_p=0.5, solarize_p=(0.5, 0.5)),
                             dtype=torch.float32)
    return cases


@pytest.fixture(scope="session")
def interpreted(tmp_path_factory) -> tuple[dict, dict]:
    """(cases, the kernels' outputs for them under Triton's CPU interpreter), computed once per test
    session: pytest-xdist workers share the session's temporary folder, and the second one waits."""
    base = tmp_path_factory.getbasetemp()
    folder = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "augment_triton"
    folder.mkdir(exist_ok=True)
    cases_file, out_file = folder / "cases.pt", folder / "out.pt"
    with FileLock(str(folder / "lock")):
        if not out_file.exists():
            torch.save(build_cases(), cases_file)
            env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
            child = subprocess.run([sys.executable, "-c", CHILD, str(cases_file), str(out_file)], cwd=REPO, env=env,
                                   capture_output=True, text=True, timeout=240)
            assert child.returncode == 0, child.stderr[-3000:]
    return torch.load(cases_file, weights_only=False), torch.load(out_file, weights_only=False)


def eager(case: dict, compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    images = case["images"]
    images = images.float() if images.dtype == torch.float16 else images  # the float32 specification
    return A.apply(images, case["params"], case["spec"], compute_dtype=compute_dtype)


def on_cuda(case: dict, compute_dtype: torch.dtype | None) -> torch.Tensor:  # GPU only: the compiled kernels
    from pipelines import augment_triton
    return augment_triton.apply(case["images"].cuda(), case["params"].to("cuda"), case["spec"],
                                dtype=case["dtype"], compute_dtype=compute_dtype).cpu()


def assert_view(out: torch.Tensor, like: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.shape == like.shape and out.dtype == dtype
    assert out.is_contiguous(memory_format=torch.channels_last)


# ------------------------------------------------------------------------------------------
# Each distortion alone, then all together, against eager and torchvision
# ------------------------------------------------------------------------------------------

def test_each_distortion_alone_matches_eager_and_torchvision(interpreted):
    cases, results = interpreted
    case, out = cases["single"], results["single"]
    want = eager(case)
    assert_view(out, want, torch.float32)
    torch.testing.assert_close(out, want, atol=EAGER_BOUND, rtol=0)
    torch.testing.assert_close(out, reference_view(case["images"], case["params"], case["spec"]),
                               atol=TORCHVISION_BOUND, rtol=0)
    plain = F2.normalize(case["images"].float() / 255, list(case["spec"].mean), list(case["spec"].std))
    assert (out[0] - plain[0]).abs().max() < EAGER_BOUND  # nothing drawn: normalisation alone
    assert (out[1:] - plain[1:]).flatten(1).abs().amax(1).min() > 0.05  # every drawn distortion changed its sample


def test_contrast_blends_with_the_mean_at_its_step(interpreted):
    """Sample 11 brightens (clipping) and rotates hue before contrast: the mean of the original image is wrong."""
    cases, results = interpreted
    case = cases["single"]
    image = case["images"][11].float() / 255
    stale = F2.adjust_contrast(F2.adjust_hue(F2.adjust_brightness(image, 1.9), 0.2), 1.6)  # torchvision: right mean
    spec = case["spec"]
    want = F2.normalize(F2.adjust_saturation(stale, 0.5), list(spec.mean), list(spec.std))
    torch.testing.assert_close(results["single"][11], want, atol=TORCHVISION_BOUND, rtol=0)
    wrong_mean = (F2.rgb_to_grayscale(image).mean() - F2.rgb_to_grayscale(stale).mean()).abs()
    assert wrong_mean > 0.02  # the case distinguishes the two means


@pytest.mark.parametrize("name", ["random_view0", "random_view1", "paper_float"])
def test_random_views_match_eager_and_torchvision(interpreted, name):
    cases, results = interpreted
    case, out = cases[name], results[name]
    params = case["params"]
    assert params.jitter.any() and params.blur.any() and (params.grayscale.any() or name == "paper_float")
    want = eager(case)
    assert_view(out, want, torch.float32)
    torch.testing.assert_close(out, want, atol=EAGER_BOUND, rtol=0)
    images = case["images"] if case["images"].dtype == torch.uint8 else (case["images"] * 255).round().to(torch.uint8)
    if case["images"].dtype == torch.uint8:
        torch.testing.assert_close(out, reference_view(images, params, case["spec"]), atol=TORCHVISION_BOUND, rtol=0)
    if torch.cuda.is_available():  # GPU only: float32 planes; the GPU's fused multiply-adds and division differ
        torch.testing.assert_close(on_cuda(case, torch.float32), want, atol=GPU_FLOAT32_BOUND, rtol=0)


def test_float16_storage_stays_within_fp16_rounding(interpreted):
    """float16 input, intermediate planes and output (the CUDA configuration), in the interpreter."""
    cases, results = interpreted
    case, out = cases["float16"], results["float16"]
    want = eager(case)
    assert_view(out, want, torch.float16)
    assert case["params"].blur.any() and case["params"].jitter.any()
    torch.testing.assert_close(out.float(), want, atol=FP16_BOUND, rtol=0)
    if torch.cuda.is_available():  # GPU only
        difference = (on_cuda(case, torch.float16).float() - want).abs()
        assert difference.mean() < FP16_BOUND / 4 and difference.max() < GPU_FLOAT16_MAX


def test_two_view_augment_triton_backend_matches_eager_backend(interpreted):
    cases, results = interpreted
    case = cases["two_view"]
    want = A.TwoViewAugment(case["spec"], case["dtype"], backend="eager")(
        *case["crops"], torch.Generator().manual_seed(case["seed"]))
    for got, ref in zip(results["two_view"], want):
        assert_view(got, ref, case["dtype"])
        torch.testing.assert_close(got, ref, atol=EAGER_BOUND, rtol=0)
    assert not torch.equal(results["two_view"][0], results["two_view"][1])


# ------------------------------------------------------------------------------------------
# Compiled for the GPU (no GPU needed)
# ------------------------------------------------------------------------------------------

class Launches:
    """Stands in for a kernel: records `kernel[grid](*args, **kwargs)` instead of launching it."""

    def __init__(self, kernel, calls: list):
        self.kernel, self.calls = kernel, calls

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((self.kernel, args, kwargs))


def test_kernels_compile_for_sm90_without_register_spills(monkeypatch, tmp_path):
    """The launches `apply` makes for the CUDA configuration (channels-last uint8 in, float16 planes and
    out, 224 px, 23 taps) compiled through Triton's whole CUDA pipeline to an sm_90 binary, which then
    keeps every value in registers (no local-memory spills)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import mangle_type

    from pipelines import augment_triton as T
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # compile now, whatever an earlier run cached
    calls = []
    for name in ("_contrast_mean_kernel", "_colour_kernel", "_blur_rows_kernel", "_blur_cols_kernel"):
        monkeypatch.setattr(T, name, Launches(getattr(T, name), calls))
    spec = AugmentSpec()
    images = torch.zeros(2, 224, 224, 3, dtype=torch.uint8).permute(0, 3, 1, 2)
    T.apply(images, A.sample_params(2, spec, 0, torch.Generator().manual_seed(0)), spec, dtype=torch.float16,
            compute_dtype=torch.float16)
    assert len(calls) == 4
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    for kernel, args, kwargs in calls:
        options = {"num_warps": kwargs.pop("num_warps")}
        signature = {name: mangle_type(arg) for name, arg in zip(kernel.arg_names, args)}
        signature.update(dict.fromkeys(kwargs, "constexpr"))
        binary = triton.compile(ASTSource(kernel, signature, kwargs), target=GPUTarget("cuda", 90, 32),
                                options=options).asm["cubin"]
        with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
            file.write(binary)
            file.flush()
            usage = subprocess.run([str(cuobjdump), "--dump-resource-usage", file.name], capture_output=True,
                                   text=True, check=True).stdout
        spills = {key: int(value) for key, value in re.findall(r"(STACK|LOCAL):(\d+)", usage)}
        assert spills == {"STACK": 0, "LOCAL": 0}, (kernel.fn.__name__, usage)


# ------------------------------------------------------------------------------------------
# Backend selection and the device constants (in this process, no interpreter)
# ------------------------------------------------------------------------------------------

def test_triton_backend_on_the_cpu_without_interpreter_refuses_in_one_line(monkeypatch):
    from pipelines import augment_triton
    monkeypatch.setattr(augment_triton, "INTERPRETED", False)  # as decorated without TRITON_INTERPRET=1
    images = make_images(2, 16)
    with pytest.raises(ConfigError, match=r"augment\.backend.*CUDA") as err:
        A.TwoViewAugment(AugmentSpec(image_size=16), backend="triton")(images, images)
    assert "\n" not in str(err.value)


def test_unknown_backend_names_the_key():
    with pytest.raises(ConfigError, match=r"augment\.backend.*'triton'"):
        A.TwoViewAugment(AugmentSpec(image_size=16), backend="tritn")


def test_auto_backend_on_the_cpu_is_eager_bit_for_bit():
    spec = strong_spec(image_size=16, grayscale_p=0.5, solarize_p=(0.5, 0.5))
    images = make_images(6, 16)
    auto = A.TwoViewAugment(spec, backend="auto")(images, images, torch.Generator().manual_seed(1))
    plain = A.TwoViewAugment(spec, backend="eager")(images, images, torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(auto, plain))


def test_normalisation_constants_are_made_once_per_workspace(monkeypatch):
    calls = []
    make = A.normalization_affine
    monkeypatch.setattr(A, "normalization_affine", lambda *args: calls.append(args) or make(*args))
    spec = strong_spec(image_size=16, grayscale_p=0.5, solarize_p=(0.5, 0.5))
    images = make_images(6, 16)
    params = A.sample_params(6, spec, 0, torch.Generator().manual_seed(0))
    ws = A.Workspace()
    first, second = A.apply(images, params, spec, workspace=ws), A.apply(images, params, spec, workspace=ws)
    assert len(calls) == 1  # the second call copies nothing to the device
    fresh = A.apply(images, params, spec, workspace=None)
    assert torch.equal(first, second) and torch.equal(first, fresh)  # bit-identical to computing them each call
