"""Dataset dict -> model input, with one augmentation for the image both encoders see.

The released code augments (flips, resizes, crops) only the image given to CLIP while the SAM
tokens come from pre-extracted, un-augmented images, so tokens and feature maps disagree.
Here the augmentation (Detectron2's ``ResizeShortestEdge`` + ``RandomFlip`` from the config)
is applied once, to the single image that goes to both SAM and CLIP and to its boxes.
At test time the ground-truth boxes are kept as the proposals to recognise (the released
test mapper drops them and crashes).
"""

import copy
from typing import Dict

import numpy as np
import torch

from detectron2.config import configurable
from detectron2.data import DatasetMapper
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BoxMode

from .validation import InputError, check_boxes, read_image

# Where test-time proposals come from: "gt" = the dataset's ground-truth boxes.
TEST_PROPOSALS = ("gt",)


class RegionSpotDatasetMapper(DatasetMapper):
    """Read, validate and augment one dataset dict (Detectron2 standard format).

    Output dict: the input's keys plus "image" ((3, H, W) uint8 RGB tensor, augmented) and
    "instances" (``gt_boxes``: XYXY_ABS pixels of the augmented image, ``gt_classes``:
    int64 contiguous ids). Annotations are boxes only (no masks, keypoints).

    Raises:
        InputError: the image is missing or unreadable, or a box is NaN, empty or outside the
            image; the message names the file (and the box).
    """

    @configurable
    def __init__(self, is_train: bool, **kwargs):
        kwargs.update(use_instance_mask=False, use_keypoint=False, recompute_boxes=False)
        super().__init__(is_train, **kwargs)

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        ret = super().from_config(cfg, is_train)
        if cfg.MODEL.REGIONSPOT.TEST_PROPOSALS not in TEST_PROPOSALS:
            raise ValueError(f"MODEL.REGIONSPOT.TEST_PROPOSALS must be one of {TEST_PROPOSALS}, got "
                             f"{cfg.MODEL.REGIONSPOT.TEST_PROPOSALS!r}")
        return ret

    def __call__(self, dataset_dict: Dict) -> Dict:
        dataset_dict = copy.deepcopy(dataset_dict)
        file_name = dataset_dict.get("file_name", "<no file_name>")
        image = read_image(file_name, self.image_format)
        try:
            utils.check_image_size(dataset_dict, image)
        except Exception as e:  # Detectron2's SizeMismatchError
            raise InputError(f"image {file_name!r}: {e}") from e
        annos = [a for a in dataset_dict.pop("annotations", []) if a.get("iscrowd", 0) == 0]
        if annos:
            xyxy = np.array([BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in annos],
                            dtype=np.float32)
            clipped = check_boxes(xyxy, image.shape[:2], f"boxes of {file_name!r}")
            for a, box in zip(annos, clipped.tolist()):
                a["bbox"], a["bbox_mode"] = box, BoxMode.XYXY_ABS
                a.pop("segmentation", None)  # boxes are the prompts; masks come from SAM
                a.pop("keypoints", None)

        aug_input = T.AugInput(image)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        image_shape = image.shape[:2]
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))

        annos = [utils.transform_instance_annotations(a, transforms, image_shape) for a in annos]
        instances = utils.annotations_to_instances(annos, image_shape)
        if self.is_train:
            instances = utils.filter_empty_instances(instances)
        dataset_dict["instances"] = instances
        return dataset_dict
