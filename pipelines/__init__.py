"""Data pipelines: each yields (view1, view2) on the device, channels-last, normalised.

`PIPELINES` is the registry of pipeline names; each entry imports its pipeline class on
first use (FFCV and DALI are heavy imports), and every class is built the same way:
`cls(config, placement, batch_size)`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from bt_fast.config import Config, check_choice

if TYPE_CHECKING:  # the package itself stays free of torch: the converter and the data tools do not need it
    from pipelines.base import Placement, TwoViewPipeline


def _reference() -> type:
    from pipelines.reference import ReferencePipeline
    return ReferencePipeline


def _ffcv() -> type:
    from pipelines.ffcv import FFCVPipeline
    return FFCVPipeline


def _dali() -> type:
    from pipelines.dali import DALIPipeline
    return DALIPipeline


PIPELINES: dict[str, Callable[[], type]] = {"reference": _reference, "ffcv": _ffcv, "dali": _dali}


def build_pipeline(config: Config, placement: Placement, batch_size: int) -> TwoViewPipeline:
    """The pipeline named by `config.pipeline`, delivering `batch_size` images per rank."""
    check_choice("pipeline", config.pipeline, PIPELINES)
    return PIPELINES[config.pipeline]()(config, placement, batch_size)

