"""tools.preview: the first view pairs training feeds, of every pipeline, de-normalised, in one PNG."""
import contextlib
import importlib.util
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from bt_fast.config import IMAGENET_MEAN, IMAGENET_STD, load_config
from bt_fast.distributed import DistContext
from bt_fast.host import usable_cores
from bt_fast.trainer import Trainer
from conftest import write_image_folder
from pipelines import PIPELINES
from tools import preview

SIZE, PAIRS, BATCH = 32, 4, 3  # the pairs shown span two training batches
NEEDS = {"reference": "torchvision", "ffcv": "ffcv", "dali": "nvidia.dali"}


def pixels(view: torch.Tensor) -> np.ndarray:
    """A normalised (3, H, W) view as uint8 (H, W, 3), with ImageNet's mean and std written out."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (view.float() * std + mean).clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy()


@pytest.mark.parametrize("name", list(PIPELINES))
def test_preview_shows_the_pairs_training_feeds_first(name, tmp_path, capsys):
    """The preview's pairs are the first ones a one-process run trains on: its first batch of BATCH, then
    the next batch's first, not a batch of PAIRS drawn apart (FFCV's distortions depend on the batch)."""
    if importlib.util.find_spec(NEEDS[name].split(".")[0]) is None:
        pytest.skip(f"{NEEDS[name]} is not installed")
    data = write_image_folder(tmp_path / "images", classes=2, per_class=4)
    out = tmp_path / "views.png"
    overrides = [f"augment.image_size={SIZE}", f"batch_size={BATCH}"]
    with warnings.catch_warnings():  # more workers than cores: one per core, without torch's warning about it
        warnings.filterwarnings("error", message=".*worker processes in total", category=UserWarning)
        preview.main(["--config", "configs/demo_cpu.yaml", "--pipeline", name, "--data", str(data),
                      "--pairs", str(PAIRS), "--out", str(out), f"workers={usable_cores() + 1}", *overrides])
    assert f"from the {name} pipeline" in capsys.readouterr().out

    # what training feeds: the trainer's own pipeline (one worker), iterated as its epoch loop does
    config = load_config("configs/demo_cpu.yaml", [f"pipeline={name}", f"data={data}", "workers=1", "knn_every=0",
                                                   f"out_dir={tmp_path / 'run'}", "projector=16-16", *overrides])
    trainer = Trainer(config, DistContext(rank=0, local_rank=0, world_size=1, device=torch.device("cpu")))
    trainer.pipeline.set_epoch(0)
    with contextlib.closing(iter(trainer.pipeline)) as batches:
        fed = [next(batches), next(batches)]
    view1, view2 = (torch.cat([batch[side] for batch in fed]) for side in (0, 1))
    assert len(fed[0][0]) == BATCH < PAIRS <= len(view1)
    with Image.open(out) as image:
        grid = np.asarray(image.convert("RGB"))
    step = SIZE + 2  # 2 px of padding around every tile
    assert grid.shape == (step + 2, 2 * PAIRS * step + 2, 3)
    for pair in range(PAIRS):
        for side, view in enumerate((view1, view2)):
            left = 2 + (2 * pair + side) * step
            tile = grid[2:2 + SIZE, left:left + SIZE]
            np.testing.assert_array_equal(tile, pixels(view[pair]), err_msg=f"pair {pair} view {side + 1}")
    assert not np.array_equal(pixels(view1[0]), pixels(view2[0]))  # two different distortions


def test_preview_without_data_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        preview.main(["--config", "configs/demo_cpu.yaml", "--pipeline", "reference", "--out", str(tmp_path / "v.png")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: config key 'data' is required") and err.count("\n") == 1


def test_more_pairs_than_epoch_0_trains_on_names_the_most_there_are(tmp_path, capsys):
    """8 images in batches of 3: training feeds 6 pairs in epoch 0 (the last 2 images make no full batch). The
    overrides come before and after options, as bt_fast.train takes them (those after were 'unrecognized')."""
    data = write_image_folder(tmp_path / "images", classes=2, per_class=4)
    with pytest.raises(SystemExit) as exit_info:
        preview.main(["--config", "configs/demo_cpu.yaml", "--pipeline", "reference", "--data", str(data),
                      "batch_size=3", "--pairs", "7", "--out", str(tmp_path / "v.png"), f"augment.image_size={SIZE}"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: the reference pipeline feeds 6 pairs in epoch 0 (2 batches of batch_size=3); ask for at most 6 pairs"]
    assert not (tmp_path / "v.png").exists()


def test_out_not_ending_in_png_is_one_line_before_any_work(tmp_path, capsys):
    """The picture is PNG bytes: a .jpg name would hold a file its suffix misnames."""
    data = write_image_folder(tmp_path / "images", classes=2, per_class=2)
    with pytest.raises(SystemExit) as exit_info:
        preview.main(["--config", "configs/demo_cpu.yaml", "--pipeline", "reference", "--data", str(data),
                      "--pairs", "2", "--out", str(tmp_path / "views.jpg"), "batch_size=2", f"augment.image_size={SIZE}"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: argument --out: {tmp_path / 'views.jpg'} does not end in .png; the image is written as PNG only, "
        f"so give a .png file (see --help)"]
    assert not (tmp_path / "views.jpg").exists()


def test_a_split_datasets_root_is_refused_as_training_refuses_it(tmp_path, capsys):
    """--data naming a folder of train/ and val/ previewed the two splits as two classes; training refuses it."""
    root = tmp_path / "demo"
    for split in ("train", "val"):
        write_image_folder(root / split, classes=1, per_class=2, size=(16, 16))
    with pytest.raises(SystemExit) as exit_info:
        preview.main(["--config", "configs/demo_cpu.yaml", "--pipeline", "reference", "--data", str(root),
                      "--out", str(tmp_path / "v.png"), "batch_size=2", f"augment.image_size={SIZE}"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: config key 'data' names {root}, which holds train/ and val/: pretraining would read both splits as "
        f"two classes; give data={root / 'train'}"]
    assert not (tmp_path / "v.png").exists()
