"""pipelines.convert and its CLI tools.convert: validation, mode conversion, report, atomic output,
and read-back of both formats with the stock FFCV Loader and the stock DALI webdataset reader (CPU)."""
from __future__ import annotations

import errno
import io
import json
import mmap
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bt_fast.errors import StorageError
from bt_fast.host import usable_cores
from conftest import modules_loaded_by
from pipelines import convert as convert_module
from pipelines import image_folder
from pipelines.convert import convert, outcome, report_path, work_dir
from pipelines.dali_format import ShardWriter
from pipelines.ffcv_format import BetonPart, beton_samples, page_size_for
from pipelines.image_folder import count_images, find_image_folder
from pipelines.images import ImagePrep, decode_source_image
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
def source(module_tmp):
    root = module_tmp("convert_src") / "folder"
    return root, _build_source(root)


@pytest.fixture(scope="module")
def kept(source):
    """(label, expected pixels) of the kept images in ImageFolder order (sorted class, sorted path)."""
    root, expected = source
    _, samples = find_image_folder(root)
    rels = [str(Path(p).relative_to(root)) for p, _ in samples]
    return [(expected[r][0], expected[r][1], r) for r in rels if expected[r][1] is not None]


@pytest.fixture(scope="module")
def outputs(source, module_tmp):
    root, _ = source
    out = module_tmp("convert_out")
    ffcv = convert(root, out / "data.beton", "ffcv", max_resolution=MAX_RES, workers=2, part_size=4, progress=False)
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
        assert report == {key: value for key, value in returned.items() if key != "this_run"}
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


def _encodings(root: Path) -> dict[str, bool]:
    """RGB JPEGs of SIZE in several encodings under root/k/; returns {file name: stored byte for byte}."""
    import cv2
    from PIL.JpegImagePlugin import get_sampling
    rng = np.random.default_rng(5)
    (root / "k").mkdir(parents=True)
    kept = {}
    for name, subsampling, code in (("s444.jpg", "4:4:4", 0), ("s422.jpg", "4:2:2", 1), ("s420.jpg", "4:2:0", 2)):
        Image.fromarray(_smooth(rng)).save(root / "k" / name, quality=90, subsampling=subsampling)
        assert get_sampling(Image.open(root / "k" / name)) == code
        kept[name] = True
    # restart markers (Pillow cannot write them): a DRI segment, then RSTn markers in the scan
    assert cv2.imwrite(str(root / "k" / "restart.jpg"), _smooth(rng)[..., ::-1], [cv2.IMWRITE_JPEG_RST_INTERVAL, 2])
    data = (root / "k" / "restart.jpg").read_bytes()
    assert b"\xff\xdd" in data and any(bytes([0xFF, 0xD0 + n]) in data for n in range(8))
    kept["restart.jpg"] = True
    Image.fromarray(_smooth(rng)).save(root / "k" / "progressive.jpg", quality=90, progressive=True)
    assert Image.open(root / "k" / "progressive.jpg").info.get("progressive")
    kept["progressive.jpg"] = False
    exif = Image.Exif()
    exif[0x0112] = 3  # upside down: same size once rotated
    Image.fromarray(_smooth(rng)).save(root / "k" / "rotated.jpg", quality=90, exif=exif)
    kept["rotated.jpg"] = False
    return kept


def test_kept_originals_decode_like_the_source_through_ffcv_and_our_decoder(tmp_path):
    """Baseline JPEGs of any chroma subsampling, with or without restart markers, are stored byte for
    byte in both formats and decode, through the stock FFCV Loader and through
    `pipelines.ffcv_decoders.decode_into`, to the pixels Pillow decodes from the source file (within
    FFCV's fast IDCT); progressive and EXIF-rotated files are re-encoded."""
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from PIL import ImageOps

    from pipelines.ffcv_decoders import decode_into
    from pipelines.images import frame_marker

    kept = _encodings(tmp_path / "src")
    report = convert(tmp_path / "src", tmp_path / "k.beton", "ffcv", max_resolution=MAX_RES, workers=1, progress=False)
    convert(tmp_path / "src", tmp_path / "shards", "dali", max_resolution=MAX_RES, workers=1, progress=False)
    assert report["written"] == 6 and report["converted"] == 1  # the rotation is noted
    paths = [Path(p) for p, _ in find_image_folder(tmp_path / "src")[1]]
    assert [frame_marker(p.read_bytes()) for p in paths] == [0xC2 if p.name == "progressive.jpg" else 0xC0
                                                             for p in paths]
    jpegs, _ = _stored(tmp_path / "k.beton")
    with tarfile.open(tmp_path / "shards" / "shard-00000.tar") as archive:
        in_shards = {archive.extractfile(m).read() for m in archive if m.name.endswith(".jpg")}
    loader = Loader(str(tmp_path / "k.beton"), batch_size=6, num_workers=1, order=OrderOption.SEQUENTIAL,
                    pipelines={"image": [SimpleRGBImageDecoder()], "label": [IntDecoder()]})
    (images, _), = list(loader)
    for path, stored, image in zip(paths, jpegs, np.asarray(images)):
        original = path.read_bytes()
        assert (stored == original) == kept[path.name], path.name
        assert (original in in_shards) == kept[path.name], path.name
        want = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
        error = np.abs(image.astype(np.int16) - want)
        if kept[path.name]:  # the original bytes: FFCV's fast IDCT against Pillow's accurate one
            assert error.max() <= 6 and error.mean() < 1.5, (path.name, error.max(), error.mean())
        else:  # one JPEG generation at quality 90
            assert error.mean() < 4, (path.name, error.mean())
        slot = np.zeros((SIZE[1], SIZE[0], 3), np.uint8)
        assert decode_into(np.frombuffer(stored, np.uint8), slot, SIZE[1], SIZE[0]) == 0
        assert np.array_equal(slot, image), path.name


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


def test_dali_shards_read_back(outputs, kept, source):
    out, _, _ = outputs
    meta = json.loads((out / "shards" / "dataset.json").read_text())
    assert meta["num_samples"] == 11 and meta["classes"] == ["a", "b", "c"] and meta["num_classes"] == 3
    # shard k: the usable files among positions 5k..5k+4 of the fixed permutation of the 14 sources
    _, samples = find_image_folder(source[0])
    usable = [source[1][str(Path(p).relative_to(source[0]))][1] is not None for p, _ in samples]
    order = np.random.default_rng(0).permutation(len(samples))
    assert [s["num_samples"] for s in meta["shards"]] == [sum(usable[i] for i in order[k:k + 5]) for k in (0, 5, 10)]
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


PLAIN = ("a/a0.jpg", "a/a1.jpg", "b/b0.jpg", "c/c0.jpg")  # baseline RGB JPEGs within the cap


def test_plain_jpegs_stored_byte_for_byte_in_both_formats(outputs, source):
    out, _, _ = outputs
    root, _ = source
    originals = {(root / rel).read_bytes() for rel in PLAIN}
    stored = set()
    for tar in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(tar) as archive:
            stored |= {archive.extractfile(m).read() for m in archive if m.name.endswith(".jpg")}
    beton = set(_stored(out / "data.beton")[0])
    for kept in (stored, beton):
        assert originals <= kept
        assert (root / "a/a_big.jpg").read_bytes() not in kept
        assert (root / "b/b_cmyk.jpg").read_bytes() not in kept


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
        import wds2idx  # DALI's own indexer, installed with it
        creator = wds2idx.IndexCreator(str(tar_path), str(tmp_path / "ref.idx"), verbose=False)
        creator.create_index()
        creator.close()
        assert (tmp_path / "ref.idx").read_text() == (root / (tar_path.stem + ".idx")).read_text()


# ---------------------------------------------------------------------------------------------
# text-list source, --force, CLI errors
# ---------------------------------------------------------------------------------------------

