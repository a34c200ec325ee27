"""bt_fast.knn, bt_fast.linear_probe, bt_fast.weights and tools.evaluate: the k-NN classifier against a
brute-force formula, the linear probe on separable features, checkpoint loading (official torchvision-style, bt_fast checkpoint and
backbone files, wrong files), and the command line end to end on a tiny ImageFolder (resnet18, 32 px)."""
from __future__ import annotations

import fractions
import json
import math
from pathlib import Path

import pytest
import yaml
import torch
import torchvision
from torch.utils.data import DataLoader, TensorDataset

from bt_fast.checkpoint import CheckpointError, atomic_save, load_checkpoint
from bt_fast.config import Config
from bt_fast.errors import DataError, UserError, one_line
from bt_fast.knn import LabelledImageFolder, extract_features, knn_predict, knn_scores, topk_accuracy
from bt_fast.linear_probe import linear_topk, train_linear
from bt_fast.model import BarlowTwins
from bt_fast.weights import infer_arch, load_backbone, mismatch, random_backbone
from tests.conftest import write_image_folder
from tools import evaluate as ev


# -- k-NN -----------------------------------------------------------------------------------------
def clustered(n_per_class: int, num_classes: int, dim: int = 32, noise: float = 0.05, seed: int = 0):
    """Points around orthogonal class centres: perfectly separable by cosine similarity."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(dim)[:num_classes] * 3.0
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    features = centres[labels] + noise * torch.randn(labels.shape[0], dim, generator=g)
    return features, labels


def test_knn_separable_features_give_full_accuracy():
    train_x, train_y = clustered(30, 10, seed=0)
    test_x, test_y = clustered(10, 10, seed=1)
    ranked = knn_predict(train_x, train_y, test_x, num_classes=10)  # k=200 of 300: most neighbours are other classes
    top1, top5 = topk_accuracy(ranked, test_y)
    assert top1 == 100.0 and top5 == 100.0
    assert ranked.shape == (100, 10)
    assert sorted(ranked[0].tolist()) == list(range(10))  # a full ranking of the classes


def test_knn_shuffled_labels_is_near_chance():
    # labels that carry no information about the features: each query has its own neighbourhood,
    # so a correct k-NN scores chance (10% / 50%, standard error ~1% / 1.6% with 1000 queries)
    g = torch.Generator().manual_seed(3)
    train_x, test_x = torch.randn(1000, 32, generator=g), torch.randn(1000, 32, generator=g)
    train_y, test_y = torch.randint(0, 10, (1000,), generator=g), torch.randint(0, 10, (1000,), generator=g)
    top1, top5 = topk_accuracy(knn_predict(train_x, train_y, test_x, num_classes=10), test_y)
    assert 5.0 < top1 < 16.0
    assert 42.0 < top5 < 58.0
    # the same queries with the labels they are supposed to have: the classifier does use the labels
    assert topk_accuracy(knn_predict(test_x, test_y, test_x, num_classes=10), test_y)[0] == 100.0


def brute_force_scores(train_x, train_y, test_x, num_classes, k, temperature):
    """The k-NN vote written out element by element, each query's votes divided by exp(its largest cos / T)."""
    k = min(k, len(train_x))
    scores = torch.zeros(len(test_x), num_classes, dtype=torch.float64)
    for i, q in enumerate(test_x.double()):
        qn = q / q.norm()
        sims = [float(qn @ (t.double() / t.double().norm())) for t in train_x]
        nearest = sorted(range(len(sims)), key=lambda j: -sims[j])[:k]
        for j in nearest:
            scores[i, int(train_y[j])] += math.exp((sims[j] - sims[nearest[0]]) / temperature)
    return scores


@pytest.mark.parametrize("k, chunk", [(1, None), (5, 3), (7, 1), (1000, 4)])  # 1000 > 40 train: capped
def test_knn_scores_match_brute_force(k, chunk):
    g = torch.Generator().manual_seed(k)
    train_x, test_x = torch.randn(40, 8, generator=g), torch.randn(13, 8, generator=g)
    train_y = torch.randint(0, 4, (40,), generator=g)
    expected = brute_force_scores(train_x, train_y, test_x, 4, k, 0.5)
    got = knn_scores(train_x * 3.0, train_y, test_x, 4, k=k, temperature=0.5, chunk_size=chunk)  # scale-invariant
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-5)
    ranked = knn_predict(train_x, train_y, test_x, 4, k=k, temperature=0.5)
    assert torch.equal(ranked[:, 0], expected.argmax(dim=1))


