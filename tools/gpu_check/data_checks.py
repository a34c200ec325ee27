"""Checks of the data path on the device: augmentation, device crop and decode, FFCV and DALI."""
from __future__ import annotations

import contextlib
import importlib.util
import io

import torch
from PIL import Image

from bt_fast.config import AugmentSpec, load_config
from pipelines.augment import TwoViewAugment, apply, sample_params
from pipelines.base import Placement
from tools.gpu_check.measure import Result, compare, timed
from tools.gpu_check.train_checks import image_folder

def check_augment(device, sizes, workdir, measured) -> list[Result]:
    """Both views in float16 and bfloat16 compute on the device (and, on CUDA, the fused Triton kernels)
    against float32 compute on the CPU; images/s of each backend."""
    spec = AugmentSpec(image_size=sizes.image_size)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (sizes.batch, 3, sizes.image_size, sizes.image_size), dtype=torch.uint8,
                           generator=generator)
    results = []
    for compute in (torch.float16, torch.bfloat16):
        got, want = [], []
        for view in (0, 1):
            params = sample_params(sizes.batch, spec, view, generator)
            want.append(apply(images, params, spec, compute_dtype=torch.float32))
            got.append(apply(images.to(device), params.to(device), spec, compute_dtype=compute))
        results.append(compare(f"augment {str(compute)[6:]}", torch.stack(got), torch.stack(want),
                               relative=False, mean=True))
    crops = images.to(device)
    backends = ["eager"]
    if device.type == "cuda":  # GPU only: the fused kernels, float16 out, against float32 eager on the CPU
        from pipelines.augment_triton import apply as fused
        params = [sample_params(sizes.batch, spec, view, generator) for view in (0, 1)]
        want = [apply(images, p, spec, compute_dtype=torch.float32) for p in params]
        got = [fused(crops, p.to(device), spec, dtype=torch.float16) for p in params]
        results.append(compare("augment triton", torch.stack(got), torch.stack(want), relative=False, mean=True))
        backends.append("triton")
    else:
        results.append(Result("augment triton", "skipped: the fused kernels need CUDA (tests/test_augment_triton.py "
                                                 "runs them through Triton's CPU interpreter)"))
    for backend in backends:
        augment = TwoViewAugment(spec, torch.float16 if device.type == "cuda" else torch.float32, backend=backend)
        key = "augment_images_per_s" if backend == "eager" else f"augment_{backend}_images_per_s"
        measured[key] = sizes.batch / timed(lambda: augment(crops, crops), device, 5)
    return results


