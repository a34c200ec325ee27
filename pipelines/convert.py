"""Convert an ImageFolder or a `path label` list into an FFCV `.beton` or DALI webdataset shards.

The source is an ImageFolder (SRC/<class>/<image>, labels = index of the sorted class names, exactly as
`pipelines.image_folder.find_image_folder`; not a split dataset's root, `is_split_root`) or a text file whose
lines are `<path> <label>` (path relative to the list file's directory or absolute, label an int
0..`MAX_LIST_LABEL`; blank lines and lines starting with '#' are ignored).

`convert` does, in order:

1. DST is checked: a path that does not exist or an empty directory is used; a previous output
   of the converter (a `.beton` header, or a directory whose `dataset.json` names every file in
   it) is left as it is where it holds this very conversion (`unconverted`: nothing to do), and is
   otherwise replaced only with `force`; anything else is refused, `force` or not, and so is a dali
   DST inside an ImageFolder source (it would become one of its classes) and a DST whose report path
   (step 5) is a directory.
2. The samples are split into parts of consecutive output positions (`part_size` for ffcv, one
   tar shard of `shard_size` for dali). Each file is read, validated and prepared in one decode
   over `workers` processes (`pipelines.images.ImagePrep.stored`): zero-byte, missing,
   truncated, corrupt and non-image files are *skipped*; other pixel modes are *converted* to RGB
   (rules in `pipelines.images`); images whose longer side exceeds `max_resolution` are shrunk
   to it and anything re-encoded is encoded at `jpeg_quality`.
3. Each finished part is kept in the work directory `work_dir(DST)` (`.DST.parts` beside DST)
   with its part report, so a conversion that is killed and rerun with the same arguments and
   the same source listing redoes only the parts it had not finished (a source file rewritten
   in place between the two runs is not noticed). Nothing but that directory is held per image:
   memory is flat in the number of images, apart from the source listing and, for ffcv, the
   metadata the `.beton` header holds (`pipelines.ffcv_format.finish_beton`). When the storage
   refuses a write (full, over quota, read-only), the unfinished part's data is removed and a
   StorageError names DST and says how many parts are kept.
4. The parts are put together and moved into place only when complete; then the work directory
   is removed. dali: the shards move into a directory under a hidden temporary name in DST's
   directory. ffcv: the parts' pages are written in place, one part after another, into the
   `.beton` in the work directory (`output.beton`, its data region placed for every listed
   sample), and its tables go around them at the end: the data is written once and the disk
   never holds it twice. A Ctrl-C or a stop signal from the move into place on is held until the report
   is written, the work directory removed and the workers stopped, and is then an `Interrupted` error
   saying that DST is complete: it can neither leave a complete DST without its report nor pass for an
   interrupt that wrote nothing. Before that, SIGTERM, SIGHUP and SIGUSR1 (a scheduler's stop, a closed
   terminal, SLURM's warning) stop the conversion as Ctrl-C does (`ConversionSignals`), and `stopped` words
   what is kept.
5. A JSON report goes to `report_path(DST)` = `DST + '.report.json'` (UTF-8, paths as text):
   counts, one `{path, status, reason}` entry per skipped or converted file, and the source's
   `source_state` (how `pipelines.ffcv` tells, without a rescan, that the source changed since) and
   an ImageFolder's `listing_digest` (whether it changed: compared after a rescan).

Formats:

- ffcv: DST is a `.beton` (`pipelines.ffcv_format`), in source order.
- dali: DST is a directory of webdataset tar shards plus DALI index files and `dataset.json`
  (layout in `pipelines.dali_format`), in a fixed shuffled order.

Both store the same bytes per image (`ImagePrep.stored`): a source file that is already a
baseline RGB JPEG within the size limit and needs no EXIF rotation byte for byte (no second lossy
generation, and no encode); everything else, progressive JPEGs included, re-encoded as above.
"""
from __future__ import annotations

import json
import os
import signal
import threading
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from bt_fast.errors import (DataError, Interrupted, StorageError, WorkerLost, leave_a_lost_terminal, option_flag,
                            some_of)
from bt_fast.files import (atomic_write_text, ensure_writable_directory, free_bytes, fsync_directory, mebibytes,
                           remove_orphaned_temporaries, remove_path, size_text, storage_fault, temporary_name,
                           write_json)
