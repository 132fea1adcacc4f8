"""Which evaluation tasks a dataset's ground truth supports: box AP needs boxes, mask AP
("segm") needs instance masks.

Most box datasets (Objects365, V3Det, OpenImages boxes, a user's own box annotations) have no
``segmentation`` in their annotations; pycocotools, the LVIS API and faster-coco-eval all fail
with ``KeyError: 'segmentation'`` when asked for mask AP on them. The evaluators therefore
decide from the ground truth itself (:func:`mask_annotation_counts`):

- no annotation has a mask: mask AP is skipped, with one log line, and box AP is computed and
  reported as usual;
- every annotation has one: mask AP as usual;
- some have one: mask AP is still computed; each annotation without a mask gets its box as its
  mask (one polygon, the convention the LVIS API itself applies to box-only results), with one
  warning that counts them (:func:`fill_missing_masks_with_boxes`).
"""

from typing import Iterable, List, Sequence, Tuple

__all__ = ["has_mask", "mask_annotation_counts", "fill_missing_masks_with_boxes", "no_masks_message"]


def has_mask(annotation: dict) -> bool:
    """Whether a COCO/LVIS annotation dict carries a non-empty instance mask in
    ``segmentation``: polygons (a list holding at least one polygon of >= 3 points) or an RLE
    (a dict with ``counts``). A missing key, None, ``[]``, ``[[]]`` or ``{}`` is no mask."""
    seg = annotation.get("segmentation") if isinstance(annotation, dict) else None
    if isinstance(seg, dict):
        return bool(seg.get("counts"))
    if isinstance(seg, (list, tuple)):
        return any(isinstance(poly, (list, tuple)) and len(poly) >= 6 for poly in seg)
    return False


def mask_annotation_counts(annotations: Iterable[dict]) -> Tuple[int, int]:
    """``(with_mask, total)``: how many of the annotations have a mask (:func:`has_mask`), of
    how many."""
    with_mask = total = 0
    for ann in annotations:
        total += 1
        with_mask += has_mask(ann)
    return with_mask, total


def no_masks_message(dataset_name: str, total: int, json_file: str = "") -> str:
    """The one log line of a skipped mask AP."""
    where = f" in {json_file}" if json_file else ""
    return (f"{dataset_name} has no mask annotations (none of its {total} annotations{where} has a "
            f"'segmentation'): mask AP (segm) skipped, box AP only")


def fill_missing_masks_with_boxes(annotations: Sequence[dict]) -> List:
    """Give every annotation without a mask (:func:`has_mask`) its box as its mask: one
    polygon ``[[x, y, x + w, y, x + w, y + h, x, y + h]]`` from ``bbox`` (XYWH), written into
    the dicts in place (the ground-truth API's own annotation objects, so that its mask AP sees
    them).

    Returns:
        the ids (``id``, or None) of the annotations given a box mask.

    Raises:
        ValueError: an annotation without a mask has no 4-number ``bbox`` (the message names it).
    """
    filled = []
    for ann in annotations:
        if has_mask(ann):
            continue
        bbox = ann.get("bbox")
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
            raise ValueError(f"ground-truth annotation {ann.get('id')!r} has neither a mask ('segmentation') nor a "
                             f"[x, y, w, h] 'bbox' (got {bbox!r}); mask AP needs one of them")
        x, y, w, h = (float(v) for v in bbox)
        ann["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
        filled.append(ann.get("id"))
    return filled
