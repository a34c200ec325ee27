"""pipelines.convert and its CLI tools.convert: validation, mode conversion, report, atomic output,
and read-back of both formats with the stock FFCV Loader and the stock DALI webdataset reader (CPU)."""
from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.base import DataError, find_image_folder
from pipelines.convert import convert
from pipelines.dali_format import write_dali
from pipelines.ffcv_format import write_ffcv
from pipelines.images import ImagePrep
from tools.convert import main as convert_main

MAX_RES = 64          # every kept test image ends up 64x48 (SimpleRGBImageDecoder needs one size)
SIZE = (64, 48)
REPO = Path(__file__).resolve().parents[1]


def _cli(args: list[str]) -> int:
    """The exit status `python -m tools.convert ARGS` would have."""
    try:
        return convert_main(args)
    except SystemExit as exit_:
        return exit_.code


def _smooth(rng, size=SIZE, channels=3) -> np.ndarray:
    low = rng.integers(0, 256, size=(4, 4, channels)).astype(np.uint8)
    mode = "RGB" if channels == 3 else "L"
    return np.asarray(Image.fromarray(low.squeeze(), mode).resize(size, Image.BICUBIC))


def _rgb(array: np.ndarray) -> np.ndarray:
    return np.repeat(array[..., None], 3, axis=2) if array.ndim == 2 else array


