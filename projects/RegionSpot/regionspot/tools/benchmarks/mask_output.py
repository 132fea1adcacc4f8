"""The mask-output measurement of ``regionspot-benchmark stages``
(:mod:`regionspot.tools.benchmarks.stages`), and the random boxes it and the stages use.

Mask output memory (``mask_output``, once, with the first config): the post-processing of
``--mask-pairs`` (900) (box, class) pairs on a ``--mask-image-size`` (800 x 1333; 480 x 640
with ``--quick``) image, for
10 boxes (90 classes each on average) and for as many boxes as pairs (one class each): the
distinct masks held, their bytes, the bytes one mask per pair would take (the layout before
masks were shared; computed, not run), the peak memory increase during post-processing (CUDA:
``max_memory_allocated``; CPU: resident set size sampled every 0.5 ms) and the time to
RLE-encode the masks as the evaluator does (each distinct mask once).
"""

import argparse
import gc
from typing import Dict

import torch

from regionspot.tools.benchmarks.timing import RssSampler, timed
from regionspot.tools.common import synchronize


def random_boxes(n: int, height: int, width: int, generator: torch.Generator, min_size: float = 8.0) -> torch.Tensor:
    """(n, 4) float32 XYXY boxes inside a height x width image, each side >= min_size."""
    u = torch.rand(n, 4, generator=generator)
    x1 = u[:, 0] * (width - min_size)
    y1 = u[:, 1] * (height - min_size)
    x2 = x1 + min_size + u[:, 2] * (width - x1 - min_size)
    y2 = y1 + min_size + u[:, 3] * (height - y1 - min_size)
    return torch.stack([x1, y1, x2, y2], dim=1)


def measure_mask_output(model, args: argparse.Namespace, device: torch.device) -> Dict[str, object]:
    """Memory and time of mask output at ``args.mask_pairs`` (box, class) pairs on an image of
    ``args.mask_image_size`` (see the module docstring).

    Args:
        model: a RegionSpot model in eval mode with its vocabulary set.
        args: the stages subcommand's settings (``mask_image_size``, ``mask_pairs``, ``seed``).
        device: where the model runs.

    Returns:
        ``image_size``, ``pairs``, ``peak_kind``, ``note`` and ``cases``: per box count (10 and
        ``mask_pairs``) the detections, distinct masks, their bytes, the one-mask-per-pair bytes,
        the peak memory increase and the post-processing and RLE-encoding times (ms).
    """
    from detectron2.structures import Boxes, Instances

    from regionspot.evaluation.lvis_evaluation import encode_masks_once
    from regionspot.modeling.proposals.gt import proposals_from_ground_truth

    h, w = args.mask_image_size
    g = torch.Generator().manual_seed(args.seed + 1)
    image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
    features = model.encode_images([image])
    protocol = model.protocol.replace(topk=args.mask_pairs)
    cases = []
    for n in sorted({10, args.mask_pairs}):
        gt = Instances((h, w))
        gt.gt_boxes = Boxes(random_boxes(n, h, w, g).to(device))
        proposals = [proposals_from_ground_truth(gt)]
        recognition = model.recognize(features, proposals, model.text_embeddings)[0]
        gc.collect()
        if device.type == "cuda":
            synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            result, ms = timed(
                lambda recognition=recognition: model.postprocess(recognition, (h, w), protocol, mask_on=True), device)
            peak_increase = torch.cuda.max_memory_allocated(device) - before
        else:
            with RssSampler() as rss:
                result, ms = timed(
                    lambda recognition=recognition: model.postprocess(recognition, (h, w), protocol, mask_on=True),
                    device)
            peak_increase = rss.peak - rss.start
        masks = result.pred_masks.to("cpu")
        _, encode_ms = timed(lambda masks=masks: encode_masks_once(masks), torch.device("cpu"))
        cases.append({
            "num_boxes": n, "num_detections": len(result), "distinct_masks": int(masks.bitmaps.shape[0]),
            "mask_bytes": masks.bitmaps.numel() * masks.bitmaps.element_size(),
            "per_pair_layout_bytes": len(result) * h * w,
            "peak_increase_bytes": int(peak_increase),
            "postprocess_ms": ms, "rle_encode_ms": encode_ms,
        })
    return {"image_size": [h, w], "pairs": args.mask_pairs,
            "peak_kind": "cuda_max_memory_allocated" if device.type == "cuda" else "cpu_rss_sampled",
            "note": "mask_bytes: the distinct (H, W) bool masks the output holds; per_pair_layout_bytes: "
                    "one mask per (box, class) pair (computed, not run); peak_increase_bytes: memory "
                    "growth during post-processing",
            "cases": cases}