from bt_fast.host import usable_cores
from bt_fast.progress import progress as progress_bar
from bt_fast.worker_pool import WorkerPool
from pipelines.convert_parts import (WorkDir, job_fingerprint, listing_digest, open_beton, prepared, work_dir,
                                     worker_pool, write_part)
from pipelines.dali_format import shuffled_order, write_meta, written_files
from pipelines.ffcv_format import beton_samples, finish_beton
from pipelines.image_folder import SampleList, classes_without_images, find_image_folder, is_split_root
from pipelines.images import DEFAULT_JPEG_QUALITY, DEFAULT_MAX_RESOLUTION, ImagePrep

DEFAULT_SHARD_SIZE = 1000
DEFAULT_PART_SIZE = 10_000  # ffcv: images per resumable part
FORMATS = ("ffcv", "dali")


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------

# A list file names its classes '0'..'max label'; a larger "label" is another column (a size, a time stamp)
# and would make that many names.
MAX_LIST_LABEL = 999_999


def read_list_file(list_file: Path) -> tuple[list[str], SampleList]:
    """(class names '0'..'max label', (path, label) samples) from a `<path> <label>` list file (UTF-8, a
    leading byte-order mark ignored), read a line at a time. A label is an integer 0..`MAX_LIST_LABEL`;
    anything else is a DataError naming the line."""
    base = list_file.parent

    def parsed() -> Iterator[tuple[str, int]]:
        try:
            with open(list_file, encoding="utf-8-sig") as lines:
                for number, line in enumerate(lines, start=1):
                    line = line.strip()
                    if not line or line.startswith("#"):
                        continue
                    parts = line.rsplit(None, 1)
                    if len(parts) != 2:
                        raise DataError(f"{list_file} line {number}: expected '<path> <label>', got {line[:80]!r}")
                    name, raw_label = parts
                    try:
                        label = int(raw_label)
                    except ValueError:
                        raise DataError(f"{list_file} line {number}: label {raw_label!r} is not an integer") from None
                    if label < 0:
                        raise DataError(f"{list_file} line {number}: label {label} is negative")
                    if label > MAX_LIST_LABEL:
                        raise DataError(f"{list_file} line {number}: label {raw_label[:30]} is above {MAX_LIST_LABEL:,}; "
                                        f"the last column is the class index, counted from 0")
                    path = Path(name)
                    yield str(path if path.is_absolute() else base / path), label
        except UnicodeDecodeError:
            raise DataError(f"source {list_file} is neither a directory nor a UTF-8 '<path> <label>' list file") from None

    samples = SampleList(parsed())
    if not samples:
        raise DataError(f"list file {list_file} names no images (expected lines '<path> <label>')")
    return [str(i) for i in range(int(samples.labels.max()) + 1)], samples


def scan_source(src: str | Path) -> tuple[list[str], SampleList]:
    """(class names indexed by label, (path, label) samples) from an ImageFolder or a list file."""
    src = Path(src)
    check_source_exists(src)
    if src.is_dir():
        if is_split_root(src):
            raise DataError(f"source {src} holds train/ and val/: its two splits would be stored as two classes, the "
                            f"validation images among the training ones; give {src / 'train'}")
        return find_image_folder(src)
    return read_list_file(src)


def check_source_exists(src: Path) -> None:
    if not src.exists():
        raise DataError(f"source {src} does not exist (expected an ImageFolder directory or a '<path> <label>' list file)")


def listed_source(src: Path) -> tuple[list[list] | None, list[str], SampleList]:
    """(`source_state`, then `scan_source`) of `src`; a source that exists but cannot be read (its
    permissions, a socket) is a DataError naming it, not an OSError that reads as a failed write."""
    try:
        state = source_state(src) if src.exists() else None  # before the scan: a change made during it is newer
        return (state, *scan_source(src))
    except OSError as err:
        raise DataError(f"cannot read the source {err.filename or src} ({err.strerror or err}); make it readable "
                        f"or choose another SRC") from None


