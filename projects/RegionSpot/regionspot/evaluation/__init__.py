"""Evaluation: Detectron2's LVIS evaluator, with masks encoded once per box."""

from .lvis_evaluation import RegionSpotLVISEvaluator  # noqa: F401
