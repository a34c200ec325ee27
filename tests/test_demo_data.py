"""pipelines.demo_data and tools.make_demo_data: the ImageFolder layout the pipelines and evaluation read, deterministic,
reused when complete; the command's ImageNet-like set."""
from __future__ import annotations

import json
import shutil

import pytest
from PIL import Image

from pipelines.demo_data import PHOTOGRAPHS, build
from pipelines.image_folder import find_image_folder


def test_build_makes_a_deterministic_image_folder_and_reuses_it(tmp_path):
    root = build(tmp_path / "a", train_per_class=2, val_per_class=1, seed=3)
    for subset, per_class in (("train", 2), ("val", 1)):
        classes, samples = find_image_folder(str(root / subset))
        assert sorted(classes) == sorted(PHOTOGRAPHS) and len(samples) == per_class * len(PHOTOGRAPHS)
        for path, _ in samples:
            with Image.open(path) as image:
                assert image.format == "JPEG" and image.mode == "RGB" and image.size in ((500, 375), (375, 500))

    again = build(tmp_path / "b", train_per_class=2, val_per_class=1, seed=3)
    files = sorted(p.relative_to(root) for p in root.rglob("*.jpg"))
    assert files == sorted(p.relative_to(again) for p in again.rglob("*.jpg"))
    assert all((root / f).read_bytes() == (again / f).read_bytes() for f in files)

    marker = root / "train" / PHOTOGRAPHS[0] / "kept.txt"
    marker.write_text("a complete set is not rebuilt")
    build(root, train_per_class=2, val_per_class=1, seed=3)
    assert marker.exists()
    build(root, train_per_class=1, val_per_class=1, seed=3)  # other arguments: rebuilt from scratch
    assert not marker.exists() and json.loads((root / "manifest.json").read_text())["train_per_class"] == 1
    assert len(list((root / "train").rglob("*.jpg"))) == len(PHOTOGRAPHS)


def _user_files_and_old_conversions(root):
    """Beside a built demo set: the user's notes and run, conversions of its splits (the FFCV pipeline's
    train.beton, an unfinished one's work directory, DALI records under a name of the user's) and a .beton
    of another source."""
    (root / "NOTES.txt").write_text("keep")
    (root / "myrun").mkdir()
    (root / "myrun" / "important.pth").write_bytes(b"weights")
    for output, source in (("train.beton", root / "train"), ("shards", root / "val"), ("mine.beton", root.parent)):
        (root / f"{output}.report.json").write_text(json.dumps({"source": str(source), "output": str(root / output)}))
    (root / "train.beton").write_bytes(b"old images")
    (root / ".val.beton.parts").mkdir()
    (root / ".val.beton.parts" / "job.json").write_text("{}")
    (root / "shards").mkdir()
    (root / "shards" / "dataset.json").write_text("{}")
    (root / "mine.beton").write_bytes(b"another source")


def test_a_rebuild_replaces_only_the_set_and_its_conversions(tmp_path):
    """A rebuild deleted the whole folder, the user's files in it too. It removes train/, val/ and the
    conversions of them (a stale train.beton of the same file names would be read as current), nothing else."""
    root = build(tmp_path / "demo", train_per_class=1, val_per_class=1)
    _user_files_and_old_conversions(root)
    old = (root / "train" / PHOTOGRAPHS[0] / f"{PHOTOGRAPHS[0]}_0000.jpg").read_bytes()
    build(root, train_per_class=1, val_per_class=1, seed=1)
    assert sorted(p.name for p in root.iterdir()) == ["NOTES.txt", "manifest.json", "mine.beton",
                                                      "mine.beton.report.json", "myrun", "train", "val"]
    assert (root / "NOTES.txt").read_text() == "keep" and (root / "myrun" / "important.pth").read_bytes() == b"weights"
    assert (root / "mine.beton").read_bytes() == b"another source"
    assert json.loads((root / "manifest.json").read_text())["seed"] == 1
    assert (root / "train" / PHOTOGRAPHS[0] / f"{PHOTOGRAPHS[0]}_0000.jpg").read_bytes() != old
    assert [len(list((root / split).rglob("*.jpg"))) for split in ("train", "val")] == [len(PHOTOGRAPHS)] * 2


def test_the_command_names_each_old_conversion_a_rebuild_removes(tmp_path, capsys):
    from tools.make_demo_data import main
    root = tmp_path / "demo"
    main([str(root), "--train-per-class", "1", "--val-per-class", "1"])
    _user_files_and_old_conversions(root)
    capsys.readouterr()
    main([str(root), "--train-per-class", "1", "--val-per-class", "1", "--seed", "1"])
    removed = ["shards", "shards.report.json", "train.beton", "train.beton.report.json", ".val.beton.parts"]
    assert capsys.readouterr().out.splitlines() == [
        *(f"removed {root / name} (converted from the demo set's old images)" for name in removed),
        f"demo dataset: {root} ({len(PHOTOGRAPHS)} classes, {2 * len(PHOTOGRAPHS)} JPEGs)"]
    assert (root / "NOTES.txt").read_text() == "keep" and (root / "myrun" / "important.pth").is_file()