@pytest.mark.parametrize("temperature", [0.01, 0.001])
def test_knn_ranks_like_the_exact_vote_at_small_temperatures(temperature):
    # exp(cos / T) overflowed float32 past cos / T = 88: every near neighbour voted inf, the classes tied, and
    # the stable sort put the lowest class index first (demo k-NN at T=0.01: top-1 16% instead of 51%).
    g = torch.Generator().manual_seed(3)
    train_x, test_x = torch.randn(60, 4, generator=g), torch.randn(30, 4, generator=g)
    train_y = torch.randint(0, 5, (60,), generator=g)
    expected = brute_force_scores(train_x, train_y, test_x, 5, 10, temperature)
    assert torch.isfinite(knn_scores(train_x, train_y, test_x, 5, k=10, temperature=temperature)).all()
    ranked = knn_predict(train_x, train_y, test_x, 5, k=10, temperature=temperature)
    assert torch.equal(ranked[:, 0], expected.argmax(dim=1))


def test_topk_accuracy_caps_k_at_class_count():
    ranked = torch.tensor([[2, 0, 1], [1, 2, 0], [0, 1, 2]])
    labels = torch.tensor([2, 0, 1])
    assert topk_accuracy(ranked, labels, (1, 2, 5)) == pytest.approx([100 / 3, 200 / 3, 100.0])


def test_extract_features_uses_eval_mode_and_restores_training_mode():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten())
    model[1].running_mean.uniform_(-1, 1)
    model[1].running_var.uniform_(0.5, 2)
    images, labels = torch.randn(10, 3, 8, 8), torch.arange(10) % 3
    model.train()
    features, got_labels = extract_features(model, DataLoader(TensorDataset(images, labels), batch_size=4), "cpu")
    assert model.training
    with torch.no_grad():
        expected = model.eval()(images)
    torch.testing.assert_close(features, expected)
    assert torch.equal(got_labels, labels)


# -- linear probe ---------------------------------------------------------------------------------
def test_linear_probe_learns_separable_features_and_not_shuffled_labels():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 10, generator=g)
    x = torch.randn(4000, 32, generator=g)
    scores = x @ w
    best = scores.topk(2, dim=1).values
    keep = best[:, 0] - best[:, 1] > 1.0          # linearly separable with a margin, by construction
    x, y = x[keep][:1500], scores[keep].argmax(dim=1)[:1500]
    assert torch.bincount(y, minlength=10).max() < 0.2 * len(y)
    train_x, train_y, test_x, test_y = x[:1000], y[:1000], x[1000:], y[1000:]
    top1, top5 = linear_topk(train_linear(train_x, train_y, 10, epochs=30), test_x, test_y)
    assert top1 > 90.0 and top5 > 98.0
    shuffled = train_y[torch.randperm(1000, generator=g)]
    top1_shuffled, _ = linear_topk(train_linear(train_x, shuffled, 10, epochs=30), test_x, test_y)
    assert top1_shuffled < 25.0  # chance is about 10-20% (the largest class)


# -- checkpoints ----------------------------------------------------------------------------------
def randomised_resnet18(seed: int = 0) -> torch.nn.Module:
    """A resnet18 whose every parameter and BN statistic differs from any fresh initialisation."""
    torch.manual_seed(seed)
    model = torchvision.models.resnet18()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def source_features(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    fc, model.fc = model.fc, torch.nn.Identity()
    try:
        with torch.no_grad():
            return model.eval()(images)
    finally:
        model.fc = fc


IMAGES = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))


def test_official_format_state_dict_loads_with_same_features(tmp_path):
    source = randomised_resnet18()
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("fc.")}  # like resnet50.pth
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    loaded = load_backbone(path)
    assert loaded.arch == "resnet18" and loaded.kind == "state dict" and loaded.image_size is None
    with torch.no_grad():
        got = loaded.backbone.eval()(IMAGES)
    torch.testing.assert_close(got, source_features(source, IMAGES))
    assert got.shape == (4, 512)
    # through the feature extractor, as the evaluation runs it
    features, _ = extract_features(loaded.backbone, [(IMAGES, torch.zeros(4, dtype=torch.long))], "cpu")
    torch.testing.assert_close(features, source_features(source, IMAGES))


def test_full_torchvision_state_dict_with_fc_and_ddp_prefix_loads(tmp_path):
    source = randomised_resnet18(1)
    path = tmp_path / "ddp.pth"
    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, path)  # fc present, DDP prefix
    loaded = load_backbone(path, arch="resnet18")
    with torch.no_grad():
        torch.testing.assert_close(loaded.backbone.eval()(IMAGES), source_features(source, IMAGES))


def test_arch_is_inferred_from_keys():
    with torch.device("meta"):
        rn50 = torchvision.models.resnet50().state_dict()
        rn18 = torchvision.models.resnet18().state_dict()
    assert infer_arch(rn50) == "resnet50" and infer_arch(rn18) == "resnet18"
    assert mismatch({k: v for k, v in rn50.items() if not k.startswith("fc.")}, "resnet50") is None
    assert "missing" in mismatch(rn18, "resnet50")


