"""``regionspot-train``: train and evaluate RegionSpot with Detectron2's trainer (in a checkout
also ``python train_net.py``, a thin wrapper with the same flags).

``--config-file`` takes a yaml file or a bundled config's name (``regionspot_bl.yaml``; see
:mod:`regionspot.model_zoo`). Outputs go to the config's ``OUTPUT_DIR``, relative to the current
folder (``./output/...``); Detectron2's built-in datasets and the bundled sample are read from (or
for the sample, written on first use under) ``$DETECTRON2_DATASETS`` (``./datasets`` when unset).

Train the head (SAM and CLIP stay frozen):
    regionspot-train --config-file regionspot_bl.yaml --num-gpus 8
Evaluate on an LVIS-format dataset, with ground-truth boxes, a detector's boxes from a file,
an RPN or SAM's automatic masks as proposals (the bundled eval_lvis_{gt,glip,rpn,sam_auto}.yaml):
    regionspot-train --config-file eval_lvis_glip.yaml --eval-only \
        MODEL.WEIGHTS W MODEL.REGIONSPOT.PROPOSAL_FILE glip_lvis_val.json
Your own COCO- or LVIS-format dataset, its vocabulary from its categories:
    regionspot-train --config-file regionspot_bl.yaml --eval-only \
        --register mydata mydata.json images/ MODEL.WEIGHTS W DATASETS.TEST "('mydata',)"
Several processes (one per GPU; gloo processes on a machine without GPUs) and machines, through
PyTorch's elastic agent (--max-restarts K restarts the group from the last checkpoint if a rank dies):
    regionspot-train --config-file regionspot_bl_stage2.yaml --num-gpus 8 \
        --num-machines 2 --machine-rank 0 --dist-url tcp://HOST:29500
or started by torchrun (docs/training.md: several machines, SLURM):
    torchrun --nproc-per-node 8 --max-restarts 2 -m regionspot.tools.train_net --config-file regionspot_bl_stage2.yaml
"""

import fnmatch
import logging
import os
import sys
from datetime import timedelta

from detectron2.data import MetadataCatalog
from detectron2.engine import default_argument_parser, default_setup

from regionspot.checkpoint import RegionSpotCheckpointer
from regionspot.cli import USER_ERRORS, add_debug_argument, report_user_error, setup_logging
from regionspot.config import load_config
from regionspot.data.datasets.user import add_register_argument, register_from_args
from regionspot.engine.launch import DEFAULT_TIMEOUT, JobFailed, env_rank, launch, under_torchrun
from regionspot.engine.output_lock import lock_output_dir
from regionspot.engine.trainer import RegionSpotTrainer as Trainer
from regionspot.model_zoo import resolve_config_file
from regionspot.modeling.weights import require_file

logger = logging.getLogger("regionspot")
PROG = "regionspot-train"


def _prog() -> str:
    """The command's name for error lines: ``train_net.py`` when run through the checkout's
    wrapper or ``python -m``, else ``regionspot-train``."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return name if name in ("train_net.py", PROG) else PROG


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
    patterns = [] if args.eval_only else [os.path.join(out, p)
                                          for p in ("model_*.pth", "last_checkpoint", "metrics.json")]
    for key, path in inputs.items():
        if not path or "://" in path:
            continue
        real = os.path.realpath(os.path.expanduser(path))
        overwritten = real in written or any(fnmatch.fnmatch(real, p) for p in patterns)
        if overwritten and not (key == "MODEL.WEIGHTS" and args.resume):
            raise ValueError(f"refusing to start: {key} ({path}) would be overwritten by this run's outputs in "
                             f"OUTPUT_DIR {cfg.OUTPUT_DIR!r}; choose another OUTPUT_DIR or move the file")


def check_inputs(args):
    """Everything a run reads, checked before any model is built: the config (keys, values,
    device), ``--register``'ed datasets, the datasets named, that no output overwrites an input,
    the SAM and CLIP files, and for evaluation a head to evaluate. Returns the config (not frozen).

    Raises:
        ValueError: an input the run cannot use (the message names it).
        WeightsError: a SAM or CLIP weights file is missing.
    """
    register_from_args(args.register)
    # a bundled config's name becomes its file (Detectron2's default_setup reads the file to log it)
    args.config_file = resolve_config_file(args.config_file)
    cfg = load_config(args.config_file, args.opts)
    check_datasets(cfg, args.eval_only)
    check_no_overwrite(cfg, args)
    require_file(cfg.MODEL.REGIONSPOT.SAM_WEIGHTS, "SAM")
    if cfg.MODEL.REGIONSPOT.VL_MODEL == "openai_clip":  # other families' loaders check their own files
        require_file(cfg.MODEL.REGIONSPOT.CLIP_WEIGHTS, "CLIP")
    if args.eval_only and not cfg.MODEL.WEIGHTS and not args.untrained_head:
        raise ValueError("--eval-only needs the head to evaluate: set MODEL.WEIGHTS to a RegionSpot checkpoint "
                         "(a released one or one written by train_net.py), or pass --untrained-head to evaluate "
                         "a randomly initialised head on purpose")
    return cfg


def setup(args):
    setup_logging(names=("regionspot",))  # the console, from the first line
    cfg = check_inputs(args)
    cfg.freeze()
    from detectron2.utils import comm

    if comm.get_rank() == 0:  # one job per OUTPUT_DIR, refused before anything is written
        lock_output_dir(cfg.OUTPUT_DIR)
    default_setup(cfg, args)  # Detectron2's and fvcore's loggers, OUTPUT_DIR/log.txt, config.yaml
    setup_logging(cfg.OUTPUT_DIR, names=("regionspot",))
    return cfg


def train(args):
    """One process's run (``python train_net.py``'s ``main(args)``): evaluate with ``--eval-only``,
    else train. Returns the evaluation results (a dict) or the trainer's result."""
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        if cfg.MODEL.WEIGHTS:
            RegionSpotCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS,
                                                                                  resume=args.resume)
        else:
            logger.warning("--untrained-head: evaluating a randomly initialised head (MODEL.WEIGHTS is empty); "
                           "its AP is chance level for this vocabulary, not RegionSpot's accuracy")
        return Trainer.test(cfg, model)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def worker_main(args):
    """:func:`train` in one process of the job: an input error is reported once (rank 0), as
    one line, and ends the process with exit code 2 (the launcher then ends the job)."""
    from detectron2.utils import comm

    try:
        return train(args)
    except USER_ERRORS as e:
        if comm.get_rank() == 0:
            report_user_error(getattr(args, "prog", PROG), e, args.debug)
        raise SystemExit(2) from None


