"""metrics.jsonl read line by line, without torch: what `tools.plot` loads besides `bt_fast.plots`.

`bt_fast.run_log` writes the file and says what its records hold.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

METRICS_NAME = "metrics.jsonl"


def numbered_lines(path: str | Path) -> Iterator[tuple[int, str, dict | None]]:
    """(line number from 1, line, record) of each line of a metrics.jsonl, one at a time (a 1,000-epoch
    ImageNet run logs 625,000): the record is the line's JSON object if it holds a step, else None, as for a
    torn last line (a killed writer's)."""
    with open(path, errors="surrogateescape") as lines:  # not UTF-8: no record, and written back unchanged
        for number, line in enumerate(lines, start=1):
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            yield number, line, record if isinstance(record, dict) and "step" in record else None


def numbered_metrics(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number from 1, record) of each record of a metrics.jsonl: each line holding a JSON object with
    a step. Any other line is skipped; a file of no such lines yields nothing."""
    return ((number, record) for number, _, record in numbered_lines(path) if record is not None)


def is_torn(line: str) -> bool:
    """True for a line without its newline: the last line of a file whose writer was killed mid-line."""
    return not line.endswith("\n")


def lines_without_records(path: str | Path, numbers: list[int]) -> str:
    """The start of a warning about the lines `numbers` (ascending, at least one) of a metrics.jsonl that
    hold no record: "<path> line 3 holds no metrics record ..." or "<path> 2 lines, the first line 3, hold ..."."""
    which = f"line {numbers[0]} holds" if len(numbers) == 1 else \
        f"{len(numbers)} lines, the first line {numbers[0]}, hold"
    return f"{path} {which} no metrics record (a JSON object with a step)"