def bt_fast_checkpoint(model: BarlowTwins, image_size: int = 48) -> dict:
    config = Config(arch=model.arch, projector="64-64")
    config.augment.image_size = image_size
    return {"model": model.state_dict(), "optimizer": {"state": {}, "param_groups": []}, "scaler": {},
            "epoch": 3, "step": 30, "config": config.to_dict(),
            "rng": {"torch": torch.get_rng_state()}}


def randomised_barlow_twins() -> BarlowTwins:
    model = BarlowTwins("resnet18", "64-64")
    model.backbone.load_state_dict({k: v for k, v in randomised_resnet18(2).state_dict().items()
                                    if not k.startswith("fc.")})
    return model.eval()


def test_bt_fast_checkpoint_and_backbone_files_load(tmp_path):
    model = randomised_barlow_twins().to(memory_format=torch.channels_last)  # as the trainer holds it
    with torch.no_grad():
        expected = model.backbone(IMAGES)
    checkpoint = tmp_path / "checkpoint.pth"
    torch.save(bt_fast_checkpoint(model, image_size=48), checkpoint)
    loaded = load_backbone(checkpoint)
    assert (loaded.arch, loaded.kind, loaded.image_size) == ("resnet18", "bt_fast checkpoint", 48)
    with torch.no_grad():
        torch.testing.assert_close(loaded.backbone.eval()(IMAGES), expected)

    backbone = tmp_path / "backbone.pth"
    torch.save({k: v.contiguous() for k, v in model.backbone.state_dict().items()}, backbone)
    loaded = load_backbone(backbone)
    assert loaded.arch == "resnet18"
    with torch.no_grad():
        torch.testing.assert_close(loaded.backbone.eval()(IMAGES), expected)
    # the torchvision-style promise of backbone.pth: only fc.* missing
    missing, unexpected = torchvision.models.resnet18().load_state_dict(torch.load(backbone, weights_only=True),
                                                                       strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []


def test_wrong_checkpoints_give_clear_errors(tmp_path):
    not_torch = tmp_path / "notes.txt"
    not_torch.write_text("not a checkpoint\n")
    with pytest.raises(CheckpointError) as err:
        load_backbone(not_torch)
    assert str(err.value) == (f"checkpoint {not_torch} is not a file torch.save wrote; pass a run's checkpoint.pth or "
                              f"backbone.pth, or a torch-saved state dict")

    pickled = tmp_path / "object.pth"  # a torch.save file of an object torch.load(weights_only=True) refuses
    torch.save(fractions.Fraction(1, 3), pickled)
    with pytest.raises(Exception) as refused:
        torch.load(pickled, weights_only=True)
    whole = " ".join(str(refused.value).replace("\x1b[1m", "").replace("\x1b[0m", "").split())  # (torch's bold)
    with pytest.raises(CheckpointError) as err:
        load_backbone(pickled)
    detail = str(err.value).split(f"({type(refused.value).__name__}: ", 1)[1].rsplit("); pass", 1)[0]
    assert len(whole) > 120 and len(detail) <= 120 and detail.endswith("...")  # torch's long message, cut ...
    assert whole.startswith(detail[:-3] + " ")  # ... after a whole word

    foreign = tmp_path / "vit.pth"
    torch.save({"blocks.0.attn.qkv.weight": torch.zeros(3, 3)}, foreign)
    with pytest.raises(CheckpointError, match=r"vit\.pth holds no ResNet backbone weights"):
        load_backbone(foreign)

    rn18 = tmp_path / "rn18.pth"
    torch.save(randomised_resnet18().state_dict(), rn18)
    with pytest.raises(CheckpointError, match=r"rn18\.pth does not fit a resnet50 backbone \(missing"):
        load_backbone(rn18, arch="resnet50")

    truncated = tmp_path / "truncated.pth"
    torch.save({k: v for k, v in randomised_resnet18().state_dict().items() if not k.startswith("layer4.")},
               truncated)
    with pytest.raises(CheckpointError, match=r"truncated\.pth does not fit a resnet18 backbone.*layer4"):
        load_backbone(truncated)

    widened = tmp_path / "widened.pth"
    state = randomised_resnet18().state_dict()
    state["conv1.weight"] = torch.zeros(64, 4, 7, 7)
    torch.save(state, widened)
    with pytest.raises(CheckpointError, match=r"widened\.pth .*'conv1\.weight' has shape"):
        load_backbone(widened)

    mixed = tmp_path / "mixed.pth"
    torch.save({"epoch": 3, "conv1.weight": torch.zeros(1)}, mixed)
    with pytest.raises(CheckpointError, match=r"mixed\.pth is not a model state dict \(key 'epoch'"):
        load_backbone(mixed)

    checkpoint = tmp_path / "checkpoint.pth"
    torch.save(bt_fast_checkpoint(randomised_barlow_twins()), checkpoint)
    with pytest.raises(CheckpointError, match=r"checkpoint\.pth was trained as resnet18"):
        load_backbone(checkpoint, arch="resnet50")

    with pytest.raises(CheckpointError, match=r"missing\.pth does not exist"):
        load_backbone(tmp_path / "missing.pth")

    # a run's out_dir given for its checkpoint was said not to exist
    with pytest.raises(CheckpointError) as err:
        load_backbone(tmp_path)
    assert str(err.value) == (f"checkpoint {tmp_path} is a directory; pass the checkpoint.pth or backbone.pth in it "
                              f"(a run's out_dir holds both), or a ResNet state dict file")


def test_a_checkpoint_cut_short_is_called_incomplete_and_the_one_before_it_is_named(tmp_path):
    """A copy or write that stopped part-way got torch's "failed finding central directory" and the advice to
    pass a torch-saved state dict; evaluation now names the file kept before it, and training the way to
    resume from that one."""
    incomplete = ("is incomplete (it ends before the directory a torch-saved file ends with: a write or a copy "
                  "cut short)")
    backbone = tmp_path / "backbone.pth"
    torch.save(randomised_resnet18().state_dict(), backbone)
    backbone.write_bytes(backbone.read_bytes()[:backbone.stat().st_size // 2])
    with pytest.raises(CheckpointError) as err:
        load_backbone(backbone)
    assert str(err.value) == f"checkpoint {backbone} {incomplete}; copy it again"

    checkpoint = tmp_path / "checkpoint.pth"
    for step in (1, 2):  # the second save keeps the first as checkpoint.prev.pth
        atomic_save(bt_fast_checkpoint(randomised_barlow_twins()) | {"step": step}, checkpoint, keep_previous=True)
    checkpoint.write_bytes(checkpoint.read_bytes()[:-100])
    with pytest.raises(CheckpointError) as err:
        load_backbone(checkpoint)
    previous = tmp_path / "checkpoint.prev.pth"
    assert str(err.value) == (f"checkpoint {checkpoint} {incomplete}; copy it again, or pass {previous}, the one "
                              f"saved before it")
    assert load_backbone(previous).arch == "resnet18"
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(checkpoint)
    assert str(err.value) == (f"checkpoint {checkpoint} {incomplete}; rename checkpoint.prev.pth (the one before it) "
                              f"to checkpoint.pth to resume from there, delete it to start afresh, or choose another "
                              f"out_dir")


@pytest.mark.parametrize("content, reason", [(b"", "is empty (0 bytes)"),
                                             (b"epochs: 10\n", "is not a file torch.save wrote")])
def test_a_checkpoint_that_is_empty_or_no_torch_file_says_so(content, reason, tmp_path):
    """Both were "cannot be read (RuntimeError)" (an empty file made by `: > checkpoint.pth`, say)."""
    checkpoint = tmp_path / "checkpoint.pth"
    checkpoint.write_bytes(content)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(checkpoint)
    assert str(err.value) == f"checkpoint {checkpoint} {reason}; delete it or choose another out_dir"


def test_a_plain_pickle_is_refused_without_torchs_two_line_warning(tmp_path):
    """torch.load(weights_only=True) warned about the pickle protocol (two lines on stderr) before our one line."""
    import pickle
    import warnings
    path = tmp_path / "backbone.pth"
    path.write_bytes(pickle.dumps({"conv1.weight": [1.0]}, protocol=4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(CheckpointError, match=f"checkpoint {path} cannot be read by torch.load"):
            load_backbone(path)
        with pytest.raises(CheckpointError):
            load_checkpoint(path)
    assert [str(w.message) for w in caught] == []


def test_random_init_is_seeded():
    a, b, c = random_backbone("resnet18", 0), random_backbone("resnet18", 0), random_backbone("resnet18", 1)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.conv1.weight, c.conv1.weight)


# -- command line ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rn18_file(module_tmp) -> Path:
    path = module_tmp("ckpt") / "resnet18.pth"
    torch.save({k: v for k, v in randomised_resnet18().state_dict().items() if not k.startswith("fc.")}, path)
    return path


COMMON = ["--image-size", "32", "--workers", "0", "--device", "cpu", "--batch-size", "16"]


def test_cli_knn_writes_json_and_one_line(split_folder, rn18_file, tmp_path, capsys):
    out = tmp_path / "knn.json"
    assert ev.main(["--checkpoint", str(rn18_file), "--data", str(split_folder), "--mode", "knn",
                    "--json", str(out), *COMMON]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("knn") and "top1" in lines[0] and str(rn18_file) in lines[0]
    record = json.loads(out.read_text())
    assert {"mode", "top1", "top5", "checkpoint"} <= set(record)
    assert record["mode"] == "knn" and record["checkpoint"] == str(rn18_file)
    assert 0.0 <= record["top1"] <= 100.0 and record["top5"] == 100.0  # 3 classes: top-5 covers all
    assert (record["train_images"], record["val_images"], record["k"], record["arch"]) == (24, 12, 24, "resnet18")


def test_cli_compare_matches_separate_runs(split_folder, rn18_file, tmp_path, capsys):
    both, alone, base = tmp_path / "both.json", tmp_path / "alone.json", tmp_path / "base.json"
    assert ev.main(["--compare", "--checkpoint", str(rn18_file), "--data", str(split_folder),
                    "--json", str(both), *COMMON]) == 0
    printed = capsys.readouterr().out
    assert "pretrained" in printed and "random init" in printed
    assert ev.main(["--checkpoint", str(rn18_file), "--data", str(split_folder), "--json", str(alone), *COMMON]) == 0
    assert ev.main(["--random-init", "--arch", "resnet18", "--data", str(split_folder), "--json", str(base),
                    *COMMON]) == 0
    result = json.loads(both.read_text())
    assert set(result) == {"pretrained", "random_init"}
    for key in ("top1", "top5"):
        assert result["pretrained"][key] == pytest.approx(json.loads(alone.read_text())[key])
        assert result["random_init"][key] == pytest.approx(json.loads(base.read_text())[key])
    assert result["random_init"]["random_init"] is True and result["random_init"]["checkpoint"] is None


def test_cli_notes_a_checkpoint_of_an_unfinished_run_and_records_its_progress(split_folder, tmp_path, capsys):
    from bt_fast.train import train
    from tests.test_train import tiny_config
    run = tmp_path / "run"
    train(tiny_config(split_folder / "train", run, "max_steps=4"))  # 4 of 2 epochs x 3 steps (24 images, batch 8)
    checkpoint, out = run / "checkpoint.pth", tmp_path / "eval.json"
    capsys.readouterr()
    argv = ["--compare", "--checkpoint", str(checkpoint), "--data", str(split_folder), "--json", str(out), *COMMON]
    assert ev.main(argv) == 0
    assert capsys.readouterr().err.splitlines() == [
        f"note: {checkpoint} is from an unfinished pretraining run, saved at step 4 of 6 (1 of 2 epochs complete); "
        f"evaluating its weights as they were then"]
    result = json.loads(out.read_text())
    assert result["pretrained"]["pretraining"] == {"step": 4, "total_steps": 6, "epoch": 1, "epochs": 2,
                                                   "finished": False}
    assert result["random_init"]["pretraining"] is None

    train(tiny_config(split_folder / "train", run))  # the same run, finished
    capsys.readouterr()
    assert ev.main(argv[1:]) == 0
    assert capsys.readouterr().err == ""
    assert json.loads(out.read_text())["pretraining"] == {"step": 6, "total_steps": 6, "epoch": 2, "epochs": 2,
                                                          "finished": True}


@pytest.mark.parametrize("cache", ["--cache-features", "--no-cache-features"])
def test_cli_linear_probe_runs_both_ways(split_folder, rn18_file, tmp_path, capsys, cache):
    out = tmp_path / "linear.json"
    assert ev.main(["--checkpoint", str(rn18_file), "--data", str(split_folder / "train"),
                    "--val-data", str(split_folder / "val"), "--mode", "linear", "--epochs", "3", cache,
                    "--json", str(out), *COMMON]) == 0
    record = json.loads(out.read_text())
    assert record["mode"] == "linear" and record["cached_features"] == (cache == "--cache-features")
    assert 0.0 <= record["top1"] <= 100.0 and record["top5"] == 100.0
    assert capsys.readouterr().out.startswith("linear")


def exit_code(argv: list[str]) -> int:
    """The exit status `python -m tools.evaluate ARGV` ends with."""
    try:
        return ev.main(argv)
    except SystemExit as exit:
        return exit.code


def test_cli_errors_are_one_line_naming_the_file(split_folder, tmp_path, capsys):
    bad = tmp_path / "bad.pth"
    torch.save({"weight": torch.zeros(2)}, bad)
    assert exit_code(["--checkpoint", str(bad), "--data", str(split_folder), *COMMON]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(bad) in err[0]

    missing = tmp_path / "missing.pth"
    assert exit_code(["--checkpoint", str(missing), "--data", str(split_folder), *COMMON]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and f"{missing} does not exist" in err[0]

    flat = tmp_path / "flat"
    write_image_folder(flat, classes=2, per_class=2)
    assert exit_code(["--random-init", "--arch", "resnet18", "--data", str(flat), *COMMON]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no train/ and val/" in err[0] and "--val-data" in err[0]

    broken = tmp_path / "broken"
    write_image_folder(broken / "train", classes=2, per_class=2)
    write_image_folder(broken / "val", classes=2, per_class=2)
    corrupt = broken / "val" / "class1" / "img000.jpg"
    corrupt.write_bytes(b"not a jpeg")
    assert exit_code(["--random-init", "--arch", "resnet18", "--data", str(broken), *COMMON]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(corrupt) in err[0]


@pytest.mark.parametrize("mode, flag, value, must", [
    ("knn", "--temperature", "0", "positive"), ("linear", "--lr", "-0.1", "positive"),
    ("linear", "--weight-decay", "-1", "0 or more"), ("finetune", "--lr-classifier", "0", "positive"),
])
def test_a_rate_out_of_range_is_named_with_its_value(mode, flag, value, must, tmp_path, capsys):
    # One line named every rate at once: "learning rates and --temperature must be positive and ...".
    argv = ["--random-init", "--arch", "resnet18", "--data", str(tmp_path / "missing"), "--mode", mode, flag, value]
    assert exit_code(argv) == 2
    assert capsys.readouterr().err == f"error: {flag} must be {must}, got {float(value)} (see --help)\n"


def test_a_training_class_folder_without_images_is_refused_as_torchvision_refuses_it(tmp_path):
    # It was a class no image trained: with four real classes, top-5 was 100% whatever the backbone.
    train = write_image_folder(tmp_path / "train", classes=2, per_class=2)
    (train / "aaa_empty").mkdir()
    with pytest.raises(FileNotFoundError, match="aaa_empty"):
        torchvision.datasets.ImageFolder(str(train))
    with pytest.raises(DataError) as err:
        LabelledImageFolder(str(train), transform=None)
    assert str(err.value) == (f"{train} has class folders without images: aaa_empty; add images to them or "
                              f"remove them")
    classes = ["aaa_empty", "class0", "class1"]  # a validation folder may lack a class: it is labelled as training's
    assert [label for _, label in LabelledImageFolder(str(train), None, classes).samples] == [1, 1, 2, 2]
    (train / "aaa_empty").rmdir()
    assert LabelledImageFolder(str(train), None).classes == torchvision.datasets.ImageFolder(str(train)).classes
    val = write_image_folder(tmp_path / "val", classes=5, per_class=1)  # class0..class4; training has class0, class1
    with pytest.raises(DataError) as err:
        LabelledImageFolder(str(val), None, ["class0", "class1"])
    assert str(err.value).startswith(f"{val} has classes not in the training folder: class2, class3, class4; ")
    (val / "class5").mkdir()
    (val / "class0").rename(val / "class5" / "x")  # (any image below a class folder counts)
    with pytest.raises(DataError) as err:
        LabelledImageFolder(str(val), None, ["class1"])
    assert str(err.value).startswith(f"{val} has classes not in the training folder: class2, class3, class4 and 1 "
                                     f"more; ")  # the list stopped at three without a word


def test_resolve_splits(split_folder, capsys):
    with pytest.raises(DataError, match="does not exist"):
        ev.resolve_splits("/nonexistent/data")
    train, val = split_folder / "train", split_folder / "val"
    assert ev.resolve_splits(train, val) == (train, val)
    assert ev.resolve_splits(split_folder) == (train, val)
    capsys.readouterr()
    assert ev.resolve_splits(train, split_folder / "." / "train") == (train, train)  # k-NN: each image finds itself
    assert capsys.readouterr().err == (f"warning: --val-data {train} is the training data (--data): the accuracy is "
                                       f"that of images the classifier has seen; pass images held out from training "
                                       f"to measure it\n")


def test_a_data_option_naming_a_file_or_nothing_is_named(split_folder, tmp_path):
    # A missing --val-data was reported with training's remedy ("pass DATA=/path/to/imagefolder or omit it
    # for the demo"), a .beton given as --data alone as a directory that "does not exist".
    beton = tmp_path / "train.beton"
    beton.write_bytes(b"")
    folder = "pass an ImageFolder directory (a sub-directory of images per class)"
    for data, val, message in [
            (split_folder / "train", tmp_path / "missing", f"--val-data {tmp_path / 'missing'} does not exist; {folder}"),
            (split_folder / "train", beton, f"--val-data {beton} is a file; {folder}"),
            (beton, split_folder / "val", f"--data {beton} is a file; {folder}"),
            (beton, None, f"--data {beton} is a file; pass a directory with train/ and val/ sub-folders "
                          f"(ImageFolders)"),
            # a split root beside --val-data had been "has classes not in the training folder: train, val; ..."
            (split_folder, split_folder / "val", f"--data {split_folder} holds train/ and val/, which would be read as "
                                                 f"two classes; give --data {split_folder / 'train'}, or --data "
                                                 f"{split_folder} alone"),
            (split_folder / "train", split_folder, f"--val-data {split_folder} holds train/ and val/, which would be "
                                                   f"read as two classes; give --val-data {split_folder / 'val'}")]:
        with pytest.raises(DataError) as err:
            ev.resolve_splits(data, val)
        assert str(err.value) == message


def test_errors_from_dataloader_workers_are_reduced_to_the_original_message():
    """What the CLI prints for a corrupt image found inside a DataLoader worker (bt_fast.errors.one_line)."""
    wrapped = DataError("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
                        '  File "x.py", line 1, in f\nbt_fast.errors.DataError: cannot read image a.jpg: bad; '
                        "remove or replace the file\n")
    assert one_line(wrapped) == "cannot read image a.jpg: bad; remove or replace the file"
    assert one_line(DataError("first line\nsecond")) == "first line second"


# -- a run's backbone.pth and the official ResNet-50 formats ---------------------------------------
def _run_directory(root: Path, image_size: int) -> Path:
    """A run directory as training leaves it: backbone.pth (a plain state dict) beside checkpoint.pth."""
    model = randomised_barlow_twins()
    root.mkdir()
    torch.save(bt_fast_checkpoint(model, image_size=image_size), root / "checkpoint.pth")
    torch.save(model.backbone.state_dict(), root / "backbone.pth")
    return root / "backbone.pth"


def test_backbone_pth_takes_the_training_image_size_from_its_run(tmp_path):
    backbone = _run_directory(tmp_path / "run", image_size=48)
    assert load_backbone(backbone).image_size == 48  # from checkpoint.pth beside it
    config = Config(arch="resnet18")
    config.augment.image_size = 40
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(config.to_dict()))
    assert load_backbone(backbone).image_size == 40  # config.yaml, the run's resolved config, comes first
    alone = tmp_path / "copied.pth"
    alone.write_bytes(backbone.read_bytes())
    assert load_backbone(alone).image_size is None


def test_cli_evaluates_backbone_pth_at_the_training_size_and_warns_without_its_run(split_folder, tmp_path, capsys):
    backbone = _run_directory(tmp_path / "run", image_size=40)
    options = ["--workers", "0", "--device", "cpu", "--batch-size", "16", "--data", str(split_folder)]
    assert ev.main(["--checkpoint", str(backbone), "--json", str(tmp_path / "run.json"), *options]) == 0
    assert json.loads((tmp_path / "run.json").read_text())["image_size"] == 40
    assert "warning" not in capsys.readouterr().err
    alone = tmp_path / "backbone.pth"
    alone.write_bytes(backbone.read_bytes())
    assert ev.main(["--checkpoint", str(alone), "--json", str(tmp_path / "alone.json"), *options]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"warning: {alone} records no training image size (nor does a config.yaml or checkpoint.pth "
                   f"beside it); evaluating at 224 px, pass --image-size if it was trained at another"]
    assert json.loads((tmp_path / "alone.json").read_text())["image_size"] == 224


def test_official_resnet50_files_load_and_evaluate(split_folder, tmp_path, capsys):
    """torchvision's resnet50 without fc.* (the released resnet50.pth) and the official training checkpoint
    ({"model": DDP state dict of backbone, projector and bn}) give torchvision's features; the CLI runs it."""
    torch.manual_seed(3)
    source = torchvision.models.resnet50().eval()
    weights = {k: v for k, v in source.state_dict().items() if not k.startswith("fc.")}
    released = tmp_path / "resnet50.pth"
    torch.save(weights, released)
    official = tmp_path / "checkpoint.pth"
    torch.save({"epoch": 1, "model": {**{f"module.backbone.{k}": v for k, v in weights.items()},
                                      "module.projector.0.weight": torch.randn(64, 2048),
                                      "module.bn.running_mean": torch.zeros(64)},
                "optimizer": {"state": {}, "param_groups": []}}, official)
    expected = source_features(source, IMAGES)
    for path in (released, official):
        loaded = load_backbone(path)
        assert (loaded.arch, loaded.image_size) == ("resnet50", None)
        with torch.no_grad():
            torch.testing.assert_close(loaded.backbone.eval()(IMAGES), expected)
    out = tmp_path / "official.json"
    assert ev.main(["--checkpoint", str(official), "--data", str(split_folder), "--json", str(out), *COMMON]) == 0
    record = json.loads(out.read_text())
    assert (record["arch"], record["image_size"], record["val_images"]) == ("resnet50", 32, 12)


def test_a_diverged_linear_probe_or_finetuning_is_an_error_not_an_accuracy(split_folder, rn18_file, tmp_path, capsys):
    # At --lr 1e30 the probe's weights overflow to inf/nan; argsort of nan logits still ranked the classes, and
    # the command printed top-1 6.25% (the demo's chance level) and wrote it to --json as the backbone's result.
    features, labels = torch.randn(40, 8, generator=torch.Generator().manual_seed(0)), torch.arange(40) % 4
    linear = train_linear(features, labels, 4, epochs=3, lr=1e30)
    assert not torch.isfinite(linear(features)).all()
    with pytest.raises(UserError, match="training diverged: .*not finite.*; lower the learning rate$"):
        linear_topk(linear, features, labels)

    out = tmp_path / "eval.json"
    for mode, rates, remedy in [
            ("linear", ["--lr", "1e30"], "lower --lr (1e+30)"),
            ("finetune", ["--lr-classifier", "1e30", "--train-percent", "100"],
             "lower --lr-backbone (0.005) or --lr-classifier (1e+30)")]:
        argv = ["--checkpoint", str(rn18_file), "--data", str(split_folder), "--mode", mode, "--epochs", "2",
                "--json", str(out), *rates, *COMMON]
        assert exit_code(argv) == 2
        assert capsys.readouterr().err.splitlines() == [
            f"error: training diverged: the classifier's outputs on the validation images are not finite, so it "
            f"has no accuracy; {remedy}"]
        assert not out.exists()


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_checkpoint_with_weights_that_are_not_finite_is_refused(value, tmp_path):
    # A backbone whose bn1.weight was nan gave nan features, and k-NN reported the chance level (top-1 6.25% on
    # the demo) as the checkpoint's accuracy.
    state = {k: v for k, v in randomised_resnet18().state_dict().items() if not k.startswith("fc.")}
    state["bn1.weight"][3] = value
    path = tmp_path / "diverged.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as err:
        load_backbone(path)
    assert str(err.value) == (f"checkpoint {path} holds weights that are not finite ('bn1.weight' has nan or inf), "
                              f"as a diverged run leaves; pass a checkpoint saved before it diverged")


def test_a_missing_data_folder_is_the_only_line_whatever_the_checkpoint_notes(tmp_path, capsys):
    # The checkpoint was read first: its note (an unfinished run) or warning (no training image size) came
    # before the data error, two lines for one mistake, after seconds of loading a ResNet-50 checkpoint.
    path = tmp_path / "checkpoint.pth"
    torch.save({**bt_fast_checkpoint(randomised_barlow_twins()), "step": 4, "schedule_steps": 128}, path)
    bare = tmp_path / "bare" / "backbone.pth"
    bare.parent.mkdir()
    torch.save({k: v for k, v in randomised_resnet18().state_dict().items() if not k.startswith("fc.")}, bare)
    for checkpoint in (path, bare):
        assert exit_code(["--checkpoint", str(checkpoint), "--data", str(tmp_path / "missing"), *COMMON[2:]]) == 2
        assert capsys.readouterr().err.splitlines() == [
            f"error: data directory {tmp_path / 'missing'} does not exist; pass --data DIR with train/ and val/ "
            f"sub-folders"]


def test_ctrl_c_of_a_fine_tuning_names_its_checkpoint_only_once_one_exists(tmp_path, monkeypatch, capsys):
    """Stopped before its first epoch's end it pointed at a finetune.pth (and an --out-dir) that did not exist."""
    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(ev, "run", interrupted)
    out = tmp_path / "ft"
    argv = ["--checkpoint", str(tmp_path / "backbone.pth"), "--data", str(tmp_path), "--mode", "finetune",
            "--out-dir", str(out)]
    assert ev.main(argv) == 130
    assert capsys.readouterr().err.splitlines() == [
        f"error: interrupted; no epoch had finished, so nothing is kept in {out}: the same command starts over"]
    out.mkdir()
    (out / ev.CHECKPOINT_NAME).write_bytes(b"an epoch's checkpoint")
    assert ev.main(argv) == 130
    assert capsys.readouterr().err.splitlines() == [
        f"error: interrupted; run the same command again to resume from {out / ev.CHECKPOINT_NAME}"]


@pytest.mark.parametrize("size", ["48px", 0, True])
def test_a_training_image_size_that_is_no_number_of_pixels_is_named_with_its_file(size, tmp_path):
    """A hand-edited config.yaml beside backbone.pth: '48px' was a ValueError traceback, and 0 a warning that no
    size was recorded, 'nor does a config.yaml ... beside it'."""
    torch.save(random_backbone("resnet18", 0).state_dict(), tmp_path / "backbone.pth")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"arch": "resnet18", "augment": {"image_size": size}}))
    with pytest.raises(CheckpointError) as err:
        load_backbone(tmp_path / "backbone.pth")
    assert str(err.value) == (f"the config of the run beside {tmp_path / 'backbone.pth'} gives augment.image_size "
                              f"{size!r}, not a number of pixels; fix it there (the size the backbone was trained at)")


def test_torchs_unpickling_error_is_quoted_without_its_terminal_style_codes(tmp_path):
    # A pickled module (not a state dict): torch's message prints its advice in bold, '\x1b[1m' in an error line.
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pth")
    with pytest.raises(CheckpointError) as err:
        load_backbone(tmp_path / "module.pth")
    assert "UnpicklingError: Weights only load failed" in str(err.value) and "\x1b" not in str(err.value)
