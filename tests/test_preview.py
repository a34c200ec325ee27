"""tools.preview: the first batch's view pairs of every pipeline, de-normalised, in one PNG."""
import importlib.util
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from bt_fast.config import IMAGENET_MEAN, IMAGENET_STD, load_config
from bt_fast.host import usable_cores
from conftest import write_image_folder
from pipelines import PIPELINES
from pipelines.base import Placement
from tools import preview

SIZE, PAIRS = 32, 4
NEEDS = {"reference": "torchvision", "ffcv": "ffcv", "dali": "nvidia.dali"}


def pixels(view: torch.Tensor) -> np.ndarray:
    """A normalised (3, H, W) view as uint8 (H, W, 3), with ImageNet's mean and std written out."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (view.float() * std + mean).clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy()


@pytest.mark.parametrize("name", list(PIPELINES))
def test_preview_shows_the_pipelines_first_pairs(name, tmp_path, capsys):
    if importlib.util.find_spec(NEEDS[name].split(".")[0]) is None:
        pytest.skip(f"{NEEDS[name]} is not installed")
    data = write_image_folder(tmp_path / "images", classes=2, per_class=4)
    out = tmp_path / "views.png"
    overrides = [f"augment.image_size={SIZE}"]
    with warnings.catch_warnings():  # more workers than cores: one per core, without torch's warning about it
        warnings.filterwarnings("error", message=".*worker processes in total", category=UserWarning)
        preview.main(["--config", "configs/demo_cpu.yaml", "--pipeline", name, "--data", str(data),
                      "--pairs", str(PAIRS), "--out", str(out), f"workers={usable_cores() + 1}", *overrides])
    assert f"from the {name} pipeline" in capsys.readouterr().out

    # the same batch, drawn again from a pipeline built here, with one worker
    config = load_config("configs/demo_cpu.yaml", [f"pipeline={name}", f"data={data}", "workers=1", *overrides])
    pipeline = PIPELINES[name]()(config, Placement(torch.device("cpu")), PAIRS)
    pipeline.set_epoch(0)
    view1, view2 = next(iter(pipeline))
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


def test_more_pairs_than_images_names_the_pairs_not_batch_size(tmp_path, capsys):
    data = write_image_folder(tmp_path / "images", classes=2, per_class=4)
    with pytest.raises(SystemExit) as exit_info:
        preview.main(["--config", "configs/demo_cpu.yaml", "--pipeline", "reference", "--data", str(data),
                      "--pairs", "9", "--out", str(tmp_path / "v.png")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: data directory {data} has 8 images: fewer than the 9 pairs asked for; ask for at most 8"]
    assert not (tmp_path / "v.png").exists()