def test_a_rebuild_cut_short_while_removing_is_rebuilt_by_the_next_build(tmp_path, monkeypatch):
    """The old set is marked incomplete before anything of it is removed: a Ctrl-C there, then a build with the old
    arguments, must not reuse a set that lost its train/ or its images."""
    import pipelines.demo_data
    root = build(tmp_path / "demo", train_per_class=1, val_per_class=1)
    with monkeypatch.context() as patch:
        def stopped(path):
            raise KeyboardInterrupt
        patch.setattr(pipelines.demo_data, "_remove", stopped)
        (root / "train.beton").write_bytes(b"old images")
        with pytest.raises(KeyboardInterrupt):
            build(root, train_per_class=1, val_per_class=1, seed=1)
    shutil.rmtree(root / "train")  # as if the Ctrl-C had come part-way through train/
    build(root, train_per_class=1, val_per_class=1)
    assert "complete" not in json.loads((root / "manifest.json").read_text()) and not (root / "train.beton").exists()
    assert len(list((root / "train").rglob("*.jpg"))) == len(PHOTOGRAPHS)


def test_a_folder_that_is_not_a_demo_set_is_never_deleted(tmp_path, monkeypatch, capsys):
    from tools.make_demo_data import main
    theirs = tmp_path / "photos"
    theirs.mkdir()
    (theirs / "holiday.jpg").write_bytes(b"not ours")
    monkeypatch.setattr("sys.argv", ["make_demo_data", str(theirs)])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2 and (theirs / "holiday.jpg").read_bytes() == b"not ours"
    assert capsys.readouterr().err == (f"error: {theirs} holds files that are not a demo set (it has no demo set's manifest.json); "
                                       f"name a new or empty directory for the demo data\n")

    empty = build(tmp_path / "empty", train_per_class=1, val_per_class=1)  # an empty folder is used
    assert json.loads((empty / "manifest.json").read_text())["train_per_class"] == 1


@pytest.mark.parametrize("manifest", ['{"name": "my project"}', "not JSON", "[1]"])
def test_a_folder_with_a_manifest_json_of_its_own_is_never_deleted(tmp_path, monkeypatch, capsys, manifest):
    from tools.make_demo_data import main
    theirs = tmp_path / "project"
    theirs.mkdir()
    (theirs / "manifest.json").write_text(manifest)
    (theirs / "thesis.tex").write_text("precious")
    monkeypatch.setattr("sys.argv", ["make_demo_data", str(theirs), "--train-per-class", "1", "--val-per-class", "1"])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2 and (theirs / "thesis.tex").read_text() == "precious"
    assert (theirs / "manifest.json").read_text() == manifest and sorted(p.name for p in theirs.iterdir()) == [
        "manifest.json", "thesis.tex"]
    assert capsys.readouterr().err.startswith(f"error: {theirs} holds files that are not a demo set")


def test_a_file_given_as_the_demo_folder_is_one_error_line(tmp_path, monkeypatch, capsys):
    from tools.make_demo_data import main
    theirs = tmp_path / "notes.txt"
    theirs.write_text("precious")
    monkeypatch.setattr("sys.argv", ["make_demo_data", str(theirs)])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2 and theirs.read_text() == "precious"
    assert capsys.readouterr().err == (f"error: {theirs} is not a directory; name a new or empty directory for the "
                                       f"demo data\n")


def test_a_set_cut_short_is_rebuilt(tmp_path, monkeypatch):
    """A build stopped part-way (Ctrl-C) leaves a manifest that says so; the next build starts again."""
    import pipelines.demo_data
    root = tmp_path / "demo"
    real = pipelines.demo_data.random_crops
    with monkeypatch.context() as patch:
        def stopped(*args):
            yield from list(real(*args))[:1]
            raise KeyboardInterrupt
        patch.setattr(pipelines.demo_data, "random_crops", stopped)
        with pytest.raises(KeyboardInterrupt):
            build(root, train_per_class=2, val_per_class=1)
    assert json.loads((root / "manifest.json").read_text())["complete"] is False
    build(root, train_per_class=2, val_per_class=1)
    assert "complete" not in json.loads((root / "manifest.json").read_text())
    assert len(list((root / "train").rglob("*.jpg"))) == 2 * len(PHOTOGRAPHS)


def test_each_image_is_written_before_the_next_is_made(tmp_path, monkeypatch):
    """A class's crops are not all held before the first is written (10,000 of them are 5.6 GB)."""
    import pipelines.demo_data
    made, saved_after = [], []
    monkeypatch.setattr(pipelines.demo_data.Image, "fromarray",
                        lambda *args, fromarray=Image.fromarray: made.append(1) or fromarray(*args))
    monkeypatch.setattr(Image.Image, "save", lambda image, *args, save=Image.Image.save, **kw:
                        saved_after.append(len(made)) or save(image, *args, **kw))
    build(tmp_path / "demo", train_per_class=3, val_per_class=2)
    assert saved_after == list(range(1, 5 * len(PHOTOGRAPHS) + 1))


