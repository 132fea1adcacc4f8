"""Run frozen SAM once per training image and store its position-aware tokens (fills the SAM-token cache).

    python tools/extract_sam_tokens.py --config-file configs/regionspot_bl.yaml --dataset objects365_v1_train \\
        [--output-dir DIR] [--batch-size 8] [--shard-size 1000] [--dtype float32|bfloat16] [--num-workers 4] \\
        [--num-gpus N --num-machines M --machine-rank R --dist-url URL] [--register NAME JSON IMAGE_ROOT] \\
        [--overwrite] [--finalize] [--opts KEY VALUE ...]

Only SAM is loaded (``MODEL.REGIONSPOT.SAM_WEIGHTS``, ``TOKEN_SOURCE``, ``BOX_CHUNK_SIZE``), on
``MODEL.DEVICE``. For every image of the Detectron2 dataset ``--dataset`` (``DatasetCatalog``;
``--register`` adds your own COCO/LVIS json first) it stores, for the image and for its
horizontal flip, one token per non-crowd annotation box, as
``regionspot.data.token_cache.compute_image_tokens`` defines them (``docs/token_cache.md`` gives the
contract and the file layout). The cache goes to ``<output dir>/<dataset>/``; the output dir
defaults to the config's ``MODEL.REGIONSPOT.TOKEN_CACHE_DIR`` (the key training reads).

- Batching: ``--batch-size`` SAM image-encoder inputs per forward (an image and its flip
  are two inputs). The tokens equal the one-image function's: bit for bit on the CPU with
  the same number of threads (tested with batch sizes 2, 3 and 8); float kernels that change with
  the thread count (``--num-gpus N`` on a CPU gives each process 1/N of the cores) or with
  the batch shape on a GPU change the last bits (~1e-6 relative). Images are read and their
  boxes validated by ``--num-workers`` data-loader processes.
- Shards of ``--shard-size`` images are written atomically; a rerun (after a crash or
  ``kill -9``) skips the images already in finished shards. ``--overwrite`` deletes the
  dataset's cache files first. An existing cache written with other SAM weights, token
  source or dtype, or whose boxes no longer match the dataset's annotations, is refused
  (one error line, exit 2) unless ``--overwrite``.
- Several processes: ``--num-gpus N`` (PyTorch's elastic agent through ``regionspot.engine.launch``;
  one process per GPU, or N CPU processes with gloo on a machine without CUDA), or started by
  ``torchrun --nproc-per-node N tools/extract_sam_tokens.py ...`` (several machines too); rank r
  takes the images i with i % world_size == r and writes its own shards; rank 0 writes
  ``manifest.json`` when all have finished (``--finalize`` does it later, e.g. after separate jobs per machine).
- Progress: a tqdm bar on rank 0 (images, rate, ETA); at the end a summary (images, boxes,
  bytes, seconds, images/s) and the images that could not be read, which are skipped
  (exit status 1 then). A full disk stops the run with one line naming the folder, the bytes
  needed and free (exit 2); the finished shards stay, and a rerun with room continues. Bad
  input (unknown dataset, config without SAM weights, ...): one ``extract_sam_tokens.py: error:``
  line, exit 2 (``--debug``: with the traceback). The last run's summary
  is also written to ``<output dir>/<dataset>/last_run.json``.
- Log: the project's lines (SAM loaded, ...) on the console (rank 0) and in
  ``<output dir>/<dataset>/log.txt`` (``log.txt.rank<N>`` for the other ranks).

Cache sizes per dataset and what bfloat16 tokens change (measured): ``docs/speed.md``.

Test hook: the environment variable ``REGIONSPOT_TEST_SLEEP_PER_IMAGE`` (seconds) slows the
run down after each image, so a test can kill it between shards.
"""

import argparse
import glob
import json
import os
import sys
import time
import uuid
import warnings
from typing import Any, Dict, List, Mapping, Optional, Sequence

from regionspot.tools.common import ToolError, load_config, run_tool

