"""bt_fast.finetune and `tools.evaluate --mode finetune` on a tiny ImageFolder (resnet18, 32 px): the
per-class subset counted, a train list honoured image by image, the per-epoch cosine against torch's
CosineAnnealingLR, and a resumed run ending with the weights of an uninterrupted one. The learning
check on the demo photographs is in tests/test_learning.py."""
from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest
import torch

import bt_fast.finetune as ft
from bt_fast.checkpoint import CheckpointError
from bt_fast.errors import DataError
from bt_fast.schedule import epoch_cosine
from bt_fast.weights import random_backbone
from pipelines.image_folder import find_image_folder
from tools import evaluate as ev


def settings(**changes) -> ft.FinetuneSettings:
    values = dict(image_size=32, batch_size=10, workers=0, device=torch.device("cpu"), epochs=3,
                  train_percent=100, seed=0)
    return ft.FinetuneSettings(**{**values, **changes})


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# -- the subset -----------------------------------------------------------------------------------
def test_per_class_subset_is_balanced_and_reproducible():
    labels = [c for c in range(16) for _ in range(64)]  # the demo's 16 classes of 64
    for percent, per_class in ((1, 1), (10, 6), (100, 64)):  # 0.64 -> at least one, 6.4 -> 6
        chosen = ft.per_class_subset(labels, percent, seed=0)
        assert Counter(labels[i] for i in chosen) == {c: per_class for c in range(16)}
        assert chosen == sorted(set(chosen))
    assert ft.per_class_subset(labels, 10, seed=3) == ft.per_class_subset(labels, 10, seed=3)
    assert ft.per_class_subset(labels, 10, seed=3) != ft.per_class_subset(labels, 10, seed=4)
    uneven = [0] * 25 + [1] * 5 + [2] * 150
    counts = Counter(uneven[i] for i in ft.per_class_subset(uneven, 10, seed=0))
    assert counts == {0: 3, 1: 1, 2: 15}  # 2.5 rounds up, 0.5 -> at least one


def test_train_list_names_images_by_path_or_unique_name(split_folder, tmp_path):
    train = split_folder / "train"
    _, samples = find_image_folder(train)
    listing = tmp_path / "subset.txt"
    listing.write_text("# two of class 0, one of class 2\nclass0/img003.jpg\n\nclass2/img000.jpg\nclass0/img005.jpg\n")
    chosen = ft.read_train_list(listing, train, samples)
    assert [Path(samples[i][0]).relative_to(train).as_posix() for i in chosen] == \
        ["class0/img003.jpg", "class2/img000.jpg", "class0/img005.jpg"]

    ambiguous = tmp_path / "ambiguous.txt"
    ambiguous.write_text("class1/img001.jpg\nimg002.jpg\n")  # every class has an img002.jpg
    with pytest.raises(DataError, match=r"ambiguous\.txt line 2: 'img002\.jpg' matches 3 images"):
        ft.read_train_list(ambiguous, train, samples)
    unknown = tmp_path / "unknown.txt"
    unknown.write_text("class9/img000.jpg\n")
    with pytest.raises(DataError, match=r"unknown\.txt line 1: 'class9/img000\.jpg' is not an image in"):
        ft.read_train_list(unknown, train, samples)
    with pytest.raises(DataError, match=r"missing\.txt does not exist"):
        ft.read_train_list(tmp_path / "missing.txt", train, samples)
    with pytest.raises(DataError, match=f"^train list {tmp_path} is a directory; pass a text file"):
        ft.read_train_list(tmp_path, train, samples)

    # SimCLR's ImageNet lists name files alone (n01440764_10026.JPEG): unique names resolve
    renamed = [(str(train / "class1" / "n01_7.jpg"), 1), *samples]
    assert ft.read_train_list(_write(tmp_path / "simclr.txt", "n01_7.jpg\n"), train, renamed) == [0]


