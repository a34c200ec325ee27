"""DALI pipeline on the CPU: output contract, per-sample probabilities, operator wiring, sharding, records, errors."""
from __future__ import annotations

import contextlib
import dataclasses
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nvidia.dali import Pipeline, fn, pipeline_def, types

from bt_fast.config import AugmentSpec, Config  # noqa: E402
from bt_fast.errors import DataError  # noqa: E402
from pipelines.base import Placement  # noqa: E402
from pipelines.dali import (LUMA, DALIPipeline, EpochPlan, FolderSource, GraphOptions,  # noqa: E402
                            brightness_contrast, two_view_graph)
from pipelines.dali_debug import grey_views, replay_view, to_pixels  # noqa: E402

CPU = torch.device("cpu")
RED, BRIGHT = (225, 45, 35), (250, 250, 244)
NO_RANDOM_COLOUR = dict(jitter_p=0.0, grayscale_p=0.0, blur_p=(0.0, 0.0), solarize_p=(0.0, 0.0))


def make_config(data: str = "", records: str = "", size: int = 32, seed: int = 0, **augment) -> Config:
    config = Config()
    config.data, config.dali.records, config.workers, config.seed = data, records, 2, seed
    config.augment = dataclasses.replace(AugmentSpec(image_size=size), **augment)
    return config


def pipeline(config: Config, batch: int, rank: int = 0, world: int = 1, dtype=torch.float32, **kw) -> DALIPipeline:
    return DALIPipeline(config, Placement(CPU, dtype, rank, world), batch, **kw)


def constant_folder(root: Path, colours: dict[str, tuple[int, int, int]], per_class: int, size=(48, 40)) -> Path:
    for name, colour in colours.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", size, colour).save(root / name / f"{i:03d}.png")  # lossless: exactly constant
    return root


