"""Learning check: the demo pretraining (configs/demo_cpu.yaml, unchanged) learns features.

Trains the demo exactly as `make pretrain` does, then compares k-NN top-1 of the pretrained
backbone with the same architecture at random initialisation on the demo validation split
(crops from parts of the photographs that training never saw). A pipeline or optimizer that
silently stops learning fails here. The slowest test of the suite: a few CPU minutes.
"""
import json

from bt_fast.config import load_config
from bt_fast.train import train
from pipelines import demo_data
from tools import evaluate

MIN_GAIN_POINTS = 15.0


def test_demo_pretraining_beats_random_init_on_knn(tmp_path):
    demo = demo_data.build(tmp_path / "demo", train_per_class=64, val_per_class=16)
    run = tmp_path / "run"
    summary = train(load_config("configs/demo_cpu.yaml", [f"data={demo / 'train'}", f"knn_val={demo / 'val'}",
                                                          f"out_dir={run}"]))
    assert summary["last_loss"] < summary["first_loss"]

    result = tmp_path / "eval.json"
    assert evaluate.main(["--compare", "--mode", "knn", "--checkpoint", summary["checkpoint"],
                          "--data", str(demo), "--json", str(result)]) == 0
    measured = json.loads(result.read_text())
    gain = measured["pretrained"]["top1"] - measured["random_init"]["top1"]
    assert gain >= MIN_GAIN_POINTS, measured

    # The training-time monitor saw the same backbone on the same split.
    monitor = [json.loads(line) for line in open(run / "metrics.jsonl") if "knn_top1" in line]
    assert monitor and abs(monitor[-1]["knn_top1"] - measured["pretrained"]["top1"]) < 1e-3  # JSON keeps 4 decimals
