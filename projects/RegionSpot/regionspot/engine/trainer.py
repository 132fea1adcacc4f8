"""RegionSpot's trainer: Detectron2's ``DefaultTrainer`` with RegionSpot's data, vocabularies,
optimizer, checkpointer, evaluation and mixed precision.

- Data: every ``DATASETS.TRAIN`` dataset mixed by ``DATALOADER.DATASET_RATIO`` in a resumable
  order (``data/build.py``, ``data/samplers.py``); ``--resume`` continues the order.
- Vocabularies: each training dataset's text embeddings are computed once, before the first
  step (one process per machine computes, the others wait and read the cache), and every
  image is scored against its own dataset's vocabulary.
- Optimizer: AdamW on the head only, full-model gradient clipping (released recipe).
- Steps: Detectron2's ``SimpleTrainer``, or ``MixedPrecisionTrainer`` with
  ``SOLVER.AMP.ENABLED`` (bfloat16, or float16 with loss scaling).
- Processes: DDP on CUDA or, without GPUs, on the CPU with gloo (``engine/launch.py``).
- Evaluation: each ``DATASETS.TEST`` dataset with its own vocabulary; AP tables with their
  protocol, ``metrics.json`` written atomically.
"""

import json
import logging
import os
import weakref
from collections import OrderedDict

import detectron2.utils.comm as comm
import torch
from detectron2.data import MetadataCatalog
from detectron2.engine import DefaultTrainer, SimpleTrainer
from detectron2.engine.train_loop import TrainerBase
from detectron2.evaluation import DatasetEvaluators, inference_on_dataset
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping
from detectron2.utils.events import JSONWriter
from detectron2.utils.logger import create_small_table, setup_logger

from ..checkpoint import RegionSpotCheckpointer
from ..data.build import build_regionspot_test_loader, build_regionspot_train_loader
from ..evaluation import RegionSpotCOCOEvaluator, RegionSpotLVISEvaluator
from ..evaluation.protocol import evaluation_protocol
from ..filter_report import FilterReport, FilterReportEvaluator
from ..io import SpaceCheckedStream, write_json_atomic
from ..modeling.text_classifier import vocabulary_from_config
from .launch import restart_count, wrap_ddp
from .train_loop import MixedPrecisionTrainer, ProgressWriter

logger = logging.getLogger("regionspot")

TABLE_KEYS = ("AP", "APr", "APc", "APf", "AP50", "AP75")


def encode_vocabulary_once(model, class_names):
    """Text embeddings of a vocabulary, computed by one process per machine: the first process
    of each machine encodes (and writes the disk cache), the others wait, then read the cache.
    Without a cache (``TEXT_CACHE_DIR`` "") every process encodes."""
    if comm.get_world_size() > 1 and model.text_classifier.cache_dir and comm.get_local_rank() != 0:
        comm.synchronize()
        return model.encode_vocabulary(class_names)
    embeddings = model.encode_vocabulary(class_names)
    if comm.get_world_size() > 1 and model.text_classifier.cache_dir:
        comm.synchronize()
    return embeddings


def set_training_vocabularies(model, cfg) -> None:
    """Each ``DATASETS.TRAIN`` dataset's vocabulary (and class hierarchy, if its metadata has
    ``category_ancestors``) on the model; the first one also as the default vocabulary."""
    for i, name in enumerate(cfg.DATASETS.TRAIN):
        names = vocabulary_from_config(cfg, name)
        embeddings = encode_vocabulary_once(model, names)
        ancestors = MetadataCatalog.get(name).get("category_ancestors", None)
        model.set_vocabulary(names, embeddings, dataset=name, ancestors=ancestors, allow_duplicates=True)
        if i == 0:
            model.set_vocabulary(names, embeddings, allow_duplicates=True)


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


def space_checked(writer: JSONWriter) -> JSONWriter:
    """Detectron2's ``JSONWriter`` whose lines are written only where there is room for them: a
    full disk is a :class:`~regionspot.io.DiskFullError` naming the folder, not a partial line."""
    writer._file_handle = SpaceCheckedStream(writer._file_handle, writer._file_handle.name)
    return writer