def source_state(src: str | Path) -> list[list]:
    """A cheap fingerprint of the source's listing: [name, mtime_ns] of the source itself and, for
    an ImageFolder, of each class directory. Adding, removing or renaming an image changes its
    directory's mtime, so an unchanged state means an unchanged flat ImageFolder (a change inside
    a nested sub-directory of a class is not seen). Costs one stat per class."""
    src = Path(src)
    state = [[".", src.stat().st_mtime_ns]]
    if src.is_dir():
        with os.scandir(src) as entries:
            state += sorted([entry.name, entry.stat().st_mtime_ns] for entry in entries
                            if entry.is_dir() and not entry.name.startswith("."))
    return state


def source_change(output: str | Path, data: str | Path) -> str | None:
    """What changed in the ImageFolder `data` since `output` was converted from it, in words (images added,
    removed, renamed or moved to another class: its `listing_digest`); None when nothing did, or when the
    report of `output` is missing or names another source. The folder is rescanned only when its
    `source_state` (one stat per class) differs from the one recorded."""
    output = Path(output)
    try:
        report = json.loads(report_path(output).read_text())
    except (OSError, ValueError):
        return None
    if not data or not Path(data).is_dir() or Path(data).resolve() not in recorded_sources(report, output):
        return None
    if report.get("source_state") is not None and report["source_state"] == source_state(data):
        return None
    converted = report.get("written", 0) + report.get("skipped", 0)
    samples = find_image_folder(data)[1]
    if len(samples) != converted:
        return f"{data} now holds {len(samples)} images but {output} was converted from {converted}"
    if report.get("listing_digest") not in (None, listing_digest(data, samples)):
        return (f"{data} holds as many images as {output} was converted from ({converted}), but not the same "
                f"ones (added, removed, renamed or moved to another class)")
    return None


def recorded_sources(report: dict, output: Path) -> set[Path]:
    """Where the source the report of `output` names may be now, resolved: the report spells it as the
    converting command did (relative to that command's directory, perhaps), so it is taken both as it stands
    and at the same place relative to `output` as to the output the report names."""
    source, recorded = report.get("source"), report.get("output")
    if not isinstance(source, str) or not source:
        return set()
    places = {Path(source).resolve()}
    if isinstance(recorded, str) and recorded and Path(source).is_absolute() == Path(recorded).is_absolute():
        places.add((output.parent / os.path.relpath(source, Path(recorded).parent)).resolve())
    return places


# --------------------------------------------------------------------------------------------
# The destination
# --------------------------------------------------------------------------------------------

def report_path(dst: str | Path) -> Path:
    """Where `convert` writes the report of output `dst`."""
    dst = Path(dst)
    return dst.with_name(dst.name + ".report.json")


