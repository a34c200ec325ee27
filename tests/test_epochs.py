"""Epoch order, the same for every pipeline: each image goes to exactly one rank per epoch."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bt_fast.config import AugmentSpec, Config
from bt_fast.errors import DataError
from pipelines import PIPELINES, build_pipeline
from pipelines.base import Placement
from pipelines.epochs import epoch_seed, rank_block, sample_rng, samples_per_rank

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # numba finalizers (FFCV)

IMAGES, WORLD, BATCH, SEED = 25, 3, 4, 11
NO_COLOUR_CHANGE = dict(jitter_p=0.0, grayscale_p=0.0, blur_p=(0.0, 0.0), solarize_p=(0.0, 0.0))


def colour_of(image_id: int) -> tuple[int, int, int]:
    return 20 + 9 * image_id, 235 - 9 * image_id, 128


def ids_of(view: torch.Tensor, spec: AugmentSpec) -> list[int]:
    """Image ids back from constant-colour views (the red level says which image it is)."""
    red = view.float()[:, 0].mean(dim=(1, 2)) * spec.std[0] + spec.mean[0]
    return [round((255 * float(r) - 20) / 9) for r in red]


@pytest.fixture(scope="module")
def constant_images(module_tmp) -> Path:
    """25 single-colour images; ImageFolder order (sorted) is the id order."""
    root = module_tmp("epochs") / "train"
    for k in range(IMAGES):
        folder = root / f"class{k // 10}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 32), colour_of(k)).save(folder / f"img{k:03d}.png")
    return root


# Every pipeline, and each FFCV mode (ffcv.decode, ffcv.crop) besides the default one.
CASES = [(name, {}) for name in sorted(PIPELINES)] + [("ffcv", {"decode": "device"}), ("ffcv", {"crop": "host"})]


@pytest.fixture
def plain_python_ffcv(request):
    """FFCV's loader run as plain Python: the same order, without numba compile time for three loaders."""
    if request.node.callspec.params["name"] != "ffcv":
        yield
        return
    from pipelines.ffcv import Compiler
    Compiler.set_enabled(False)
    yield
    Compiler.set_enabled(True)


@pytest.mark.parametrize("name, ffcv", CASES, ids=[name + "".join(f"-{v}_{k}" for k, v in ffcv.items())
                                                   for name, ffcv in CASES])
def test_each_image_goes_to_exactly_one_rank_per_epoch(constant_images, name, ffcv, plain_python_ffcv):
    config = Config(data=str(constant_images), pipeline=name, workers=1, seed=SEED,
                    augment=dataclasses.replace(AugmentSpec(image_size=16), **NO_COLOUR_CHANGE))
    config.ffcv = dataclasses.replace(config.ffcv, **ffcv)
    pipelines = [build_pipeline(config, Placement(torch.device("cpu"), torch.float32, rank, WORLD), BATCH)
                 for rank in range(WORLD)]
    per_rank = IMAGES // WORLD  # 8: two batches of 4 on every rank, one image left out per epoch
    assert [len(p) for p in pipelines] == [per_rank // BATCH] * WORLD
    orders = []
    for epoch in (0, 1):
        # The documented convention written out: one permutation of all images from (seed, epoch), the
        # same on every rank; rank r reads its r-th contiguous block of 25 // 3.
        order = np.random.default_rng([SEED, epoch, 0]).permutation(IMAGES)
        read = []
        for rank, pipeline in enumerate(pipelines):
            pipeline.set_epoch(epoch)
            batches = list(pipeline)
            assert len(batches) == len(pipeline)
            ids = [i for view1, view2 in batches for i in ids_of(view1, config.augment)]
            assert ids == [i for _, view2 in batches for i in ids_of(view2, config.augment)]
            assert ids == order[rank * per_rank:(rank + 1) * per_rank].tolist()
            read.extend(ids)
        assert len(read) == len(set(read)) == WORLD * per_rank  # disjoint across ranks
        orders.append(read)
    assert orders[0] != orders[1]  # reshuffled every epoch


def test_rank_block_and_the_minimum_size():
    order = np.arange(10)[::-1]
    assert [rank_block(order, r, 3).tolist() for r in range(3)] == [[9, 8, 7], [6, 5, 4], [3, 2, 1]]
    with pytest.raises(ValueError, match="rank 3"):
        rank_block(order, 3, 3)
    assert samples_per_rank(10, 3, 3, "data directory d") == 3
    with pytest.raises(DataError, match="data directory d has 10 images: too few for one batch of 4 per rank on 3"):
        samples_per_rank(10, 4, 3, "data directory d")


def test_epoch_seed_is_the_seed_sequence_of_seed_epoch_and_stream():
    expected = int(np.random.SeedSequence([5, 2, 7]).generate_state(1)[0]) & 0x7FFFFFFF
    assert epoch_seed(5, 2, 7) == expected
    assert len({epoch_seed(5, e, s) for e in range(3) for s in range(3)}) == 9


def test_sample_rng_seeds_the_cpu_generator_from_the_sample_alone_and_restores_it(monkeypatch):
    reseeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", reseeded.append)  # what torch.manual_seed also calls
    before = torch.get_rng_state()
    with sample_rng(1, 2, 3):
        drawn = torch.rand(4)
    expected = torch.rand(4, generator=torch.Generator().manual_seed(hash((1, 2, 3)) % 2**63))
    assert torch.equal(drawn, expected)
    assert torch.equal(torch.get_rng_state(), before)
    assert reseeded == []  # a GPU's generator is not reseeded per sample
