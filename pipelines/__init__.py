"""Data pipelines: each yields (view1, view2) on the device, channels-last, normalised."""
from __future__ import annotations

from bt_fast.config import Config
from pipelines.base import DataError, Placement, TwoViewPipeline


def build_pipeline(config: Config, placement: Placement, batch_size: int) -> TwoViewPipeline:
    """The pipeline named by `config.pipeline`, delivering `batch_size` images per rank."""
    if config.pipeline == "reference":
        from pipelines.reference import ReferencePipeline
        return ReferencePipeline(config.data, config.augment, batch_size, placement,
                                 workers=config.workers, seed=config.seed)
    if config.pipeline == "ffcv":
        from pipelines.ffcv import FFCVPipeline
        return FFCVPipeline(config, placement, batch_size)
    if config.pipeline == "dali":
        from pipelines.dali import DALIPipeline
        return DALIPipeline(config, placement, batch_size)
    raise DataError(f"unknown pipeline '{config.pipeline}': choose reference, ffcv or dali")


__all__ = ["DataError", "Placement", "TwoViewPipeline", "build_pipeline"]
