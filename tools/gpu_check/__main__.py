"""`python -m tools.gpu_check`: run every check, print pass/fail and the throughput table, write JSON."""
from __future__ import annotations

import contextlib
import gc
import io
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Sequence

from bt_fast.errors import (STARTING, CliParser, cli_errors, exit_on_interrupt, one_line, output_file,
                            quiet_no_cuda_runtime_warning, say)

with exit_on_interrupt(STARTING):
    import torch

    from bt_fast.distributed import resolve_device
    from bt_fast.files import write_json
    from tools.gpu_check.data_checks import (check_augment, check_dali, check_device_crop, check_device_decode,
                                             check_ffcv, installed)
    from tools.gpu_check.hot_path_checks import check_no_host_sync, check_rank_devices
    from tools.gpu_check.measure import SIZES, Result
    from tools.gpu_check.train_checks import check_amp, check_ddp, check_lars, check_resume, measure_training

CHECKS: list[Callable] = [check_augment, check_device_crop, check_device_decode, check_amp, check_lars, check_resume,
                          check_ddp, check_no_host_sync, check_ffcv, check_dali, check_rank_devices]
THROUGHPUT = "throughput"  # the training-speed part, selectable by --only as a check is


def check_name(check: Callable) -> str:
    """A check's name on the command line and in a crashed check's line: check_no_host_sync -> "no host sync"."""
    return check.__name__.removeprefix("check_").replace("_", " ")


def selected(only: str | None) -> tuple[list[Callable], bool]:
    """(the checks, whether to measure throughput) that `--only a,b` names ("no-host-sync" or "no host sync"
    name check_no_host_sync); every check and the throughput without it. ValueError for an unknown name."""
    if only is None:
        return CHECKS, True
    names = {name.strip().replace("-", " ").replace("_", " ") for name in only.split(",") if name.strip()}
    known = {check_name(check): check for check in CHECKS}
    unknown = sorted(names - known.keys() - {THROUGHPUT})
    if unknown or not names:
        raise ValueError(f"--only takes names from {', '.join(n.replace(' ', '-') for n in [*known, THROUGHPUT])}; "
                         f"got {only!r}")
    return [check for name, check in known.items() if name in names], THROUGHPUT in names


@contextlib.contextmanager
def held_output():
    """What the code under check prints (a first-use conversion's progress, a resume notice) is held back:
    the run prints only its check lines and table. Held text is written to stderr if the block raises."""
    held = io.StringIO()
    try:
        with contextlib.redirect_stdout(held), contextlib.redirect_stderr(held):
            yield
    except BaseException:
        sys.stderr.write(held.getvalue())
        raise


