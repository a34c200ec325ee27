"""The `conversion` section (`--conversion`): `tools.convert` in each format against the decode floor.

Every source file is read once first, so that no repetition also measures the disk (the target is
about the converter's CPU). Each repetition decodes --decode-images originals spread over the set (the
floor: `cv2.imdecode`, one thread, as in decode_floor.py), then converts the whole set to an FFCV
`.beton` and to DALI shards, each in a fresh process (`python -m tools.convert --workers W`), and
deletes the output. Per format: `images_per_s` (images / wall time), `cpu_s_per_image` (user + system
of the converter and its workers), `vs_floor` (that over the floor), `peak_rss_mib` (its largest
process in any repetition) and `vs_target`: images/s over the target `0.7 x W / floor`
(docs/performance.md).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipelines.image_folder import find_image_folder
from tools.bench.decode_floor import decode_cpu_seconds, jpeg_library, original_jpegs
from tools.bench.measure import BenchError, rate_stats, ratio, stats

FORMATS = ("ffcv", "dali")
TARGET_SHARE = 0.7  # of the workers' cores spent at the decode floor
REPO = Path(__file__).resolve().parents[2]


def bench_conversion(args: argparse.Namespace) -> dict:
    _, samples = find_image_folder(args.data)
    images, workers = len(samples), max(1, args.workers)
    originals = original_jpegs(args.data, args.decode_images, samples)
    for path, _ in samples:  # into the page cache, where the machine's memory holds the set
        Path(path).read_bytes()
    floors: list[float] = []
    runs: dict[str, list[dict]] = {fmt: [] for fmt in FORMATS}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".conversion.", dir=args.json.parent))  # one output at a time
    try:
        for _ in range(args.reps):  # alternated, so a change in the machine's pace touches every figure alike
            floors += decode_cpu_seconds(originals, 1)
            for fmt in FORMATS:
                runs[fmt].append(_convert(args.data, scratch / f"out.{fmt}", fmt, workers))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    floor = stats(floors)
    target = TARGET_SHARE * workers / floor["median"]
    section: dict = {"data": str(args.data), "images": images, "workers": workers, "reps": args.reps,
                     "decode_floor": {"cpu_s_per_image": floor, "images": len(originals),
                                      "decoder": f"cv2.imdecode, 1 thread ({jpeg_library()})"},
                     "target_images_per_s": target}
    for fmt, measured in runs.items():
        rate = rate_stats(images, [run["wall_s"] for run in measured])
        cpu = stats([run["cpu_s"] / images for run in measured])
        section[fmt] = {"wall_s": stats([run["wall_s"] for run in measured]), "images_per_s": rate,
                        "cpu_s_per_image": cpu, "vs_floor": ratio(cpu, floor), "vs_target": rate["median"] / target,
                        "peak_rss_mib": max(run["peak_rss_mib"] for run in measured),
                        "written": measured[-1]["written"], "skipped": measured[-1]["skipped"]}
    return section


# Runs the converter and reports its usage. Linux keeps a process's peak RSS across exec, so a converter
# forked straight from this process (torch imported, several hundred MiB) would report this process's.
_LAUNCHER = """import json, os, subprocess, sys
child = subprocess.Popen(sys.argv[2:], stdin=subprocess.DEVNULL)
_, status, usage = os.wait4(child.pid, 0)
with open(sys.argv[1], "w") as out:
    json.dump({"code": os.waitstatus_to_exitcode(status), "cpu_s": usage.ru_utime + usage.ru_stime,
               "peak_rss_mib": usage.ru_maxrss / 1024}, out)
"""


def _convert(data: str, out: Path, fmt: str, workers: int) -> dict:
    """One conversion in a fresh process: wall and CPU seconds (its reaped workers' included), peak RSS of
    its largest process, and what its report counts."""
    usage_file = out.with_name(f"{out.name}.usage.json")
    with tempfile.TemporaryFile() as output:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", _LAUNCHER, str(usage_file), sys.executable, "-m", "tools.convert",
                        data, str(out), "--format", fmt, "--workers", str(workers)],
                       cwd=REPO, stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, check=True)
        wall = time.perf_counter() - start
        output.seek(0)
        said = output.read().decode(errors="replace").strip()
    usage = json.loads(usage_file.read_text())
    usage_file.unlink()
    if usage["code"] != 0:
        raise BenchError(f"tools.convert --format {fmt} failed ({usage['code']}): {said.splitlines()[-1] if said else ''}")
    report = json.loads(Path(f"{out}.report.json").read_text())
    if out.is_dir():
        shutil.rmtree(out)
    else:
        out.unlink()
    Path(f"{out}.report.json").unlink()
    return {"wall_s": wall, "cpu_s": usage["cpu_s"], "peak_rss_mib": usage["peak_rss_mib"],
            "written": report["written"], "skipped": report["skipped"]}
