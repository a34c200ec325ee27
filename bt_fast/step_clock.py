"""Per-step time and data wait, measured where the work runs, read only when asked.

For each step the trainer marks two points on the device's timeline: `data_ready` once the batch is
delivered (after the pipeline's fence on the current stream) and `step_done` once the step's work is
issued. A step then lasts from the previous `step_done` to its own, and it waited for data from the
previous `step_done` to its `data_ready`, or from `wait_from_here` where the host did work of its own
between the two steps (the trainer's logging after its sync: no data wait, but still the step's time).
On CUDA the marks are events on the current stream, so the times are the GPU's: the host running ahead
of the GPU does not count as waiting, a GPU idle while the host fetches data does. On the CPU they are
`time.perf_counter()` readings of work done in place.

Only `read` looks at the marks; on CUDA it waits for the last one, which makes it the caller's
deliberate host sync.
"""
from __future__ import annotations

import time

import torch


class StepClock:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"  # GPU only: events
        self._last_done = self._wait_from = None
        self._marks: list[tuple[object, ...]] = []  # (previous done, wait origin, ready, done) per unread step

    def _mark(self):
        if self.cuda:  # GPU only
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self) -> None:
        """The origin of the next step (a new epoch's loop begins: its first batch's wait counts from here)."""
        self._last_done = self._wait_from = self._mark()

    def wait_from_here(self) -> None:
        """The host's own work since the last `step_done` is over: the next step's data wait counts from here."""
        self._wait_from = self._mark()

    def data_ready(self) -> None:
        self._ready = self._mark()

    def step_done(self) -> None:
        done = self._mark()
        self._marks.append((self._last_done, self._wait_from, self._ready, done))
        self._last_done = self._wait_from = done

    def read(self) -> list[tuple[float, float]]:
        """(step seconds, data-wait seconds) of each step marked since the last read, in order."""
        marks, self._marks = self._marks, []
        if self.cuda and marks:  # GPU only: the deliberate sync
            marks[-1][-1].synchronize()
            return [(begin.elapsed_time(done) / 1000, waiting.elapsed_time(ready) / 1000)
                    for begin, waiting, ready, done in marks]
        return [(done - begin, ready - waiting) for begin, waiting, ready, done in marks]