@contextlib.contextmanager
def new_garbage_only():
    """Within, gc.collect() skips every object alive on entry (mostly the imported modules: a full
    collection of those takes a quarter of a second, after every check)."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def run_checks(device: torch.device, report: Callable[[str], None] = say, checks: Sequence[Callable] | None = None,
               throughput: bool = True) -> dict:
    """Each of `checks` (default CHECKS) in turn, then the throughput part if asked; the summary for the JSON."""
    checks = CHECKS if checks is None else checks
    sizes = SIZES[device.type]
    results, measured = [], {}
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp, new_garbage_only():
        for index, check in enumerate(checks):
            workdir = Path(tmp) / str(index)
            workdir.mkdir()
            try:
                with held_output():
                    outcome = list(check(device, sizes, workdir, measured))
                    # Its garbage goes now, so that a finalizer's complaint is held too: numba's, about the
                    # FFCV host crop's compiled decoder, is printed when that is collected and is no finding.
                    gc.collect()
            except Exception as err:  # noqa: BLE001 - a crashing check is a failed check; the others still run
                outcome = [Result(check_name(check), f"fail: {one_line(err)}")]
            for result in outcome:
                results.append(result)
                error = "" if result.error is None else f"  error {result.error:.3g} (tolerance {result.tolerance:g})"
                report(f"{result.check:<18} {result.status}{error}")
        if throughput:
            with held_output():
                measure_training(device, sizes, Path(tmp), measured)
    if measured:
        report("\nthroughput")
    for key, value in measured.items():
        report(f"  {key:<40} {value if isinstance(value, str) else f'{value:.4g}'}")
    failed = any(r.status.startswith("fail") for r in results) or any(
        isinstance(value, str) and value.startswith("error") for value in measured.values())
    return {"device": str(device), "sizes": asdict(sizes), "checks": [asdict(r) for r in results],
            "throughput": measured, "passed": not failed}


# The packages each end-to-end pipeline needs: without them its entry is a skip, with them a failure.
END_TO_END_NEEDS = {"reference": (), "ffcv": ("ffcv",), "ffcv_device_decode": ("ffcv", "torchcodec"),
                    "dali": ("nvidia.dali",)}


def failed_pipelines(section: dict) -> list[str]:
    """The end-to-end pipelines that did not train although the packages they need are installed (a crash,
    a time-out, an error while building or training)."""
    return [name for name, entry in section.items() if isinstance(entry, dict) and "unavailable" in entry
            and all(installed(module) for module in END_TO_END_NEEDS.get(name, ()))]


def run_end_to_end(device: torch.device, report: Callable[[str], None] = say, options: Sequence[str] = ()) -> dict:
    """`python -m tools.bench --end-to-end --device <device> <options>` (the bench's sizes for that device by
    default), reported as its table."""
    from tools.bench.__main__ import parse_args, resolve_data
    from tools.bench.end_to_end import bench_end_to_end
    from tools.bench.report import end_to_end_lines
    args = parse_args(["--end-to-end", "--device", device.type, *options])
    with held_output():
        resolve_data(args)
        section = bench_end_to_end(args, args.pipelines)
    report("")
    for line in end_to_end_lines(section):
        report(line)
    return section


def main(argv: list[str] | None = None) -> None:
    parser = CliParser(prog="python -m tools.gpu_check",
                       description="check bt_fast's CUDA code paths and measure their speed")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None,
                        help="default: cuda, or a one-line notice and exit 0 when no CUDA device is visible")
    parser.add_argument("--json", type=output_file, default=None, help="also write the results and throughput here")
    parser.add_argument("--end-to-end", action="store_true",
                        help="then train end to end with every pipeline (python -m tools.bench --end-to-end)")
    parser.add_argument("--only", default=None, metavar="NAMES",
                        help="run only these checks, comma-separated, e.g. no-host-sync,augment,throughput "
                             "(to rerun what failed); default: every check and the throughput")
    args = parser.parse_args(argv)
    try:
        checks, throughput = selected(args.only)
    except ValueError as err:
        parser.error(str(err))
    if args.device is None and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible, nothing to check (--device cpu runs the checks on the CPU)")
        return
    quiet_no_cuda_runtime_warning()
    with cli_errors(), exit_on_interrupt(outcome="nothing was written (the JSON comes after the checks)"):
        device = resolve_device(args.device or "cuda", setting="--device")
        summary = run_checks(device, checks=checks, throughput=throughput)
        if args.json:  # kept if the end-to-end part below fails, is stopped or outlasts a job's time
            write_json(args.json, summary)
    if args.end_to_end:
        kept = f"the checks' results are in {args.json}" if args.json else "the checks' results are above"
        with cli_errors(), exit_on_interrupt(outcome=f"{kept}; the end-to-end part was not written"):
            if device.type == "cuda":  # GPU only: the checks' cached blocks go back before the children train
                torch.cuda.empty_cache()
            try:
                summary["end_to_end"] = run_end_to_end(device)
                failed = failed_pipelines(summary["end_to_end"])
                if failed:  # installed, and still no figure: a failure, not a skip
                    summary["passed"] = False
                    say(f"\nend to end: FAILED for {', '.join(failed)} (see their lines above)")
            except Exception as err:  # noqa: BLE001 - recorded in the JSON beside the checks, and the run fails
                summary["end_to_end"], summary["passed"] = {"error": one_line(err)}, False
                say(f"\nend to end: error: {one_line(err)}")
            if args.json:
                write_json(args.json, summary)
    say(f"\n{'all checks passed' if summary['passed'] else 'some checks FAILED'} on {device}")
    sys.exit(0 if summary["passed"] else 1)


if __name__ == "__main__":
    main()
