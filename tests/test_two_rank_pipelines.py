"""Two ranks (gloo, CPU) training with the FFCV and DALI pipelines: the first-use FFCV conversion happens
once, under the lock; each rank draws its own augmentations; a run resumed mid-epoch continues with the
losses of an uninterrupted one."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bt_fast.checkpoint import CHECKPOINT_NAME
from bt_fast.train import train
from conftest import free_ports, spawn_pinned
from pipelines import build_pipeline
from pipelines.base import Placement
from test_distributed import tiny_config


def identical_images(root: Path, count: int = 24) -> Path:
    """`count` copies of one photograph-like JPEG in two classes: every rank reads the same pixels, so
    only the augmentation's random draws can make the ranks' views differ."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((64, 48), Image.BICUBIC)
    for i in range(count):
        (root / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        image.save(root / f"class{i % 2}" / f"img{i:03d}.jpg", quality=90)
    return root


def _rank_views(config, rank: int, world: int) -> torch.Tensor:
    """This rank's first augmented view of epoch 0, from inputs that are the same on every rank."""
    pipeline = build_pipeline(config, Placement(torch.device("cpu"), torch.float32, rank, world), 4)
    pipeline.set_epoch(0)
    if config.pipeline == "ffcv":  # the crops depend on the sample index: give both ranks the same ones
        crops = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (4, 2, 32, 32, 3), dtype=np.uint8))
        pipeline.crops = lambda: iter([crops])
    return next(iter(pipeline))[0]


def _worker(rank: int, world: int, ports: list[int], data: str, root: str) -> None:
    """Both pipelines in one pair of ranks (each process pays the imports once): for each, a run split
    at step 2 of 3 (epoch 0) and resumed to step 4, an uninterrupted run to step 4, and this rank's views."""
    import pipelines.ffcv
    real_convert = pipelines.ffcv.convert

    def convert(*args, **kwargs):
        with open(Path(root) / "conversions", "a") as record:
            record.write(f"{rank}\n")
        return real_convert(*args, **kwargs)
    pipelines.ffcv.convert = convert
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank))
    ports = iter(ports)
    for pipeline in PIPELINES:
        out = Path(root) / pipeline
        for name, steps in [("split", 2), ("split", 4), ("straight", 4)]:  # step 2 of 3 in epoch 0: a mid-epoch resume
            os.environ["MASTER_PORT"] = str(next(ports))
            summary = train(tiny_config(data, out / name, f"pipeline={pipeline}", f"max_steps={steps}",
                                        "log_every=1", "workers=1"))
            assert summary["steps"] == steps
        config = tiny_config(data, out / "views", f"pipeline={pipeline}", "workers=1")
        torch.save(_rank_views(config, rank, world), out / f"views{rank}.pt")


PIPELINES = ["ffcv", "dali"]


@pytest.fixture(scope="module")
def two_ranks(module_tmp) -> Path:
    """The directory where `_worker`'s two ranks left their runs, one sub-directory per pipeline."""
    root = module_tmp("two_ranks")
    data = identical_images(root / "images")
    spawn_pinned(_worker, args=(2, free_ports(3 * len(PIPELINES)), str(data), str(root)), nprocs=2)
    return root


@pytest.mark.timeout(300)
@pytest.mark.parametrize("pipeline", PIPELINES)
def test_two_ranks_convert_once_draw_their_own_augmentations_and_resume_mid_epoch(pipeline, two_ranks):
    if pipeline == "ffcv":
        assert len((two_ranks / "conversions").read_text().split()) == 1  # one rank converted, the other waited
        assert sorted(p.name for p in two_ranks.iterdir() if p.name.startswith((".images", "images."))) == [
            "images.beton", "images.beton.report.json"]  # no lock file left beside the data
    runs = two_ranks / pipeline
    views = [torch.load(runs / f"views{rank}.pt") for rank in range(2)]
    assert views[0].shape == views[1].shape == (4, 3, 32, 32)
    assert not torch.equal(views[0], views[1])  # same inputs, different draws on each rank

    split, straight = ([json.loads(line) for line in (runs / name / "metrics.jsonl").read_text().splitlines()]
                       for name in ("split", "straight"))
    assert [m["step"] for m in split] == [m["step"] for m in straight] == [1, 2, 3, 4]
    assert [m["loss"] for m in split] == pytest.approx([m["loss"] for m in straight], rel=1e-5)
    a, b = (torch.load(runs / name / CHECKPOINT_NAME, weights_only=True) for name in ("split", "straight"))
    assert max((a["model"][k].double() - b["model"][k].double()).abs().max().item()
               for k in a["model"] if a["model"][k].is_floating_point()) < 1e-5
    # step 4 is batch 1 of epoch 1: DALI's checkpoint holds each rank's graph state (FFCV's batches follow from the step)
    positions = a["pipeline_positions"]
    if pipeline == "dali":
        assert [(p["rank"], p["epoch"], p["batch"]) for p in positions] == [(0, 1, 1), (1, 1, 1)]
    else:
        assert positions is None
