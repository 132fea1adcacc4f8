"""Dataset dict -> model input, with one augmentation for the image both encoders see.

The released code augments (flips, resizes, crops) only the image given to CLIP while the SAM
tokens come from pre-extracted, un-augmented images, so tokens and feature maps disagree.
Here the augmentation (Detectron2's ``ResizeShortestEdge`` + ``RandomFlip`` from the config)
is applied once, to the single image that goes to both SAM and CLIP and to its boxes.
At test time the ground-truth boxes are kept (the proposals with ``PROPOSALS`` "gt"; the
released test mapper drops them and crashes). With ``PROPOSALS`` "file", the boxes a detector
wrote, selected (score threshold, NMS, top ``PROPOSAL_TOPK``) and attached to the dataset dicts
as Detectron2's precomputed-proposal keys (``data/dataset_proposals.py``), go through Detectron2's
own ``transform_proposals`` with the same transform as the image and become
``dataset_dict["proposals"]`` (the selection is not applied a second time here).
"""

import copy
import logging
from typing import Dict, Optional

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import DatasetMapper
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BoxMode

from ..proposal_sources import check_proposal_source
from ..transforms import annotation_boxes_xyxy, flip_boxes, resize_for_clip, resize_for_sam
from .validation import InputError, check_boxes, read_image

logger = logging.getLogger(__name__)