def _build_source(root: Path) -> dict[str, tuple[int, np.ndarray | None]]:
    """Write the test ImageFolder; returns {relative path: (label, expected stored pixels or None=skipped)}.

    Expected pixels are computed here independently of the converter.
    """
    rng = np.random.default_rng(1)
    expected: dict[str, tuple[int, np.ndarray | None]] = {}
    for name in ("a", "b", "c"):
        (root / name).mkdir(parents=True)

    def save_jpeg(rel, array, label, **kw):
        Image.fromarray(array).save(root / rel, quality=95, **kw)
        expected[rel] = (label, np.asarray(Image.open(root / rel).convert("RGB")))

    # plain RGB JPEGs (stored byte-for-byte in the DALI shards)
    save_jpeg("a/a0.jpg", _smooth(rng), 0)
    save_jpeg("a/a1.jpg", _smooth(rng), 0)
    save_jpeg("b/b0.jpg", _smooth(rng), 1)
    save_jpeg("c/c0.jpg", _smooth(rng), 2)
    # twice the limit: resized to 64x48; INTER_AREA at exactly 2x is a 2x2 box average
    Image.fromarray(_smooth(rng, size=(128, 96))).save(root / "a/a_big.jpg", quality=95)
    big = np.asarray(Image.open(root / "a/a_big.jpg")).astype(np.float64)
    expected["a/a_big.jpg"] = (0, np.round(big.reshape(48, 2, 64, 2, 3).mean(axis=(1, 3))).astype(np.uint8))
    # grayscale PNG: channel replicated
    gray = _smooth(rng, channels=1)
    Image.fromarray(gray, "L").save(root / "a/a_gray.png")
    expected["a/a_gray.png"] = (0, _rgb(gray))
    # CMYK JPEG: Pillow's plain CMYK -> RGB
    Image.fromarray(_smooth(rng)).convert("CMYK").save(root / "b/b_cmyk.jpg", quality=95)
    expected["b/b_cmyk.jpg"] = (1, np.asarray(Image.open(root / "b/b_cmyk.jpg").convert("RGB")))
    # RGBA PNG, top-left 16x16 fully transparent, a band half transparent: composited over white
    colour = _smooth(rng)
    alpha = np.full(SIZE[::-1], 255, np.uint8)
    alpha[:16, :16] = 0
    alpha[32:, :] = 128
    Image.fromarray(np.dstack([colour, alpha]), "RGBA").save(root / "b/b_rgba.png")
    a = alpha[..., None].astype(np.float64) / 255
    expected["b/b_rgba.png"] = (1, np.round(colour * a + 255 * (1 - a)).astype(np.uint8))
    # 16-bit grayscale PNG (a full-range ramp): scaled by 255/65535, not clipped at 255
    ramp = np.tile(np.linspace(0, 65535, SIZE[0]).astype(np.uint16), (SIZE[1], 1))
    Image.fromarray(ramp).save(root / "c/c16.png")
    assert Image.open(root / "c/c16.png").mode.startswith("I")
    expected["c/c16.png"] = (2, _rgb(np.round(ramp / 257).astype(np.uint8)))
    # palette PNG without transparency, and RGBA that is fully opaque: lossless conversions
    ramp_palette = np.stack([np.arange(64) * 4, 255 - np.arange(64) * 3, np.full(64, 90)], axis=1).astype(np.uint8)
    pal = Image.fromarray(np.tile(np.arange(64, dtype=np.uint8), (SIZE[1], 1)), "P")
    pal.putpalette(ramp_palette.reshape(-1).tolist())
    pal.save(root / "c/c_pal.png")
    assert Image.open(root / "c/c_pal.png").mode == "P"
    expected["c/c_pal.png"] = (2, np.broadcast_to(ramp_palette, (SIZE[1], 64, 3)).copy())
    opaque = _smooth(rng)
    Image.fromarray(np.dstack([opaque, np.full(SIZE[::-1], 255, np.uint8)]), "RGBA").save(root / "c/c_opaque.png")
    expected["c/c_opaque.png"] = (2, opaque)
    # unusable files
    (root / "a/a_zero.jpg").write_bytes(b"")
    data = (root / "a/a0.jpg").read_bytes()
    (root / "b/b_trunc.jpg").write_bytes(data[: len(data) // 2])
    (root / "c/c_text.jpg").write_text("this is not an image\n")
    for rel in ("a/a_zero.jpg", "b/b_trunc.jpg", "c/c_text.jpg"):
        expected[rel] = ("abc".index(rel[0]), None)
    return expected


SKIP_REASONS = {"a/a_zero.jpg": "empty", "b/b_trunc.jpg": "truncated", "c/c_text.jpg": "not a recognised image"}
CONVERTED = {"a/a_gray.png", "b/b_cmyk.jpg", "b/b_rgba.png", "c/c16.png", "c/c_pal.png", "c/c_opaque.png"}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert_src") / "folder"
    return root, _build_source(root)


@pytest.fixture(scope="module")
def kept(source):
    """(label, expected pixels) of the kept images in ImageFolder order (sorted class, sorted path)."""
    root, expected = source
    _, samples = find_image_folder(root)
    rels = [str(Path(p).relative_to(root)) for p, _ in samples]
    return [(expected[r][0], expected[r][1], r) for r in rels if expected[r][1] is not None]


@pytest.fixture(scope="module")
def outputs(source, tmp_path_factory):
    root, _ = source
    out = tmp_path_factory.mktemp("convert_out")
    ffcv = convert(root, out / "data.beton", "ffcv", max_resolution=MAX_RES, workers=2, progress=False)
    dali = convert(root, out / "shards", "dali", max_resolution=MAX_RES, workers=1, shard_size=5,
                        progress=False)
    return out, ffcv, dali


def _mad(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.abs(x.astype(np.int16) - y.astype(np.int16)).mean())


# ---------------------------------------------------------------------------------------------
# reports
# ---------------------------------------------------------------------------------------------

def test_report_lists_skipped_and_converted(outputs, source):
    out, ffcv_report, dali_report = outputs
    root, _ = source
    for name, returned in (("data.beton", ffcv_report), ("shards", dali_report)):
        report = json.loads((out / f"{name}.report.json").read_text())
        assert report == returned
        assert report["written"] == 11 and report["skipped"] == 3 and report["converted"] == len(CONVERTED)
        by_rel = {str(Path(f["path"]).relative_to(root)): f for f in report["files"]}
        assert set(by_rel) == set(SKIP_REASONS) | CONVERTED  # plain RGB and resized files are not listed
        for rel, word in SKIP_REASONS.items():
            assert by_rel[rel]["status"] == "skipped" and word in by_rel[rel]["reason"]
        for rel in CONVERTED:
            assert by_rel[rel]["status"] == "converted" and by_rel[rel]["reason"].startswith("converted")
        assert "composited over white" in by_rel["b/b_rgba.png"]["reason"]
        assert "alpha fully opaque" in by_rel["c/c_opaque.png"]["reason"]
        assert "16-bit" in by_rel["c/c16.png"]["reason"]


def test_no_temporary_files_left(outputs):
    out, _, _ = outputs
    assert sorted(p.name for p in out.iterdir()) == ["data.beton", "data.beton.report.json",
                                                     "shards", "shards.report.json"]
    shard_files = sorted(p.name for p in (out / "shards").iterdir())
    assert shard_files == ["dataset.json"] + [f"shard-0000{i}.{e}" for i in range(3) for e in ("idx", "tar")]


# ---------------------------------------------------------------------------------------------
# FFCV read-back with the stock Loader
# ---------------------------------------------------------------------------------------------

def test_ffcv_beton_reads_back(outputs, kept):
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import ToTensor

    out, _, _ = outputs
    loader = Loader(str(out / "data.beton"), batch_size=5, num_workers=1, order=OrderOption.SEQUENTIAL,
                    drop_last=False, pipelines={"image": [SimpleRGBImageDecoder()],
                                                "label": [IntDecoder(), ToTensor()]})
    images, labels = [], []
    for image, label in loader:
        images.extend(np.asarray(image))
        labels.extend(int(v) for v in label.reshape(-1))
    assert len(images) == len(kept) == 11
    assert labels == [label for label, _, _ in kept]
    for image, (_, want, rel) in zip(images, kept):
        assert image.shape == (48, 64, 3), rel
        assert _mad(image, want) < 4, rel  # same pixels up to one JPEG generation


# ---------------------------------------------------------------------------------------------
# DALI read-back with the stock webdataset reader and our index files
# ---------------------------------------------------------------------------------------------

def _read_dali(root: Path) -> tuple[list[np.ndarray], list[int]]:
    from nvidia.dali import fn, pipeline_def, types

    meta = json.loads((root / "dataset.json").read_text())

    @pipeline_def(batch_size=4, num_threads=1, device_id=None, prefetch_queue_depth=1)
    def pipe():
        jpegs, cls = fn.readers.webdataset(
            paths=[str(root / s["tar"]) for s in meta["shards"]],
            index_paths=[str(root / s["index"]) for s in meta["shards"]],
            ext=["jpg", "cls"], missing_component_behavior="error", name="reader")
        return fn.decoders.image(jpegs, device="cpu", output_type=types.RGB), cls

    p = pipe()
    p.build()
    total = p.epoch_size("reader")
    assert total == meta["num_samples"]
    images, labels = [], []
    while len(images) < total:
        batch_images, batch_labels = p.run()
        for i in range(len(batch_images)):
            images.append(np.asarray(batch_images.at(i)))
            labels.append(int(bytes(np.asarray(batch_labels.at(i))).decode("ascii")))
    return images[:total], labels[:total]


def test_dali_shards_read_back(outputs, kept):
    out, _, _ = outputs
    meta = json.loads((out / "shards" / "dataset.json").read_text())
    assert meta["num_samples"] == 11 and meta["classes"] == ["a", "b", "c"] and meta["num_classes"] == 3
    assert [s["num_samples"] for s in meta["shards"]] == [5, 5, 1]
    images, labels = _read_dali(out / "shards")
    assert sorted(labels) == sorted(label for label, _, _ in kept)
    # Shards are shuffled: pair each decoded image with the expected image it matches best.
    unmatched = list(range(len(kept)))
    for image, label in zip(images, labels):
        assert image.shape == (48, 64, 3)
        best = min(unmatched, key=lambda j: _mad(image, kept[j][1]))
        assert _mad(image, kept[best][1]) < 4, kept[best][2]
        assert label == kept[best][0], kept[best][2]
        unmatched.remove(best)
    assert not unmatched


def test_dali_plain_jpegs_stored_byte_for_byte(outputs, source):
    out, _, _ = outputs
    root, _ = source
    originals = {(root / rel).read_bytes() for rel in ("a/a0.jpg", "a/a1.jpg", "b/b0.jpg", "c/c0.jpg")}
    stored = set()
    for tar in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(tar) as archive:
            stored |= {archive.extractfile(m).read() for m in archive if m.name.endswith(".jpg")}
    assert originals <= stored
    assert (root / "a/a_big.jpg").read_bytes() not in stored


def test_dali_index_matches_tar_and_wds2idx(outputs, tmp_path):
    out, _, _ = outputs
    root = out / "shards"
    for tar_path in sorted(root.glob("*.tar")):
        lines = (root / (tar_path.stem + ".idx")).read_text().splitlines()
        version, count = lines[0].split()
        assert version == "v1.2" and int(count) == len(lines) - 1
        with tarfile.open(tar_path) as archive:
            members = {m.name: archive.extractfile(m).read() for m in archive}
        raw = tar_path.read_bytes()
        seen = []
        for line in lines[1:]:
            fields = line.split()
            assert len(fields) == 8  # two components: ext offset size name
            for ext, offset, size, name in zip(*[iter(fields)] * 4):
                offset, size = int(offset), int(size)
                assert offset % 512 == 0 and name.endswith("." + ext)
                assert raw[offset:offset + size] == members[name]
                seen.append(name)
        assert sorted(seen) == sorted(members)
        # and the reference indexer that ships with DALI agrees byte for byte
        wds2idx = pytest.importorskip("wds2idx")
        creator = wds2idx.IndexCreator(str(tar_path), str(tmp_path / "ref.idx"), verbose=False)
        creator.create_index()
        creator.close()
        assert (tmp_path / "ref.idx").read_text() == (root / (tar_path.stem + ".idx")).read_text()


# ---------------------------------------------------------------------------------------------
# text-list source, --force, CLI errors
# ---------------------------------------------------------------------------------------------

def test_text_list_source(source, tmp_path):
    root, expected = source
    lst = root.parent / "list.txt"
    lst.write_text("# path label\n"
                   "folder/a/a0.jpg 7\n"
                   f"{root / 'b/b_rgba.png'} 3\n"      # absolute path
                   "\n"
                   "folder/c/c0.jpg 0\n"
                   "folder/missing.jpg 1\n"
                   "folder/b/b_trunc.jpg 1\n")
    dst = tmp_path / "listed"
    report = convert(lst, dst, "dali", max_resolution=MAX_RES, workers=1, progress=False)
    assert report["written"] == 3 and report["skipped"] == 2
    reasons = {Path(f["path"]).name: f["reason"] for f in report["files"] if f["status"] == "skipped"}
    assert "not found" in reasons["missing.jpg"] and "truncated" in reasons["b_trunc.jpg"]
    meta = json.loads((dst / "dataset.json").read_text())
    assert meta["num_classes"] == 8 and meta["num_samples"] == 3
    images, labels = _read_dali(dst)
    assert sorted(labels) == [0, 3, 7]
    for image, label in zip(images, labels):
        rel = {7: "a/a0.jpg", 3: "b/b_rgba.png", 0: "c/c0.jpg"}[label]
        assert _mad(image, expected[rel][1]) < 4


def test_existing_output_needs_force(source, tmp_path, capsys):
    root, _ = source
    dst = tmp_path / "out"
    args = [str(root), str(dst), "--format", "dali", "--max-resolution", str(MAX_RES), "--workers", "1"]
    assert _cli(args) == 0
    first = json.loads((dst / "dataset.json").read_text())
    before = {p.name: p.read_bytes() for p in dst.iterdir()}
    capsys.readouterr()

    assert _cli(args + ["--jpeg-quality", "50"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error:") and str(dst) in err and "--force" in err
    assert {p.name: p.read_bytes() for p in dst.iterdir()} == before

    assert _cli(args + ["--jpeg-quality", "50", "--force"]) == 0
    second = json.loads((dst / "dataset.json").read_text())
    assert first["jpeg_quality"] == 90 and second["jpeg_quality"] == 50
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "out.report.json"]

    beton = tmp_path / "x.beton"
    beton.write_bytes(b"keep me")
    assert _cli([str(root), str(beton), "--format", "ffcv", "--workers", "1"]) == 2
    assert beton.read_bytes() == b"keep me"


@pytest.mark.parametrize("case", ["missing", "empty", "bad_list", "bad_quality"])
def test_cli_errors_are_one_line(case, tmp_path, capsys, source):
    root, _ = source
    extra = []
    if case == "missing":
        src = tmp_path / "nowhere"
    elif case == "empty":
        src = tmp_path / "empty"
        (src / "class0").mkdir(parents=True)
    elif case == "bad_list":
        src = tmp_path / "list.txt"
        src.write_text("a.jpg 0\nb.jpg zero\n")
    else:
        src, extra = root, ["--jpeg-quality", "101"]
    code = _cli([str(src), str(tmp_path / "out"), "--format", "ffcv", *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error:") and "\n" not in err and "Traceback" not in err
    if case != "bad_quality":
        assert str(src) in err
    assert not (tmp_path / "out").exists()


def test_cli_subprocess_missing_source(tmp_path):
    result = subprocess.run([sys.executable, "-m", "tools.convert", str(tmp_path / "nope"), str(tmp_path / "o"),
                             "--format", "dali"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("error: source") and str(tmp_path / "nope") in result.stderr


def test_all_skipped_is_an_error_with_report(tmp_path, capsys):
    (tmp_path / "src" / "k").mkdir(parents=True)
    (tmp_path / "src" / "k" / "x.jpg").write_bytes(b"")
    assert _cli([str(tmp_path / "src"), str(tmp_path / "o.beton"), "--format", "ffcv", "--workers", "1"]) == 2
    assert "no usable images" in capsys.readouterr().err
    assert not (tmp_path / "o.beton").exists()
    assert json.loads((tmp_path / "o.beton.report.json").read_text())["skipped"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.beton.report.json", "src"]


def test_target_size_matches_ffcv_rounding():
    from ffcv.fields.rgb_image import resizer
    prep = ImagePrep(max_resolution=64)
    for w, h in [(128, 96), (500, 375), (375, 500), (65, 1000), (64, 64), (10, 7)]:
        image = np.zeros((h, w, 3), np.uint8)
        assert prep.target_size(w, h) == resizer(image, 64).shape[1::-1]


@pytest.mark.parametrize("fmt", ["ffcv", "dali"])
def test_writer_failure_aborts_instead_of_hanging(fmt, source, tmp_path):
    """A file that vanished after validation must abort the write (FFCV workers would hang)."""
    root, _ = source
    samples = [(str(root / "a/a0.jpg"), 0), (str(tmp_path / "vanished.jpg"), 1)]
    prep = ImagePrep(max_resolution=MAX_RES)
    with pytest.raises(DataError, match="vanished.jpg"):
        if fmt == "ffcv":
            write_ffcv(tmp_path / "x.beton", samples, prep, workers=1)
        else:
            (tmp_path / "x").mkdir()
            write_dali(tmp_path / "x", samples, prep, workers=1, shard_size=10, classes=("a", "b"),
                       show_progress=False)