def textured_folder(root: Path, count: int = 12) -> Path:
    """Sharp-edged random colour blocks: blur, flip and crop errors all show in the pixels.

    Levels stay in 40..180 so that no jitter factor drives a channel past 0 or 255: clamping
    between steps is where the fixed DALI order legitimately departs from any one PIL order.
    """
    rng = np.random.default_rng(1)
    (root / "a").mkdir(parents=True)
    for i in range(count):
        blocks = rng.integers(40, 181, size=(6, 8, 3), dtype=np.uint8)
        Image.fromarray(blocks).resize((80, 60), Image.NEAREST).save(root / "a" / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def colour_folder(module_tmp) -> Path:
    return constant_folder(module_tmp("colours"), {"bright": BRIGHT, "red": RED}, per_class=64)


@pytest.fixture(scope="module")
def colour_run(colour_folder):
    """~2048 samples of the default spec on constant red and near-white images, with the graph's choices."""
    p = pipeline(make_config(str(colour_folder), size=32), batch=64, debug=True)
    rows = {"ids": [], "pixels": ([], []), "choices": ({}, {})}
    for epoch in range(16):
        p.set_epoch(epoch)
        for batch in p.debug_batches():
            rows["ids"].append(batch.ids)
            for v, view in enumerate((batch.view1, batch.view2)):
                rows["pixels"][v].append(to_pixels(view, p.spec))
                for name, value in batch.choices[v].items():
                    rows["choices"][v].setdefault(name, []).append(value)
    ids = np.concatenate(rows["ids"])
    pixels = tuple(np.concatenate(p_) for p_ in rows["pixels"])
    choices = tuple({k: np.concatenate(v) for k, v in c.items()} for c in rows["choices"])
    bright = ids < 64  # classes sorted: bright (ids 0..63), red (64..127)
    return ids, pixels, choices, bright


# --------------------------------------------------------------------------------------------
# Output contract
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_views_are_normalised_channels_last_in_the_placement_dtype(tmp_path, dtype):
    folder = constant_folder(tmp_path, {"c": (200, 100, 30), "d": (10, 240, 128)}, per_class=4)
    p = pipeline(make_config(str(folder), size=40, **NO_RANDOM_COLOUR), batch=4, dtype=dtype, debug=True)
    assert len(p) == 2
    batches = list(p.debug_batches())
    assert len(batches) == 2
    for batch in batches:
        for view in (batch.view1, batch.view2):
            assert view.shape == (4, 3, 40, 40) and view.dtype == dtype and view.device == CPU
            assert view.is_contiguous(memory_format=torch.channels_last)
        colours = np.array([(200, 100, 30) if i < 4 else (10, 240, 128) for i in batch.ids], dtype=np.float64)
        expected = (colours / 255.0 - np.array(p.spec.mean)) / np.array(p.spec.std)  # (B, 3)
        tolerance = 0.02 if dtype == torch.float32 else 0.03
        for view in (batch.view1, batch.view2):
            got = view.float().numpy()
            assert np.abs(got - expected[:, :, None, None]).max() < tolerance


def test_two_views_differ_and_iteration_matches_len(image_folder):
    p = pipeline(make_config(str(image_folder), size=32), batch=8)
    batches = list(p)
    assert len(batches) == len(p) == 24 // 8 and p.num_samples == 24  # what a resume compares
    for view1, view2 in batches:
        assert (view1 - view2).abs().mean() > 0.05
        assert torch.isfinite(view1).all() and torch.isfinite(view2).all()


# --------------------------------------------------------------------------------------------
# Per-sample probabilities, measured on the pixels where the effect is detectable
# --------------------------------------------------------------------------------------------

def test_grayscale_rate_from_pixels(colour_run):
    ids, pixels, choices, bright = colour_run
    red = ~bright
    for v in range(2):
        # Red stays clearly coloured under any jitter; only grayscale makes R = G = B.
        # (View 2 samples that were solarized are left out: solarizing can bring channels close.)
        keep = red & ~choices[v]["solarize"].astype(bool)
        grey = grey_views(pixels[v][keep])
        assert keep.sum() > 700
        assert abs(grey.mean() - 0.2) < 0.05, f"view {v + 1}: grayscale rate {grey.mean():.3f}"
        assert np.array_equal(grey, choices[v]["grayscale"][keep].astype(bool))


def test_solarize_rates_from_pixels(colour_run):
    ids, pixels, choices, bright = colour_run
    # Near-white stays >= 128 in every channel under any jitter; solarized it drops below 128.
    for v, rate in ((0, 0.0), (1, 0.2)):
        solarized = pixels[v][bright].mean(axis=(1, 2, 3)) < 128
        assert bright.sum() > 700
        assert abs(solarized.mean() - rate) < (0.05 if rate else 1e-9), f"view {v + 1}: rate {solarized.mean():.3f}"
        assert np.array_equal(solarized, choices[v]["solarize"][bright].astype(bool))


def test_choice_rates_follow_the_spec(colour_run):
    _, _, choices, _ = colour_run
    spec = AugmentSpec()
    n = len(choices[0]["flip"])
    for v in range(2):
        expected = {"flip": spec.flip_p, "jitter": spec.jitter_p, "blur": spec.blur_p[v]}
        for name, p in expected.items():
            rate = choices[v][name].astype(bool).mean()
            assert abs(rate - p) < 4 * max(np.sqrt(p * (1 - p) / n), 1e-9), f"view {v + 1} {name}: {rate:.3f} vs {p}"
        jitter = choices[v]["jitter"].astype(bool)
        b, c, s, h = (choices[v][k] for k in ("brightness", "contrast", "saturation", "hue"))
        assert np.all(b[~jitter] == 1) and np.all(c[~jitter] == 1) and np.all(s[~jitter] == 1) and np.all(h[~jitter] == 0)
        assert 0.6 <= b[jitter].min() and b[jitter].max() <= 1.4 and abs(b[jitter].mean() - 1) < 0.02
        assert 0.8 <= s[jitter].min() and s[jitter].max() <= 1.2
        assert -0.1 <= h[jitter].min() and h[jitter].max() <= 0.1 and h[jitter].max() > 0.09
        sigma = choices[v]["sigma"]
        assert 0.1 <= sigma.min() and sigma.max() <= 2.0
    # The two views draw independently.
    assert (choices[0]["flip"] != choices[1]["flip"]).mean() > 0.4


# --------------------------------------------------------------------------------------------
# Operator wiring: every view equals PIL/torchvision applied with the same choices
# --------------------------------------------------------------------------------------------

def test_views_match_pil_replay_of_the_same_choices(tmp_path):
    folder = textured_folder(tmp_path)
    # Hue off (DALI's YIQ hue differs from torchvision's HSV hue by design); every other step on,
    # with probabilities that exercise both branches of each coin.
    config = make_config(str(folder), size=48, hue=0.0, blur_p=(0.5, 0.5), solarize_p=(0.5, 0.5), grayscale_p=0.3)
    p = pipeline(config, batch=12, debug=True)
    files = sorted((folder / "a").iterdir())
    differences = {}
    for epoch in range(3):
        p.set_epoch(epoch)
        for batch in p.debug_batches():
            for v, view in enumerate((batch.view1, batch.view2)):
                pixels = to_pixels(view, p.spec)
                for i, sample in enumerate(batch.ids):
                    image = Image.open(files[int(sample)]).convert("RGB")
                    expected = replay_view(image, batch.choices[v], i, p.spec).astype(np.float64)
                    jittered = bool(batch.choices[v]["jitter"][i])
                    differences.setdefault(jittered, []).append(np.abs(pixels[i] - expected).mean())
    plain, jittered = np.array(differences[False]), np.array(differences[True])
    assert len(plain) > 5 and len(jittered) > 20
    # Geometry, flip, grayscale, blur, solarize: resampling and rounding only.
    assert plain.max() < 1.0, plain
    # Colour jitter: PIL truncates to uint8 after each enhancement (~0.5 level each), DALI rounds.
    assert jittered.max() < 2.5, jittered


def test_a_blur_sigma_range_of_one_value_blurs_with_it(tmp_path):
    """augment.blur_sigma=[s, s] (a range the config allows) builds a graph, and every view equals the
    PIL/torchvision replay of its crop blurred with torchvision's Gaussian of sigma s."""
    folder = textured_folder(tmp_path)
    config = make_config(str(folder), size=32, **{**NO_RANDOM_COLOUR, "blur_p": (1.0, 1.0)}, blur_sigma=(1.5, 1.5))
    p = pipeline(config, batch=12, debug=True)
    files = sorted((folder / "a").iterdir())
    p.set_epoch(0)
    batch = next(p.debug_batches())
    for v, view in enumerate((batch.view1, batch.view2)):
        assert (batch.choices[v]["sigma"] == 1.5).all() and batch.choices[v]["blur"].all()
        pixels = to_pixels(view, p.spec)
        for i, sample in enumerate(batch.ids):
            expected = replay_view(Image.open(files[int(sample)]).convert("RGB"), batch.choices[v], i, p.spec)
            assert np.abs(pixels[i] - expected.astype(np.float64)).mean() < 1.0


# --------------------------------------------------------------------------------------------
# Brightness and contrast: arithmetic on the images' device
# --------------------------------------------------------------------------------------------

PHOTOGRAPHS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field")
# (brightness, contrast) per photograph: ColorJitter's extremes, mixed draws, and the identity.
FACTORS = np.array([(1.4, 1.4), (0.6, 0.6), (0.63, 1.25), (1.33, 0.63), (1.18, 0.74), (1.0, 1.0)], dtype=np.float32)


@pytest.mark.parametrize("device", ["cpu", pytest.param("gpu", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_brightness_contrast_equals_the_dali_operator_on_photographs(device):
    """The arithmetic blend against the stock `fn.brightness_contrast` given PIL's centre (rounded
    mean luma, computed here with numpy) and against the formula in float64, on real photographs."""
    import skimage.data as skimage_data
    images = [np.ascontiguousarray(getattr(skimage_data, name)()[..., :3]) for name in PHOTOGRAPHS]
    centres = [np.float32(np.floor((image @ np.array(LUMA)).mean() + 0.5)) for image in images]
    brightness, contrast = list(FACTORS[:, 0]), list(FACTORS[:, 1])

    @pipeline_def(batch_size=len(images), num_threads=1, device_id=0 if device == "gpu" else None)
    def blends():
        x = fn.external_source(lambda: images, batch=True, layout="HWC", device=device)
        b = fn.external_source(lambda: brightness, batch=True)
        c = fn.external_source(lambda: contrast, batch=True)
        m = fn.external_source(lambda: centres, batch=True)
        return brightness_contrast(x, b, c), fn.brightness_contrast(x, brightness=b, contrast=c, contrast_center=m)

    pipe = blends()
    pipe.build()
    ours, stock = (out.as_cpu() if device == "gpu" else out for out in pipe.run())
    for i, image in enumerate(images):
        got, reference = np.array(ours.at(i)), np.array(stock.at(i))
        assert got.dtype == np.uint8 and got.shape == image.shape
        got, reference = got.astype(int), reference.astype(int)
        b, c, m = float(brightness[i]), float(contrast[i]), float(centres[i])
        formula = np.clip(np.floor(b * (m + c * (image - m)) + 0.5), 0, 255)
        # Bound: every pixel within 1 grey level (float rounding at .5 ties), at most 1 in 10,000 off.
        for expected in (reference, formula):
            assert np.abs(got - expected).max() <= 1, PHOTOGRAPHS[i]
            assert (got != expected).mean() <= 1e-4, PHOTOGRAPHS[i]
    assert np.array_equal(np.array(ours.at(len(images) - 1)), images[-1])  # factors 1, 1: the identity


def _host_copies_of_device_results(outputs) -> tuple[list[str], set[str]]:
    """Walk a DALI graph from its outputs: the nodes that bring a GPU result back to the host
    (`DataNode.cpu()`: a "cpu" node of an operator whose output is on the GPU), and every GPU node."""
    transfers, gpu_nodes, seen, stack = [], set(), set(), list(outputs)
    while stack:
        node = stack.pop()
        producer = node.source
        if node.device == "gpu":
            gpu_nodes.add(node.name)
        elif producer.outputs[node.index].device == "gpu":
            transfers.append(node.name)
        if id(producer) not in seen:
            seen.add(id(producer))
            for item in producer.inputs:
                stack.extend(item if isinstance(item, list) else [item])
    return transfers, gpu_nodes


def test_the_graph_reads_the_files_its_plan_lists_without_looping_over_the_listing(image_folder):
    """The graph's function runs under DALI's autograph, which turns a loop over the listing into one
    converted call per file (seconds per 100,000 files, every epoch): the plan lists the files."""
    source = FolderSource(str(image_folder))
    block = source.block(0, 3, 0, 1)
    plan = EpochPlan(0, 3, 0, 1, block, source.paths(block))
    source.samples = None  # nothing in the graph reads the listing
    options = GraphOptions("once", gpu=False, out_dtype=types.FLOAT, debug=True)
    pipe = two_view_graph(source, plan, AugmentSpec(image_size=16), options, batch_size=4, num_threads=1,
                          device_id=None, seed=0)
    pipe.build()
    for batch in range(2):
        ids = np.array(pipe.run()[2].as_tensor()).reshape(-1)
        assert ids.tolist() == block[4 * batch:4 * batch + 4].tolist()


@pytest.mark.parametrize("decode", ["once", "roi"])
def test_the_gpu_graph_never_copies_a_device_result_to_the_host(image_folder, decode):
    """The graph built for a GPU placement (traced only, so no GPU is needed) has no GPU->host copy;
    the contrast centre is reduced on the GPU."""
    source = FolderSource(str(image_folder))
    block = source.block(0, 0, 0, 1)
    plan = EpochPlan(0, 0, 0, 1, block, source.paths(block))
    options = GraphOptions(decode, gpu=True, out_dtype=types.FLOAT16, debug=False)
    pipe = two_view_graph(source, plan, AugmentSpec(image_size=32), options, batch_size=4, num_threads=1, device_id=0)
    transfers, gpu_nodes = _host_copies_of_device_results(pipe._graph_out)
    assert transfers == []
    assert sum(name.startswith("__Mean_") for name in gpu_nodes) == 2  # one contrast centre per view


# --------------------------------------------------------------------------------------------
# Epochs and sharding
# --------------------------------------------------------------------------------------------

def _epoch_ids(config: Config, batch: int, world: int, epoch: int) -> list[np.ndarray]:
    out = []
    for rank in range(world):
        p = pipeline(config, batch, rank, world, debug=True)
        p.set_epoch(epoch)
        ids = [b.ids for b in p.debug_batches()]
        assert len(ids) == len(p)
        out.append(np.concatenate(ids))
    return out


def test_an_epoch_is_reproducible(image_folder):
    config = make_config(str(image_folder), size=24)

    def run(epoch):
        p = pipeline(config, batch=8, debug=True)
        p.set_epoch(epoch)
        return [(b.ids, b.view1.clone(), b.view2.clone()) for b in p.debug_batches()]

    first, again, other = run(5), run(5), run(6)
    for (ids_a, a1, a2), (ids_b, b1, b2) in zip(first, again):
        assert np.array_equal(ids_a, ids_b) and torch.equal(a1, b1) and torch.equal(a2, b2)
    assert not all(np.array_equal(a[0], b[0]) for a, b in zip(first, other))


def _epoch_views(p: DALIPipeline) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(v1.clone(), v2.clone()) for v1, v2 in p]


def _same_views(got: list, want: list) -> bool:
    return len(got) == len(want) and all(torch.equal(a, b) for pair, other in zip(got, want) for a, b in zip(pair, other))


def _state_after(config: Config, epoch: int, batches: int) -> dict:
    """`position_state` of a batch-4 pipeline that has delivered `batches` batches of `epoch`."""
    stopped = pipeline(config, batch=4)
    stopped.set_epoch(epoch)
    with contextlib.closing(iter(stopped)) as delivered:
        for _ in range(batches):
            next(delivered)
        return stopped.position_state()


def test_resuming_mid_epoch_from_the_graph_state_reads_none_of_the_batches_before(tmp_path, image_folder, capsys):
    """A graph restored from `position_state` delivers the rest of the epoch exactly, without running the
    batches before the resume point: their files are damaged here, and a replay (what a graph without the
    state does, and what a state for another position leads to) stops on them."""
    data = shutil.copytree(image_folder, tmp_path / "images")
    config = make_config(str(data), size=24, seed=3)
    whole = pipeline(config, batch=4)
    whole.set_epoch(2)
    expected = _epoch_views(whole)
    assert len(expected) == 6 and whole.position_state() is None  # between epochs: nothing to keep

    state = _state_after(config, 2, 3)
    assert state["epoch"] == 2 and state["batch"] == 3

    elsewhere = pipeline(config, batch=4)  # the state names batch 3: resuming at 2 replays 0 and 1
    elsewhere.restore_position(state)
    elsewhere.set_epoch(2, 2)
    assert _same_views(_epoch_views(elsewhere), expected[2:])

    refused = pipeline(config, batch=4)  # a state this DALI cannot read (another version's, say): a replay
    refused.restore_position({**state, "dali": b"not a DALI checkpoint"})
    refused.set_epoch(2, 3)
    assert _same_views(_epoch_views(refused), expected[3:])
    assert "warning: DALI cannot restore its state from the checkpoint" in capsys.readouterr().err

    for path in elsewhere.plan().files[:3 * 4]:  # the files of batches 0-2 of this rank's epoch
        Path(path).write_bytes(b"\xff\xd8 not a JPEG any more")
    replay = pipeline(config, batch=4)
    replay.set_epoch(2, 3)
    with pytest.raises(DataError, match="cannot read image"):
        _epoch_views(replay)

    resumed = pipeline(config, batch=4)
    resumed.restore_position(state)
    resumed.set_epoch(2, 3)
    assert _same_views(_epoch_views(resumed), expected[3:])


def test_a_state_of_another_graph_is_not_offered_to_dali_and_the_replay_is_said(image_folder, capsys):
    """A resume with other augmentation settings (view 2's blur never drawn: a graph without that coin flip) went on
    by replaying the epoch's first batches, as it should, but its warning quoted DALI's internal assertion ("The
    executor doesn't recognize __CoinFlip_47 as a name of an operator")."""
    config = make_config(str(image_folder), size=24, seed=3)
    state = _state_after(config, 2, 3)
    changed = make_config(str(image_folder), size=24, seed=3, blur_p=(1.0, 0.0))
    whole = pipeline(changed, batch=4)
    whole.set_epoch(2)
    expected = _epoch_views(whole)
    capsys.readouterr()
    resumed = pipeline(changed, batch=4)
    resumed.restore_position(state)
    resumed.set_epoch(2, 3)
    assert _same_views(_epoch_views(resumed), expected[3:])
    assert capsys.readouterr().err.splitlines() == [
        "warning: the checkpoint's DALI state is of another graph (augmentation settings, dtype or device changed); "
        "running the epoch's first 3 batches again"]


# --------------------------------------------------------------------------------------------
# Webdataset records written by tools.convert
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def records(module_tmp, image_folder) -> Path:
    from pipelines.convert import convert
    dst = module_tmp("records") / "wds"
    report = convert(image_folder, dst, "dali", workers=1, shard_size=5, progress=False)
    assert report["written"] == 24
    return dst


def test_records_are_read_and_sharded(records):
    config = make_config(records=str(records), size=24)
    seen = []
    for epoch in range(2):
        ranks = _epoch_ids(config, batch=4, world=2, epoch=epoch)
        assert [len(r) for r in ranks] == [12, 12]
        every = np.concatenate(ranks)
        assert len(set(every.tolist())) == 24 and set(every.tolist()) <= set(range(24))
        seen.append(ranks[0])
    assert not np.array_equal(seen[0], seen[1])
    view1, view2 = next(iter(pipeline(config, batch=4, dtype=torch.float16)))
    assert view1.shape == view2.shape == (4, 3, 24, 24) and view1.dtype == torch.float16
    assert view1.is_contiguous(memory_format=torch.channels_last)


def test_a_graph_state_dali_cannot_save_is_a_warning_and_a_resume_replays(image_folder, capsys, monkeypatch):
    """The run's checkpoint is written all the same (every rank keeps entering the gather with a state)."""
    config = make_config(str(image_folder), size=24, seed=3)
    whole = pipeline(config, batch=4)
    whole.set_epoch(0)
    expected = _epoch_views(whole)
    stopped = pipeline(config, batch=4)
    stopped.set_epoch(0)
    with contextlib.closing(iter(stopped)) as delivered:
        next(delivered)
        monkeypatch.setattr(Pipeline, "checkpoint", lambda self: (_ for _ in ()).throw(RuntimeError("no state")))
        state = stopped.position_state()
    assert state["batch"] == 1 and state["dali"] is None
    assert "warning: DALI cannot save its graph state (no state)" in capsys.readouterr().err
    monkeypatch.undo()
    resumed = pipeline(config, batch=4)
    resumed.restore_position(state)
    resumed.set_epoch(0, 1)
    assert _same_views(_epoch_views(resumed), expected[1:])


def test_records_resume_mid_epoch_from_the_graph_state(records):
    """The webdataset reader's position and its shuffle buffer are part of the graph state too."""
    config = make_config(records=str(records), size=24, seed=2)
    whole = pipeline(config, batch=4)
    whole.set_epoch(1)
    expected = _epoch_views(whole)
    resumed = pipeline(config, batch=4)
    restored, build = [], resumed.build
    resumed.build = lambda plan, checkpoint=None: restored.append(checkpoint is not None) or build(plan, checkpoint)
    resumed.restore_position(_state_after(config, 1, 2))
    resumed.set_epoch(1, 2)
    assert _same_views(_epoch_views(resumed), expected[2:]) and len(expected) == 6
    assert restored == [True]


def test_records_of_a_folder_that_changed_since_are_reported(tmp_path, image_folder, capsys):
    """data= naming the ImageFolder the records were converted from, which has gained an image since: the
    counts in the warning are the folder's files and the images the shards' tar members hold."""
    import tarfile
    from pipelines.convert import convert
    data, wds = tmp_path / "data", tmp_path / "wds"
    shutil.copytree(image_folder, data)
    convert(data, wds, "dali", workers=1, shard_size=5, progress=False)
    config = make_config(data=str(data), records=str(wds), size=24)
    pipeline(config, batch=4)
    assert "warning" not in capsys.readouterr().err
    first = sorted((data / sorted(p.name for p in data.iterdir())[0]).iterdir())[0]
    shutil.copy(first, first.with_name("added" + first.suffix))
    files = sum(len(list(d.iterdir())) for d in data.iterdir())
    stored = 0
    for shard in wds.glob("*.tar"):
        with tarfile.open(shard) as tar:
            stored += sum(member.name.endswith(".jpg") for member in tar.getmembers())
    pipeline(config, batch=4)
    assert f"{data} now holds {files} images but {wds} was converted from {stored}; rewrite" in capsys.readouterr().err
    assert stored == files - 1


def test_an_image_folder_with_a_dataset_json_of_its_own_is_read_as_an_image_folder(tmp_path, image_folder):
    """A metadata file named dataset.json beside the class directories does not make data= records: the
    pipeline reads the images torchvision's ImageFolder lists there."""
    from torchvision.datasets import ImageFolder
    data = tmp_path / "data"
    shutil.copytree(image_folder, data)
    (data / "dataset.json").write_text('{"name": "my photographs", "license": "CC-BY"}')
    p = pipeline(make_config(str(data), size=24), batch=4)
    assert list(p.source.samples) == ImageFolder(str(data)).samples
    view1, _ = next(iter(p))
    assert view1.shape == (4, 3, 24, 24)


def test_records_errors_name_the_problem(tmp_path, records):
    with pytest.raises(DataError, match="dataset.json"):
        pipeline(make_config(records=str(tmp_path)), batch=4)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "dataset.json").write_text((records / "dataset.json").read_text())
    with pytest.raises(DataError, match="shard-00000.tar"):
        pipeline(make_config(records=str(broken)), batch=4)


def test_an_undecodable_image_in_the_records_is_one_line_naming_the_decoder_not_the_graphs_source(tmp_path, records):
    """A shard whose stored JPEGs were overwritten in place (same sizes, so its index holds): PIL cannot
    decode them either; the error names the records and the failing operator, and quotes no line of the
    graph's Python source from DALI's pipeline traceback."""
    import io
    import tarfile
    from PIL import UnidentifiedImageError
    broken = tmp_path / "broken"
    shutil.copytree(records, broken)
    for shard in broken.glob("*.tar"):
        with tarfile.open(shard) as tar:
            members = [(m.offset_data, m.size) for m in tar.getmembers() if m.name.endswith(".jpg")]
        with open(shard, "r+b") as handle:
            for offset, size in members:
                handle.seek(offset)
                handle.write(b"\xff\xd8\xff" + b"\x00" * (size - 3))
        with tarfile.open(shard) as tar, pytest.raises(UnidentifiedImageError):
            Image.open(io.BytesIO(tar.extractfile(next(m for m in tar if m.name.endswith(".jpg"))).read()))
    with pytest.raises(DataError, match=f"DALI failed reading records {broken} in epoch 0: fn.decoders.image: ") as err:
        next(iter(pipeline(make_config(records=str(broken), size=24), batch=4)))
    assert "\n" not in str(err.value) and "options." not in str(err.value) and " = " not in str(err.value)


def test_a_corrupt_shard_index_is_one_data_error_naming_it(tmp_path, records, capsys):
    """Found when the pipeline is made (before a run writes to out_dir), not as DALI's traceback from
    building the graph; an entry DALI cannot parse is one line when the graph is built."""
    index = (records / "shard-00000.idx").read_bytes()
    lines = index.split(b"\n")
    damages = {"junk": b"junk\n", "empty": b"", "lines cut": b"\n".join(lines[:3]) + b"\n",
               "cut mid-line": index[:len(index) // 2], "header count": index.replace(b"v1.2 5", b"v1.2 4", 1)}
    for damage, data in damages.items():
        broken = tmp_path / damage.replace(" ", "_")
        shutil.copytree(records, broken)
        (broken / "shard-00000.idx").write_bytes(data)
        with pytest.raises(DataError, match=rf"^{broken / 'shard-00000.idx'} is not the DALI index of its shard "
                                            r"\(.*\); reconvert .* --format dali --force`$") as err:
            pipeline(make_config(records=str(broken)), batch=4)
        assert "\n" not in str(err.value), damage
    garbled = tmp_path / "garbled"
    shutil.copytree(records, garbled)
    (garbled / "shard-00000.idx").write_bytes(index.replace(lines[2], b"not an entry"))
    with pytest.raises(DataError, match=r"shard-00000.idx.* line 2 .*; rewrite them with tools.convert") as err:
        next(iter(pipeline(make_config(records=str(garbled)), batch=4)))
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["truncated", "not_an_image", "empty"])
def test_an_unreadable_image_raises_a_data_error_naming_it(tmp_path, image_folder, damage):
    folder = tmp_path / "data"
    folder.mkdir()
    for path in image_folder.rglob("*.jpg"):
        (folder / path.parent.name).mkdir(exist_ok=True)
        (folder / path.parent.name / path.name).write_bytes(path.read_bytes())
    bad = folder / "class1" / "zz_bad.jpg"
    good = (image_folder / "class1" / "img000.jpg").read_bytes()
    bad.write_bytes({"truncated": good[:len(good) // 3], "not_an_image": b"plain text, not a JPEG",
                     "empty": b""}[damage])
    p = pipeline(make_config(str(folder), size=16), batch=5)
    with pytest.raises(DataError, match=r"zz_bad\.jpg" + (r": empty file \(0 bytes\)" if damage == "empty" else "")):
        for _ in p:
            pass


def test_a_file_name_that_is_not_utf8_is_one_data_error_naming_it(tmp_path, image_folder):
    """DALI's own file reader refuses a list holding such a name (in a traceback from inside the graph); the
    pipeline names the file, as the bytes on disk, before it builds one. UTF-8 names outside ASCII are read."""
    import os
    data = tmp_path / "data"
    shutil.copytree(image_folder, data)
    first = sorted((data / "class1").iterdir())[0]
    first.rename(first.with_name("ünï 画像.jpg"))
    assert len(next(iter(pipeline(make_config(str(data), size=24), batch=4)))[0]) == 4
    latin1 = os.fsencode(data / "class1") + b"/caf\xe9.jpg"
    os.rename(os.fsencode(sorted((data / "class1").iterdir())[1]), latin1)

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def stock_reader():
        return fn.readers.file(files=[os.fsdecode(latin1)], labels=[0])[0]

    with pytest.raises(RuntimeError, match="files"):
        stock_reader().build()
    with pytest.raises(DataError, match=re.escape(f"DALI cannot open {data}/class1/caf\\xe9.jpg: its name is not "
                                                  f"valid UTF-8")) as err:
        pipeline(make_config(str(data), size=24), batch=4)
    assert "\n" not in str(err.value)


def test_too_few_images_for_a_batch(image_folder):
    with pytest.raises(DataError, match="too few"):
        pipeline(make_config(str(image_folder)), batch=16, rank=0, world=2)
    with pytest.raises(DataError, match="does not exist"):
        pipeline(make_config("/nonexistent/folder"), batch=4)