@pytest.mark.parametrize("fault", ["not utf-8", "unreadable", "socket"])
def test_a_train_list_that_cannot_be_read_as_text_is_one_data_error(split_folder, tmp_path, monkeypatch, fault):
    """A list that was not UTF-8, or could not be read (no read permission: root reads it anyway, so the EACCES
    is simulated at `Path.read_text`), was a UnicodeDecodeError or PermissionError traceback; a socket was said
    not to exist."""
    import errno
    import os
    import socket
    train = split_folder / "train"
    listing = tmp_path / "subset.txt"
    listing.write_bytes(b"class0/img003.jpg\n\xff\xfe\n" if fault == "not utf-8" else b"class0/img003.jpg\n")
    expected = {"not utf-8": f"train list {listing} is not UTF-8 text (byte 18); pass a text file naming one "
                             f"training image per line",
                "unreadable": f"cannot read train list {listing} ({os.strerror(errno.EACCES)}); make it readable",
                "socket": f"train list {tmp_path / 's'} is not a regular file; pass a text file naming one training "
                          f"image per line"}[fault]
    listener = socket.socket(socket.AF_UNIX)
    if fault == "socket":
        listing = tmp_path / "s"
        listener.bind(str(listing))
    elif fault == "unreadable":
        def denied(self, *args, **kwargs):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        monkeypatch.setattr(Path, "read_text", denied)
    with listener, pytest.raises(DataError) as error:
        ft.read_train_list(listing, train, find_image_folder(train)[1])
    assert str(error.value) == expected


def test_a_train_list_naming_an_image_twice_is_refused(split_folder, tmp_path):
    # The image was trained on twice an epoch and counted twice in train_images, silently.
    train = split_folder / "train"
    renamed = [(str(train / "class1" / "n01_7.jpg"), 1), *find_image_folder(train)[1]]
    for text, line, name, first in [("class0/img003.jpg\nclass2/img000.jpg\nclass0/img003.jpg\n", 3,
                                     "class0/img003.jpg", 1),
                                    ("class1/n01_7.jpg\n# the same by its file name\nn01_7.jpg\n", 3, "n01_7.jpg", 1)]:
        listing = _write(tmp_path / "twice.txt", text)
        with pytest.raises(DataError) as err:
            ft.read_train_list(listing, train, renamed)
        assert str(err.value) == (f"train list {listing} line {line}: '{name}' names the image of line {first} again; "
                                  f"list each image once")


def test_epoch_cosine_is_torchs_cosine_annealing_stepped_per_epoch():
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=0.5)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=20)
    for epoch in range(20):
        assert epoch_cosine(0.5, epoch, 20) == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-12, abs=1e-15)
        optimizer.step()
        scheduler.step()


# -- training -------------------------------------------------------------------------------------
def test_training_reads_exactly_the_listed_images(split_folder, tmp_path, monkeypatch):
    listing = _write(tmp_path / "subset.txt", "class0/img001.jpg\nclass1/img004.jpg\nclass2/img007.jpg\n")
    read = []
    load_rgb = ft.load_rgb
    train = split_folder / "train"
    monkeypatch.setattr(ft, "load_rgb", lambda path: read.append(Path(path).relative_to(train).as_posix())
                        or load_rgb(path))
    results, facts = ft.finetune([random_backbone("resnet18", 0)], 512, train, split_folder / "val",
                                 settings(train_list=listing, epochs=2))
    assert Counter(read) == {"class0/img001.jpg": 2, "class1/img004.jpg": 2, "class2/img007.jpg": 2}
    assert (facts["train_images"], facts["val_images"], facts["classes"]) == (3, 12, 3)
    assert len(facts["epoch_losses"]) == 2 and len(results) == 1


