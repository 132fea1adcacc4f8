"""RegionSpotPredictor: set the image once, query many boxes and vocabularies."""

import numpy as np
import pytest
import torch

from regionspot import RegionSpotPredictor
from regionspot.data.validation import InputError


@pytest.fixture
def predictor(tiny_model):
    vocabulary = list(tiny_model.class_names)
    yield RegionSpotPredictor(tiny_model, min_size=256, max_size=512)
    tiny_model.set_vocabulary(vocabulary)


@pytest.fixture(scope="module")
def image():
    return (np.random.RandomState(1).rand(300, 450, 3) * 255).astype(np.uint8)


BOXES = [[10, 10, 200, 150], [220, 50, 440, 290]]


def test_encoders_run_once_per_image(predictor, image, monkeypatch):
    predictor.set_image(image)
    calls = []
    monkeypatch.setattr(predictor.model, "encode_images", lambda *a: calls.append(1))
    a = predictor.predict(BOXES, ["cat", "dog"])
    b = predictor.predict(BOXES[:1], ["car", "tree", "sky"])
    assert calls == []
    assert a.labels[0] in ("cat", "dog") and b.labels[0] in ("car", "tree", "sky")
    assert a.probabilities.shape == (2, 2) and b.probabilities.shape == (1, 3)
    assert a.masks.shape == (2, 300, 450) and a.masks.dtype == torch.bool


def test_predictions_match_the_meta_architecture(predictor, image):
    """Same boxes, same vocabulary: the predictor's best class is the evaluator path's top pair."""
    model = predictor.model
    model.set_vocabulary(["cat", "dog", "car"])
    predictor.set_image(image)
    got = predictor.predict(BOXES)
    resized = predictor.resize.get_transform(image).apply_image(image)
    scale = resized.shape[0] / image.shape[0]
    from detectron2.structures import Boxes, Instances

    inst = Instances(resized.shape[:2])
    inst.gt_boxes = Boxes(torch.tensor(BOXES, dtype=torch.float32) * scale)
    out = model([{"image": torch.as_tensor(resized.transpose(2, 0, 1).copy()), "instances": inst,
                  "height": 300, "width": 450}])[0]["instances"]
    for i, box in enumerate(BOXES):
        rows = (out.pred_boxes.tensor - torch.tensor(box, dtype=torch.float32)).abs().max(1).values < 1e-3
        best = out.scores[rows].argmax()
        assert out.pred_classes[rows][best] == got.classes[i]
        torch.testing.assert_close(out.scores[rows][best], got.scores[i])


def test_bgr_input(predictor, image):
    predictor.set_image(image)
    rgb = predictor.predict(BOXES).scores
    predictor.set_image(image[..., ::-1].copy(), "BGR")
    torch.testing.assert_close(predictor.predict(BOXES).scores, rgb)


@pytest.mark.parametrize("boxes,message", [
    ([[0, 0, float("nan"), 10]], "NaN"),
    ([[5, 5, 5, 40]], "zero area"),
    ([[0, 0, 460, 40]], "outside"),
    ([[1, 2, 3]], r"\(N, 4\)"),
])
def test_bad_boxes(predictor, image, boxes, message):
    predictor.set_image(image)
    with pytest.raises(InputError, match=message):
        predictor.predict(boxes)


def test_usage_errors(predictor, image):
    with pytest.raises(RuntimeError, match="set_image"):
        predictor.predict(BOXES)
    with pytest.raises(InputError, match="uint8"):
        predictor.set_image(image.astype(np.float32))
    predictor.set_image(image)
    with pytest.raises(InputError, match="vocabulary is empty"):
        predictor.predict(BOXES, [])
    assert len(predictor.predict(np.zeros((0, 4))).labels) == 0
