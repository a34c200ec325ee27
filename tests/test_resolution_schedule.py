"""The opt-in resolution schedule: its sizes per epoch, its settings, each pipeline's batches, resume."""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence

import numpy as np
import pytest
import torch

from bt_fast.config import AugmentSpec, ConfigError, load_config
from bt_fast.train import train
from bt_fast.trainer import Trainer
from pipelines import build_pipeline
from pipelines.augment import TwoViewAugment, apply, sample_params
from pipelines.base import Placement

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # numba finalizers (FFCV)

# 3 epochs from 16 to 64 px over the whole run: the straight line is 16, 40, 64, and 40 rounds to 32.
SCHEDULE = ["augment.image_size=64", "augment.start_image_size=16", "augment.size_ramp=[0.0, 1.0]", "epochs=3"]
SIZES = [16, 32, 64]


def test_documented_sizes_for_ten_epochs():
    """224 px from 128 px, ramp over 20%..80% of the run: epochs 1.8..7.2 on the axis 0..9.
    The straight line at epochs 2..7 is 131.6, 149.3, 167.1, 184.9, 202.7, 220.4 px."""
    spec = AugmentSpec(image_size=224, start_image_size=128, size_ramp=(0.2, 0.8))
    assert [spec.image_size_at(epoch, 10) for epoch in range(10)] == [128, 128, 128, 160, 160, 192, 192, 224, 224, 224]


def test_default_ramp_gives_ffcv_resnet50_schedule():
    """FFCV's ImageNet example (88 epochs, 160 -> 192 px, ramp from epoch 65 to 76) written out: the
    minimum up to the ramp's start, the maximum from its end, between them the linear value rounded to
    a multiple of 32."""
    def ffcv(epoch: int) -> int:
        if epoch <= 65:
            return 160
        if epoch >= 76:
            return 192
        return int(np.round(np.interp(epoch, [65, 76], [160, 192]) / 32)) * 32

    spec = AugmentSpec(image_size=192, start_image_size=160)
    assert [spec.image_size_at(epoch, 88) for epoch in range(88)] == [ffcv(epoch) for epoch in range(88)]


def test_off_by_default_and_in_the_paper_configs():
    for config in (load_config(None), load_config("configs/paper_rn50.yaml")):
        spec = config.augment
        assert not spec.progressive
        assert {spec.image_size_at(epoch, config.epochs) for epoch in range(config.epochs)} == {224}
        assert spec.at_epoch(0, config.epochs) == spec


def test_one_epoch_run_and_last_epoch_are_full_size():
    spec = AugmentSpec(image_size=224, start_image_size=96, size_ramp=(1.0, 1.0))
    assert spec.image_size_at(0, 1) == 224
    assert [spec.image_size_at(epoch, 5) for epoch in range(5)] == [96, 96, 96, 96, 224]


def test_epoch_spec_has_the_epoch_size_and_its_blur_kernel():
    spec = AugmentSpec(image_size=224, start_image_size=96, size_ramp=(0.5, 0.5))
    early = spec.at_epoch(0, 10)
    assert (early.image_size, early.start_image_size, early.crop_scale) == (96, 0, spec.crop_scale)
    assert early.blur_kernel_size == round(96 * 23 / 224) | 1 == 11  # about 10% of the side, odd
    assert spec.at_epoch(9, 10).blur_kernel_size == 23