class _Parser:
    """Detectron2's argument parser plus ``--register NAME JSON IMAGE_ROOT``. ``--register``,
    ``--resume`` and ``--eval-only`` are also accepted among the trailing ``KEY VALUE`` config
    overrides (Detectron2 would take them for config keys)."""

    FLAGS = {"--resume": "resume", "--eval-only": "eval_only", "--debug": "debug", "--untrained-head": "untrained_head"}

    def __init__(self):
        self.parser = default_argument_parser()
        self.parser.prog = _prog()
        for action in self.parser._actions:
            if action.dest == "config_file":
                action.help = ("a config yaml file, or a bundled config's name (regionspot_bl.yaml, "
                               "regionspot_sample_cpu.yaml, ...: regionspot.model_zoo)")
        self.parser.epilog = ("Outputs: the config's OUTPUT_DIR, relative to the current folder (./output/...). "
                              "Datasets: Detectron2's built-in ones and the bundled sample (written on first "
                              "use) under $DETECTRON2_DATASETS (./datasets when unset).")
        add_register_argument(self.parser)
        add_debug_argument(self.parser)
        self.parser.add_argument("--untrained-head", action="store_true",
                                 help="with --eval-only and an empty MODEL.WEIGHTS: evaluate a randomly initialised "
                                      "head on purpose (otherwise refused)")
        self.parser.add_argument("--max-restarts", type=int, default=0,
                                 help="restart all processes from the last checkpoint up to this many times when one "
                                      "dies (PyTorch's elastic agent, as torchrun's --max-restarts)")

    def parse_args(self, argv=None):
        args = self.parser.parse_args(argv)
        opts, i = [], 0
        while i < len(args.opts):
            item = args.opts[i]
            if item == "--register":
                if len(args.opts) < i + 4:
                    self.parser.error("--register needs NAME JSON IMAGE_ROOT")
                args.register.append(args.opts[i + 1:i + 4])
                i += 4
                continue
            if item in self.FLAGS:
                setattr(args, self.FLAGS[item], True)
            else:
                opts.append(item)
            i += 1
        args.opts = opts
        return args


def get_parser():
    """Detectron2's argument parser plus ``--register NAME JSON IMAGE_ROOT`` (see :class:`_Parser`)."""
    return _Parser()


def run(argv=None) -> int:
    """The command line: parse, check the inputs once in this process, then launch the job.
    An input error is one line on stderr and exit code 2 (the traceback with ``--debug``),
    prefixed with the command's name as typed (``regionspot-train`` or ``train_net.py``)."""
    args = get_parser().parse_args(argv)
    args.prog = _prog()
    if env_rank() == 0:
        print("Command Line Args:", args)
    timeout = DEFAULT_TIMEOUT
    if args.num_gpus * args.num_machines > 1 or args.max_restarts > 0 or under_torchrun():
        # caught here once, not in every process (under torchrun: reported by rank 0 only)
        try:
            timeout = timedelta(minutes=check_inputs(args).DIST_TIMEOUT_MINUTES)
        except USER_ERRORS as e:
            return report_user_error(args.prog, e, args.debug) if env_rank() == 0 else 2
    try:
        launch(worker_main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
               dist_url=args.dist_url, args=(args,), max_restarts=args.max_restarts, timeout=timeout)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    except JobFailed as e:  # a worker failed: its error is printed above unless it died by a signal
        if e.exit_code != 2:
            print(f"{args.prog}: error: {e}", file=sys.stderr)
        return e.exit_code
    except USER_ERRORS as e:  # the launcher's own checks (--dist-url, --num-gpus)
        return report_user_error(args.prog, e, args.debug)
    return 0


def main(argv=None) -> int:
    """The console script ``regionspot-train`` (:func:`run`); returns the exit status."""
    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