def unwrap(model):
    """The RegionSpot module inside a DDP wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") else model


class RegionSpotTrainer(DefaultTrainer):
    """:class:`DefaultTrainer` for RegionSpot (see the module docstring)."""

    def __init__(self, cfg):
        # DefaultTrainer.__init__, with RegionSpot's vocabularies, DDP wrapper, step and checkpointer.
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        set_training_vocabularies(model, cfg)  # before the first step, outside the forward
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        model = wrap_ddp(model, broadcast_buffers=False)
        if cfg.SOLVER.AMP.ENABLED:
            self._trainer = MixedPrecisionTrainer(model, data_loader, optimizer, cfg.SOLVER.AMP.PRECISION)
        else:
            self._trainer = SimpleTrainer(model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        # Saves only the head, atomically; for training it loads what fits, as Detectron2 does.
        self.checkpointer = RegionSpotCheckpointer(model, cfg.OUTPUT_DIR, strict=False, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        # Evaluations during training (EvalHook, the last iteration) are of this run's head.
        self.test = lambda cfg, model, evaluators=None: type(self).test(
            cfg, model, evaluators, weights=f"this run's head after {min(self.iter + 1, self.max_iter)} iterations "
                                            f"({os.path.abspath(cfg.OUTPUT_DIR)})")
        self.register_hooks(self.build_hooks())

    @property
    def train_sampler(self):
        """The :class:`~regionspot.data.samplers.ResumableBatchSampler` of the training loader."""
        return self._trainer.data_loader.batch_sampler

    def resume_or_load(self, resume: bool = True):
        """Detectron2's resume, then the data order continues where the checkpoint left it.

        After an elastic restart (``TORCHELASTIC_RESTART_COUNT`` > 0, :func:`restart_count`) the
        run always resumes from ``OUTPUT_DIR``'s last complete checkpoint, and says from which
        iteration."""
        restarts = restart_count()
        super().resume_or_load(resume=resume or restarts > 0)
        if restarts:
            logger.warning("elastic restart %d: resuming from iteration %d (%s)", restarts, self.start_iter,
                           self.checkpointer.get_checkpoint_file() if self.checkpointer.has_checkpoint()
                           else "no checkpoint yet: from the start")
        self.train_sampler.set_start_iter(self.start_iter)
        # Detectron2 0.6 starts the loader's iterator when the step object is built: restart it.
        self._trainer._data_loader_iter = iter(self._trainer.data_loader)

    def state_dict(self):
        state = super().state_dict()
        state["sampler_seed"] = self.train_sampler.seed  # a random seed (SEED < 0) must survive a resume
        return state

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if "sampler_seed" in state_dict:
            self.train_sampler.seed = state_dict["sampler_seed"]

    @classmethod
    def build_train_loader(cls, cfg):
        return build_regionspot_train_loader(cfg)

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
                                          max_dets_per_image=cfg.TEST.DETECTIONS_PER_IMAGE, protocol=protocol,
                                          backend=cfg.TEST.EVALUATOR_BACKEND)

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

    def build_writers(self):
        writers = [ProgressWriter(self.max_iter, self.cfg.SOLVER.IMS_PER_BATCH),
                   space_checked(JSONWriter(os.path.join(self.cfg.OUTPUT_DIR, "metrics.json")))]
        try:
            from detectron2.utils.events import TensorboardXWriter

            writers.append(TensorboardXWriter(self.cfg.OUTPUT_DIR))
        except ImportError:  # tensorboard is optional
            pass
        return writers

    @classmethod
    def test(cls, cfg, model, evaluators=None, weights=None):
        """Evaluate on each of ``DATASETS.TEST`` with that dataset's vocabulary and the configured
        proposals; print each AP table with its protocol and write
        ``<OUTPUT_DIR>/inference/<dataset>/metrics.json`` atomically. The model's training
        vocabulary is restored afterwards (periodic evaluation during training).

        ``weights``: what ``metrics.json`` records as the head evaluated (default:
        :func:`head_weights_record` of ``MODEL.WEIGHTS``; during training, this run's head)."""
        regionspot = unwrap(model)
        previous = (regionspot.class_names, regionspot.text_embeddings)
        results = OrderedDict()
        try:
            for idx, name in enumerate(cfg.DATASETS.TEST):
                vocabulary = vocabulary_from_config(cfg, name)
                # text embeddings computed here, not in the forward, once per machine
                regionspot.set_vocabulary(vocabulary, encode_vocabulary_once(regionspot, vocabulary),
                                          allow_duplicates=True)
                protocol = evaluation_protocol(cfg, name, len(vocabulary))
                loader, coverage = build_regionspot_test_loader(cfg, name)
                evaluator = evaluators[idx] if evaluators else cls.build_evaluator(
                    cfg, name, protocol=protocol["description"])
                filters = FilterReportEvaluator()  # what each selection step removed, summed
                res = inference_on_dataset(model, loader, DatasetEvaluators([evaluator, filters]))
                results[name] = res
                if comm.is_main_process():
                    report_results(cfg, name, res, protocol, coverage, weights=weights,
                                   skipped_tasks=getattr(evaluator, "skipped_tasks", None), filters=filters.summary)
        finally:
            if previous[0] is not None:
                regionspot.set_vocabulary(previous[0], previous[1], allow_duplicates=True)
        return results


def head_weights_record(weights: str):
    """What an output file records of the head it was made with: the ``MODEL.WEIGHTS`` path as
    an absolute path, or ``"untrained"`` for a randomly initialised head."""
    return os.path.abspath(os.path.expanduser(weights)) if weights else "untrained"


def report_results(cfg, dataset_name: str, results: dict, protocol: dict, coverage, skipped_tasks=None,
                   filters=None, weights=None) -> None:
    """Log an AP table per task with the protocol under it, and write the metrics file (strict
    JSON: a NaN metric is ``null``; ``skipped_tasks``: {task: reason} of requested tasks the
    evaluator skipped, e.g. mask AP on a dataset without masks; ``filters``: the dataset's
    :class:`~regionspot.filter_report.FilterReportEvaluator` summary, written
    under ``filters``, with one warning line when a selection step left images with nothing)."""
    if filters:
        message = FilterReport.from_dict(filters).summary_warning(f"evaluation on {dataset_name}")
        if message:
            logger.warning(message)
    for task, metrics in results.items():
        row = {k: metrics[k] for k in TABLE_KEYS if k in metrics}
        logger.info("%s AP on %s:\n%s\nprotocol: %s", task, dataset_name, create_small_table(row),
                    protocol["description"])
    if coverage:
        logger.info("proposal file coverage on %s: %s", dataset_name, json.dumps(coverage))
    folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
    write_json_atomic(os.path.join(folder, "metrics.json"),
                      {"dataset": dataset_name, "weights": weights or head_weights_record(cfg.MODEL.WEIGHTS),
                       "proposals": cfg.MODEL.REGIONSPOT.PROPOSALS, "protocol": protocol,
                       "proposal_coverage": coverage, "results": results,
                       "skipped_tasks": dict(skipped_tasks or {}), "filters": filters})