def test_shard_bytes_are_what_tarfile_writes(tmp_path):
    """ShardWriter writes the members itself; the file is byte for byte what the standard library's
    tarfile (USTAR, addfile) writes for the same members."""
    import io
    from pipelines.dali_format import ShardWriter
    rng = np.random.default_rng(2)
    keys = [f"{i:08d}" for i in range(6)] + ["123456789"]  # (past 10^8 samples a key has nine digits)
    samples = [(key, rng.bytes(int(rng.integers(1, 3000))), int(rng.integers(0, 1000))) for key in keys]
    writer = ShardWriter(tmp_path / "ours.tar")
    for key, data, label in samples:
        writer.add_sample(key, data, label)
    assert writer.close()["num_samples"] == 7
    with tarfile.open(tmp_path / "stdlib.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, data, label in samples:
            for name, member in ((f"{key}.jpg", data), (f"{key}.cls", str(label).encode())):
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = (
                    len(member), 0, 0o644, 0, 0, "", "")
                tar.addfile(info, io.BytesIO(member))
    assert (tmp_path / "ours.tar").read_bytes() == (tmp_path / "stdlib.tar").read_bytes()


def test_image_folder_scan_matches_sorted_rglob(tmp_path, monkeypatch):
    """The scandir walk lists exactly what the plain pathlib scan it replaced lists, in its order."""
    from pipelines.image_folder import IMAGE_SUFFIXES
    root = tmp_path / "folder"
    for rel in ("b/x.jpg", "b/a.JPEG", "b/a/z.png", "b/a.b/y.jpg", "b/a-b.jpg", "b/.hidden.jpg", "b/deep/er/k.webp",
                "b/notes.txt", "b/.jpg", "b/..jpg", "b/trail.jpg.", "a/1.jpg", "a/10.jpg", "a/2.jpg", "c/only.txt"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    (root / "b" / "dir.jpg").mkdir()
    (root / "elsewhere").mkdir()
    (root / "elsewhere" / "e.jpg").write_bytes(b"x")
    (root / "b" / "linked").symlink_to(root / "elsewhere")   # a linked directory is not followed
    (root / "b" / "dangling.jpg").symlink_to(root / "gone.jpg")  # a dangling link is listed (skipped later)
    (root / ".cache").mkdir()
    (root / ".cache" / "c.jpg").write_bytes(b"x")
    classes, samples = find_image_folder(root)
    reference = [(str(p), label) for label, name in enumerate(sorted(d.name for d in root.iterdir()
                                                                     if d.is_dir() and not d.name.startswith(".")))
                 for p in sorted((root / name).rglob("*"))
                 if p.suffix.lower() in IMAGE_SUFFIXES and (p.is_file() or p.is_symlink())]
    assert classes == ["a", "b", "c", "elsewhere"] and samples == reference and len(samples) == 13
    from torchvision.datasets.folder import IMG_EXTENSIONS  # a .pgm (grayscale) image was left out
    assert sorted(IMAGE_SUFFIXES) == sorted(IMG_EXTENSIONS)
    # count_images: the same images, counted class by class only as far as `enough` of them
    per_class = [sum(label == index for _, label in reference) for index in range(len(classes))]
    listed, below = [], image_folder._images_below
    monkeypatch.setattr(image_folder, "_images_below", lambda directory: listed.append(directory) or below(directory))
    for enough in (1, 4, 13, 100):
        listed.clear()
        needed = next((k for k in range(1, len(classes) + 1) if sum(per_class[:k]) >= enough), len(classes))
        assert (count_images(root, enough), len(listed)) == (sum(per_class[:needed]), needed), enough


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
    # the summary line counts the skipped files by reason, in the report's order where counts tie
    assert outcome(report) == (f"wrote 3 images to {dst} (2 skipped: 1 truncated or corrupt, 1 file not found; "
                               f"{report['converted']} converted; report: {dst}.report.json)")
    meta = json.loads((dst / "dataset.json").read_text())
    assert meta["num_classes"] == 8 and meta["num_samples"] == 3
    images, labels = _read_dali(dst)
    assert sorted(labels) == [0, 3, 7]
    for image, label in zip(images, labels):
        rel = {7: "a/a0.jpg", 3: "b/b_rgba.png", 0: "c/c0.jpg"}[label]
        assert _mad(image, expected[rel][1]) < 4


def test_a_list_file_with_a_byte_order_mark_loses_no_image(source, tmp_path):
    """Windows editors start a UTF-8 file with U+FEFF; it is no part of the first line's path."""
    root, expected = source
    lst = root.parent / "bom.txt"
    lst.write_bytes(b"\xef\xbb\xbf" + "folder/a/a0.jpg 0\nfolder/c/c0.jpg 1\n".encode())
    report = convert(lst, tmp_path / "bom", "dali", max_resolution=MAX_RES, workers=1, progress=False)
    assert report["written"] == 2 and report["skipped"] == 0 and report["files"] == []
    images, labels = _read_dali(tmp_path / "bom")
    assert sorted(labels) == [0, 1]
    for image, label in zip(images, labels):
        assert _mad(image, expected[["a/a0.jpg", "c/c0.jpg"][label]][1]) < 4


@pytest.mark.parametrize("label, problem", [
    ("x", "label 'x' is not an integer"), ("-1", "label -1 is negative"),
    ("1000000", "label 1000000 is above 999,999; the last column is the class index, counted from 0"),
    ("9" * 23, f"label {'9' * 23} is above 999,999; the last column is the class index, counted from 0")])
def test_a_list_file_label_that_is_no_class_index_names_its_line(label, problem, source, tmp_path, capsys):
    root, _ = source
    lst = root.parent / "labels.txt"
    lst.write_text(f"# images\nfolder/a/a0.jpg 0\nfolder/c/c0.jpg {label}\n")
    assert _cli([str(lst), str(tmp_path / "out"), "--format", "dali", "--workers", "1"]) == 2
    assert capsys.readouterr().err.splitlines() == [f"error: {lst} line 3: {problem}"]
    assert not (tmp_path / "out").exists()


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


def test_the_same_command_again_finds_its_output_current_and_a_changed_source_is_refused(source, tmp_path, capsys):
    """A rerun of a finished conversion was refused (exit 2), so `convert && train` failed the second time.
    It now rewrites nothing and exits 0, as `make` does, however SRC and DST are spelled; with another setting
    or a changed source it is refused, naming what differs."""
    root, _ = source
    src = tmp_path / "src"
    shutil.copytree(root / "a", src / "a")
    dst = tmp_path / "out.beton"
    args = [str(src), str(dst), "--format", "ffcv", "--workers", "1"]
    assert _cli(args) == 0
    capsys.readouterr()
    written = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in tmp_path.iterdir() if p.is_file()}

    assert _cli([f"{src}/", str(tmp_path / "." / "out.beton"), *args[2:]]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"{tmp_path / 'out.beton'} already holds the conversion of {src} with these settings (4 images; report: "
        f"{tmp_path / 'out.beton.report.json'}): nothing to do; --force converts again"]
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in tmp_path.iterdir() if p.is_file()} == written

    shutil.copy(src / "a" / "a0.jpg", src / "a" / "a0 copy.jpg")
    assert _cli(args) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: output {dst} already holds the FFCV dataset {dst} (4 samples); {src} now holds 6 images but {dst} was "
        f"converted from 5; pass --force to replace it (and its report {dst}.report.json)"]
    assert _cli(args + ["--force"]) == 0 and beton_samples(dst) == 5
    capsys.readouterr()
    shutil.rmtree(src)  # named as missing, not as a failed write
    assert _cli(args) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: source {src} does not exist (expected an ImageFolder directory or a '<path> <label>' list file)"]


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


