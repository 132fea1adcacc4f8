"""The synthetic workload of ``regionspot-benchmark e2e`` (:mod:`regionspot.tools.benchmarks.e2e`):
LVIS-val-like JPEG photos of COCO sizes with random boxes, written once as an LVIS-format dataset.
"""

import json
import os
from typing import List

import numpy as np
import torch

# Image sizes (H, W) of COCO/LVIS val photos: the common ones.
PHOTO_SIZES = [(480, 640), (427, 640), (640, 480), (640, 427), (375, 500), (500, 375), (424, 640),
               (612, 612), (480, 640), (427, 640)]


def synthetic_photo(rng: np.random.RandomState, height: int, width: int) -> np.ndarray:
    """(H, W, 3) uint8: smooth colour fields plus mild noise, so JPEG sizes and decoding cost are
    those of photos rather than of white noise."""
    low = rng.rand(max(2, height // 32), max(2, width // 32), 3).astype(np.float32)
    field = torch.nn.functional.interpolate(torch.from_numpy(low).permute(2, 0, 1)[None], size=(height, width),
                                            mode="bicubic", align_corners=False)[0].permute(1, 2, 0).numpy()
    noise = rng.randn(height, width, 3).astype(np.float32) * 0.04
    return (np.clip(field + noise, 0, 1) * 255).astype(np.uint8)


def random_xywh(rng: np.random.RandomState, height: int, width: int, n: int) -> List[List[float]]:
    """n boxes [x, y, w, h] inside the image, each side >= 8 px, sizes spread like LVIS's."""
    out = []
    for _ in range(n):
        w = float(np.clip(width * rng.beta(1.2, 3.0), 8, width))
        h = float(np.clip(height * rng.beta(1.2, 3.0), 8, height))
        x = float(rng.uniform(0, width - w))
        y = float(rng.uniform(0, height - h))
        out.append([round(x, 2), round(y, 2), round(w, 2), round(h, 2)])
    return out


def write_synthetic_lvis(folder: str, num_images: int, boxes_per_image: int, seed: int = 0) -> str:
    """Write (or reuse) the synthetic LVIS-val-like workload: ``folder/images/*.jpg`` and
    ``folder/lvis_synthetic.json`` (LVIS format: 1203 categories with frequencies, per-image
    ``neg_category_ids``/``not_exhaustive_category_ids``). Reused when a manifest says the same
    size, boxes and seed. Returns the json path."""
    from detectron2.data.datasets.lvis_v1_categories import LVIS_CATEGORIES
    from PIL import Image

    from regionspot.data.vocabularies import get_vocabulary
    from regionspot.io import write_json_atomic

    json_path = os.path.join(folder, "lvis_synthetic.json")
    manifest_path = os.path.join(folder, "manifest.json")
    manifest = {"num_images": num_images, "boxes_per_image": boxes_per_image, "seed": seed, "version": 2}
    if os.path.isfile(json_path) and os.path.isfile(manifest_path):
        with open(manifest_path) as f:
            if json.load(f) == manifest:
                return json_path
    names = get_vocabulary("lvis")  # LVIS v1's names in category-id order (ids 1..1203)
    frequencies = [c["frequency"] for c in sorted(LVIS_CATEGORIES, key=lambda c: c["id"])]
    rng = np.random.RandomState(seed)
    categories = [{"id": i + 1, "name": n, "frequency": f, "synset": n, "image_count": 1, "instance_count": 1}
                  for i, (n, f) in enumerate(zip(names, frequencies))]
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    images, annotations = [], []
    for i in range(num_images):
        h, w = PHOTO_SIZES[rng.randint(len(PHOTO_SIZES))]
        file_name = f"{i + 1:012d}.jpg"
        Image.fromarray(synthetic_photo(rng, h, w)).save(os.path.join(folder, "images", file_name), quality=90)
        cats = rng.randint(1, len(names) + 1, size=boxes_per_image)
        negatives = sorted(set(rng.randint(1, len(names) + 1, size=8).tolist()) - set(cats.tolist()))
        images.append({"id": i + 1, "height": h, "width": w, "file_name": file_name,
                       "neg_category_ids": negatives, "not_exhaustive_category_ids": []})
        for box, cat in zip(random_xywh(rng, h, w, boxes_per_image), cats.tolist()):
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": cat, "bbox": box,
                                "area": box[2] * box[3], "iscrowd": 0,
                                "segmentation": [[box[0], box[1], box[0] + box[2], box[1], box[0] + box[2],
                                                  box[1] + box[3], box[0], box[1] + box[3]]]})
    write_json_atomic(json_path, {"images": images, "annotations": annotations, "categories": categories,
                                  "info": {"description": "synthetic LVIS-val-like workload (random content)"},
                                  "licenses": []})
    write_json_atomic(manifest_path, manifest)
    return json_path