def check_device_crop(device, sizes, workdir, measured) -> list[Result]:
    """Both views' crops of a padded batch in float16 and bfloat16 compute on the device against float32
    on the CPU (max |diff| in [0, 1] units), and the operator's speed against a per-box torchvision loop."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2.functional import resized_crop

    from pipelines.device_crop import random_boxes, resized_crops
    generator = torch.Generator().manual_seed(3)
    batch, size = sizes.batch, sizes.image_size
    height, width = (375, 500) if device.type == "cuda" else (48, 64)
    coarse = torch.randint(0, 256, (batch, 3, 12, 16), generator=generator).float()
    images = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bicubic").clamp(0, 255)
    images = images.round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()  # smooth photos-like content
    boxes = random_boxes(batch, height, width, generator, min_fraction=0.25)
    want = resized_crops(images, boxes, size)
    on_device, device_boxes = images.to(device), boxes.to(device)
    results = [compare(f"device crop {name}", resized_crops(on_device, device_boxes, size, dtype=dtype).float(), want,
                       relative=False)
               for name, dtype in (("float16", torch.float16), ("bfloat16", torch.bfloat16))]
    half = torch.float16 if device.type == "cuda" else torch.float32  # GPU only: half compute
    chw = on_device.permute(0, 3, 1, 2).float()

    def per_box_loop():
        return [resized_crop(chw[i], *boxes[i, v].tolist(), [size, size], InterpolationMode.BICUBIC, antialias=True)
                for i in range(batch) for v in range(2)]
    ours = timed(lambda: resized_crops(on_device, device_boxes, size, dtype=half), device, 5)
    loop = timed(per_box_loop, device, 2)
    measured["device_crop_images_per_s"] = batch / ours
    measured["torchvision_loop_crop_images_per_s"] = batch / loop
    return results


def check_device_decode(device, sizes, workdir, measured) -> list[Result]:
    """`ffcv.decode=device`'s batched decode (nvJPEG on CUDA) of JPEGs of mixed sizes into one padded batch,
    against libjpeg-turbo on the CPU: mean |diff| per image region in [0, 1] units (the decoders' IDCT and
    chroma upsampling differ slightly), and its images/s."""
    if not installed("torchcodec"):
        return [Result("device decode", "skipped: torchcodec not installed")]
    from pipelines.device_decode import decode_padded
    generator = torch.Generator().manual_seed(4)
    shapes = [(375, 500), (500, 375), (333, 500), (480, 360)] * (sizes.batch // 4)
    encoded = []
    for height, width in shapes:
        coarse = torch.randint(0, 256, (1, 3, 12, 16), generator=generator).float()
        pixels = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bicubic").clamp(0, 255)
        buffer = io.BytesIO()
        Image.fromarray(pixels[0].permute(1, 2, 0).round().to(torch.uint8).numpy()).save(buffer, "JPEG", quality=90)
        encoded.append(buffer.getvalue())
    jpegs = torch.zeros((len(encoded), max(map(len, encoded))), dtype=torch.uint8)
    for i, data in enumerate(encoded):
        jpegs[i, :len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    records = [(h, w, len(data)) for (h, w), data in zip(shapes, encoded)]
    height, width = max(h for h, _ in shapes), max(w for _, w in shapes)
    want = decode_padded(jpegs, records, height, width, torch.device("cpu"), "gpu_check")
    got = decode_padded(jpegs, records, height, width, device, "gpu_check").cpu()
    regions = [(got[i, :h, :w].float() - want[i, :h, :w].float()).abs().mean() / 255
               for i, (h, w, _) in enumerate(records)]
    seconds = timed(lambda: decode_padded(jpegs, records, height, width, device, "gpu_check"), device, 3)
    measured["device_decode_images_per_s"] = len(encoded) / seconds
    return [compare("device decode", torch.stack(regions), torch.zeros(len(regions)), relative=False)]




def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package (nvidia) is missing
        return False


def loader_config(sizes, workdir, pipeline: str, *overrides: str):
    return load_config(None, [f"data={image_folder(workdir / 'images', sizes.batch)}", f"pipeline={pipeline}",
                              "workers=1", f"augment.image_size={sizes.image_size}", *overrides])


def check_ffcv(device, sizes, workdir, measured) -> list[Result]:
    """The first batch's crops cut on the device (FFCV's ToDevice, float16 resize on CUDA) against the same
    device crop on the CPU (`ffcv.crop=device` on both: `auto` would crop on the host on the CPU)."""
    if not installed("ffcv"):
        return [Result("ffcv crops", "skipped: not installed")]
    from pipelines.ffcv import FFCVPipeline
    config = loader_config(sizes, workdir, "ffcv", "ffcv.crop=device")
    crops = []
    for where in (device, torch.device("cpu")):
        pipeline = FFCVPipeline(config, Placement(where), sizes.batch)
        crops.append(pipeline.device_crops(next(iter(pipeline.host_batches()))).float())
    return [compare("ffcv crops", crops[0], crops[1], relative=False)]


def check_dali(device, sizes, workdir, measured) -> list[Result]:
    """DALI on the device (the mixed decoder on CUDA) against DALI on the CPU, same seed: the same images
    in the same order, and per-image view means within TOLERANCE (the JPEG decoders differ slightly).
    Then, on the device, an epoch resumed at its second batch from the graph's saved state against the
    whole epoch: the same views exactly, from a restored graph (not a replay)."""
    if not installed("nvidia.dali"):
        return [Result(name, "skipped: not installed") for name in ("dali ids", "dali view means", "dali resume")]
    from pipelines.dali import DALIPipeline
    config = loader_config(sizes, workdir, "dali")
    batches = [next(DALIPipeline(config, Placement(where), sizes.batch, debug=True).debug_batches())
               for where in (device, torch.device("cpu"))]
    means = [torch.stack([b.view1, b.view2]).float().mean(dim=(2, 3, 4)) for b in batches]
    return [compare("dali ids", torch.as_tensor(batches[0].ids), torch.as_tensor(batches[1].ids), relative=False),
            compare("dali view means", means[0], means[1], relative=False), dali_resume(config, device, sizes)]


def dali_resume(config, device, sizes) -> Result:
    from pipelines.dali import DALIPipeline
    batch = max(1, sizes.batch // 4)  # the folder holds sizes.batch images: four batches an epoch

    def epoch(pipeline: DALIPipeline, start: int = 0) -> torch.Tensor:
        pipeline.set_epoch(0, start)
        return torch.stack([torch.stack([v1, v2]).float().cpu() for v1, v2 in pipeline])

    whole = epoch(DALIPipeline(config, Placement(device), batch))
    stopped = DALIPipeline(config, Placement(device), batch)
    stopped.set_epoch(0)
    with contextlib.closing(iter(stopped)) as delivered:
        next(delivered)
        state = stopped.position_state()
    resumed, restored = DALIPipeline(config, Placement(device), batch), []
    build = resumed.build
    resumed.build = lambda plan, checkpoint=None: restored.append(checkpoint is not None) or build(plan, checkpoint)
    resumed.restore_position(state)
    got = epoch(resumed, 1)
    if restored != [True]:
        return Result("dali resume", "fail: the saved graph state was not used")
    return compare("dali resume", got, whole[1:], relative=False)