SLEEP_ENV = "REGIONSPOT_TEST_SLEEP_PER_IMAGE"
REPORT = "last_run.json"
MAX_LISTED_FAILURES = 50  # failed images printed in the summary (the report lists all)
PROG = "extract_sam_tokens.py"


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    from regionspot.cli import add_debug_argument
    from regionspot.data.datasets.user import add_register_argument

    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, help="RegionSpot config (yaml)")
    parser.add_argument("--dataset", required=True, help="name of a registered Detectron2 dataset")
    parser.add_argument("--output-dir", default=None,
                        help="cache root (default: the config's MODEL.REGIONSPOT.TOKEN_CACHE_DIR)")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="SAM image-encoder inputs per forward; an image and its flip are two (default 8)")
    parser.add_argument("--shard-size", type=int, default=1000, help="images per shard file (default 1000)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="stored token dtype (default float32; with --finalize: the shards' dtype)")
    parser.add_argument("--num-workers", type=int, default=2,
                        help="data-loader processes reading images, per rank (default 2; 0: in the main process)")
    parser.add_argument("--num-gpus", type=int, default=1, help="processes per machine (one per GPU)")
    parser.add_argument("--num-machines", type=int, default=1)
    parser.add_argument("--machine-rank", type=int, default=0)
    parser.add_argument("--dist-url", default="auto", help="process-group URL (auto: a free local port)")
    parser.add_argument("--overwrite", action="store_true", help="delete the dataset's existing cache files first")
    parser.add_argument("--finalize", action="store_true",
                        help="only write manifest.json from the shards already written (no SAM run)")
    add_register_argument(parser)
    add_debug_argument(parser)
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[],
                        help="config overrides KEY VALUE ... (must come last)")
    return parser


# ----------------------------------------------------------------------------- setup


def output_root(cfg, output_dir: Optional[str]) -> str:
    """``--output-dir``, else ``MODEL.REGIONSPOT.TOKEN_CACHE_DIR`` (if the config has that key)."""
    root = output_dir or cfg.MODEL.REGIONSPOT.get("TOKEN_CACHE_DIR", "")
    if not root:
        raise ToolError("no output folder: give --output-dir or set MODEL.REGIONSPOT.TOKEN_CACHE_DIR")
    return os.path.expanduser(root)


def sam_identity(cfg, dtype: Optional[str]):
    """The cache identity of the config's SAM; :class:`ToolError` for a missing or bad SAM file."""
    from regionspot.data.token_cache import make_identity
    from regionspot.modeling.weights import WeightsError

    rs = cfg.MODEL.REGIONSPOT
    if not str(rs.SAM_WEIGHTS or "").strip():
        raise ToolError("the config has no SAM weights: set MODEL.REGIONSPOT.SAM_WEIGHTS")
    try:
        return make_identity(os.path.expanduser(rs.SAM_WEIGHTS), rs.TOKEN_SOURCE, dtype, localizer=rs.LOCALIZER)
    except (WeightsError, OSError, ValueError) as e:
        raise ToolError(str(e)) from e


def dataset_records(name: str, registrations=()) -> List[dict]:
    """The dataset dicts of a registered dataset (``--register`` ones registered first), with
    unique ``image_id``s. Raises :class:`ToolError` for an unknown name or bad dicts."""
    import importlib

    from detectron2.data import DatasetCatalog

    from regionspot.data.datasets.user import register_from_args

    importlib.import_module("regionspot.data.datasets")  # registers the bundled sample

    try:
        register_from_args(registrations)
    except ValueError as e:
        raise ToolError(str(e)) from e
    if name not in DatasetCatalog.list():
        raise ToolError(f"dataset {name!r} is not registered in Detectron2's DatasetCatalog; register your own "
                        f"with --register NAME JSON IMAGE_ROOT")
    try:
        records = DatasetCatalog.get(name)
    except Exception as e:
        raise ToolError(f"cannot load dataset {name!r}: {type(e).__name__}: {e}") from e
    seen = {}
    for i, r in enumerate(records):
        if "image_id" not in r:
            raise ToolError(f"dataset {name!r}: record {i} ({r.get('file_name', '?')!r}) has no image_id")
        key = str(r["image_id"])
        if key in seen:
            raise ToolError(f"dataset {name!r}: image id {r['image_id']!r} appears twice (records {seen[key]} and "
                            f"{i}); cache entries are keyed by image id")
        seen[key] = i
    return records


def remove_cache_files(directory: str) -> int:
    """Delete the cache's own files in a dataset folder (shards, manifest, progress, temporaries)."""
    removed = 0
    for pattern in ("shard-r*-*.safetensors", "manifest.json", "progress-r*.json", REPORT, ".shard-r*.tmp",
                    ".manifest.json.*.tmp", ".progress-r*.tmp"):
        for path in glob.glob(os.path.join(directory, pattern)):
            os.remove(path)
            removed += 1
    return removed


def check_existing(cache_dir: str, dataset_name: str, identity, records: Sequence[Mapping]) -> List:
    """The finished shards of an existing cache, checked against the run: same identity, and
    every cached image of the dataset still has the boxes it was cached with.

    Raises:
        ToolError: a corrupt or foreign shard, or a stale entry (named, with the fix).
    """
    from safetensors import safe_open

    from regionspot.data import token_cache as tc
    from regionspot.data.validation import InputError

    try:
        shards = tc.scan_shards(cache_dir, dataset_name, identity)
    except tc.TokenCacheError as e:
        raise ToolError(str(e)) from e
    by_id = {str(r["image_id"]): r for r in records}
    directory = os.path.join(cache_dir, dataset_name)
    for shard in shards:
        with safe_open(os.path.join(directory, shard.file), framework="pt") as f:
            for image_id in shard.image_ids:
                record = by_id.get(str(image_id))
                if record is None:
                    continue  # no longer in the dataset: harmless
                stored = f.get_tensor(f"boxes/{image_id}")
                try:
                    current = tc.annotation_boxes(record)
                except (InputError, KeyError):
                    current = None
                if current is None or stored.shape != current.shape or not bool(
                        ((stored - current).abs() <= tc.STALE_TOLERANCE_PX).all()):
                    raise ToolError(f"SAM-token cache {directory}: shard {shard.file} holds image {image_id!r} with "
                                    f"boxes that differ from the dataset's current annotations (stale cache); "
                                    f"rerun with --overwrite to rebuild it")
    return shards


# ----------------------------------------------------------------------------- extraction


class _ImageReader:
    """Map-style dataset for the data loader: reads one image and its boxes, never raises."""

    def __init__(self, records: Sequence[Mapping]):
        self.records = records

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        import numpy as np
        import torch

        from regionspot.data.token_cache import annotation_boxes
        from regionspot.data.validation import InputError, read_image

        record = self.records[i]
        file_name = record.get("file_name", "<no file_name>")
        try:
            array = read_image(file_name, "RGB")
            h, w = array.shape[:2]
            if ("height" in record and int(record["height"]) != h) or ("width" in record and int(record["width"]) != w):
                raise InputError(f"image {file_name!r} is {w}x{h} (WxH) but its dataset dict says "
                                 f"{record.get('width')}x{record.get('height')}")
            record = dict(record, height=h, width=w)
            boxes = annotation_boxes(record)
        except (InputError, KeyError, ValueError, TypeError) as e:
            return {"index": i, "image": None, "boxes": None, "error": str(e)}
        image = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
        return {"index": i, "image": image, "boxes": boxes, "error": None}


def _identity_pass(x):
    return x


def extract_rank(position, records: Sequence[Mapping], cache_dir: str, dataset_name: str, identity, *,
                 rank: int = 0, world_size: int = 1, shard_size: int = 1000, batch_size: int = 8,
                 num_workers: int = 0, progress: Optional[bool] = None, sleep_per_image: float = 0.0
                 ) -> Dict[str, Any]:
    """One process's share of the extraction: the images i with ``i % world_size == rank`` that
    no finished shard holds yet, written as this rank's shards.

    Tokens are those of :func:`regionspot.data.token_cache.compute_image_tokens`, computed with
    the image encoder batched over ``batch_size`` inputs (images and flips). A single process
    (``world_size == 1``) rewrites ``manifest.json`` after each shard; otherwise the rank
    rewrites its ``progress-r<rank>.json`` and :func:`finalize_cache` writes the manifest later.

    Args:
        position: a ``SamPositionTokens`` on the device to use.
        records: the whole dataset's dicts (same list and order on every rank).
        identity: the cache identity (``dtype`` set).
        progress: tqdm bar (None: only on a terminal).
        sleep_per_image: seconds to wait after each image (test hook).

    Returns:
        dict: rank, images (written now), boxes, shards, bytes, seconds, skipped (already
        cached), failures (list of ``[file_name, message]``).

    Raises:
        TokenCacheError: an existing shard is corrupt or foreign.
    """
    import torch
    from tqdm import tqdm

    from regionspot.data import token_cache as tc

    start = time.perf_counter()
    all_ids = [r["image_id"] for r in records]
    existing = tc.scan_shards(cache_dir, dataset_name, identity, checksums=world_size == 1)
    cached = {str(i) for s in existing for i in s.image_ids}
    mine = [r for i, r in enumerate(records) if i % world_size == rank]
    pending = [r for r in mine if str(r["image_id"]) not in cached]

    def on_shard(_record):
        if world_size == 1:
            tc.write_manifest(cache_dir, dataset_name, identity, existing + writer.records, all_ids)
        else:
            tc.write_progress(cache_dir, dataset_name, identity, rank, writer.records)

    writer = tc.ShardWriter(cache_dir, dataset_name, identity, rank, shard_size, on_shard)
    failures: List[List[str]] = []
    images = boxes = 0
    loader = torch.utils.data.DataLoader(_ImageReader(pending), batch_size=None, shuffle=False,
                                         num_workers=num_workers, collate_fn=_identity_pass)
    bar = tqdm(total=len(pending), desc=f"SAM tokens {dataset_name}" + (f" rank {rank}" if world_size > 1 else ""),
               unit="img", disable=None if progress is None else not progress, dynamic_ncols=True)

    def run_batch(items):
        nonlocal images, boxes
        # the image and its flip of every item, through the localizer's one token extraction
        inputs, prompts = [], []
        for item in items:
            inputs += [item["image"], item["image"].flip(-1)]
            prompts += [item["boxes"], tc.flip_boxes(item["boxes"], item["image"].shape[-1])]
        tokens = [t.cpu() for j in range(0, len(inputs), batch_size)
                  for t in position.extract_tokens(inputs[j:j + batch_size], prompts[j:j + batch_size])]
        for k, item in enumerate(items):
            entry = tc.ImageTokens(pending[item["index"]]["image_id"], tokens[2 * k], tokens[2 * k + 1],
                                   prompts[2 * k], prompts[2 * k + 1])
            writer.add(entry)
            images += 1
            boxes += entry.num_boxes
            bar.update(1)
            if sleep_per_image > 0:
                time.sleep(sleep_per_image)

    with torch.no_grad(), bar:
        batch = []
        for item in loader:
            if item["error"] is not None:
                failures.append([pending[item["index"]].get("file_name", "<no file_name>"), item["error"]])
                bar.update(1)
                continue
            batch.append(item)
            if 2 * len(batch) >= batch_size:
                run_batch(batch)
                batch = []
        if batch:
            run_batch(batch)
        writer.flush()
    if not writer.records and world_size == 1 and pending:
        tc.write_manifest(cache_dir, dataset_name, identity, existing, all_ids)
    return {"rank": rank, "images": images, "boxes": boxes, "shards": len(writer.records),
            "bytes": sum(r.bytes for r in writer.records), "seconds": time.perf_counter() - start,
            "skipped": len(mine) - len(pending), "failures": failures}


def format_summary(summaries: Sequence[Mapping], manifest: Mapping, seconds: float) -> str:
    images = sum(s["images"] for s in summaries)
    boxes = sum(s["boxes"] for s in summaries)
    nbytes = sum(s["bytes"] for s in summaries)
    skipped = sum(s["skipped"] for s in summaries)
    failures = [f for s in summaries for f in s["failures"]]
    rate = images / seconds if seconds > 0 else 0.0
    per_box = f", {nbytes / boxes:,.0f} bytes/box" if boxes else ""
    lines = [f"summary: {images} images ({boxes} boxes, image + flip) written in {seconds:.1f} s "
             f"({rate:.2f} images/s), {nbytes:,} bytes in {sum(s['shards'] for s in summaries)} shards{per_box}; "
             f"{skipped} already cached; {len(failures)} failed",
             f"cache: {manifest['num_images']} of {manifest['dataset_num_images']} images, {manifest['num_boxes']} "
             f"boxes, {manifest['total_bytes']:,} bytes in {len(manifest['shards'])} shards; "
             f"{'complete' if manifest['complete'] else 'INCOMPLETE'}"]
    if failures:
        lines.append(f"failed images ({len(failures)}; not cached, rerun after fixing them):")
        lines += [f"  {name}: {message}" for name, message in failures[:MAX_LISTED_FAILURES]]
        if len(failures) > MAX_LISTED_FAILURES:
            lines.append(f"  ... and {len(failures) - MAX_LISTED_FAILURES} more (all are listed in {REPORT})")
    return "\n".join(lines)


def _launched_main(options: Dict[str, Any]) -> None:
    """Per-process entry point (``regionspot.engine.launch``): load SAM, extract this rank's share,
    then rank 0 writes the manifest, prints the summary and the run report. A full disk in one
    of several processes is one error line from that process and exit status 2."""
    from detectron2.utils import comm

    from regionspot.io import DiskFullError

    try:
        _extract_in_process(options)
    except DiskFullError as e:  # one line from the rank that hit it; the launcher ends the others
        if comm.get_world_size() <= 1:
            raise  # one process: run_tool reports it
        print(f"{PROG}: error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def _extract_in_process(options: Dict[str, Any]) -> None:
    import torch
    from detectron2.utils import comm

    from regionspot.cli import setup_logging
    from regionspot.data import token_cache as tc
    from regionspot.modeling.backbones import build_localizer

    rank, world = comm.get_rank(), comm.get_world_size()
    _quiet_warnings()
    # a spawned process starts with bare loggers: console on rank 0, log.txt(.rank<N>) for each
    setup_logging(os.path.join(options["cache_dir"], options["dataset"]), rank=rank)
    cfg = load_config(options["config_file"], options["opts"])
    records = options.get("records")  # one process: the dataset run() loaded; else each loads it
    if records is None:
        records = dataset_records(options["dataset"], options["register"])
    device = torch.device(cfg.MODEL.DEVICE)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", comm.get_local_rank())
    elif device.type == "cpu" and comm.get_local_size() > 1:  # share the cores, do not oversubscribe them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // comm.get_local_size()))
    # the model's localizer (MODEL.REGIONSPOT.LOCALIZER) with its attention (same result up to
    # rounding); tokens always in float32 (extract_tokens); the model's COMPILE is not used here
    cfg.defrost()
    cfg.MODEL.REGIONSPOT.COMPILE = False
    position = build_localizer(cfg).to(device)
    identity = tc.CacheIdentity.from_dict(options["identity"])
    if position.token_dim != identity.token_dim:
        raise RuntimeError(f"SAM gives {position.token_dim}-d tokens, the identity says {identity.token_dim}")
    sleep = float(os.environ.get(SLEEP_ENV, "0") or 0)
    summary = extract_rank(position, records, options["cache_dir"], options["dataset"], identity, rank=rank,
                           world_size=world, shard_size=options["shard_size"], batch_size=options["batch_size"],
                           num_workers=options["num_workers"], progress=None if rank == 0 else False,
                           sleep_per_image=sleep)
    summaries = comm.all_gather(summary) if world > 1 else [summary]
    if rank == 0:
        manifest = tc.finalize_cache(options["cache_dir"], options["dataset"], identity,
                                     [r["image_id"] for r in records])
        seconds = max(s["seconds"] for s in summaries)
        print(format_summary(summaries, manifest, seconds), flush=True)
        report = {"run_id": options["run_id"], "summaries": list(summaries), "seconds": seconds,
                  "complete": manifest["complete"], "num_images": manifest["num_images"]}
        from regionspot.io import write_json_atomic

        write_json_atomic(os.path.join(options["cache_dir"], options["dataset"], REPORT), report)
    comm.synchronize()


def _quiet_warnings():
    for message in (".*torch.jit.script.*deprecated.*", ".*torch.jit.load.*deprecated.*",
                    ".*pkg_resources is deprecated.*"):
        warnings.filterwarnings("ignore", message=message)


def run(args: argparse.Namespace) -> int:
    """Check the inputs, then extract (or ``--finalize``); returns the exit status.

    Raises:
        ToolError: see the module docstring.
    """
    from regionspot.cli import setup_logging
    from regionspot.data import token_cache as tc
    from regionspot.engine.launch import JobFailed, env_rank, env_world_size, launch, under_torchrun

    started = time.perf_counter()
    for name in ("batch_size", "shard_size", "num_gpus", "num_machines"):
        if getattr(args, name) < 1:
            raise ToolError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.num_workers < 0:
        raise ToolError(f"--num-workers must not be negative, got {args.num_workers}")
    cfg = load_config(args.config_file, args.opts)  # a MODEL.DEVICE this machine lacks is an error
    identity = sam_identity(cfg, args.dtype if args.finalize else (args.dtype or "float32"))
    cache_dir = output_root(cfg, args.output_dir)
    records = dataset_records(args.dataset, args.register)
    directory = os.path.join(cache_dir, args.dataset)
    setup_logging(directory)  # <directory>/log.txt, once the dataset is known to exist
    if args.overwrite and env_world_size() > 1:
        raise ToolError("--overwrite deletes the cache while other torchrun processes read it: run it in one "
                        "process first (or use --num-gpus)")
    if args.overwrite:
        removed = remove_cache_files(directory) if os.path.isdir(directory) else 0
        print(f"--overwrite: removed {removed} cache files from {directory}")
    ids = [r["image_id"] for r in records]
    if args.finalize:
        try:
            manifest = tc.finalize_cache(cache_dir, args.dataset, identity, ids)
        except tc.TokenCacheError as e:
            raise ToolError(str(e)) from e
        state = "complete" if manifest["complete"] else f"INCOMPLETE ({len(manifest['missing_image_ids'])} missing)"
        print(f"wrote {os.path.join(directory, tc.MANIFEST)}: {manifest['num_images']} of {len(ids)} images, "
              f"{manifest['num_boxes']} boxes, {len(manifest['shards'])} shards; {state}")
        return 0 if manifest["complete"] else 1

    shards = check_existing(cache_dir, args.dataset, identity, records)
    cached = {str(i) for s in shards for i in s.image_ids} & {str(i) for i in ids}
    world = env_world_size() if under_torchrun() else args.num_gpus * args.num_machines
    lead = env_rank() == 0  # the one process of a torchrun job that reports
    if lead:
        print(f"SAM-token cache {directory}: {len(records)} images in {args.dataset}, {len(cached)} already cached in "
          f"{len(shards)} shards, {len(records) - len(cached)} to extract with {world} process(es) on "
          f"{cfg.MODEL.DEVICE} ({identity.token_dim}-d {identity.token_source} tokens, {identity.dtype}, "
          f"shard size {args.shard_size}, batch size {args.batch_size})", flush=True)
    if len(cached) == len(records):  # nothing to extract: no SAM, no processes
        if not lead:
            return 0
        try:
            manifest = tc.finalize_cache(cache_dir, args.dataset, identity, ids)
        except tc.TokenCacheError as e:
            raise ToolError(str(e)) from e
        print(format_summary([], manifest, time.perf_counter() - started), flush=True)
        return 0 if manifest["complete"] else 1
    run_id = (os.environ.get("TORCHELASTIC_RUN_ID", "") + os.environ.get("TORCHELASTIC_RESTART_COUNT", "")
              if under_torchrun() else uuid.uuid4().hex)  # the same in every process of a torchrun job
    options = {"config_file": args.config_file, "opts": list(args.opts), "dataset": args.dataset,
               "register": [list(r) for r in args.register], "cache_dir": cache_dir,
               "identity": identity.to_dict(), "shard_size": args.shard_size, "batch_size": args.batch_size,
               "num_workers": args.num_workers, "run_id": run_id,
               "records": records if world == 1 else None}  # launch() calls one process in this one
    dist_url = args.dist_url
    if dist_url == "auto" and args.num_machines > 1:
        raise ToolError("--dist-url is required with --num-machines > 1 (e.g. tcp://HOST:PORT)")
    try:
        launch(_launched_main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
               dist_url=dist_url, args=(options,))
    except JobFailed as e:  # a process failed: its own error is printed above unless it died by a signal
        if e.exit_code != 2:
            print(f"{PROG}: error: {e}", file=sys.stderr)
        return e.exit_code
    if args.machine_rank != 0 or not lead:
        return 0
    try:
        with open(os.path.join(directory, REPORT), "r", encoding="utf-8") as f:
            report = json.load(f)
    except (OSError, ValueError):
        report = None
    if report is None or report.get("run_id") != run_id:
        print(f"{PROG}: error: the extraction processes did not report back", file=sys.stderr)
        return 1
    failed = sum(len(s["failures"]) for s in report["summaries"])
    return 1 if failed or not report["complete"] else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the tool; returns the exit status (0 done, 1 some images failed, 2 bad input, with one
    ``extract_sam_tokens.py: error:`` line on stderr; the traceback too with ``--debug``)."""
    with warnings.catch_warnings():  # import-time deprecation noise of dependencies
        _quiet_warnings()
        args = build_parser().parse_args(argv)
        return run_tool(lambda: run(args), PROG, args.debug)  # the log file once the cache folder is known (run)


if __name__ == "__main__":
    sys.exit(main())
