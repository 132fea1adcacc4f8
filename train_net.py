#!/usr/bin/env python
"""Train and evaluate RegionSpot with Detectron2's trainer.

Train the head (SAM and CLIP stay frozen):
    python train_net.py --config-file configs/regionspot_bl.yaml --num-gpus 8
Evaluate on an LVIS-format dataset, with ground-truth boxes, a detector's boxes from a file,
an RPN or SAM's automatic masks as proposals (configs/eval_lvis_{gt,glip,rpn,sam_auto}.yaml):
    python train_net.py --config-file configs/eval_lvis_glip.yaml --eval-only \
        MODEL.WEIGHTS W MODEL.REGIONSPOT.PROPOSAL_FILE glip_lvis_val.json
"""

import fnmatch
import json
import logging
import os
import sys
from collections import OrderedDict

import torch

import detectron2.utils.comm as comm
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, launch
from detectron2.data import MetadataCatalog, build_detection_train_loader
from detectron2.evaluation import inference_on_dataset
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping
from detectron2.utils.events import CommonMetricPrinter, JSONWriter
from detectron2.utils.logger import create_small_table

from regionspot.config import load_config
from regionspot.checkpoint import CheckpointError, RegionSpotCheckpointer
from regionspot.io import write_json_atomic
from regionspot.data.build import build_regionspot_test_loader
from regionspot.data.datasets.user import add_register_argument, register_from_args
from regionspot.data.mapper import RegionSpotDatasetMapper
from regionspot.evaluation import RegionSpotCOCOEvaluator, RegionSpotLVISEvaluator
from regionspot.evaluation.protocol import evaluation_protocol
from regionspot.modeling.meta_arch import vocabulary_from_config
from regionspot.modeling.weights import WeightsError

logger = logging.getLogger("regionspot")

TABLE_KEYS = ("AP", "APr", "APc", "APf", "AP50", "AP75")


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


def unwrap(model):
    """The RegionSpot module inside a DDP wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") else model


class Trainer(DefaultTrainer):
    """:class:`DefaultTrainer` with RegionSpot's mapper, optimizer, checkpointer and evaluator."""

    def __init__(self, cfg):
        super().__init__(cfg)
        # The training vocabulary is set once, before the first step, outside the forward.
        unwrap(self.model).set_vocabulary(vocabulary_from_config(cfg))

    @classmethod
    def build_train_loader(cls, cfg):
        return build_detection_train_loader(cfg, mapper=RegionSpotDatasetMapper(cfg, True))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_regionspot_test_loader(cfg, dataset_name)[0]

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None, protocol: str = ""):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", "lvis")
        evaluators = {"lvis": RegionSpotLVISEvaluator, "coco": RegionSpotCOCOEvaluator}
        if evaluator_type not in evaluators:
            raise ValueError(f"dataset {dataset_name!r} has evaluator_type {evaluator_type!r}; RegionSpot evaluates "
                             f"LVIS- and COCO-format datasets")
        tasks = ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",)
        return evaluators[evaluator_type](dataset_name, tasks, distributed=True, output_dir=output_folder,
                                          max_dets_per_image=cfg.TEST.DETECTIONS_PER_IMAGE, protocol=protocol)

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
        logger.info("RegionSpot: %d trainable head parameters, %d frozen (SAM, CLIP and the RPN if any)",
                    trainable, total - trainable)
        return model

    def build_hooks(self):
        # Replace Detectron2's checkpointer before its hooks capture it: ours saves only the
        # head, atomically; for training it loads what fits, as Detectron2 does.
        old = self.checkpointer
        self.checkpointer = RegionSpotCheckpointer(old.model, old.save_dir, strict=False, **old.checkpointables)
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
        """Evaluate on each of ``DATASETS.TEST`` with that dataset's vocabulary and the configured
        proposals; print each AP table with its protocol and write
        ``<OUTPUT_DIR>/inference/<dataset>/metrics.json`` atomically. The model's training
        vocabulary is restored afterwards (periodic evaluation during training)."""
        regionspot = unwrap(model)
        previous = (regionspot.class_names, regionspot.text_embeddings)
        results = OrderedDict()
        try:
            for idx, name in enumerate(cfg.DATASETS.TEST):
                vocabulary = vocabulary_from_config(cfg, name)
                regionspot.set_vocabulary(vocabulary)  # text embeddings computed here, not in the forward
                protocol = evaluation_protocol(cfg, name, len(vocabulary))
                loader, coverage = build_regionspot_test_loader(cfg, name)
                evaluator = evaluators[idx] if evaluators else cls.build_evaluator(
                    cfg, name, protocol=protocol["description"])
                res = inference_on_dataset(model, loader, evaluator)
                results[name] = res
                if comm.is_main_process():
                    report_results(cfg, name, res, protocol, coverage)
        finally:
            if previous[0] is not None:
                regionspot.set_vocabulary(previous[0], previous[1])
        return results


