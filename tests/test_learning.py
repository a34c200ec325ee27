"""Learning check: the demo pretraining (configs/demo_cpu.yaml with epochs=2 instead of 4) learns
features that every evaluation protocol sees.

Trains the demo once, as `make pretrain` does but for 2 epochs, then compares the pretrained backbone
with the same architecture at random initialisation on the demo validation split (crops from parts of
the photographs that training never saw) by k-NN, the linear probe and fine-tuning. A pipeline,
optimizer or evaluation that silently stops learning fails here. The slowest module of the suite.

Each bar is at most two thirds of the smallest gain measured with the 2-epoch pretraining at seed 0
(what the fixture trains) and seed 1, one thread on 2-core CPUs; docs/evaluation.md lists every figure,
and those of the full 4 epochs:
- k-NN: +22.3 and +33.6 (2026-12-04), +24.2 and +32.0 (2026-12-03);
- linear probe on augmented crops, 3 epochs: +39.1 and +43.8 (2026-12-06; at 5 epochs +42.6 and +45.7);
- fine-tuning on 1%, head lr 0.1, mean over eval seeds 0 / 1 / 2: +11.7 and +10.7 (single seeds
  from +3.5 to +22.3; the 4-epoch demo's mean on the same CPU was +8.7).
"""
import json

import pytest

from bt_fast.config import load_config
from bt_fast.train import train
from pipelines import demo_data
from tools import evaluate

# One pretraining for the module: its tests share a pytest-xdist worker (`make test` runs --dist loadscope), and
# the first of them also waits for the pretraining, so the hang guard is the pretraining's time plus the test's.
pytestmark = pytest.mark.timeout(900)

MIN_KNN_GAIN_POINTS = 15.0
MIN_LINEAR_GAIN_POINTS = 20.0
MIN_FINETUNE_MEAN_GAIN_POINTS = 4.0
FINETUNE_SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def pretrained(module_tmp):
    """(demo root, training summary, run directory) of one demo pretraining shared by the module, on the CPU
    where the bars were calibrated (docs/evaluation.md), also where CUDA is visible."""
    root = module_tmp("learning")
    demo = demo_data.build(root / "demo", train_per_class=64, val_per_class=16)
    run = root / "run"
    summary = train(load_config("configs/demo_cpu.yaml", [f"data={demo / 'train'}", f"knn_val={demo / 'val'}",
                                                          f"out_dir={run}", "epochs=2", "device=cpu"]))
    return demo, summary, run


def compare(pretrained, work_dir, *options: str) -> dict:
    """`tools.evaluate --compare` of the demo checkpoint against random init, on the CPU; its JSON."""
    demo, summary, _ = pretrained
    work_dir.mkdir(parents=True, exist_ok=True)
    result = work_dir / "eval.json"
    assert evaluate.main(["--compare", "--checkpoint", summary["checkpoint"], "--data", str(demo),
                          "--device", "cpu", "--json", str(result), *options]) == 0
    return json.loads(result.read_text())


def gain(measured: dict) -> float:
    return measured["pretrained"]["top1"] - measured["random_init"]["top1"]


def test_demo_pretraining_beats_random_init_on_knn(pretrained, tmp_path):
    _, summary, run = pretrained
    assert summary["last_loss"] < summary["first_loss"]
    measured = compare(pretrained, tmp_path, "--mode", "knn")
    assert gain(measured) >= MIN_KNN_GAIN_POINTS, measured

    # The training-time monitor saw the same backbone on the same split.
    monitor = [json.loads(line) for line in open(run / "metrics.jsonl") if "knn_top1" in line]
    assert monitor and abs(monitor[-1]["knn_top1"] - measured["pretrained"]["top1"]) < 1e-3  # JSON keeps 4 decimals


def test_demo_pretraining_beats_random_init_on_the_linear_probe(pretrained, tmp_path):
    """The probe trained on RandomResizedCrop + flip crops, as the official probe is, for 3 epochs: where
    the probe on pretrained features reaches about 57-62%, the one on random-init features is still near 18%
    (at 10 epochs, about 41%: a gain of +20). On cached features of the whole images the demo separates
    the two by only a few points (docs/evaluation.md)."""
    measured = compare(pretrained, tmp_path, "--mode", "linear", "--no-cache-features", "--epochs", "3")
    assert gain(measured) >= MIN_LINEAR_GAIN_POINTS, measured


def test_demo_pretraining_beats_random_init_on_fine_tuning(pretrained, tmp_path):
    """The official 1% recipe (one image per class here, 20 epochs) with the head's learning rate at 0.1,
    at evaluation seeds 0, 1 and 2; the mean gain is held to the bar.

    Which 16 images a seed draws moves one run's gain between +3 and +22 points (docs/evaluation.md),
    so a single seed is too noisy to hold to a bar. Both arms of a seed share its subset, head
    initialisation and order: a checkpoint that did not reach the backbone gains exactly 0.
    At the official head lr 0.5, made for ImageNet's 50 steps per epoch, the demo's single step per
    epoch leaves both runs at the mercy of the last few updates (-8.6 to +1.6 points).
    """
    gains = []
    for seed in FINETUNE_SEEDS:
        measured = compare(pretrained, tmp_path / f"seed{seed}", "--mode", "finetune", "--lr-classifier", "0.1",
                           "--seed", str(seed))
        for record in measured.values():
            assert (record["train_images"], record["train_percent"], record["epochs"], record["lr_backbone"]) == \
                (16, 1, 20, 0.005)
            assert len(record["epoch_losses"]) == 20
        gains.append(gain(measured))
    assert sum(gains) / len(gains) >= MIN_FINETUNE_MEAN_GAIN_POINTS, gains