def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(split_folder, tmp_path):
    """Two backbones side by side (as --compare trains them), stopped after epoch 1 of 3 and resumed."""
    def run(out_dir, on_epoch=None, **changes):
        backbones = [random_backbone("resnet18", 0), random_backbone("resnet18", 1)]
        results, facts = ft.finetune(backbones, 512, split_folder / "train", split_folder / "val",
                                     settings(out_dir=out_dir, **changes), on_epoch)
        return backbones, results, facts

    whole_backbones, whole_results, whole_facts = run(tmp_path / "whole")

    def stop_after_first_epoch(epoch, losses):
        if epoch == 0:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", stop_after_first_epoch)
    assert torch.load(tmp_path / "cut" / ft.CHECKPOINT_NAME, weights_only=True)["epoch"] == 1
    backbones, results, facts = run(tmp_path / "cut")
    assert facts["resumed_epochs"] == 1 and facts["epoch_losses"] == whole_facts["epoch_losses"]
    assert results == whole_results
    for resumed, whole in zip(backbones, whole_backbones):
        for (name, a), b in zip(resumed.state_dict().items(), whole.state_dict().values()):
            assert torch.equal(a, b), name

    with pytest.raises(CheckpointError, match=r"finetune\.pth was written by a different fine-tuning run "
                                              r"\(lr_backbone 0\.005 -> 0\.01\)"):
        run(tmp_path / "cut", lr_backbone=0.01)


# -- command line ---------------------------------------------------------------------------------
COMMON = ["--image-size", "32", "--workers", "0", "--device", "cpu", "--batch-size", "10"]


def test_cli_finetune_compare_writes_both_records(split_folder, tmp_path, capsys):
    out = tmp_path / "ft.json"
    listing = _write(tmp_path / "subset.txt", "\n".join(f"class{c}/img00{i}.jpg" for c in range(3) for i in range(4)))
    checkpoint = tmp_path / "rn18.pth"
    torch.save(random_backbone("resnet18", 7).state_dict(), checkpoint)
    assert ev.main(["--compare", "--mode", "finetune", "--checkpoint", str(checkpoint), "--data", str(split_folder),
                    "--train-list", str(listing), "--epochs", "2", "--json", str(out), *COMMON]) == 0
    printed = capsys.readouterr().out
    assert "finetune list" in printed and "pretrained" in printed and "random init" in printed
    result = json.loads(out.read_text())
    for record in result.values():
        assert record["mode"] == "finetune" and record["train_images"] == 12 and record["train_list"] == str(listing)
        assert (record["epochs"], record["lr_backbone"], record["lr_classifier"], record["weight_decay"]) == \
            (2, 0.005, 0.5, 0.0)
        assert len(record["epoch_losses"]) == 2 and 0.0 <= record["top1"] <= 100.0
    assert result["random_init"]["random_init"] and result["pretrained"]["checkpoint"] == str(checkpoint)


def test_cli_resumes_only_for_the_same_backbone_weights(split_folder, tmp_path, capsys):
    """finetune.pth of one backbone is refused for random init or another file, and resumed for a copy."""
    checkpoint, other = tmp_path / "rn18.pth", tmp_path / "other.pth"
    torch.save(random_backbone("resnet18", 7).state_dict(), checkpoint)
    torch.save(random_backbone("resnet18", 8).state_dict(), other)
    common = ["--mode", "finetune", "--data", str(split_folder), "--train-percent", "100", "--epochs", "1",
              "--out-dir", str(tmp_path / "ft"), *COMMON]
    assert ev.main(["--checkpoint", str(checkpoint), *common]) == 0
    capsys.readouterr()
    for backbone in (["--random-init", "--arch", "resnet18"], ["--checkpoint", str(other)]):
        with pytest.raises(SystemExit) as exit:
            ev.main([*backbone, *common])
        err = capsys.readouterr().err
        assert exit.value.code == 2 and err.count("\n") == 1, err
        assert "finetune.pth was written by a different fine-tuning run (the backbone weights (sha256 " in err

    moved = tmp_path / "moved.pth"
    moved.write_bytes(checkpoint.read_bytes())
    assert ev.main(["--checkpoint", str(moved), *common]) == 0
    assert "resumed after epoch 1" in capsys.readouterr().out


def test_a_resume_is_refused_where_the_training_classes_changed(split_folder, tmp_path, capsys):
    """The labels are the classes' places in the training folder: with class1 renamed class3, class2's images
    are labelled 1, no longer 2, though the subset (a list naming images of class0 and class2) is the same."""
    import shutil
    data = shutil.copytree(split_folder, tmp_path / "data")
    listing = tmp_path / "subset.txt"
    listing.write_text("class0/img000.jpg\nclass0/img001.jpg\nclass2/img000.jpg\nclass2/img001.jpg\n")
    argv = ["--random-init", "--arch", "resnet18", "--mode", "finetune", "--data", str(data), "--train-list",
            str(listing), "--epochs", "1", "--batch-size", "2", "--out-dir", str(tmp_path / "ft"), *COMMON[:-2]]
    assert ev.main(argv) == 0
    for split in ("train", "val"):
        (data / split / "class1").rename(data / split / "class3")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit:
        ev.main(argv)
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.count("\n") == 1, err
    assert "finetune.pth was written by a different fine-tuning run (the training classes)" in err


