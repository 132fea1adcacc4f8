#!/usr/bin/env python
"""Train and evaluate RegionSpot with Detectron2's trainer.

Train the head (SAM and CLIP stay frozen):
    python train_net.py --config-file configs/regionspot_bl.yaml --num-gpus 8
Evaluate with ground-truth boxes as proposals on an LVIS-format dataset:
    python train_net.py --config-file configs/regionspot_bl.yaml --eval-only MODEL.WEIGHTS W
"""

import copy
import json
import logging
import os
from collections import OrderedDict

import torch

import detectron2.utils.comm as comm
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, launch
from detectron2.evaluation import LVISEvaluator
from detectron2.data import MetadataCatalog, build_detection_test_loader, build_detection_train_loader
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping
from detectron2.utils.events import CommonMetricPrinter, JSONWriter

from regionspot.config import load_config
from regionspot.checkpoint import RegionSpotCheckpointer
from regionspot.io import write_json_atomic
from regionspot.data.mapper import RegionSpotDatasetMapper
from regionspot.modeling.meta_arch import vocabulary_from_config

logger = logging.getLogger("regionspot")

EVAL_PROTOCOL = (
    "protocol: ground-truth boxes as proposals; each box scored against the whole vocabulary "
    "({score}); top {topk} (box, class) pairs per image; LVIS evaluator keeps 300 per image "
    "(standard AP)"
)


def with_full_model_clipping(optimizer_cls, max_norm: float):
    """An ``optimizer_cls`` whose ``step`` first clips the global gradient norm of all its
    parameters to ``max_norm`` (``SOLVER.CLIP_GRADIENTS.CLIP_TYPE: full_model``; the released
    recipe clips the whole model at 1.0). Detectron2's own clipping is per parameter."""

    class FullModelClipped(optimizer_cls):
        def step(self, closure=None):
            params = [p for group in self.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, max_norm)
            return super().step(closure=closure)

    return FullModelClipped


class Trainer(DefaultTrainer):
    """:class:`DefaultTrainer` with RegionSpot's mapper, optimizer, checkpointer and evaluator."""

    @classmethod
    def build_train_loader(cls, cfg):
        return build_detection_train_loader(cfg, mapper=RegionSpotDatasetMapper(cfg, True))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(cfg, dataset_name, mapper=RegionSpotDatasetMapper(cfg, False))

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", "lvis")
        if evaluator_type != "lvis":
            raise NotImplementedError(f"dataset {dataset_name!r} has evaluator_type {evaluator_type!r}; "
                                      f"RegionSpot evaluates LVIS-format datasets")
        tasks = ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",)
        return LVISEvaluator(dataset_name, tasks, distributed=True, output_dir=output_folder)

    @classmethod
    def build_optimizer(cls, cfg, model):
        """AdamW over the trainable (head) parameters; frozen SAM/CLIP are excluded."""
        params = get_default_optimizer_params(
            model, base_lr=cfg.SOLVER.BASE_LR, weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
        )
        clip = cfg.SOLVER.CLIP_GRADIENTS
        if clip.ENABLED and clip.CLIP_TYPE == "full_model":
            optimizer_cls = with_full_model_clipping(torch.optim.AdamW, clip.CLIP_VALUE)
            return optimizer_cls(params, lr=cfg.SOLVER.BASE_LR, weight_decay=cfg.SOLVER.WEIGHT_DECAY)
        return maybe_add_gradient_clipping(cfg, torch.optim.AdamW)(
            params, lr=cfg.SOLVER.BASE_LR, weight_decay=cfg.SOLVER.WEIGHT_DECAY)

    @classmethod
    def build_model(cls, cfg):
        model = super().build_model(cfg)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        logger.info("RegionSpot: %d trainable head parameters, %d frozen (SAM + CLIP)", trainable, total - trainable)
        return model

    def build_hooks(self):
        # Replace Detectron2's checkpointer before its hooks capture it: ours saves only the
        # head, atomically, and loads the released checkpoints strictly.
        old = self.checkpointer
        self.checkpointer = RegionSpotCheckpointer(old.model, old.save_dir, **old.checkpointables)
        return super().build_hooks()

    def build_writers(self):
        writers = [CommonMetricPrinter(self.max_iter), JSONWriter(os.path.join(self.cfg.OUTPUT_DIR, "metrics.json"))]
        try:
            from detectron2.utils.events import TensorboardXWriter

            writers.append(TensorboardXWriter(self.cfg.OUTPUT_DIR))
        except ImportError:  # tensorboard is optional
            pass
        return writers

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """Evaluate on each of ``DATASETS.TEST`` with that dataset's vocabulary; write
        ``<OUTPUT_DIR>/inference/<dataset>/metrics.json`` atomically."""
        unwrapped = model.module if hasattr(model, "module") else model
        results = OrderedDict()
        for idx, name in enumerate(cfg.DATASETS.TEST):
            unwrapped.set_vocabulary(vocabulary_from_config(cfg, name))
            one = copy.deepcopy(cfg)
            one.defrost()
            one.DATASETS.TEST = (name,)
            res = super().test(one, model, [evaluators[idx]] if evaluators else None)
            results[name] = res
            if comm.is_main_process():
                rs = cfg.MODEL.REGIONSPOT
                protocol = EVAL_PROTOCOL.format(score=rs.TEST_SCORE, topk=rs.TEST_TOPK)
                logger.info("Results on %s (%s): %s", name, protocol, json.dumps(res))
                folder = os.path.join(cfg.OUTPUT_DIR, "inference", name)
                write_json_atomic(os.path.join(folder, "metrics.json"),
                                  {"dataset": name, "protocol": protocol, "weights": cfg.MODEL.WEIGHTS,
                                   "results": res})
        return results


def setup(args):
    cfg = load_config(args.config_file, args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        if cfg.MODEL.WEIGHTS:
            RegionSpotCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS,
                                                                                  resume=args.resume)
        else:
            logger.warning("MODEL.WEIGHTS is empty: evaluating an untrained (randomly initialised) head")
        return Trainer.test(cfg, model)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))
