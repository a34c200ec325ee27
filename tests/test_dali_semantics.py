"""tools.dali_semantics: bad arguments and unusable data are one `error:` line, not a traceback."""
from __future__ import annotations

import shutil

import pytest

from tools.dali_semantics import main


def error_lines(capsys, *args: str) -> list[str]:
    """What a run of `main(args)` that exits 2 prints on stderr, by line."""
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    assert exc.value.code == 2
    return capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("option, value, least", [("--batch-size", "0", 1), ("--samples", "0", 1),
                                                  ("--replay", "-1", 0), ("--workers", "-1", 0)])
def test_an_unusable_number_is_one_error_line(option, value, least, capsys):
    assert error_lines(capsys, option, value) == [f"error: {option} must be at least {least}, got {value} (see --help)"]


@pytest.mark.parametrize("size", ["0", "7", "1025", "100000"])
def test_an_image_size_out_of_range_is_one_error_line_before_any_work(size, tmp_path, capsys):
    # 100000 px went on to build DALI and PIL views of that side until memory ran out, with a traceback
    report, missing = tmp_path / "report.json", tmp_path / "missing"
    assert error_lines(capsys, "--image-size", size, "--data", str(missing), "--json", str(report)) == [
        f"error: --image-size must lie in 8..1024 pixels, got {size} (see --help)"]
    assert list(tmp_path.iterdir()) == []
    for bound in ("8", "1024"):  # the bounds pass, on to the first check of the work: the data directory
        assert error_lines(capsys, "--image-size", bound, "--data", str(missing), "--json", str(report)) == [
            f"error: --data {missing} does not exist; give an ImageFolder directory"]


def test_more_replays_than_samples_are_refused_and_a_file_as_data_is_named(tmp_path, capsys):
    """--replay 100 --samples 16 replayed 16 without a word; a .beton as --data was 'not a directory' with
    advice to pass the --data that was passed."""
    assert error_lines(capsys, "--replay", "100", "--samples", "16") == [
        "error: --replay 100 exceeds --samples 16: only 16 views of each kind are made; give at most that (see --help)"]
    beton = tmp_path / "train.beton"
    beton.write_bytes(b"")
    assert error_lines(capsys, "--data", str(beton), "--samples", "16") == [
        f"error: --data {beton} is a file; give an ImageFolder directory"]


def test_unusable_data_is_one_error_line(image_folder, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert error_lines(capsys, "--data", str(empty)) == [
        f"error: data directory {empty} holds no images in class sub-directories (expected {empty}/<class>/<image>.jpg)"]
    folder = tmp_path / "corrupt"
    shutil.copytree(image_folder, folder)
    (folder / "class1" / "zz_bad.jpg").write_bytes(b"plain text, not a JPEG")
    [line] = error_lines(capsys, "--data", str(folder), "--batch-size", "5", "--samples", "25", "--image-size", "16",
                         "--replay", "0", "--workers", "1")
    assert line.startswith(f"error: cannot read image(s) in {folder}: {folder / 'class1' / 'zz_bad.jpg'}: ")
