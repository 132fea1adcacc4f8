"""RegionSpotPredictor: set the image once, query many boxes and vocabularies; its own
vocabulary, never the model's."""

import numpy as np
import pytest
import torch

from regionspot import RegionSpotPredictor
from regionspot.data.validation import InputError


@pytest.fixture
def predictor(tiny_model):
    return RegionSpotPredictor(tiny_model, min_size=256, max_size=512, vocabulary=["cat", "dog"])


@pytest.fixture(scope="module")
def image():
    return (np.random.RandomState(1).rand(300, 450, 3) * 255).astype(np.uint8)


BOXES = [[10, 10, 200, 150], [220, 50, 440, 290]]


def test_encoders_run_once_per_image(predictor, image, monkeypatch):
    predictor.set_image(image)
    calls = []
    monkeypatch.setattr(predictor.model, "encode_images", lambda *a: calls.append(1))
    a = predictor.predict(BOXES)
    b = predictor.predict(BOXES[:1], ["car", "tree", "sky"])
    assert calls == []
    assert a.labels[0] in ("cat", "dog") and b.labels[0] in ("car", "tree", "sky")
    assert a.probabilities.shape == (2, 2) and b.probabilities.shape == (1, 3)
    assert a.masks.shape == (2, 300, 450) and a.masks.dtype == torch.bool
    np.testing.assert_allclose(a.boxes.numpy(), BOXES, atol=1e-3)  # back in the image's pixels
    assert torch.equal(a.proposal_scores, torch.ones(2))


def test_text_embeddings_are_computed_once_per_vocabulary(predictor, image, monkeypatch):
    predictor.set_image(image)
    predictor.predict(BOXES, ["car", "tree"])
    calls = []
    encode = predictor.model.encode_vocabulary
    monkeypatch.setattr(predictor.model, "encode_vocabulary", lambda names: calls.append(names) or encode(names))
    predictor.predict(BOXES, ["car", "tree"])
    predictor.predict(BOXES)
    assert calls == []
    predictor.predict(BOXES, ["boat"])
    assert calls == [["boat"]]


def test_two_predictors_on_one_model_do_not_disturb_each_other(tiny_model, image):
    model_vocabulary = list(tiny_model.class_names)
    model_embeddings = tiny_model.text_embeddings.clone()
    a = RegionSpotPredictor(tiny_model, 256, 512, vocabulary=["cat", "dog", "car"])
    b = RegionSpotPredictor(tiny_model, 256, 512, vocabulary=["tree", "sky"])
    a.set_image(image)
    b.set_image(image)
    first = a.predict(BOXES)
    b.predict(BOXES)  # another vocabulary on the same model in between
    again = a.predict(BOXES)
    assert again.vocabulary == ["cat", "dog", "car"] and b.predict(BOXES).vocabulary == ["tree", "sky"]
    assert torch.equal(first.probabilities, again.probabilities)
    assert tiny_model.class_names == model_vocabulary and torch.equal(tiny_model.text_embeddings, model_embeddings)


def test_per_box_best_class_is_the_probability_argmax(predictor, image):
    predictor.set_image(image)
    out = predictor.predict(BOXES, ["cat", "dog", "car"])
    torch.testing.assert_close(out.probabilities.sum(1), torch.ones(2))
    assert torch.equal(out.classes, out.probabilities.argmax(1))
    assert torch.equal(out.scores, out.probabilities.max(1).values)  # given boxes: proposal score 1
    kept = out.select(out.scores >= out.scores.max())
    assert len(kept.labels) == 1 and kept.masks.shape[0] == 1


def test_recognise_everything_with_sam_auto(tiny_model, image, monkeypatch):
    settings = dict(tiny_model.proposal_generator.sam_auto.settings, points_per_side=4, pred_iou_thresh=0.0,
                    stability_score_thresh=0.0)
    monkeypatch.setattr(tiny_model.proposal_generator.sam_auto, "settings", settings)
    predictor = RegionSpotPredictor(tiny_model, 256, 512, vocabulary=["cat", "dog"])
    predictor.set_image(image)
    out = predictor.predict(proposals="sam_auto")
    assert len(out.labels) > 0 and out.masks.shape[1:] == (300, 450)
    assert (out.proposal_scores[:-1] >= out.proposal_scores[1:]).all()  # best proposals first
    assert torch.equal(out.scores, out.probabilities.max(1).values * out.proposal_scores)
    # each region's mask is the automatic generator's mask, inside its box
    for box, mask in zip(out.boxes, out.masks):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        assert xs.min() >= box[0] - 2 and xs.max() <= box[2] + 2 and ys.min() >= box[1] - 2 and ys.max() <= box[3] + 2
    with pytest.raises(ValueError, match="RPN_WEIGHTS"):
        predictor.predict(proposals="rpn")


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


def test_usage_errors(tiny_model, predictor, image):
    with pytest.raises(RuntimeError, match="set_image"):
        predictor.predict(BOXES)
    with pytest.raises(InputError, match="uint8"):
        predictor.set_image(image.astype(np.float32))
    predictor.set_image(image)
    with pytest.raises(ValueError, match="vocabulary is empty"):
        predictor.predict(BOXES, [])
    with pytest.raises(InputError, match="either boxes"):
        predictor.predict(BOXES, proposals="sam_auto")
    with pytest.raises(InputError, match="proposals must be one of"):
        predictor.predict(proposals="selective_search")
    assert len(predictor.predict(np.zeros((0, 4))).labels) == 0
    no_vocabulary = RegionSpotPredictor(tiny_model, 256, 512)
    no_vocabulary.set_image(image)
    with pytest.raises(InputError, match="no vocabulary"):
        no_vocabulary.predict(BOXES)


def test_the_predictor_leaves_the_models_mode_as_it_was(tiny_model, image):
    """A model being trained can be looked at: predictions run in eval mode (no dropout in the
    head) and the model is given back in training mode."""
    predictor = RegionSpotPredictor(tiny_model, vocabulary=["cat", "dog"])
    predictor.set_image(image)
    reference = predictor.predict([[10, 10, 100, 120], [50, 40, 200, 160]])
    tiny_model.train()
    try:
        again = predictor.predict([[10, 10, 100, 120], [50, 40, 200, 160]])
        assert tiny_model.training and tiny_model.head.training
    finally:
        tiny_model.eval()
    assert torch.equal(reference.scores, again.scores) and reference.labels == again.labels