@pytest.mark.parametrize("mode, given, read_by", [("knn", "--lr-backbone 2", "finetune"), ("linear", "--k 2", "knn"),
                                                  ("finetune", "--temperature 2", "knn"),
                                                  ("knn", "--epochs 2", "linear or finetune"),
                                                  ("knn", "--weight-decay 2", "linear or finetune"),
                                                  ("knn", "--no-cache-features", "linear")])
def test_cli_rejects_options_of_another_mode(split_folder, capsys, mode, given, read_by):
    """Each option another mode reads is refused, not ignored: --k or --epochs used to be accepted silently."""
    option = given.split()[0].replace("--no-", "--")
    with pytest.raises(SystemExit) as exit:
        ev.main(["--random-init", "--arch", "resnet18", "--data", str(split_folder), "--mode", mode, *given.split(),
                 *COMMON])
    assert exit.value.code == 2
    assert capsys.readouterr().err == (f"error: {option} applies to --mode {read_by} only, not --mode {mode} "
                                       f"(see --help)\n")


def test_a_subset_of_one_image_or_a_batch_of_one_is_one_error_line(split_folder, tmp_path, capsys):
    # One image in the subset: its only batch (of one) was dropped for BatchNorm, and the epoch's mean loss
    # divided by zero (ZeroDivisionError traceback); --batch-size 1 failed inside BatchNorm at 32 px.
    one_class = tmp_path / "one" / "train" / "class0"
    one_class.mkdir(parents=True)
    (one_class / "img000.jpg").write_bytes((split_folder / "train" / "class0" / "img000.jpg").read_bytes())
    listing = _write(tmp_path / "one.txt", "class0/img000.jpg\n")
    for data, extra, message in [
            (tmp_path / "one" / "train", [], f"--train-percent 1 of {one_class.parent} draws 1 image; fine-tuning "
             f"needs at least 2 (BatchNorm trains on the statistics of a batch): use a larger --train-percent or a "
             f"folder with more images"),
            (split_folder / "train", ["--train-list", str(listing)], f"train list {listing} names 1 image; "
             f"fine-tuning needs at least 2 (BatchNorm trains on the statistics of a batch): list more"),
            (split_folder / "train", ["--batch-size", "1"], "--batch-size must be at least 2 for --mode finetune "
             "(BatchNorm trains on the statistics of a batch), got 1 (see --help)")]:
        with pytest.raises(SystemExit) as exit:
            ev.main(["--random-init", "--arch", "resnet18", "--mode", "finetune", "--data", str(data), "--val-data",
                     str(split_folder / "val"), "--epochs", "1", *(COMMON[:-2] if extra[:1] == ["--batch-size"]
                                                                   else COMMON), *extra])
        assert exit.value.code == 2 and capsys.readouterr().err.splitlines() == [f"error: {message}"]


@pytest.mark.parametrize("where", ["a directory named finetune.pth", "below a file"])
def test_an_out_dir_that_cannot_take_the_checkpoint_is_refused_before_any_work(where, split_folder, tmp_path, capsys):
    # The first epoch trained (hours on ImageNet) before its checkpoint write met an IsADirectoryError traceback
    # (or a StorageError on a read-only file system); an out_dir below a file ended in NotADirectoryError's.
    (tmp_path / "file").write_text("")
    out_dir = tmp_path / "run" if where == "a directory named finetune.pth" else tmp_path / "file" / "run"
    if where == "a directory named finetune.pth":
        (out_dir / ft.CHECKPOINT_NAME).mkdir(parents=True)
    reason = "Is a directory" if where == "a directory named finetune.pth" else "Not a directory"
    with pytest.raises(SystemExit) as exit:
        ev.main(["--random-init", "--arch", "resnet18", "--mode", "finetune", "--data", str(split_folder),
                 "--out-dir", str(out_dir), *COMMON])
    assert exit.value.code == 2 and capsys.readouterr().err.splitlines() == [
        f"error: --out-dir {out_dir}: cannot write finetune.pth there ({reason}); name a writable directory "
        f"(see --help)"]


