"""Evaluation: Detectron2's LVIS (and COCO) evaluator, with masks encoded once per box."""

from .lvis_evaluation import RegionSpotCOCOEvaluator, RegionSpotLVISEvaluator  # noqa: F401