class RegionSpotDatasetMapper(DatasetMapper):
    """Read, validate and augment one dataset dict (Detectron2 standard format).

    Output dict: the input's keys plus "image" ((3, H, W) uint8 RGB tensor, augmented),
    the encoders' resizes of the image that SAM and CLIP will see, made here so that they run
    in the data-loader workers and not on the model's critical path: "sam_input" ((3, h, w)
    uint8, long side ``SAM_INPUT_SIZE``, :func:`~regionspot.transforms.resize_for_sam`;
    not when SAM's tokens come from the cache) and "clip_input" ((3, S, S) float32 in [0, 1],
    :func:`~regionspot.transforms.resize_for_clip`), both only with
    ``LOADER_RESIZE``; "instances" (``gt_boxes``: XYXY_ABS pixels of the augmented image, ``gt_classes``:
    int64 contiguous ids) and, at test time with ``PROPOSALS`` "file", "proposals"
    (``proposal_boxes`` in the same frame, ``objectness_logits``). Annotations are boxes only
    (no masks, keypoints).

    Raises:
        InputError: the image is missing or unreadable, a box is NaN, empty or outside the
            image, or a "file" source image has no proposals attached; the message names the
            file (and the box).
    """

    @configurable
    def __init__(self, is_train: bool, *, token_cache_dir: str = "", token_identity=None, sam_input_size: int = 0,
                 clip_input_size: int = 0, clip_antialias: bool = False, file_proposals: bool = False, **kwargs):
        kwargs.update(use_instance_mask=False, use_keypoint=False, recompute_boxes=False)
        super().__init__(is_train, **kwargs)
        # The proposal file's selection (score threshold, NMS, top-k) ran once, when the test
        # loader attached the boxes (data/dataset_proposals.py, recorded in "proposal_filters"):
        # the mapper only transforms them, it does not cut them again.
        self.file_proposals = file_proposals
        self.sam_input_size = sam_input_size
        self.clip_input_size = clip_input_size
        self.clip_antialias = clip_antialias
        self.skipped_images = 0
        self.token_cache_dir = token_cache_dir if is_train else ""
        self.token_identity = token_identity
        self._token_caches = {}

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        ret = super().from_config(cfg, is_train)
        rs = cfg.MODEL.REGIONSPOT
        # Detectron2's precomputed-proposal path, driven by our source key instead of
        # MODEL.LOAD_PROPOSALS; proposals are used at test time only.
        ret["file_proposals"] = check_proposal_source(rs.PROPOSALS) == "file" and not is_train
        if rs.LOADER_RESIZE:
            ret.update(sam_input_size=rs.SAM_INPUT_SIZE, clip_input_size=rs.CLIP_INPUT_SIZE,
                       clip_antialias=rs.CLIP_RESIZE_ANTIALIAS)
        if is_train and rs.TOKEN_CACHE_DIR:
            if cfg.INPUT.RANDOM_FLIP == "vertical":
                raise InputError("MODEL.REGIONSPOT.TOKEN_CACHE_DIR holds tokens of the image and its horizontal flip: "
                                 "INPUT.RANDOM_FLIP 'vertical' cannot use it")
            from .token_cache import identity_from_config

            ret["token_cache_dir"] = rs.TOKEN_CACHE_DIR
            ret["token_identity"] = identity_from_config(cfg)
        return ret

    def __call__(self, dataset_dict: Dict) -> Optional[Dict]:
        """Map one dataset dict (see the class docstring).

        In training, an image that cannot be read (missing, truncated) is skipped: the mapper
        logs it with its file name and the number skipped so far in this worker, and returns
        None, on which Detectron2's ``MapDataset`` takes another image. A day-long run does not
        die on one broken file of millions; evaluation never skips (it raises).
        """
        dataset_dict = copy.deepcopy(dataset_dict)
        file_name = dataset_dict.get("file_name", "<no file_name>")
        try:
            image = read_image(file_name, self.image_format)
        except InputError as e:
            if not self.is_train:
                raise
            self.skipped_images += 1
            logger.warning("training image skipped (%d so far in this data-loader worker): %s",
                           self.skipped_images, e)
            return None
        try:
            utils.check_image_size(dataset_dict, image)
        except Exception as e:  # Detectron2's SizeMismatchError
            raise InputError(f"image {file_name!r}: {e}") from e
        annos = [a for a in dataset_dict.pop("annotations", []) if a.get("iscrowd", 0) == 0]
        if annos:
            clipped = check_boxes(annotation_boxes_xyxy(annos), image.shape[:2], f"boxes of {file_name!r}")
            for a, box in zip(annos, clipped.tolist()):
                a["bbox"], a["bbox_mode"] = box, BoxMode.XYXY_ABS
                a.pop("segmentation", None)  # boxes are the prompts; masks come from SAM
                a.pop("keypoints", None)

        original = image
        aug_input = T.AugInput(image)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        image_shape = image.shape[:2]
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if self.clip_input_size:
            dataset_dict["clip_input"] = resize_for_clip(dataset_dict["image"], self.clip_input_size,
                                                         self.clip_antialias)
        if self.sam_input_size and not self.is_train:
            dataset_dict["sam_input"] = resize_for_sam(dataset_dict["image"], self.sam_input_size)

        if self.file_proposals:
            if "proposal_boxes" not in dataset_dict:
                raise InputError(f"image {file_name!r} (id {dataset_dict.get('image_id')!r}) has no proposals "
                                 f"attached; with PROPOSALS 'file' the test loader attaches them from the "
                                 f"proposal file")
            # proposal_topk None: keep every attached box (the top-k was applied when attaching)
            utils.transform_proposals(dataset_dict, image_shape, transforms, proposal_topk=None)

        original_boxes = np.array([a["bbox"] for a in annos], dtype=np.float32).reshape(-1, 4)
        annos = [utils.transform_instance_annotations(a, transforms, image_shape) for a in annos]
        instances = utils.annotations_to_instances(annos, image_shape)
        if self.is_train:
            self.add_sam_inputs(dataset_dict, instances, original, original_boxes, transforms)
            instances = utils.filter_empty_instances(instances)
        dataset_dict["instances"] = instances
        return dataset_dict

    def add_sam_inputs(self, dataset_dict: Dict, instances, original: np.ndarray, boxes: np.ndarray,
                       transforms) -> None:
        """What SAM needs for the training boxes, in the frame the SAM-token cache uses.

        SAM sees the ORIGINAL image, flipped when the augmentation flipped it (the resize only
        matters to CLIP: SAM resizes every image to its own 1024 px frame). Online, this adds
        ``dataset_dict["sam_image"]`` ((3, H0, W0) uint8) and ``instances.sam_boxes`` (XYXY_ABS
        pixels of that image, one per instance). With a token cache (``TOKEN_CACHE_DIR``,
        written by ``tools/extract_sam_tokens.py``), ``instances.sam_tokens`` ((N, T) float32)
        come from it for the same image, flip and boxes instead; a missing, stale or foreign
        entry is a ``TokenCacheError`` naming the cache, the dataset and the image.
        """
        from detectron2.structures import Boxes

        flipped = any(isinstance(t, T.HFlipTransform) for t in transforms.transforms)
        if self.token_cache_dir:
            cache = self._token_cache(dataset_dict)
            tokens, _ = cache.lookup(dataset_dict["image_id"], flipped, expected_boxes=torch.as_tensor(boxes))
            instances.sam_tokens = tokens
            return
        boxes = torch.as_tensor(boxes, dtype=torch.float32)
        if flipped:
            boxes = flip_boxes(boxes, original.shape[1])
            original = original[:, ::-1]
        dataset_dict["sam_image"] = torch.as_tensor(np.ascontiguousarray(original.transpose(2, 0, 1)))
        if self.sam_input_size:
            dataset_dict["sam_input"] = resize_for_sam(dataset_dict["sam_image"], self.sam_input_size)
        instances.sam_boxes = Boxes(boxes)

    def _token_cache(self, dataset_dict: Dict):
        """The SAM-token cache of the dict's dataset (opened once per data-loader worker)."""
        from .token_cache import SamTokenCache

        name = dataset_dict.get("dataset")
        if name is None:
            raise InputError(f"image {dataset_dict.get('file_name')!r} has no 'dataset' key: the SAM-token cache is "
                             f"per dataset (the training loader adds it)")
        if name not in self._token_caches:
            self._token_caches[name] = SamTokenCache(self.token_cache_dir, name, self.token_identity)
        return self._token_caches[name]