@pytest.mark.parametrize("override, message", [
    ("augment.start_image_size=4", "config key 'augment.start_image_size' must be 0 (no resolution schedule) "
                                   "or 8 to augment.image_size (224) pixels, got 4"),
    ("augment.start_image_size=256", "got 256"),
    ("augment.size_ramp=[0.8, 0.2]", "config key 'augment.size_ramp' must be a [start, end] pair of fractions"),
    ("augment.size_ramp=[-0.1, 0.5]", "got [-0.1, 0.5]"),
    ("augment.size_ramp=[0.5, 1.5]", "got [0.5, 1.5]"),
    ("augment.size_ramp=0.5", "config key 'augment.size_ramp' expects a list of 2 numbers"),
])
def test_bad_schedule_settings_are_one_line_errors(override, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    assert message in str(error.value) and "\n" not in str(error.value)


def config_with(image_folder, *overrides):
    return load_config(None, [f"data={image_folder}", "workers=0", "seed=4", *overrides])


def first_batches(config, name: str, epochs: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first batch of each of `epochs`, from pipeline `name` on the CPU (an epoch's batches depend on
    its number only, so the others are not run)."""
    pipeline = build_pipeline(dataclasses.replace(config, pipeline=name), Placement(torch.device("cpu")), 4)
    batches = []
    for epoch in epochs:
        pipeline.set_epoch(epoch)
        batches.append(next(iter(pipeline)))
    return batches


@pytest.mark.parametrize("name", ["reference", "dali", "ffcv"])
def test_pipeline_batches_are_those_of_a_fixed_size_run_at_each_epoch_size(image_folder, name):
    """Epoch e of the schedule gives the views (crop, blur window, every pixel) that a run without a
    schedule, at that epoch's size, gives in epoch e."""
    # ffcv.crop=device in both: crop=auto picks it for the schedule, but the host crop for a fixed size on the CPU
    scheduled = first_batches(config_with(image_folder, "ffcv.crop=device", *SCHEDULE), name, range(len(SIZES)))
    for epoch, size in enumerate(SIZES):
        [fixed] = first_batches(config_with(image_folder, "ffcv.crop=device", f"augment.image_size={size}", "epochs=3"),
                                name, [epoch])
        for view, want in zip(scheduled[epoch], fixed):
            assert view.shape == (4, 3, size, size) and view.is_contiguous(memory_format=torch.channels_last)
            assert torch.equal(view, want)


def test_ffcv_host_crop_refuses_the_schedule_in_one_line(image_folder, tmp_path):
    from pipelines.convert import convert
    from pipelines.ffcv import FFCVPipeline
    beton = tmp_path / "train.beton"
    convert(image_folder, beton, "ffcv", workers=1, progress=False)
    config = config_with(image_folder, f"ffcv.beton={beton}", "pipeline=ffcv", "ffcv.crop=host", *SCHEDULE)
    with pytest.raises(ConfigError) as error:
        FFCVPipeline(config, Placement(torch.device("cpu")), 4)
    message = str(error.value)
    assert message.startswith("config key 'augment.start_image_size' (16) sets a resolution schedule")
    assert message.endswith("set ffcv.crop=device to crop on the device") and "\n" not in message


def test_device_augmentation_blur_follows_the_crop_size():
    """TwoViewAugment built once applies, to crops of side S, the spec at S (its blur window)."""
    spec = AugmentSpec(image_size=64, start_image_size=16, blur_p=(1.0, 1.0), blur_sigma=(2.0, 2.0))
    augment = TwoViewAugment(spec)
    for side in (16, 32, 64):
        pixels = torch.Generator().manual_seed(side)
        crops = torch.randint(0, 256, (3, 3, side, side), dtype=torch.uint8, generator=pixels)
        views = augment(crops, crops, torch.Generator().manual_seed(0))
        at_side = AugmentSpec(image_size=side, blur_p=(1.0, 1.0), blur_sigma=(2.0, 2.0))
        generator = torch.Generator().manual_seed(0)
        for view, got in enumerate(views):
            params = sample_params(3, at_side, view, generator)
            assert torch.equal(got, apply(crops, params, at_side))
            if side != 64:  # the full size's window (7 taps) would blur these crops differently
                assert not torch.equal(got, apply(crops, params, spec))


def test_resumed_run_trains_on_the_scheduled_sizes(image_folder, tmp_path, monkeypatch):
    """24 images, 12 per step: 2 steps per epoch. A run stopped after step 3 (mid epoch 1) and resumed
    sees the sizes of an uninterrupted run. From 32 px: a 16 px epoch gives layer4 a 1x1 map, where
    torch's CPU backward can leave NaN in weights that the next, larger epoch reads
    (tools/gpu_check/measure.py)."""
    seen: list[int] = []
    real_step = Trainer.train_step

    def recording_step(self, y1, y2):
        seen.append(y1.shape[-1])
        return real_step(self, y1, y2)

    monkeypatch.setattr(Trainer, "train_step", recording_step)

    def run(out_dir, *extra):
        seen.clear()
        summary = train(load_config("configs/demo_cpu.yaml", [
            f"data={image_folder}", f"out_dir={out_dir}", "pipeline=reference", "knn_every=0", "workers=0",
            "batch_size=12", "projector=64-64", "warmup_epochs=0", "device=cpu", "augment.image_size=96",
            "augment.start_image_size=32", "augment.size_ramp=[0.0, 1.0]", "epochs=3", *extra]))
        return list(seen), summary

    straight, _ = run(tmp_path / "straight")
    assert straight == [32, 32, 64, 64, 96, 96]
    first, summary = run(tmp_path / "split", "max_steps=3")
    assert first == straight[:3] and summary["steps"] == 3
    resumed, summary = run(tmp_path / "split")
    assert resumed == straight[3:] and summary["steps"] == 6
    epochs = [json.loads(line)["epoch"] for line in open(tmp_path / "split" / "metrics.jsonl")]
    assert epochs == [0, 0, 1, 1, 2, 2]
