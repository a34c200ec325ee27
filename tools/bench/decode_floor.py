"""The `decode_floor` section: CPU seconds per image to only decode JPEGs to RGB pixels.

One thread, OpenCV's `cv2.imdecode` (libjpeg-turbo; the build string is recorded).
`cpu_s_per_image` is the floor of the original files; `decode_floor.<pipeline>.cpu_s_per_image`
that of exactly the bytes that pipeline decodes: the originals for `reference` (and for `dali`
reading an ImageFolder), the JPEGs stored in the `.beton` for `ffcv` (located with ffcv's
Reader), the `.jpg` tar members for `dali` reading webdataset records.
"""
from __future__ import annotations

import argparse
import json
import tarfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bt_fast.config import Config
from pipelines.image_folder import find_image_folder
from tools.bench.measure import BenchError, stats


def jpeg_library() -> str:
    import cv2
    lines = [line.strip() for line in cv2.getBuildInformation().splitlines() if line.strip().startswith("JPEG:")]
    return f"OpenCV {cv2.__version__}, {lines[0].split(':', 1)[1].strip() if lines else 'JPEG library unknown'}"


def _spread(items: list, limit: int) -> list:
    """At most `limit` items spread evenly over `items` (all classes represented)."""
    if len(items) <= limit:
        return items
    step = len(items) / limit
    return [items[int(i * step)] for i in range(limit)]


def original_jpegs(data: str | Path, limit: int, samples: list | None = None) -> list[bytes]:
    """At most `limit` source files of the image folder `data`, spread over it; `samples` is its
    listing where the caller holds it already."""
    if samples is None:
        _, samples = find_image_folder(data)
    return [Path(path).read_bytes() for path, _ in _spread(samples, limit)]


def beton_jpegs(path: str | Path, limit: int, field: str = "image") -> list[bytes]:
    """The JPEG bytes an FFCV `.beton` stores for `field`, located through ffcv's own Reader.

    Each sample's metadata holds `data_ptr`; the allocation table maps that pointer to its size.
    Samples written raw (not JPEG) are skipped: FFCV copies them, it does not decode them.
    """
    from ffcv.fields.rgb_image import IMAGE_MODES
    from ffcv.reader import Reader
    reader = Reader(str(path))
    if field not in reader.field_names:
        raise BenchError(f"{path} has no field '{field}' (fields: {reader.field_names})")
    meta = reader.metadata[f"f{reader.field_names.index(field)}"]  # fields are unnamed: f0, f1, ... in order
    sizes = dict(zip(reader.alloc_table["ptr"].tolist(), reader.alloc_table["size"].tolist()))
    jpg = IMAGE_MODES["jpg"]
    picks = _spread([i for i in range(len(meta)) if meta["mode"][i] == jpg], limit)
    out = []
    with open(path, "rb") as f:
        for i in picks:
            ptr = int(meta["data_ptr"][i])
            f.seek(ptr)
            out.append(f.read(sizes[ptr]))
    return out


def shard_jpegs(root: str | Path, limit: int) -> list[bytes]:
    """The `.jpg` members of the webdataset shards listed in `root/dataset.json` (tools.convert --format dali)."""
    root = Path(root)
    meta = json.loads((root / "dataset.json").read_text())
    ext = "." + meta.get("extensions", {}).get("image", "jpg")
    out: list[bytes] = []
    for shard in meta["shards"]:
        with tarfile.open(root / shard["tar"]) as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(ext):
                    out.append(tar.extractfile(member).read())
    return _spread(out, limit)


def jpeg_source(pipeline, config: Config) -> dict:
    """Which bytes `pipeline` (built from `config`) decodes: {"kind": originals|beton|shards, "path": ...}."""
    if config.pipeline == "ffcv":
        for attr in ("beton", "beton_path", "path"):
            value = getattr(pipeline, attr, None)
            if value and str(value).endswith(".beton"):
                return {"kind": "beton", "path": str(value)}
        beton = config.ffcv.beton or str(Path(config.data.rstrip("/")).with_suffix(".beton"))
        return {"kind": "beton", "path": beton}
    if config.pipeline == "dali":
        records = getattr(pipeline, "records", None) or config.dali.records
        if records:
            return {"kind": "shards", "path": str(records)}
    return {"kind": "originals", "path": str(config.data)}


def load_jpegs(source: dict, limit: int) -> list[bytes]:
    if source["kind"] == "beton":
        return beton_jpegs(source["path"], limit)
    if source["kind"] == "shards":
        return shard_jpegs(source["path"], limit)
    return original_jpegs(source["path"], limit)


def decode_cpu_seconds(jpegs: list[bytes], reps: int) -> list[float]:
    """Per-image CPU seconds (this thread only) of decoding every JPEG to RGB pixels, per repetition."""
    import cv2
    flags = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
    buffers = [np.frombuffer(b, dtype=np.uint8) for b in jpegs]
    per_image = []
    for rep in range(reps + 1):  # rep 0: warm-up (page cache, allocator)
        t0 = time.thread_time()
        for buf in buffers:
            if cv2.imdecode(buf, flags) is None:
                raise BenchError("cv2.imdecode could not decode a JPEG the pipeline reads")
        if rep:
            per_image.append((time.thread_time() - t0) / len(buffers))
    return per_image


def _pipeline_floor(source: dict, limit: int, reps: int) -> dict:
    try:
        jpegs = load_jpegs(source, limit)
        if not jpegs:
            raise BenchError(f"no JPEGs found in {source['path']}")
        return {"source": source["kind"], "path": source["path"],
                "cpu_s_per_image": stats(decode_cpu_seconds(jpegs, reps)), "images": len(jpegs),
                "mean_jpeg_bytes": float(np.mean([len(b) for b in jpegs]))}
    except Exception as err:  # noqa: BLE001 - an unreadable source is reported, the others still measured
        return {"unavailable": f"cannot read the {source['kind']} at {source['path']}: {type(err).__name__}: {err}"}


def bench_decode_floor(args: argparse.Namespace, sources: dict[str, dict | None], loaders: dict[str, dict]) -> dict:
    """The section: the originals' floor, then per pipeline the floor of the bytes it decodes."""
    originals = original_jpegs(args.data, args.decode_images)
    floor = stats(decode_cpu_seconds(originals, args.reps))
    out: dict[str, Any] = {
        "decoder": f"cv2.imdecode, 1 thread ({jpeg_library()})",
        "cpu_s_per_image": floor, "images": len(originals),
        "mean_jpeg_bytes": float(np.mean([len(b) for b in originals])),
    }
    for name, entry in loaders.items():
        source = sources.get(name)
        if source is None:
            out[name] = {"unavailable": entry.get("unavailable", "pipeline not measured")}
        elif source["kind"] == "originals":
            out[name] = {"source": "originals", "path": source["path"], "cpu_s_per_image": floor,
                         "images": len(originals)}
        else:
            out[name] = _pipeline_floor(source, args.decode_images, args.reps)
    return out
