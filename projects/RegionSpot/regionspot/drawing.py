"""Predictions drawn with Detectron2's ``Visualizer`` (boxes, labels, scores, masks): the demo
(``demo/demo.py``) and the web app (``demo/app.py``) draw through :func:`draw_predictions`."""

import numpy as np


def draw_predictions(image: np.ndarray, predictions, draw_masks: bool = True) -> np.ndarray:
    """Draw :class:`~regionspot.predictor.RegionPredictions` on an image.

    Args:
        image: (H, W, 3) uint8 RGB, the image given to ``set_image``.
        predictions: its predictions (boxes in its pixels, masks (N, H, W) bool).
        draw_masks: also fill each region's mask.

    Returns:
        (H, W, 3) uint8 RGB.
    """
    from detectron2.data.catalog import Metadata
    from detectron2.structures import Boxes, Instances
    from detectron2.utils.visualizer import ColorMode, Visualizer

    h, w = image.shape[:2]
    instances = Instances((h, w))
    instances.pred_boxes = Boxes(predictions.boxes)
    instances.scores = predictions.scores
    instances.pred_classes = predictions.classes
    if draw_masks:
        instances.pred_masks = predictions.masks
    metadata = Metadata(name="regionspot_demo", thing_classes=list(predictions.vocabulary))
    visualizer = Visualizer(image, metadata, instance_mode=ColorMode.IMAGE)
    return visualizer.draw_instance_predictions(instances).get_image()