def test_a_demo_folder_given_with_imagenet_like_is_refused_not_ignored(tmp_path, monkeypatch, capsys):
    from tools.make_demo_data import main
    monkeypatch.setattr("sys.argv", ["make_demo_data", str(tmp_path / "demo"), "--imagenet-like", "3",
                                     str(tmp_path / "inl"), "--workers", "1"])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2 and list(tmp_path.iterdir()) == []
    assert capsys.readouterr().err == (f"error: --imagenet-like N DIR writes into DIR; the folder {tmp_path / 'demo'} "
                                       f"is for the demo set only (see --help)\n")


def test_a_negative_seed_is_one_error_line_before_anything_is_written(tmp_path, monkeypatch, capsys):
    from tools.make_demo_data import main
    monkeypatch.setattr("sys.argv", ["make_demo_data", str(tmp_path / "demo"), "--seed", "-1"])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2 and list(tmp_path.iterdir()) == []
    assert capsys.readouterr().err == "error: --seed must be at least 0, got -1 (see --help)\n"


def test_fewer_imagenet_like_images_than_classes_says_how_many_classes_it_holds(tmp_path, capsys):
    """Image i is in class i % --classes: 4 images of 8 classes are 4 class folders, not the 8 it reported."""
    from tools.make_demo_data import main
    root = tmp_path / "inl"
    main(["--imagenet-like", "4", str(root), "--classes", "8", "--workers", "1"])
    assert capsys.readouterr().out == (f"ImageNet-like dataset: {root} (4 classes, 4 JPEGs; the other 4 of --classes 8 "
                                       f"get images once N is at least 8)\n")
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == [f"n{c:08d}" for c in range(4)]


def test_the_imagenet_like_command_writes_the_set_and_rejects_bad_workers(tmp_path, monkeypatch, capsys):
    from tools.make_demo_data import main
    root = tmp_path / "inl"
    monkeypatch.setattr("sys.argv", ["make_demo_data", "--imagenet-like", "6", str(root), "--workers", "2"])
    main()
    assert capsys.readouterr().out == (f"ImageNet-like dataset: {root} (6 classes, 6 JPEGs; the other 4 of --classes "
                                       f"10 get images once N is at least 10)\n")
    assert len(list(root.rglob("*.jpg"))) == 6
    monkeypatch.setattr("sys.argv", ["make_demo_data", "--imagenet-like", "6", str(root), "--workers", "0"])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines() == ["error: --workers must be at least 1, got 0 (see --help)"]


def _main_error(argv: list[str], capsys) -> tuple[int, str]:
    from tools.make_demo_data import main
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    return exit_.value.code, capsys.readouterr().err


def test_a_folder_that_cannot_be_written_is_named_in_full_with_what_to_do(tmp_path, monkeypatch, capsys):
    """A read-only working directory gave "error: [Errno 30] Read-only file system: 'data'": a raw errno and a
    relative name. Root writes any directory, so the folder is made impossible by a file in its way."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").write_text("a file where the default data/demo needs a folder")
    assert _main_error([], capsys) == (2, (
        f"error: cannot write the demo set into {tmp_path}/data/demo ({tmp_path}/data/demo: Not a directory); "
        f"give a folder you can write to: python -m tools.make_demo_data DIR\n"))
    assert _main_error(["--imagenet-like", "4", "data/inl"], capsys) == (2, (
        f"error: cannot write the ImageNet-like set into {tmp_path}/data/inl ({tmp_path}/data/inl: Not a directory); "
        f"give a folder you can write to: python -m tools.make_demo_data --imagenet-like 4 DIR\n"))
    assert (tmp_path / "data").is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_a_read_only_file_system_is_named_with_the_folder_it_refused(tmp_path, monkeypatch, capsys):
    """The tester's case, raised where `build` met it: mkdir of the relative 'data' on a read-only mount."""
    import errno
    import os

    def read_only(root, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), "data")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("tools.make_demo_data.build", read_only)
    assert _main_error([], capsys) == (2, (
        f"error: cannot write the demo set into {tmp_path}/data/demo ({tmp_path}/data: Read-only file system); "
        f"give a folder you can write to: python -m tools.make_demo_data DIR\n"))

    def unreadable_photograph(root, *args, **kwargs):  # not a write of the folder: not said to be one
        raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), "/site-packages/skimage/data/astronaut.png")
    monkeypatch.setattr("tools.make_demo_data.build", unreadable_photograph)
    assert _main_error([], capsys) == (2, "error: [Errno 2] No such file or directory: "
                                          "'/site-packages/skimage/data/astronaut.png'\n")