class StopSignal(KeyboardInterrupt):
    """A stop signal during a conversion (`ConversionSignals.STOPS`), raised where Ctrl-C raises its
    KeyboardInterrupt, so that the same code stops the workers and keeps the finished parts."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def stopped(cause: BaseException | int, rest: str) -> Interrupted:
    """The error of a conversion that Ctrl-C or a stop signal (`cause`: its KeyboardInterrupt or StopSignal,
    or the signal's number) cut short: `interrupted<rest>` or `stopped by SIGTERM<rest>`, whose exit code is
    the shell's status for that signal (128 + its number: 130 for Ctrl-C, 143 for SIGTERM)."""
    signum = cause if isinstance(cause, int) else getattr(cause, "signum", signal.SIGINT)
    how = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
    return Interrupted(how + rest, signum)


def kept_after_interrupt(dst: str | Path) -> str:
    """What a conversion to `dst` that was interrupted keeps, for the user's one line."""
    kept = work_dir(dst)
    parts = len(list(kept.glob("part-*.json")))  # a part's report is written last
    return (f"{parts} finished part(s) are kept in {kept} and the same command finishes the rest" if parts
            else "no part was finished yet")


def previous_output(dst: Path) -> str | None:
    """In words, the previous output of the converter that `dst` holds; None if it holds something else.

    Raises DataError if `dst` is a converter's directory that also holds files the converter did
    not write (replacing it would delete them).
    """
    if dst.is_file():
        samples = beton_samples(dst)
        return None if samples is None else f"the FFCV dataset {dst} ({samples} samples)"
    found = written_files(dst) if dst.is_dir() else None
    if found is None:
        return None
    names, samples = found
    foreign = sorted(set(os.listdir(dst)) - set(names))
    if foreign:
        raise DataError(f"output {dst} holds a previous conversion and also files tools.convert did not write "
                        f"({some_of(foreign)}); refusing to replace it: move them out or choose another DST")
    return (f"the DALI dataset in {dst} (dataset.json and {(len(names) - 1) // 2} shard(s) with their .idx, "
            f"{samples} samples)")


def check_destination(src: Path, dst: Path, force: bool, settings: dict | None = None) -> dict | None:
    """Refuse a DST that must not be replaced (module docstring, step 1); DataError in one line. Without `force`,
    a previous output that is what this conversion would write (`settings`: the report's settings of this one;
    `unconverted` says how one compares) is no error: its report is returned, and there is nothing to do."""
    if dst.is_symlink():
        raise DataError(f"output {dst} is a symbolic link; give the path it points to, or another DST")
    if not dst.exists() or (dst.is_dir() and not any(dst.iterdir())):
        return None
    what = previous_output(dst)
    if what is None:
        kind = "directory" if dst.is_dir() else "file"
        raise DataError(f"output {dst} is a {kind} tools.convert did not write (no .beton header, no dataset.json); "
                        f"refusing to replace it: choose another DST or remove it yourself")
    if not force:
        report, change = unconverted(src, dst, settings) if settings is not None else (None, "")
        if change is None:
            return report
        raise DataError(f"output {dst} already holds {what}{change}; pass --force to replace it (and its report "
                        f"{report_path(dst)})")
    resolved_src, resolved_dst = src.resolve(), dst.resolve()
    if resolved_src == resolved_dst or resolved_dst in resolved_src.parents:
        raise DataError(f"output {dst} contains the source {src}; refusing to overwrite it")
    return None


def unconverted(src: Path, dst: Path, settings: dict) -> tuple[dict | None, str | None]:
    """(the report of the previous output `dst`, None) where it is the conversion of `src` with `settings` (format,
    --max-resolution, --jpeg-quality, a dali DST's --shard-size) and `src` has not changed since: its `source_state`,
    or for an ImageFolder whose folders' times changed, its listing (`source_change`). Otherwise (None or the
    report, what differs, as the words to follow "DST holds <its dataset>"); an image rewritten in place is
    not seen."""
    try:
        report = json.loads(report_path(dst).read_text())
        samples = beton_samples(dst) if dst.is_file() else written_files(dst)[1]
    except (OSError, ValueError, TypeError):
        return None, f", whose report {report_path(dst)} is missing or unreadable"
    if not isinstance(report, dict) or report.get("written") != samples:
        return None, f", which its report {report_path(dst)} does not describe"
    if src.resolve() not in recorded_sources(report, dst):
        return report, f" converted from {report.get('source')}, not {src}"
    changed = [f"{option_flag(key)} {report.get(key, '(not recorded)')}, not {value}"
               for key, value in settings.items() if report.get(key) != value]
    if changed:
        return report, f" converted with {', '.join(changed)}"
    check_source_exists(src)
    try:
        if report.get("source_state") == source_state(src):
            return report, None
        change = source_change(dst, src) if src.is_dir() else f"{src} was modified since"
    except OSError as err:  # (the conversion itself would name it as `listed_source` does)
        return report, f"; the source {src} cannot be read now ({err.strerror or err})"
    if change is None and src.is_dir() and report.get("listing_digest") is not None:
        return report, None
    return report, f"; {change or f'{src} may have changed since'}"


def _settings(fmt: str, max_resolution: int, jpeg_quality: int, shard_size: int) -> dict:
    """The settings a report records: those that decide what a conversion writes (--part-size only decides
    where a stopped one goes on from)."""
    settings = {"format": fmt, "max_resolution": max_resolution, "jpeg_quality": jpeg_quality}
    if fmt == "dali":
        settings["shard_size"] = shard_size
    return settings


def check_report_place(dst: Path) -> None:
    """Refuse a DST whose report path is a directory (DataError in one line): the report could not be
    written once DST was, and the conversion would end in an error with DST in place."""
    report = report_path(dst)
    if report.is_dir():
        raise DataError(f"{report}, where the report of {dst} goes, is a directory; move it away or choose "
                        f"another DST")


def check_outside_source(src: Path, dst: Path, fmt: str) -> None:
    """Refuse a dali DST inside the source ImageFolder `src` (DataError in one line): its directory would
    be listed as one more class of `src` by the next listing, shifting the labels of the classes after it."""
    if fmt == "dali" and src.is_dir() and src.resolve() in dst.resolve().parents:
        raise DataError(f"output {dst} is inside the source {src}, where its directory would be read as one more "
                        f"class; choose a DST outside {src}")


def check_writable(directory: Path) -> None:
    """Create `directory` if needed and make sure a file can be written there (DataError otherwise)."""
    try:
        ensure_writable_directory(directory)
    except OSError as err:
        blocking = next((path for path in (directory, *directory.parents) if path.is_file()), None)
        if blocking is not None:
            raise DataError(f"cannot write into {directory}: {blocking} is a file, not a directory; choose a DST "
                            f"whose directory is a directory or can be created") from None
        raise DataError(f"cannot write into {directory} ({err.strerror or err}); choose an output on "
                        f"writable storage") from None


def install_output(tmp: Path, dst: Path) -> None:
    """Move the finished file or directory `tmp` to `dst`, replacing whatever `dst` is.

    A file over a file is one atomic rename. A directory cannot be renamed over anything, so
    the old `dst` is parked under a temporary name, the new one moved in, the old one dropped;
    if the second rename fails the old `dst` is put back.
    """
    if (dst.exists() or dst.is_symlink()) and not (tmp.is_file() and dst.is_file()):
        parked = temporary_name(dst)
        os.replace(dst, parked)
        try:
            os.replace(tmp, dst)
        except BaseException:
            os.replace(parked, dst)
            raise
        remove_path(parked)
    else:
        os.replace(tmp, dst)
    fsync_directory(dst.parent)


def outcome(report: dict) -> str:
    """One line saying what `convert` wrote, from its report: the skipped files counted by kind of reason
    (the reason up to its first colon), most frequent first; the finished parts of an earlier run it went on
    from, or removed because that run's arguments or source differed; the class folders without images."""
    if report.get("unchanged"):  # `convert` found the same conversion in place
        return (f"{report['output']} already holds the conversion of {report['source']} with these settings "
                f"({report['written']} images; report: {report_path(report['output'])}): nothing to do; --force "
                f"converts again")
    kinds = Counter(entry["reason"].split(":")[0] for entry in report["files"] if entry["status"] == "skipped")
    skipped = f"{report['skipped']} skipped" + (": " + ", ".join(f"{count} {kind}" for kind, count in
                                                                 kinds.most_common()) + ";" if kinds else ",")
    written = report["written"]
    line = (f"wrote {written} image{'s' * (written != 1)} to {report['output']} ({skipped} {report['converted']} "
            f"converted; report: {report_path(report['output'])})")
    run = report.get("this_run", {})
    removed, differences = run.get("removed", (0, []))
    if removed:
        line += (f"; removed {removed} finished part{'s' * (removed != 1)} of an earlier conversion to it, which "
                 f"differed ({', '.join(differences)})")
    if run.get("reused"):
        line += f"; went on from {run['reused']} of its {run['parts']} parts, finished by an earlier run"
    if run.get("empty_classes"):  # as in torchvision's ImageFolder(allow_empty=True); evaluation refuses them
        line += (f"; class folders without images, whose labels no image has: {some_of(run['empty_classes'])} "
                 f"(remove them before evaluating on this data)")
    return line


def write_report(path: Path, report: dict) -> None:
    """The report as UTF-8 JSON with paths as text; a path that is not valid Unicode stays escaped."""
    try:
        atomic_write_text(path, json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    except UnicodeEncodeError:  # a file name with undecodable bytes (surrogate escapes)
        write_json(path, report)


# --------------------------------------------------------------------------------------------
# The conversion
# --------------------------------------------------------------------------------------------

def _check_args(fmt: str, max_resolution: int, jpeg_quality: int, workers: int, shard_size: int,
                part_size: int) -> None:
    if fmt not in FORMATS:
        raise DataError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if max_resolution < 1:
        raise DataError(f"--max-resolution must be a positive number of pixels, got {max_resolution}")
    if not 1 <= jpeg_quality <= 100:
        raise DataError(f"--jpeg-quality must lie in 1..100, got {jpeg_quality}")
    if workers < 1:
        raise DataError(f"--workers must be at least 1, got {workers}")
    if shard_size < 1:
        raise DataError(f"--shard-size must be at least 1, got {shard_size}")
    if part_size < 1:
        raise DataError(f"--part-size must be at least 1, got {part_size}")


def convert(src: str | Path, dst: str | Path, fmt: str, *, max_resolution: int = DEFAULT_MAX_RESOLUTION,
            jpeg_quality: int = DEFAULT_JPEG_QUALITY, workers: int | None = None, force: bool = False,
            shard_size: int = DEFAULT_SHARD_SIZE, part_size: int = DEFAULT_PART_SIZE,
            progress: bool = True, starting: Callable[[], None] | None = None) -> dict:
    """Validate SRC and write DST in `fmt`; returns the report (also written to `report_path(DST)`), with how this
    run went beside it as `this_run`, not saved: its `parts`, those finished by an earlier run that it `reused`,
    `removed` (how many finished parts of an earlier run with other arguments or another source it removed, and
    what differed) and `empty_classes` (class folders without images: their labels are kept, no image has them).

    `workers` defaults to, and is capped by, the cores this process may use (`usable_cores()`: more would
    only share them, each with its own memory); `shard_size` is samples per tar shard (dali), which
    is also its resumable part; `part_size` is images per resumable part (ffcv). `starting` is called once SRC
    is listed and DST found usable, before anything is written: where a caller announces the work, which an
    unusable input then never shows.
    Raises DataError (one-line message) for unusable arguments or input; KeyboardInterrupt for a Ctrl-C
    before DST is installed, StopSignal (a KeyboardInterrupt) for a stop signal (`kept_after_interrupt` says
    what is kept, `stopped` words it), Interrupted for any of them after.
    """
    workers = workers if workers is not None else usable_cores()
    _check_args(fmt, max_resolution, jpeg_quality, workers, shard_size, part_size)
    workers = min(workers, usable_cores())
    src, dst = Path(src), _named(Path(dst))
    check_outside_source(src, dst, fmt)
    settings = _settings(fmt, max_resolution, jpeg_quality, shard_size)
    current = check_destination(src, dst, force, settings)
    if current is not None:  # reported in the words of this command
        return {**current, "source": str(src), "output": str(dst), "unchanged": True}
    check_report_place(dst)
    prep = ImagePrep(max_resolution=max_resolution, jpeg_quality=jpeg_quality)
    signals = ConversionSignals()
    with signals, worker_pool(workers) as pool:  # the workers stop inside the hold
        report = _convert_listed(src, dst, fmt, prep, force, shard_size if fmt == "dali" else part_size, pool,
                                 workers, progress, starting, signals.hold)
    if signals.noted:
        raise stopped(signals.noted, f" once the conversion had finished; nothing is lost: {outcome(report)}")
    return report


class ConversionSignals:
    """The signals that stop a conversion, in the main thread (Python runs handlers there only).

    SIGTERM, SIGHUP and SIGUSR1 (a scheduler's stop, a terminal that closed, SLURM's warning before the time
    limit: a conversion is not requeued) raise StopSignal where a Ctrl-C raises KeyboardInterrupt: the same
    code stops the workers, keeps the finished parts and says so. A repeat while that stop is under way is
    ignored, so that it completes and its line is written (a rank gets a group's SIGTERM from the scheduler
    and again from torchrun): in nested blocks too, and after the outermost block, which leaves them
    ignored. From `hold()` (DST about to be installed) to the end of the block, Ctrl-C and these signals are
    noted (`noted`: the first one's number) instead: what is left of the conversion then is short and must
    not be cut off, and a KeyboardInterrupt would tell the caller that nothing was written.

    Only a signal left to its default is taken (Python's KeyboardInterrupt for SIGINT, SIG_DFL for the
    others), or one an enclosing `ConversionSignals` block has taken (for this block's time): any other
    handler, and a SIGHUP that `nohup` made ignored, is left alone. A process forked meanwhile (a worker)
    dies of these signals quietly, as by default, instead of raising in its own code. A SIGHUP from a
    terminal that closed also points stdout and stderr, if they were that terminal, at /dev/null: the line
    that says what is kept would fail with EIO there."""

    STOPS = (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1)

    def __init__(self) -> None:
        self.noted = 0
        self._previous: dict[int, object] = {}
        self._held = False
        self._stopping = 0
        self._pid = os.getpid()
        self._terminals: list[int] = []
        self._outer: ConversionSignals | None = None

    def __enter__(self) -> ConversionSignals:
        if threading.current_thread() is threading.main_thread():
            self._terminals = [fd for fd in (1, 2) if os.isatty(fd)]
            for sig in self.STOPS:
                self._take(sig, signal.SIG_DFL)
        return self

    def _take(self, sig: int, default) -> None:
        handler = signal.getsignal(sig)
        outer = getattr(handler, "__self__", None)
        if handler is default or isinstance(outer, ConversionSignals):
            self._previous[sig] = signal.signal(sig, self._signalled)
        if isinstance(outer, ConversionSignals):
            self._outer, self._stopping = outer, self._stopping or outer._stopping

    def hold(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self._take(signal.SIGINT, signal.default_int_handler)
            self._held = True

    def _signalled(self, signum: int, frame) -> None:
        if os.getpid() != self._pid:  # a forked worker: only its parent acts on the signal
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if signum == signal.SIGHUP:
            leave_a_lost_terminal(self._terminals)
        if self._held:
            self.noted = self.noted or signum
        elif not self._stopping:
            self._stopping = signum
            raise StopSignal(signum)

    def __exit__(self, kind, error, traceback) -> None:
        for sig, handler in self._previous.items():
            stop_under_way = self._stopping and self._outer is None and sig in self.STOPS
            signal.signal(sig, signal.SIG_IGN if stop_under_way else handler)
        self._previous.clear()
        self._held = False
        if self._outer is not None:
            self._outer._stopping = self._outer._stopping or self._stopping
        if self._stopping and isinstance(error, KeyboardInterrupt) and not isinstance(error, StopSignal):
            # the StopSignal was lost where Python cannot raise (a finalizer) and came back as a Ctrl-C
            # (`bt_fast.errors._interrupt_again`): it is still the stop signal's
            raise StopSignal(self._stopping) from None


def _named(path: Path) -> Path:
    """`path`, absolute where it is '.' (the current directory), which has no name for the work directory
    and the report to be named after."""
    return path if path.name else path.absolute()


def _convert_listed(src: Path, dst: Path, fmt: str, prep: ImagePrep, force: bool, size: int,
                    pool: WorkerPool | None, workers: int, progress: bool,
                    starting: Callable[[], None] | None, installing: Callable[[], None]) -> dict:
    """`convert` from listing the source on, with the workers started; `size` is images per part,
    `installing` is called just before DST is installed."""
    state, classes, samples = listed_source(src)  # a missing source fails before anything is written
    check_writable(dst.parent)
    if starting is not None:
        starting()
    remove_orphaned_temporaries(dst.parent, (dst.name,))  # left by a conversion that was killed

    job = {"source": str(src.resolve()), "format": fmt, "max_resolution": prep.max_resolution,
           "jpeg_quality": prep.jpeg_quality, "part_size": size, "num_samples": len(samples),
           "listing_sha256": job_fingerprint(src, samples)}
    if fmt == "ffcv":
        job["beton"] = "written in place"  # a work directory of parts joined afterwards is not reused
    order = shuffled_order(len(samples)) if fmt == "dali" else np.arange(len(samples))
    starts = range(0, len(samples), size)
    work = WorkDir(dst, job)
    complete, writing = False, None
    try:
        reports = work.finished(len(starts))
        reused = len(reports)
        todo = [k for k in range(len(starts)) if k not in reports]
        remaining = sum(len(order[starts[k]:starts[k] + size]) for k in todo)
        jobs = ((prep, samples[int(i)][0]) for k in todo for i in order[starts[k]:starts[k] + size])
        with prepared(jobs, remaining, pool, workers) as results, open_beton(work, todo) as beton:
            results = iter(progress_bar(results, total=len(samples), initial=len(samples) - remaining,
                                        desc="converting", unit="img", enabled=progress))
            for writing in todo:
                reports[writing] = write_part(work, writing, starts[writing],
                                               order[starts[writing]:starts[writing] + size], samples, results, prep,
                                               beton)
            writing = None
        report = _assemble(src, dst, fmt, prep, size, classes, work, [reports[k] for k in range(len(starts))], force,
                           state, listing_digest(src, samples) if src.is_dir() else None, installing)
        empty = classes_without_images(classes, samples) if src.is_dir() else []  # a list's labels are not folders
        report = {**report, "this_run": {"parts": len(starts), "reused": reused, "removed": work.removed,
                                         "empty_classes": empty}}
        complete = True
    except DataError:  # the input or DST is unusable: no part will be reused
        complete = True
        raise
    except OSError as err:
        fault = storage_fault(err)
        if fault is None:
            raise
        kept = work.kept_after_fault(writing, len(starts))
        complete = not kept  # nothing to go on from: no work directory left behind
        raise StorageError(_storage_fault_message(dst, fault, work, kept, len(starts))) from None
    except WorkerLost as err:
        kept = work.kept_after_fault(writing, len(starts))
        complete = not kept
        where = f"{kept} of {len(starts)} parts are finished and kept in {work.root}; " if kept else ""
        raise WorkerLost(f"converting {src}: {err}. {where}the same command goes on from "
                         f"{'them' if kept else 'the start'} (with fewer workers if memory ran out)") from None
    finally:
        work.close(remove=complete)
    return report


def _storage_fault_message(dst: Path, fault: OSError, work: WorkDir, kept: int, parts: int) -> str:
    """What a StorageError says: DST, the cause and the `kept` finished parts of `parts`."""
    message = f"cannot write {dst} ({fault.strerror or fault}; {mebibytes(free_bytes(work.root))} free there)"
    if not kept:
        return message + "; nothing was written"
    needed = work.bytes_still_needed(parts)
    # ffcv's parts follow the source's class order: a later class's images may well be larger than the first ones
    room = (f"room (about {size_text(needed)} more at the finished parts' size per image, more where the rest are "
            f"larger)" if needed else "room")
    return (message + f": {kept} of {parts} parts are finished and kept in {work.root}; once there is {room} or "
            f"write access, the same command goes on from them")


def _assemble(src: Path, dst: Path, fmt: str, prep: ImagePrep, size: int, classes: Sequence[str], work: WorkDir,
              parts: list[dict], force: bool, state: list[list] | None, listing: str | None,
              installing: Callable[[], None]) -> dict:
    """Put the finished parts together into DST and write the report; returns it. `size` is images per part,
    `installing` is called just before DST is installed."""
    files = sorted((entry for part in parts for entry in part["files"]), key=lambda entry: entry["path"])
    report = {
        "source": str(src), "output": str(dst), **_settings(fmt, prep.max_resolution, prep.jpeg_quality, size),
        "written": sum(part["written"] for part in parts), "skipped": sum(part["skipped"] for part in parts),
        "converted": sum(part["converted"] for part in parts),
        "files": files, "source_state": state, "listing_digest": listing,
    }
    if not report["written"]:
        write_report(report_path(dst), report)
        raise DataError(f"no usable images in {src}: all {report['skipped']} files were skipped "
                        f"(see {report_path(dst)})")
    if fmt == "dali":
        tmp = temporary_name(dst)
        try:
            tmp.mkdir()
            shards = [part["shard"] for part in parts if part["shard"]]
            for shard in shards:
                for name in (shard["tar"], shard["index"]):
                    os.replace(work.root / name, tmp / name)
            write_meta(tmp, shards, classes, prep)
            _install(src, dst, force, tmp, installing)
        finally:
            if tmp.is_dir() and not tmp.is_symlink():  # not installed: the shards go back to their parts
                for entry in tmp.iterdir():
                    if entry.name != "dataset.json":
                        os.replace(entry, work.root / entry.name)
            if tmp.exists() or tmp.is_symlink():
                remove_path(tmp)
    else:  # the parts' pages are in place: the tables go around them
        with open(work.beton, "r+b") as beton:
            finish_beton(beton, work.data_end(len(parts)), [work.part(k, ".rows.npy") for k in range(len(parts))],
                         prep)
            os.fsync(beton.fileno())
        _install(src, dst, force, work.beton, installing)
    write_report(report_path(dst), report)
    return report


def _install(src: Path, dst: Path, force: bool, finished: Path, installing: Callable[[], None]) -> None:
    installing()
    if dst.exists() or dst.is_symlink():  # appeared or changed while we were writing
        check_destination(src, dst, force)
    install_output(finished, dst)