def test_a_second_fine_tuning_on_the_same_out_dir_is_refused_while_the_first_runs(split_folder, tmp_path):
    """Both would resume from and write the same finetune.pth: the second, started while the first holds the
    out_dir (bt_fast.run_lock), stops at once, naming the holder."""
    from bt_fast.run_lock import RunLock, RunLockError
    out_dir = tmp_path / "ft"
    with RunLock(out_dir):  # the first run
        with pytest.raises(RunLockError, match=rf"out_dir {out_dir} is in use by process {os.getpid()} on "):
            ft.finetune([random_backbone("resnet18", 0)], 512, split_folder / "train", split_folder / "val",
                        settings(out_dir=out_dir))
    assert not out_dir.exists()  # the first run's lock made it and took it away; the second wrote nothing there


def test_a_validation_class_the_training_folder_lacks_is_refused_before_any_epoch(split_folder, tmp_path, monkeypatch):
    """The validation folder was read after the last epoch: 20 epochs of ImageNet's 1% trained, then refused."""
    import shutil
    data = shutil.copytree(split_folder, tmp_path / "data")
    (data / "val" / "class1").rename(data / "val" / "class9")
    monkeypatch.setattr(ft, "train_epoch", lambda *args: pytest.fail("an epoch trained before the check"))
    with pytest.raises(DataError, match=r"val has classes not in the training folder: class9"):
        ft.finetune([random_backbone("resnet18", 0)], 512, data / "train", data / "val", settings(epochs=2))


@pytest.mark.parametrize("kept", [torch.zeros(3), {"conv1.weight": torch.zeros(1)}, [1, 2]],
                         ids=["a tensor", "a backbone's state dict", "a list"])
def test_an_out_dir_file_that_is_no_fine_tuning_checkpoint_is_named_so(kept, tmp_path):
    """A tensor or a list was an AttributeError traceback; a backbone.pth was 'written by a different fine-tuning
    run (image_size None -> 32; ...)'."""
    path = tmp_path / ft.CHECKPOINT_NAME
    torch.save(kept, path)
    with pytest.raises(CheckpointError) as err:
        ft.resume(path, {"image_size": 32}, [], [], torch.device("cpu"))
    assert str(err.value) == (f"{path} is not a fine-tuning checkpoint (it holds no epoch, run, losses, models and "
                              f"optimizers); move it out of {tmp_path} or use another --out-dir")


def test_json_naming_a_file_the_command_reads_or_keeps_is_refused_before_it_is_replaced(split_folder, tmp_path,
                                                                                       capsys):
    """`--json` the --checkpoint replaced the pretraining weights with the result's few hundred bytes."""
    kept = tmp_path / "checkpoint.pth"
    torch.save(random_backbone("resnet18", 0).state_dict(), kept)
    before = kept.read_bytes()
    listing = _write(tmp_path / "subset.txt", "class0/img001.jpg\n")
    for extra, json_file, name in [([], tmp_path / "." / "checkpoint.pth", "--checkpoint"),
                                   (["--mode", "finetune", "--train-list", str(listing)], listing, "--train-list"),
                                   (["--mode", "finetune", "--out-dir", str(tmp_path / "ft")],
                                    tmp_path / "ft" / ft.CHECKPOINT_NAME, f"--out-dir's {ft.CHECKPOINT_NAME}")]:
        with pytest.raises(SystemExit) as exit:
            ev.main(["--checkpoint", str(kept), "--data", str(split_folder), "--json", str(json_file), *extra])
        assert exit.value.code == 2 and capsys.readouterr().err == (
            f"error: --json {json_file} is {name}, which the result would replace; name another file (see --help)\n")
    assert kept.read_bytes() == before and listing.read_text() == "class0/img001.jpg\n"