def report_results(cfg, dataset_name: str, results: dict, protocol: dict, coverage) -> None:
    """Log an AP table per task with the protocol under it, and write the metrics file."""
    for task, metrics in results.items():
        row = {k: metrics[k] for k in TABLE_KEYS if k in metrics}
        logger.info("%s AP on %s:\n%s\nprotocol: %s", task, dataset_name, create_small_table(row),
                    protocol["description"])
    if coverage:
        logger.info("proposal file coverage on %s: %s", dataset_name, json.dumps(coverage))
    folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
    write_json_atomic(os.path.join(folder, "metrics.json"),
                      {"dataset": dataset_name, "weights": cfg.MODEL.WEIGHTS,
                       "proposals": cfg.MODEL.REGIONSPOT.PROPOSALS, "protocol": protocol,
                       "proposal_coverage": coverage, "results": results})


# Errors of the user's input: reported in one line, without a traceback.
USER_ERRORS = (ValueError, FileNotFoundError, WeightsError, CheckpointError)


def check_datasets(cfg, eval_only: bool) -> None:
    """The datasets a run reads are registered (named by key), before anything is built."""
    from detectron2.data import DatasetCatalog

    keys = [("DATASETS.TEST", cfg.DATASETS.TEST)]
    if not eval_only:
        keys = [("DATASETS.TRAIN", cfg.DATASETS.TRAIN)] + (keys if cfg.TEST.EVAL_PERIOD > 0 else [])
    registered = set(DatasetCatalog.list())
    for key, names in keys:
        for name in names:
            if name not in registered:
                raise ValueError(f"{key} names {name!r}, which is not registered in Detectron2's DatasetCatalog; "
                                 f"register your own with --register NAME JSON IMAGE_ROOT (Detectron2's built-in "
                                 f"names such as lvis_v1_val expect their files under $DETECTRON2_DATASETS)")


def check_no_overwrite(cfg, args) -> None:
    """Refuse to start a run whose outputs would be written over one of its inputs."""
    rs = cfg.MODEL.REGIONSPOT
    inputs = {"--config-file": args.config_file, "MODEL.WEIGHTS": cfg.MODEL.WEIGHTS,
              "MODEL.REGIONSPOT.SAM_WEIGHTS": rs.SAM_WEIGHTS, "MODEL.REGIONSPOT.CLIP_WEIGHTS": rs.CLIP_WEIGHTS,
              "MODEL.REGIONSPOT.RPN_WEIGHTS": rs.RPN_WEIGHTS, "MODEL.REGIONSPOT.PROPOSAL_FILE": rs.PROPOSAL_FILE}
    inputs.update({f"DATASETS.PROPOSAL_FILES_TEST[{i}]": f for i, f in enumerate(cfg.DATASETS.PROPOSAL_FILES_TEST)})
    for name in list(cfg.DATASETS.TEST) + list(cfg.DATASETS.TRAIN):
        json_file = MetadataCatalog.get(name).get("json_file", None) if name in MetadataCatalog.list() else None
        if json_file:
            inputs[f"the json of {name}"] = json_file
    out = os.path.realpath(cfg.OUTPUT_DIR)
    written = [os.path.join(out, f) for f in ("config.yaml", "log.txt")]
    for name in cfg.DATASETS.TEST:
        folder = os.path.join(out, "inference", name)
        written += [os.path.join(folder, f) for f in ("metrics.json", "lvis_instances_results.json",
                                                      "coco_instances_results.json", "instances_predictions.pth")]
    patterns = [] if args.eval_only else [os.path.join(out, p) for p in ("model_*.pth", "last_checkpoint", "metrics.json")]
    for key, path in inputs.items():
        if not path or "://" in path:
            continue
        real = os.path.realpath(os.path.expanduser(path))
        overwritten = real in written or any(fnmatch.fnmatch(real, p) for p in patterns)
        if overwritten and not (key == "MODEL.WEIGHTS" and args.resume):
            raise ValueError(f"refusing to start: {key} ({path}) would be overwritten by this run's outputs in "
                             f"OUTPUT_DIR {cfg.OUTPUT_DIR!r}; choose another OUTPUT_DIR or move the file")


def setup(args):
    register_from_args(args.register)
    cfg = load_config(args.config_file, args.opts)
    check_datasets(cfg, args.eval_only)
    check_no_overwrite(cfg, args)
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


class _Parser:
    """Detectron2's argument parser plus ``--register NAME JSON IMAGE_ROOT``, also accepted
    among the trailing ``KEY VALUE`` config overrides."""

    def __init__(self):
        self.parser = default_argument_parser()
        add_register_argument(self.parser)

    def parse_args(self, argv=None):
        args = self.parser.parse_args(argv)
        opts, i = [], 0
        while i < len(args.opts):
            if args.opts[i] == "--register":
                if len(args.opts) < i + 4:
                    self.parser.error("--register needs NAME JSON IMAGE_ROOT")
                args.register.append(args.opts[i + 1:i + 4])
                i += 4
            else:
                opts.append(args.opts[i])
                i += 1
        args.opts = opts
        return args


def get_parser():
    """Detectron2's argument parser plus ``--register NAME JSON IMAGE_ROOT`` (see :class:`_Parser`)."""
    return _Parser()


if __name__ == "__main__":
    args = get_parser().parse_args()
    print("Command Line Args:", args)
    try:
        launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
               dist_url=args.dist_url, args=(args,))
    except USER_ERRORS as e:
        print(f"train_net.py: error: {e}", file=sys.stderr)
        sys.exit(2)
