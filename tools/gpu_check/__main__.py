"""`python -m tools.gpu_check`: run every check, print pass/fail and the throughput table, write JSON."""
from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

from bt_fast.distributed import resolve_device
from bt_fast.errors import cli_errors, one_line
from bt_fast.files import write_json
from tools.gpu_check.data_checks import (check_augment, check_dali, check_device_crop, check_device_decode,
                                         check_ffcv)
from tools.gpu_check.measure import SIZES, Result
from tools.gpu_check.train_checks import check_amp, check_ddp, check_lars, check_resume, measure_training

CHECKS: list[Callable] = [check_augment, check_device_crop, check_device_decode, check_amp, check_lars, check_resume,
                          check_ddp, check_ffcv, check_dali]


def run_checks(device: torch.device, report: Callable[[str], None] = print) -> dict:
    sizes = SIZES[device.type]
    results, measured = [], {}
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        for index, check in enumerate(CHECKS):
            workdir = Path(tmp) / str(index)
            workdir.mkdir()
            try:
                outcome = list(check(device, sizes, workdir, measured))
            except Exception as err:  # noqa: BLE001 - a crashing check is a failed check; the others still run
                outcome = [Result(check.__name__.removeprefix("check_").replace("_", " "), f"fail: {one_line(err)}")]
            for result in outcome:
                results.append(result)
                error = "" if result.error is None else f"  error {result.error:.3g} (tolerance {result.tolerance:g})"
                report(f"{result.check:<18} {result.status}{error}")
        measure_training(device, sizes, Path(tmp), measured)
    report("\nthroughput")
    for key, value in measured.items():
        report(f"  {key:<40} {value if isinstance(value, str) else f'{value:.4g}'}")
    return {"device": str(device), "sizes": asdict(sizes), "checks": [asdict(r) for r in results],
            "throughput": measured, "passed": all(not r.status.startswith("fail") for r in results)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.gpu_check",
                                     description="check bt_fast's CUDA code paths and measure their speed")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None,
                        help="default: cuda, or a one-line notice and exit 0 when no CUDA device is visible")
    parser.add_argument("--json", default=None, help="also write the results and throughput here")
    args = parser.parse_args(argv)
    if args.device is None and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible, nothing to check (--device cpu runs the checks on the CPU)")
        return
    with cli_errors():
        device = resolve_device(args.device or "cuda", setting="--device")
        summary = run_checks(device)
        if args.json:
            write_json(args.json, summary)
    print(f"\n{'all checks passed' if summary['passed'] else 'some checks FAILED'} on {device}")
    sys.exit(0 if summary["passed"] else 1)


if __name__ == "__main__":
    main()