@pytest.mark.parametrize("fmt", ["ffcv", "dali"])
def test_a_split_datasets_root_is_refused_as_training_refuses_it(fmt, source, tmp_path, capsys):
    """The root of train/ and val/ (`make_demo_data`'s, ImageNet's usual layout) converted as an ImageFolder
    stored the two splits as two classes, and training on the output read the validation images."""
    root, _ = source
    split = tmp_path / "split"
    split.mkdir()
    for name in ("train", "val"):
        (split / name).symlink_to(root, target_is_directory=True)
    out = tmp_path / ("out.beton" if fmt == "ffcv" else "out")
    assert _cli([str(split), str(out), "--format", fmt, "--workers", "1"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: source {split} holds train/ and val/: its two splits would be stored as two classes, the validation "
        f"images among the training ones; give {split / 'train'}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["split"]


@pytest.mark.parametrize("fmt, option, owner", [("dali", "--part-size", "ffcv"), ("ffcv", "--shard-size", "dali")])
def test_a_size_option_of_the_other_format_is_refused_not_ignored(fmt, option, owner, source, tmp_path, capsys):
    root, _ = source
    dst = tmp_path / "out"
    assert _cli([str(root), str(dst), "--format", fmt, option, "5", "--workers", "1"]) == 2
    assert capsys.readouterr().err == (f"error: {option} applies to --format {owner} only, not {fmt}; leave it out "
                                       f"(see --help)\n")
    assert sorted(tmp_path.iterdir()) == []


@pytest.mark.parametrize("empty", ["SRC", "DST"])
def test_an_empty_path_argument_is_refused_not_read_as_the_current_directory(empty, source, tmp_path, monkeypatch,
                                                                             capsys):
    root, _ = source
    (tmp_path / "cwd" / "class").mkdir(parents=True)
    (tmp_path / "cwd" / "class" / "x.jpg").write_bytes((root / "a" / "a0.jpg").read_bytes())
    monkeypatch.chdir(tmp_path / "cwd")
    src, dst = ("", str(tmp_path / "out.beton")) if empty == "SRC" else (str(root), "")
    assert _cli([src, dst, "--format", "ffcv", "--workers", "1"]) == 2
    assert capsys.readouterr().err == (f"error: {empty} is empty (an unset shell variable?); give a path, '.' for the "
                                       f"current directory (see --help)\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cwd"]
    assert sorted(p.name for p in (tmp_path / "cwd").iterdir()) == ["class"]


def test_an_empty_current_directory_as_dst_holds_the_shards(source, outputs, tmp_path, monkeypatch):
    root, _ = source
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    assert _cli([str(root), ".", "--format", "dali", "--max-resolution", str(MAX_RES), "--workers", "1",
                 "--shard-size", "5"]) == 0
    reference = outputs[0] / "shards"
    assert sorted(p.name for p in (tmp_path / "here").iterdir()) == sorted(p.name for p in reference.iterdir())
    assert all((tmp_path / "here" / p.name).read_bytes() == p.read_bytes() for p in reference.iterdir())
    assert json.loads((tmp_path / "here.report.json").read_text())["written"] == outputs[2]["written"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here", "here.report.json"]


@pytest.mark.parametrize("below", ["out.beton", "sub/out.beton"])
def test_a_file_where_dsts_directory_should_be_is_named_as_such(below, source, tmp_path, capsys):
    root, _ = source
    (tmp_path / "notes").write_text("precious")
    dst = tmp_path / "notes" / below
    assert _cli([str(root), str(dst), "--format", "ffcv", "--workers", "1"]) == 2
    assert capsys.readouterr().err == (f"error: cannot write into {dst.parent}: {tmp_path / 'notes'} is a file, not a "
                                       f"directory; choose a DST whose directory is a directory or can be created\n")
    assert (tmp_path / "notes").read_text() == "precious" and sorted(tmp_path.iterdir()) == [tmp_path / "notes"]


@pytest.mark.parametrize("fmt, name", [("ffcv", "out.beton"), ("dali", "shards")])
def test_a_directory_where_the_report_goes_is_refused_before_anything_is_written(fmt, name, source, tmp_path, capsys):
    """Found only once DST was in place, it was an error naming a temporary file, with DST and its work
    directory left behind."""
    root, _ = source
    dst, report = tmp_path / name, tmp_path / f"{name}.report.json"
    report.mkdir()
    assert _cli([str(root), str(dst), "--format", fmt, "--workers", "1"]) == 2
    assert capsys.readouterr().err == (f"error: {report}, where the report of {dst} goes, is a directory; move it "
                                       f"away or choose another DST\n")
    assert sorted(tmp_path.iterdir()) == [report] and not any(report.iterdir())


@pytest.mark.parametrize("kind", ["socket", "unreadable folder"])
def test_a_source_that_cannot_be_read_is_named_as_such_not_as_a_failed_write(kind, source, tmp_path, monkeypatch,
                                                                            capsys):
    """An OSError while listing SRC read 'cannot write output SRC: ...'. A socket fails to open even for root;
    a folder without read permission (root reads it anyway) fails os.scandir with EACCES, simulated here."""
    import socket
    root, _ = source
    listener = socket.socket(socket.AF_UNIX)
    if kind == "socket":
        src, reason = tmp_path / "list.sock", os.strerror(errno.ENXIO)
        listener.bind(str(src))
    else:
        src, reason = tmp_path / "folder", os.strerror(errno.EACCES)
        (src / "a").mkdir(parents=True)
        (src / "a" / "a0.jpg").write_bytes((root / "a" / "a0.jpg").read_bytes())
    scandir = os.scandir

    def denied(path="."):
        if not isinstance(path, int) and Path(path) == src:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return scandir(path)
    before = sorted(tmp_path.iterdir())
    with listener, monkeypatch.context() as patch:
        if kind != "socket":
            patch.setattr(os, "scandir", denied)
        assert _cli([str(src), str(tmp_path / "out.beton"), "--format", "ffcv", "--workers", "1"]) == 2
    assert capsys.readouterr().err == (f"error: cannot read the source {src} ({reason}); make it readable or choose "
                                       f"another SRC\n")
    assert sorted(tmp_path.iterdir()) == before


def test_workers_beyond_the_usable_cores_are_not_started(source, tmp_path, monkeypatch):
    started, pool = [], convert_module.worker_pool
    monkeypatch.setattr(convert_module, "worker_pool", lambda workers: started.append(workers) or pool(min(workers, 2)))
    convert(source[0], tmp_path / "shards", "dali", max_resolution=MAX_RES, workers=3000, progress=False)
    assert started == [usable_cores()]  # more would only share the cores, each with its own memory


def test_cli_subprocess_missing_source(tmp_path):
    result = subprocess.run([sys.executable, "-m", "tools.convert", str(tmp_path / "nope"), str(tmp_path / "o"),
                             "--format", "dali"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("error: source") and str(tmp_path / "nope") in result.stderr


# Each image a worker prepares, refused where the worker imports a module for it.
_WORKERS_IMPORT_NOTHING = """
import sys
import pipelines.convert_parts as parts
def prepare(job, prepare=parts._prepare_job):
    modules = set(sys.modules)
    result = prepare(job)
    assert set(sys.modules) == modules, f"a worker imported {sorted(set(sys.modules) - modules)}"
    return result
parts._prepare_job = prepare
"""


@pytest.mark.parametrize("fmt", ["ffcv", "dali"])
def test_a_conversion_and_the_data_tools_never_load_torch_and_the_workers_import_nothing(fmt, source, tmp_path):
    """Preparing and writing images needs no torch (about 2 s of start-up and 650 MB in every process,
    the forked workers included), nor FFCV (which loads torch and numba) for the `.beton`'s layout. The
    workers are forked with PIL's decoders loaded: a first import in a forked child can wait forever on a
    lock that another thread of the parent held at the fork."""
    code = (_WORKERS_IMPORT_NOTHING
            + "import tools.convert, tools.make_demo_data; from pipelines.convert import convert; "
            f"report = convert({str(source[0])!r}, {str(tmp_path / 'out')!r}, {fmt!r}, workers=2, progress=False); "
            "assert report['written'] > 0, report")
    assert modules_loaded_by(code, ("torch", "ffcv", "nvidia.dali")) == []


@pytest.mark.parametrize("module, imports", [("tools.convert", "pipelines.convert"),
                                             ("tools.make_demo_data", "pipelines.demo_data")])
def test_ctrl_c_while_a_data_tool_starts_is_one_line(module, imports, monkeypatch, capsys):
    """Ctrl-C while the command still imports its modules: the one line of a Ctrl-C, not a traceback."""
    import importlib.abc
    import runpy

    class Interrupting(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == imports:
                raise KeyboardInterrupt
            return None

    for name in (module, imports):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setattr(sys, "meta_path", [Interrupting(), *sys.meta_path])
    monkeypatch.setattr(sys, "argv", [module, "--help"])
    try:
        runpy.run_module(module, run_name="__main__")
    except KeyboardInterrupt:
        pytest.fail("the KeyboardInterrupt escaped: a traceback")
    except SystemExit as exit_:
        assert exit_.code == 130
    else:
        pytest.fail("the command ran on")
    assert capsys.readouterr().err.splitlines() == ["error: interrupted while starting; nothing was written"]


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


# ---------------------------------------------------------------------------------------------
# the .beton layout, resuming a killed conversion
# ---------------------------------------------------------------------------------------------

def _stored(beton: Path) -> tuple[list[bytes], np.ndarray]:
    """Each sample's stored JPEG (through ffcv's Reader and allocation table) and the metadata rows."""
    from ffcv.reader import Reader
    reader = Reader(str(beton))
    sizes = dict(zip(reader.alloc_table["ptr"].tolist(), reader.alloc_table["size"].tolist()))
    image = reader.metadata["f0"]
    with open(beton, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as raw:  # pages unread
        return [raw[p:p + sizes[p]] for p in image["data_ptr"].tolist()], reader.metadata


def _stock_beton(path: Path, pixels: list[tuple[np.ndarray, int]]) -> Path:
    """What FFCV's own DatasetWriter (one worker) writes for these (pixels, label) samples."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    class Indexed:
        def __len__(self):
            return len(pixels)

        def __getitem__(self, i):
            return pixels[i]

    DatasetWriter(str(path), {"image": RGBImageField(write_mode="jpg", max_resolution=MAX_RES, jpeg_quality=90),
                              "label": IntField()},
                  page_size=page_size_for(MAX_RES), num_workers=1).from_indexed_dataset(Indexed())
    return path


def test_the_beton_layout_is_ffcvs():
    """The converter writes a `.beton` without importing FFCV: its layout constants are FFCV's own."""
    import pipelines.ffcv_format as layout
    import pipelines.ffcv_import  # noqa: F401
    from ffcv.fields import IntField, RGBImageField
    from ffcv.fields.rgb_image import IMAGE_MODES
    from ffcv.types import (ALLOC_TABLE_TYPE, CURRENT_VERSION, TYPE_ID_HANDLER, FieldDescType, HeaderType,
                            get_metadata_type)
    fields = {"image": RGBImageField(write_mode="jpg"), "label": IntField()}
    assert (layout.HEADER, layout.FIELD_DESCRIPTOR, layout.ALLOCATION) == (HeaderType, FieldDescType, ALLOC_TABLE_TYPE)
    assert layout.SAMPLE_METADATA == get_metadata_type(list(fields.values()))
    assert (layout.BETON_VERSION, layout.JPEG_MODE) == (CURRENT_VERSION, IMAGE_MODES["jpg"])
    assert {name: TYPE_ID_HANDLER[type_id] for name, type_id in layout.FIELD_TYPE_IDS.items()} == \
        {name: type(field) for name, field in fields.items()}
    assert not any(field.to_binary()[0].any() for field in fields.values())  # no arguments: zeros


def test_beton_is_byte_identical_to_ffcv_writer_and_parts_hold_the_same_samples(source, outputs, tmp_path):
    """One part of re-encoded images: the file FFCV's own DatasetWriter (one worker) writes for the
    same pixels, byte for byte. With originals kept and in parts: the same samples, where each kept
    original stands in for FFCV's re-encode of it."""
    import shutil
    root, _ = source
    reencoded = tmp_path / "reencoded"
    shutil.copytree(root, reencoded)
    for rel in PLAIN:
        (reencoded / rel).unlink()
    single = tmp_path / "single.beton"
    report = convert(reencoded, single, "ffcv", max_resolution=MAX_RES, workers=1, progress=False)
    prep = ImagePrep(max_resolution=MAX_RES)
    skipped = {f["path"] for f in report["files"] if f["status"] == "skipped"}
    pixels = [(prep.pixels(p), label) for p, label in find_image_folder(reencoded)[1] if p not in skipped]
    assert len(pixels) == 7
    assert single.read_bytes() == _stock_beton(tmp_path / "stock.beton", pixels).read_bytes()

    out, _, _ = outputs  # the fixture's .beton was written in four parts of four images
    skipped = {f["path"] for f in outputs[1]["files"] if f["status"] == "skipped"}
    samples = [(p, label) for p, label in find_image_folder(root)[1] if p not in skipped]
    stock = _stock_beton(tmp_path / "all.beton", [(prep.pixels(p), label) for p, label in samples])
    (jpegs, meta), (want_jpegs, want_meta) = _stored(out / "data.beton"), _stored(stock)
    plain = {str(root / rel) for rel in PLAIN}
    assert [Path(p).read_bytes() if p in plain else want for (p, _), want in zip(samples, want_jpegs)] == jpegs
    for name in ("mode", "width", "height"):
        assert meta["f0"][name].tolist() == want_meta["f0"][name].tolist()
    assert meta["f1"].tolist() == want_meta["f1"].tolist()


def test_a_data_region_placed_for_more_samples_than_were_kept_reads_back_through_ffcv(source, outputs, tmp_path):
    """Skipped images leave table room unused before the data region, which `data_start` placed for
    every listed sample: here room for 400,000 rows (a page and more) holds the fixture's samples, and
    FFCV's reader finds each one by its table and allocation table as in the converter's own output."""
    from pipelines.ffcv_format import BetonPart, data_start, finish_beton
    out, _, _ = outputs
    want_jpegs, want_meta = _stored(out / "data.beton")
    page = page_size_for(MAX_RES)
    start = data_start(400_000, page)
    assert start > data_start(len(want_jpegs), page)  # the case: the data does not start where FFCV would put it
    path = tmp_path / "roomy.beton"
    with open(path, "w+b") as handle:
        handle.truncate(start)
        handle.seek(start)
        writer = BetonPart(handle, page)
        for jpeg, row in zip(want_jpegs, want_meta):
            writer.add(jpeg, int(row["f0"]["width"]), int(row["f0"]["height"]), int(row["f1"]))
        np.save(tmp_path / "rows.npy", writer.close())
        assert finish_beton(handle, handle.tell(), [tmp_path / "rows.npy"], ImagePrep(max_resolution=MAX_RES)) \
            == len(want_jpegs)
    jpegs, meta = _stored(path)
    assert jpegs == want_jpegs
    for name in ("mode", "width", "height"):
        assert meta["f0"][name].tolist() == want_meta["f0"][name].tolist()
    assert meta["f1"].tolist() == want_meta["f1"].tolist()


def test_the_unused_end_of_each_page_takes_no_disk(source, tmp_path):
    """At --max-resolution 4096 a page is 128 MiB, and each part ends on a whole page: written out, the
    zeros of the parts' pages took over 512 MB of disk."""
    root, _ = source
    page = page_size_for(4096)
    betons = {size: tmp_path / f"parts_of_{size}.beton" for size in (4, 1000)}
    reports = {size: convert(root, beton, "ffcv", max_resolution=4096, workers=1, part_size=size, progress=False)
               for size, beton in betons.items()}
    parts = -(-reports[4]["written"] // 4)
    assert parts > 1 and betons[4].stat().st_size > parts * page  # the same layout ...
    assert betons[4].stat().st_blocks * 512 < (1 << 20)  # ... whose holes take no disk: ext4, tmpfs, xfs, btrfs
    assert _stored(betons[4])[0] == _stored(betons[1000])[0]


def _interrupted_at_the_eighth_image(monkeypatch) -> None:
    """Ctrl-C as `ImagePrep.stored` is called the eighth time (in the second part of 4 or 5 images), until undone."""
    original, calls = ImagePrep.stored, []

    def interrupted(self, path):
        calls.append(path)
        if len(calls) == 8:
            raise KeyboardInterrupt
        return original(self, path)
    monkeypatch.setattr(ImagePrep, "stored", interrupted)


@pytest.mark.parametrize("fmt", ["ffcv", "dali"])
def test_a_killed_conversion_keeps_its_finished_parts(fmt, source, outputs, tmp_path, monkeypatch):
    """Also where the rerun spells the source otherwise (relative, from another directory): its finished parts
    were removed as those of "another source", and of "the source's images"."""
    root, _ = source
    out, _, _ = outputs
    original, calls = ImagePrep.stored, []
    dst = tmp_path / ("data.beton" if fmt == "ffcv" else "shards")
    kwargs = dict(max_resolution=MAX_RES, workers=1, part_size=4, shard_size=5, progress=False)
    _interrupted_at_the_eighth_image(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        convert(root, dst, fmt, **kwargs)
    assert not dst.exists() and work_dir(dst).is_dir()

    monkeypatch.setattr(ImagePrep, "stored", lambda self, path: calls.append(path) or original(self, path))
    monkeypatch.chdir(root.parent)
    report = convert(Path(root.name), dst, fmt, **kwargs)
    first_part = 4 if fmt == "ffcv" else 5
    assert len(calls) == 14 - first_part  # the finished first part was not redone
    parts = -(-14 // first_part)
    assert outcome(report).endswith(f"; went on from 1 of its {parts} parts, finished by an earlier run")
    assert json.loads(report_path(dst).read_text()) == {k: v for k, v in report.items() if k != "this_run"}
    assert not work_dir(dst).exists()
    if fmt == "ffcv":
        assert dst.read_bytes() == (out / "data.beton").read_bytes()
    else:
        assert sorted(p.name for p in dst.iterdir()) == sorted(p.name for p in (out / "shards").iterdir())
        assert all(p.read_bytes() == (out / "shards" / p.name).read_bytes() for p in dst.iterdir())


@pytest.mark.parametrize("fmt, flag", [("ffcv", "--part-size"), ("dali", "--shard-size")])
def test_finished_parts_of_another_part_size_are_removed_and_the_line_says_so(fmt, flag, source, outputs, tmp_path,
                                                                              monkeypatch):
    """The rerun with another part size converted everything again without a word, as if no part had been kept.
    Of parts in the other format, the line names the format alone: it named the dali run's --shard-size as a
    --part-size, and '--beton None', which is no option."""
    root, _ = source
    original = ImagePrep.stored
    dst = tmp_path / ("data.beton" if fmt == "ffcv" else "shards")
    _interrupted_at_the_eighth_image(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        convert(root, dst, fmt, max_resolution=MAX_RES, workers=1, part_size=4, shard_size=4, progress=False)
    monkeypatch.setattr(ImagePrep, "stored", original)
    report = convert(root, dst, fmt, max_resolution=MAX_RES, workers=1, part_size=5, shard_size=5, progress=False)
    assert outcome(report).endswith(f"; removed 1 finished part of an earlier conversion to it, which differed "
                                    f"({flag} 4 -> 5)")
    assert report["written"] + report["skipped"] == 14 and not work_dir(dst).exists()

    other = "dali" if fmt == "ffcv" else "ffcv"
    _interrupted_at_the_eighth_image(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        convert(root, tmp_path / "x", other, max_resolution=MAX_RES, workers=1, part_size=4, shard_size=4,
                progress=False)
    monkeypatch.setattr(ImagePrep, "stored", original)
    report = convert(root, tmp_path / "x", fmt, max_resolution=MAX_RES, workers=1, progress=False)
    assert outcome(report).endswith(f"; removed 1 finished part of an earlier conversion to it, which differed "
                                    f"(--format {other} -> {fmt})")


@pytest.mark.timeout(60)  # CPython's pool waits forever for the task of a worker that died
def test_a_worker_killed_by_the_oom_killer_is_one_line_keeps_the_finished_parts_and_the_rerun_finishes(
        source, outputs, tmp_path, monkeypatch, capsys):
    import signal
    from pipelines.dali_format import shuffled_order
    root, _ = source
    out, _, _ = outputs
    samples = find_image_folder(root)[1]
    last = samples[int(shuffled_order(len(samples))[-1])][0]  # in the third and last shard of 5, 5 and 4
    original = ImagePrep.stored

    def killed(self, path):
        if path == last:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, path)

    dst = tmp_path / "shards"
    monkeypatch.setattr(ImagePrep, "stored", killed)  # the workers are forked with it
    assert _cli([str(root), str(dst), "--format", "dali", "--max-resolution", str(MAX_RES), "--workers", "2",
                 "--shard-size", "5"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: converting {root}: worker process ")
    assert "was killed by SIGKILL" in err and f"2 of 3 parts are finished and kept in {work_dir(dst)}" in err
    assert not dst.exists()

    calls = []
    monkeypatch.setattr(ImagePrep, "stored", lambda self, path: calls.append(path) or original(self, path))
    convert(root, dst, "dali", max_resolution=MAX_RES, workers=1, shard_size=5, progress=False)
    assert len(calls) == 4 and last in calls  # only the lost shard was redone
    assert sorted(p.name for p in dst.iterdir()) == sorted(p.name for p in (out / "shards").iterdir())
    assert all(p.read_bytes() == (out / "shards" / p.name).read_bytes() for p in dst.iterdir())


def _full_disk_at(writer, method: str, part: int, monkeypatch) -> None:
    """`writer.method` fails with ENOSPC (as a write to a full file system does) in part `part`, the
    writer made `part`-th from now, and behaves as before elsewhere."""
    original_init, original = writer.__init__, getattr(writer, method)
    made = []

    def counted(self, *args, **kwargs):
        made.append(self)
        original_init(self, *args, **kwargs)

    def full(self, *args):
        if made.index(self) == part:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(self, *args)
    monkeypatch.setattr(writer, "__init__", counted)
    monkeypatch.setattr(writer, method, full)


@pytest.mark.parametrize("fmt", ["ffcv", "dali"])
def test_a_full_disk_is_one_line_keeps_the_finished_parts_and_the_rerun_finishes(fmt, source, outputs, tmp_path,
                                                                              monkeypatch):
    root, _ = source
    out, _, _ = outputs
    dst = tmp_path / ("data.beton" if fmt == "ffcv" else "shards")
    kwargs = dict(max_resolution=MAX_RES, workers=1, part_size=4, shard_size=5, progress=False)
    writer, method = (BetonPart, "add") if fmt == "ffcv" else (ShardWriter, "add_sample")
    parts = 4 if fmt == "ffcv" else 3  # 14 samples

    with monkeypatch.context() as patch:  # the disk fills up in the first part: nothing to keep
        _full_disk_at(writer, method, 0, patch)
        with pytest.raises(StorageError, match=rf"^cannot write {re.escape(str(dst))} \(No space left on device; "
                                               rf"[0-9.]+ MiB free there\); nothing was written$"):
            convert(root, dst, fmt, **kwargs)
    assert not dst.exists() and not work_dir(dst).exists()

    with monkeypatch.context() as patch:  # ... in the second part
        _full_disk_at(writer, method, 1, patch)
        with pytest.raises(StorageError) as raised:
            convert(root, dst, fmt, **kwargs)
    said = re.fullmatch(rf"cannot write {re.escape(str(dst))} \(No space left on device; [0-9.]+ MiB free there\): "
                        rf"1 of {parts} parts are finished and kept in {re.escape(str(work_dir(dst)))}; once there is "
                        rf"room \(about ([0-9.]+) (KiB|MiB) more at the finished parts' size per image, more where "
                        rf"the rest are larger\) or write "
                        rf"access, the same command goes on from them", str(raised.value))
    assert said, str(raised.value)
    # about what the rest of the uninterrupted conversion's output takes on disk (its share of the positions)
    full = [out / "data.beton"] if fmt == "ffcv" else list((out / "shards").iterdir())
    rest = sum(path.stat().st_blocks * 512 for path in full) * (14 - (4 if fmt == "ffcv" else 5)) / 14
    assert 1 / 3 < float(said[1]) * 2 ** (10 if said[2] == "KiB" else 20) / rest < 3
    assert not dst.exists() and not [p for p in work_dir(dst).iterdir() if "-00001." in p.name]  # its files removed
    if fmt == "ffcv":  # and its pages: the .beton ends with the first part
        assert (work_dir(dst) / "output.beton").stat().st_size == json.loads(
            (work_dir(dst) / "part-00000.json").read_text())["beton_end"]

    calls = []
    original = ImagePrep.stored
    monkeypatch.setattr(ImagePrep, "stored", lambda self, path: calls.append(path) or original(self, path))
    convert(root, dst, fmt, **kwargs)
    assert len(calls) == 14 - (4 if fmt == "ffcv" else 5)  # the finished first part was not redone
    assert not work_dir(dst).exists()
    if fmt == "ffcv":
        assert dst.read_bytes() == (out / "data.beton").read_bytes()
    else:
        assert all(p.read_bytes() == (out / "shards" / p.name).read_bytes() for p in dst.iterdir())


def test_a_full_disk_while_the_tables_are_written_keeps_every_part_and_the_rerun_finishes(source, outputs, tmp_path,
                                                                                      monkeypatch):
    import pipelines.convert
    root, _ = source
    out, _, _ = outputs
    dst = tmp_path / "data.beton"
    kwargs = dict(max_resolution=MAX_RES, workers=1, part_size=4, progress=False)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with monkeypatch.context() as patch:
        patch.setattr(pipelines.convert, "finish_beton", full)
        with pytest.raises(StorageError, match=r": 4 of 4 parts are finished and kept in .*; once there is room or "
                                               r"write access, the same command goes on from them$"):
            convert(root, dst, "ffcv", **kwargs)
    calls = []
    original = ImagePrep.stored
    monkeypatch.setattr(ImagePrep, "stored", lambda self, path: calls.append(path) or original(self, path))
    convert(root, dst, "ffcv", **kwargs)
    assert calls == [] and dst.read_bytes() == (out / "data.beton").read_bytes()


def test_the_beton_is_written_once_in_place_and_a_kill_while_its_tables_are_written_is_finished_by_the_rerun(
        source, outputs, tmp_path, monkeypatch):
    """The parts' pages go straight into the one `.beton` of the work directory, so a conversion never needs
    room for two copies of the data; killed while the tables are written (here after the allocation table,
    before the header), the same command writes them again and decodes no image."""
    import pipelines.convert
    from pipelines.ffcv_format import HEADER
    root, _ = source
    out, _, _ = outputs
    dst = tmp_path / "data.beton"
    kwargs = dict(max_resolution=MAX_RES, workers=1, part_size=4, progress=False)
    finish = pipelines.convert.finish_beton

    def killed(handle, *args):
        finish(handle, *args)
        handle.seek(0)
        handle.write(bytes(HEADER.itemsize))  # the header did not reach the disk
        raise KeyboardInterrupt
    with monkeypatch.context() as patch:
        patch.setattr(pipelines.convert, "finish_beton", killed)
        with pytest.raises(KeyboardInterrupt):
            convert(root, dst, "ffcv", **kwargs)
    work = work_dir(dst)
    assert not dst.exists()
    assert sorted(p.name for p in work.iterdir() if p.stat().st_size > 4096) == ["output.beton"]  # no other copy
    assert (work / "output.beton").stat().st_size == (out / "data.beton").stat().st_size

    calls = []
    original = ImagePrep.stored
    monkeypatch.setattr(ImagePrep, "stored", lambda self, path: calls.append(path) or original(self, path))
    convert(root, dst, "ffcv", **kwargs)
    assert calls == [] and not work.exists()
    assert dst.read_bytes() == (out / "data.beton").read_bytes()


def test_dali_shards_go_back_to_their_parts_when_the_assembly_stops(source, outputs, tmp_path, monkeypatch):
    import pipelines.convert
    root, _ = source
    out, _, _ = outputs
    dst = tmp_path / "shards"
    kwargs = dict(max_resolution=MAX_RES, workers=1, shard_size=5, progress=False)

    def stopped(directory, *args):  # the shards are in the directory that would become DST
        assert len(list(directory.glob("*.tar"))) == 3
        raise KeyboardInterrupt
    with monkeypatch.context() as patch:
        patch.setattr(pipelines.convert, "write_meta", stopped)
        with pytest.raises(KeyboardInterrupt):
            convert(root, dst, "dali", **kwargs)
    assert sorted(p.name for p in tmp_path.iterdir()) == [work_dir(dst).name]

    calls = []
    original = ImagePrep.stored
    monkeypatch.setattr(ImagePrep, "stored", lambda self, path: calls.append(path) or original(self, path))
    convert(root, dst, "dali", **kwargs)
    assert calls == [] and all(p.read_bytes() == (out / "shards" / p.name).read_bytes() for p in dst.iterdir())


@pytest.mark.parametrize("fmt, sig_name, said", [("ffcv", "SIGINT", "interrupted"), ("dali", "SIGINT", "interrupted"),
                                                 ("ffcv", "SIGTERM", "stopped by SIGTERM"),
                                                 ("dali", "SIGHUP", "stopped by SIGHUP")])
def test_ctrl_c_once_dst_is_installed_says_it_is_complete_and_leaves_it_complete(fmt, sig_name, said, source, outputs,
                                                                                 tmp_path, monkeypatch, capsys):
    """A real SIGINT (Ctrl-C), SIGTERM or SIGHUP to this process just after DST is moved into place (while its
    report is written): the one line says DST is complete, and it is: what an uninterrupted conversion wrote,
    with its report and no work directory left; the exit status is the shell's for the signal."""
    import signal
    import pipelines.convert
    sig = getattr(signal, sig_name)
    default = signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL
    if sig == signal.SIGHUP and signal.getsignal(sig) is signal.SIG_IGN:
        pytest.skip("SIGHUP is ignored here (nohup), and so left alone by the conversion")
    assert signal.getsignal(sig) is default
    root, _ = source
    out, ffcv_report, dali_report = outputs
    reference, expected = (out / "data.beton", ffcv_report) if fmt == "ffcv" else (out / "shards", dali_report)
    dst = tmp_path / reference.name
    write_report = pipelines.convert.write_report

    def interrupted(path, report):
        assert dst.exists()  # installed already
        write_report(path, report)
        # SIGTERM and SIGHUP by default end the process (here: the test run) at once
        assert signal.getsignal(sig) not in (signal.SIG_DFL, signal.SIG_IGN), f"{sig_name} is not handled"
        os.kill(os.getpid(), sig)
    monkeypatch.setattr(pipelines.convert, "write_report", interrupted)
    size = ["--part-size", "4"] if fmt == "ffcv" else ["--shard-size", "5"]
    assert _cli([str(root), str(dst), "--format", fmt, "--max-resolution", str(MAX_RES), "--workers", "1",
                 *size]) == 128 + sig
    report = pipelines.convert.report_path(dst)
    assert capsys.readouterr().err.splitlines() == [
        f"error: {said} once the conversion had finished; nothing is lost: {outcome({**expected, 'output': str(dst)})}"]
    assert signal.getsignal(sig) is default
    assert sorted(p.name for p in tmp_path.iterdir()) == [dst.name, report.name]
    assert json.loads(report.read_text())["files"] == expected["files"]
    if fmt == "ffcv":
        assert dst.read_bytes() == reference.read_bytes()
    else:
        assert sorted(p.name for p in dst.iterdir()) == sorted(p.name for p in reference.iterdir())
        assert all(p.read_bytes() == (reference / p.name).read_bytes() for p in dst.iterdir())


def test_changed_arguments_start_over(source, tmp_path, monkeypatch):
    root, _ = source
    dst = tmp_path / "data.beton"
    original = ImagePrep.stored
    calls = []

    def interrupted(self, path):
        calls.append(path)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return original(self, path)

    monkeypatch.setattr(ImagePrep, "stored", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert(root, dst, "ffcv", max_resolution=MAX_RES, workers=1, part_size=4, progress=False)
    monkeypatch.setattr(ImagePrep, "stored", original)
    calls.clear()
    monkeypatch.setattr(ImagePrep, "stored", lambda self, path: calls.append(path) or original(self, path))
    convert(root, dst, "ffcv", max_resolution=MAX_RES, jpeg_quality=70, workers=1, part_size=4, progress=False)
    assert len(calls) == 14


# ---------------------------------------------------------------------------------------------
# --force replaces only what the converter wrote; the report
# ---------------------------------------------------------------------------------------------

def test_dali_shards_inside_the_source_folder_are_refused(source, tmp_path, capsys):
    """Their directory would be one more (empty) class of the folder: a rerun would shift every label."""
    root, _ = source
    folder = tmp_path / "folder"
    for path, _ in find_image_folder(root)[1][:2]:
        (folder / Path(path).parent.name).mkdir(parents=True, exist_ok=True)
        (folder / Path(path).parent.name / Path(path).name).write_bytes(Path(path).read_bytes())
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert _cli([str(folder), str(folder / "shards"), "--format", "dali", "--workers", "1"]) == 2
    assert capsys.readouterr().err == (f"error: output {folder / 'shards'} is inside the source {folder}, where its "
                                       f"directory would be read as one more class; choose a DST outside {folder}\n")
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_force_never_replaces_what_the_converter_did_not_write(source, tmp_path, capsys):
    root, _ = source
    base = [str(root), "--max-resolution", str(MAX_RES), "--workers", "1"]
    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "holiday.jpg").write_bytes(b"a user's file")
    for force in ([], ["--force"]):
        assert _cli([base[0], str(mine), "--format", "dali", *base[1:], *force]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "\n" not in err and "did not write" in err and str(mine) in err
        assert sorted(p.name for p in mine.iterdir()) == ["holiday.jpg"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]

    shards = tmp_path / "shards"
    assert _cli([base[0], str(shards), "--format", "dali", *base[1:], "--shard-size", "5"]) == 0
    capsys.readouterr()
    assert _cli([base[0], str(shards), "--format", "dali", *base[1:]]) == 2
    err = capsys.readouterr().err.strip()
    meta = json.loads((shards / "dataset.json").read_text())
    assert f"the DALI dataset in {shards} (dataset.json and {len(meta['shards'])} shard(s)" in err
    assert f"{meta['num_samples']} samples" in err and "--force" in err and str(tmp_path / "shards.report.json") in err

    (shards / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in shards.iterdir()}
    assert _cli([base[0], str(shards), "--format", "dali", *base[1:], "--force"]) == 2
    err = capsys.readouterr().err.strip()
    assert "notes.txt" in err and "did not write" in err
    assert {p.name: p.read_bytes() for p in shards.iterdir()} == before

    (shards / "notes.txt").unlink()
    assert _cli([base[0], str(shards), "--format", "dali", *base[1:], "--force", "--jpeg-quality", "60"]) == 0
    assert json.loads((shards / "dataset.json").read_text())["jpeg_quality"] == 60

    beton = tmp_path / "data.beton"
    assert _cli([base[0], str(beton), "--format", "ffcv", *base[1:]]) == 0
    capsys.readouterr()
    assert _cli([base[0], str(beton), "--format", "ffcv", *base[1:], "--jpeg-quality", "60"]) == 2
    assert f"the FFCV dataset {beton} (11 samples) converted with --jpeg-quality 90, not 60;" in capsys.readouterr().err
    assert _cli([base[0], str(beton), "--format", "ffcv", *base[1:], "--force", "--jpeg-quality", "60"]) == 0


def test_report_writes_non_ascii_paths_as_text(tmp_path):
    (tmp_path / "src" / "café").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "src" / "café" / "ok.jpg")
    Image.fromarray(np.zeros((8, 8), np.uint8), "L").save(tmp_path / "src" / "café" / "grå.png")
    convert(tmp_path / "src", tmp_path / "o.beton", "ffcv", workers=1, progress=False)
    text = (tmp_path / "o.beton.report.json").read_bytes().decode("utf-8")
    assert "café/grå.png" in text and "\\u" not in text
    assert json.loads(text)["files"][0]["path"] == str(tmp_path / "src" / "café" / "grå.png")


def test_sixteen_bit_rgb_png_is_noted_and_keeps_the_high_byte(tmp_path):
    import cv2
    rgb = np.random.default_rng(0).integers(0, 65536, size=(6, 7, 3)).astype(np.uint16)
    (tmp_path / "src" / "k").mkdir(parents=True)
    assert cv2.imwrite(str(tmp_path / "src" / "k" / "deep.png"), rgb[..., ::-1])  # OpenCV writes BGR
    image, notes = decode_source_image(str(tmp_path / "src" / "k" / "deep.png"))
    assert np.array_equal(np.asarray(image), (rgb >> 8).astype(np.uint8))
    report = convert(tmp_path / "src", tmp_path / "o", "dali", workers=1, progress=False)
    assert [(f["status"], "16-bit" in f["reason"]) for f in report["files"]] == [("converted", True)]
    assert report["converted"] == 1 and notes and "16-bit RGB" in notes[0]


def test_an_unchanged_folder_is_not_rescanned_at_start(source, tmp_path, monkeypatch):
    """`source_change` compares the recorded `source_state` (one stat per class) before any rescan."""
    import shutil

    data = tmp_path / "folder"
    shutil.copytree(source[0], data)
    beton = tmp_path / "folder.beton"
    convert(data, beton, "ffcv", max_resolution=MAX_RES, workers=1, progress=False)
    scans = []
    monkeypatch.setattr(convert_module, "find_image_folder", lambda root: scans.append(root) or find_image_folder(root))
    assert convert_module.source_change(beton, str(data)) is None and scans == []
    shutil.copy(data / "a" / "a0.jpg", data / "a" / "added.jpg")
    assert "now holds 15 images" in convert_module.source_change(beton, str(data)) and scans == [str(data)]


@pytest.mark.parametrize("size,orientation", [((1031, 517), 1), ((2600, 1733), 1), ((1733, 2600), 6), ((4099, 3001), 1)])
def test_a_large_jpeg_is_capped_to_ffcvs_geometry_from_a_reduced_decode(size, orientation, tmp_path):
    """Decoding at a DCT scale changes the cost, not the geometry, and barely the pixels of a photograph."""
    import cv2
    from pipelines.demo_data import load_photograph
    array = np.asarray(Image.fromarray(load_photograph("chelsea")).resize(size, Image.BICUBIC))
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "big.jpg"
    Image.fromarray(array).save(path, quality=92, exif=exif)
    upright = np.asarray(Image.open(path).transpose(Image.Transpose.ROTATE_270) if orientation == 6
                         else Image.open(path).convert("RGB"))
    height, width = upright.shape[:2]
    ratio = 256 / max(width, height)
    want_size = (int(ratio * width), int(ratio * height))  # FFCV's resizer: truncation
    want = cv2.resize(upright, want_size, interpolation=cv2.INTER_AREA)
    got = ImagePrep(max_resolution=256).pixels(str(path))
    assert got.shape == want.shape
    assert _mad(got, want) < 2.5  # about what one JPEG generation at quality 90 changes
    from pipelines.images import _decoded
    with Image.open(path) as image:
        decoded, _, full = _decoded(image, reduce_to=256)
    assert full == (width, height) and max(decoded.shape) < max(size)  # the reduced decode was taken


def test_plain_jpegs_that_opencv_decodes_store_what_the_pillow_decode_stores(tmp_path, capfd, monkeypatch):
    """Colour JPEGs that are re-encoded (over the cap, progressive) are decoded by OpenCV: the same
    bytes as Pillow's decode (`pixels`, the path FFCV's writer is checked against above), silent on
    corrupt data that both accept, and a truncated one, or one whose data breaks off at a stray marker
    (which OpenCV decodes on past, gray from there), is skipped with Pillow's reason."""
    import pipelines.images as images
    from pipelines.demo_data import load_photograph
    decoded = []
    opencv = images._opencv_decoded
    monkeypatch.setattr(images, "_opencv_decoded", lambda data, scale: decoded.append(scale) or opencv(data, scale))
    photo = Image.fromarray(load_photograph("chelsea"))
    cases = {"over.jpg": ((100, 75), {}), "reduced.jpg": ((300, 220), {}), "444.jpg": ((90, 70), {"subsampling": 0}),
             "progressive.jpg": ((64, 40), {"progressive": True})}
    for name, (size, kw) in cases.items():
        photo.resize(size, Image.BICUBIC).save(tmp_path / name, quality=90, **kw)
    data = (tmp_path / "over.jpg").read_bytes()
    (tmp_path / "corrupt.jpg").write_bytes(data[:len(data) // 2] + b"\xff\xd0" + data[len(data) // 2:])
    (tmp_path / "truncated.jpg").write_bytes(data[:len(data) // 2])
    (tmp_path / "broken.jpg").write_bytes(data[:len(data) // 2] + b"\xff\xc4" + data[len(data) // 2:])  # a DHT marker
    prep = ImagePrep(max_resolution=MAX_RES)
    for name in [*cases, "corrupt.jpg"]:
        path = str(tmp_path / name)
        got = prep.stored(path)
        assert (got.status, got.data) == ("ok", prep.encode(prep.pixels(path))), name
        assert (got.width, got.height) == Image.open(io.BytesIO(got.data)).size
    assert decoded == [1, 2, 1, 1, 1]  # every one through OpenCV; the 300 px one at a DCT scale of 1/2
    truncated = prep.stored(str(tmp_path / "truncated.jpg"))
    assert truncated.status == "skipped" and truncated.reason.startswith("truncated or corrupt: image file is truncated")
    with pytest.raises(OSError, match="broken data stream"):
        Image.open(tmp_path / "broken.jpg").load()
    broken = prep.stored(str(tmp_path / "broken.jpg"))
    assert (broken.status, broken.reason) == ("skipped", "truncated or corrupt: broken data stream when reading image file")
    assert capfd.readouterr().err == ""  # libjpeg's "Corrupt JPEG data" warning did not reach stderr


def _pillow_verdict(data: bytes) -> tuple[str, str | None]:
    """(status, Pillow's message) for a JPEG kept byte for byte, by Pillow alone: its decode at 1/8 scale,
    which was the converter's whole check before OpenCV's came first."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.draft(None, (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
        return "ok", None
    except OSError as err:
        return "skipped", str(err)


def test_a_kept_jpeg_is_accepted_or_refused_as_pillows_decode_accepts_or_refuses_it(tmp_path, capfd):
    """A baseline JPEG within the cap is stored byte for byte after OpenCV's validating decode, and
    Pillow decodes whatever libjpeg errs or warns about: copies damaged in their entropy-coded data
    (truncated, bytes flipped, a stray marker, a hole) get Pillow's verdict, and its reason, every one."""
    from pipelines.demo_data import load_photograph
    prep = ImagePrep(max_resolution=MAX_RES)
    rng = np.random.default_rng(5)
    verdicts = {}
    for photo in ("chelsea", "coffee"):
        Image.fromarray(load_photograph(photo)).resize((MAX_RES, 48), Image.BICUBIC).save(tmp_path / "clean.jpg", quality=90)
        clean = (tmp_path / "clean.jpg").read_bytes()
        assert prep.stored(str(tmp_path / "clean.jpg")).data == clean
        scan = clean.index(b"\xff\xda") + 16
        for k in range(60):
            data = bytearray(clean)
            at = int(rng.integers(scan, len(data) - 4))
            if k % 4 == 0:
                data = data[:at]
            elif k % 4 == 1:
                for i in rng.integers(scan, len(data) - 2, size=3):
                    data[i] ^= int(rng.integers(1, 256))
            elif k % 4 == 2:
                data[at:at] = bytes([0xFF, int(rng.choice([0xC4, 0xD0, 0xD9, 0xDA, 0xDB]))])
            else:
                del data[at:at + int(rng.integers(1, 40))]
            (tmp_path / "damaged.jpg").write_bytes(data)
            got = prep.stored(str(tmp_path / "damaged.jpg"))
            want, message = _pillow_verdict(bytes(data))
            assert got.status == want, (photo, k, got.reason)
            assert got.data == bytes(data) if want == "ok" else got.reason == f"truncated or corrupt: {message}"
            verdicts[want] = verdicts.get(want, 0) + 1
    assert verdicts["ok"] >= 20 and verdicts["skipped"] >= 20  # both verdicts met, not one of them only
    assert capfd.readouterr().err == ""  # libjpeg's warnings did not reach stderr


def test_workers_wait_while_the_writer_pauses(source):
    """Finished images never pile up in the writing process: at most a window of jobs is out."""
    import time
    from pipelines.convert_parts import prepared, worker_pool
    path, pulled = str(source[0] / "a" / "a0.jpg"), []

    def jobs():
        for i in range(600):
            pulled.append(i)
            yield ImagePrep(max_resolution=MAX_RES), path

    with worker_pool(2) as pool, prepared(jobs(), 600, pool, workers=2) as results:
        assert next(results).status == "ok"
        out, still_since = len(pulled), time.monotonic()
        while time.monotonic() - still_since < 1.0:  # the writer pauses (an fsync at a part's end) until no more is pulled
            time.sleep(0.05)
            if len(pulled) != out:
                out, still_since = len(pulled), time.monotonic()
        assert sum(1 for _ in results) == 599
    assert 4 * 16 * 2 - 16 <= out <= 4 * 16 * 2 + 2 and len(pulled) == 600  # window: 4 chunks of 16 per worker, filled


@pytest.mark.timeout(60)
def test_a_writer_that_stops_early_shuts_the_workers_down(source):
    """The writer leaves with jobs still queued (an error, Ctrl-C): the pool's task thread, waiting for a
    free slot in the window, must end too, or terminating the pool waits for it forever."""
    import time
    from pipelines.convert_parts import prepared, worker_pool
    job = (ImagePrep(max_resolution=MAX_RES), str(source[0] / "a" / "a0.jpg"))
    with worker_pool(2) as pool:
        with pytest.raises(KeyboardInterrupt):
            with prepared(iter([job] * 2000), 2000, pool, workers=2) as results:
                for _ in range(300):
                    assert next(results).status == "ok"
                raise KeyboardInterrupt
        time.sleep(1)  # the converter closes its work directory before it stops the pool


def converter_held_after_its_first_part(dst: Path) -> str:
    """`python -c` code running tools.convert whose images, once a part of `dst` is kept, wait: the command still
    runs when the signal comes."""
    return ("import sys, time\n"
            "from pathlib import Path\n"
            "from pipelines.images import ImagePrep\n"
            "stored = ImagePrep.stored\n"
            f"parts = Path({str(work_dir(dst))!r})\n"
            "def held(self, path):\n"
            "    if any(parts.glob('part-*.json')):\n"
            "        time.sleep(60)\n"
            "    return stored(self, path)\n"
            "ImagePrep.stored = held\n"
            "from tools.convert import main\n"
            "sys.exit(main(sys.argv[1:]))\n")


@pytest.mark.timeout(180)
def test_ctrl_c_stops_the_converter_and_its_workers_with_one_line_and_the_rerun_finishes(tmp_path):
    """Ctrl-C reaches the whole process group: exit 130 with one error line, no worker traceback; the
    same command then finishes from the kept shards."""
    from conftest import ctrl_c_once, write_image_folder
    src = write_image_folder(tmp_path / "src", classes=2, per_class=60)
    dst = tmp_path / "shards"
    command = [str(src), str(dst), "--format", "dali", "--workers", "2", "--shard-size", "10"]
    slowed = converter_held_after_its_first_part(dst)
    first_shard = work_dir(dst) / "part-00000.json"
    stopped = ctrl_c_once(slowed, command, first_shard.exists)
    assert stopped.returncode == 130, stopped.stderr
    parts = len(list(work_dir(dst).glob("part-*.json")))
    assert parts >= 1 and stopped.stderr.splitlines() == [
        f"error: interrupted; no output was written; {parts} finished part(s) are kept in {work_dir(dst)} and the "
        f"same command finishes the rest"]
    assert not dst.exists() and first_shard.exists()

    rerun = subprocess.run([sys.executable, "-m", "tools.convert", *command], cwd=REPO, capture_output=True,
                           text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert rerun.stdout.startswith(f"wrote 120 images to {dst}") and not work_dir(dst).exists()


@pytest.mark.timeout(240)
@pytest.mark.parametrize("sig_name, whole_group", [("SIGTERM", True), ("SIGTERM", False), ("SIGHUP", True)])
def test_sigterm_or_sighup_stops_the_converter_and_its_workers_like_ctrl_c_and_the_rerun_finishes(
        sig_name, whole_group, tmp_path):
    """A scheduler's SIGTERM (to the job's process group, or to the command alone) and a closed terminal's SIGHUP
    end a conversion as Ctrl-C does: one line naming the signal and the kept parts, the shell's exit status for
    that signal (128 + its number), no worker traceback and no worker left; the same command finishes the rest.
    Before, the command died of the signal without a word, and its workers, left alone, printed BrokenPipeError
    tracebacks."""
    import signal
    from conftest import signalled_once, write_image_folder
    sig = getattr(signal, sig_name)
    src = write_image_folder(tmp_path / "src", classes=2, per_class=60)
    dst = tmp_path / "c3.beton"
    command = [str(src), str(dst), "--format", "ffcv", "--workers", "2", "--part-size", "10", "--max-resolution", "64"]
    slowed = converter_held_after_its_first_part(dst)
    first_part = work_dir(dst) / "part-00000.json"
    stopped = signalled_once(slowed, command, first_part.exists, sig, whole_group)
    assert stopped.returncode == 128 + sig, stopped.stderr
    parts = len(list(work_dir(dst).glob("part-*.json")))
    assert parts >= 1 and stopped.stderr.splitlines() == [
        f"error: stopped by {sig_name}; no output was written; {parts} finished part(s) are kept in {work_dir(dst)} "
        f"and the same command finishes the rest"]
    assert not stopped.left_behind and not dst.exists() and first_part.exists()

    rerun = subprocess.run([sys.executable, "-m", "tools.convert", *command], cwd=REPO, capture_output=True,
                           text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert rerun.stdout.startswith(f"wrote 120 images to {dst}") and not work_dir(dst).exists()


def test_a_repeated_stop_signal_is_ignored_in_nested_conversion_blocks_and_after_them_and_sigusr1_stops_too():
    """A rank gets a scheduler's SIGTERM to its process group and torchrun's forwarded copy: the second one, in
    the cleanup after an inner block (`convert`'s inside `ensure_beton`'s) or after the outermost block while
    the error line is being written, must not cut that short. SIGUSR1 (SLURM's warning) stops as SIGTERM does."""
    import signal
    from pipelines.convert import ConversionSignals, StopSignal
    before = {sig: signal.getsignal(sig) for sig in ConversionSignals.STOPS}
    try:
        for sig in ConversionSignals.STOPS:
            signal.signal(sig, signal.SIG_DFL)
        raised = []
        try:
            with ConversionSignals():
                try:
                    with ConversionSignals():
                        os.kill(os.getpid(), signal.SIGUSR1)
                        signal.sigtimedwait([], 0.2)  # (not reached: the handler raises as the signal arrives)
                except StopSignal as stop:
                    raised.append(stop.signum)
                    os.kill(os.getpid(), signal.SIGTERM)  # the repeat, in the outer block's cleanup: ignored
                    raised.append("cleanup done")
        except StopSignal as stop:
            raised.append(("outer", stop.signum))
        assert raised == [signal.SIGUSR1, "cleanup done"]
        assert all(signal.getsignal(sig) == signal.SIG_IGN for sig in ConversionSignals.STOPS)
        os.kill(os.getpid(), signal.SIGTERM)  # after the outermost block: still ignored (this process lives on)
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def test_a_class_folder_without_images_keeps_its_label_as_torchvision_and_the_line_names_it(tmp_path):
    """The labels of torchvision's ImageFolder(allow_empty=True); evaluation refuses such a class, and the conversion
    had said nothing of it."""
    from torchvision.datasets import ImageFolder
    from conftest import write_image_folder
    src = write_image_folder(tmp_path / "src", classes=3, per_class=2)
    for image in (src / "class1").iterdir():
        image.unlink()
    report = convert(src, tmp_path / "out.beton", "ffcv", max_resolution=MAX_RES, workers=1, progress=False)
    assert outcome(report).endswith("; class folders without images, whose labels no image has: class1 (remove them "
                                    "before evaluating on this data)")
    labels = _stored(tmp_path / "out.beton")[1]["f1"].tolist()
    assert labels == [label for _, label in ImageFolder(str(src), allow_empty=True).samples] == [0, 0, 2, 2]
