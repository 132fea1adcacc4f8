"""RegionSpotPredictor: set the image once, query many boxes and vocabularies; its own
vocabulary, never the model's."""

import numpy as np
import pytest
import torch

from conftest import assert_same_masks
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


def test_attention_maps_cost_no_encoder_work_and_match_the_plain_prediction(predictor, image, monkeypatch):
    """predict(..., return_attention=True): per region and decoder layer a map over CLIP's patch
    grid (class token excluded), with the same labels and scores as without it."""
    predictor.set_image(image)
    plain = predictor.predict(BOXES)
    assert plain.attention is None
    calls = []
    monkeypatch.setattr(predictor.model, "encode_images", lambda *a: calls.append(1))
    out = predictor.predict(BOXES, return_attention=True)
    assert calls == []
    semantic = predictor._features[0].semantic  # (L, D): the class token and g x g patches
    grid = int((semantic.shape[0] - 1) ** 0.5)
    layers = len(predictor.model.head.decoder.layers)
    assert out.attention.shape == (2, layers, grid, grid) and out.attention.dtype == torch.float32
    assert (out.attention.flatten(2).sum(-1) < 1).all()  # the class token's share is left out
    torch.testing.assert_close(out.probabilities, plain.probabilities, rtol=1e-5, atol=1e-6)
    assert out.select(torch.tensor([1])).attention.shape == (1, layers, grid, grid)


def test_embed_gives_normalised_embeddings_that_score_like_predict(predictor, image):
    """Stored region embeddings scored against a new vocabulary equal predict() with it."""
    predictor.set_image(image)
    embeddings = predictor.embed(BOXES)
    assert embeddings.shape == (2, predictor.model.semantic_encoder.embed_dim) and embeddings.dtype == torch.float32
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(2))
    live = predictor.predict(BOXES, ["boat", "kite", "umbrella"])
    assert torch.equal(live.embeddings, embeddings)
    assert torch.equal(predictor.score_embeddings(embeddings, ["boat", "kite", "umbrella"]), live.probabilities)


def test_clicks_become_one_region_with_sams_mask(predictor, image):
    """Points -> SAM's mask -> its box recognised by the box path; the result carries the mask."""
    from segment_anything import SamPredictor

    predictor.set_image(image)
    clicks, labels = [[120.0, 140.0], [30.0, 280.0]], [1, 0]
    out = predictor.predict(points=clicks, point_labels=labels)
    assert len(out.labels) == 1 and out.masks.shape == (1, 300, 450) and out.prompt_iou.shape == (1,)
    # SAM's own answer for the same clicks, on the image the predictor encoded (its test-time resize)
    sam = SamPredictor(predictor.model.localizer.sam)
    resized = predictor._transform.apply_image(image)
    sam.set_image(resized)
    coords = predictor._transform.apply_coords(np.array(clicks, dtype=np.float64))
    _, iou, low_res = sam.predict(coords.astype(np.float32), np.array(labels), multimask_output=False)
    torch.testing.assert_close(out.prompt_iou, torch.as_tensor(iou, dtype=torch.float32), rtol=0, atol=1e-4)
    # SAM's mask logits pasted onto the photo: the predictor's mask (these clicks give a mask of
    # about a quarter of the photo with the seed-0 model, far from empty)
    reference = predictor.model.localizer.paste_masks(torch.as_tensor(low_res)[None], sam.input_size, image.shape[:2])
    assert_same_masks(out.masks[0], reference[0], "the clicks' mask")
    assert out.masks[0].sum() > 0.1 * out.masks[0].numel()
    ys, xs = torch.nonzero(out.masks[0], as_tuple=True)
    box = [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
    np.testing.assert_allclose(out.boxes[0].numpy(), box, atol=2.0)  # the mask's box (resize rounding)
    by_box = predictor.predict([box])
    torch.testing.assert_close(out.probabilities, by_box.probabilities, rtol=1e-3, atol=1e-3)
    own = predictor.predict(points=clicks, point_labels=labels, region_token="prompt")
    assert torch.equal(own.masks, out.masks)
    with pytest.raises(InputError, match="outside"):
        predictor.predict(points=[[500, 10]])
    with pytest.raises(InputError, match="point_labels"):
        predictor.predict(points=clicks, point_labels=[1, 3])
    with pytest.raises(InputError, match="either boxes"):
        predictor.predict(BOXES, points=clicks)


def test_a_mask_prompt_and_a_localizer_without_prompt_points(predictor, image, monkeypatch):
    predictor.set_image(image)
    mask = np.zeros(image.shape[:2], bool)
    mask[40:200, 60:260] = True
    out = predictor.predict(mask=mask)
    # one region whose mask is SAM's answer to the mask prompt (about a tenth of the photo with
    # the seed-0 model: not empty)
    assert len(out.labels) == 1 and out.filters.steps[0].stage.startswith("point prompt")
    assert out.masks.shape == (1, 300, 450) and out.masks[0].sum() > 0.05 * out.masks[0].numel()
    ys, xs = torch.nonzero(out.masks[0], as_tuple=True)
    np.testing.assert_allclose(out.boxes[0].numpy(), [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], atol=2.0)
    monkeypatch.delattr(type(predictor.model.localizer), "prompt_points")
    with pytest.raises(NotImplementedError, match="prompt_points"):
        predictor.predict(points=[[10, 10]])


def test_sam_auto_runs_once_per_image(tiny_model, image, monkeypatch):
    """A new vocabulary (the web app's vocabulary change) reuses the image's automatic proposals."""
    predictor = RegionSpotPredictor(tiny_model, 256, 512, vocabulary=["cat", "dog"])
    predictor.set_image(image)
    calls = []
    generate = tiny_model.generate_proposals
    monkeypatch.setattr(tiny_model, "generate_proposals", lambda *a, **k: calls.append(1) or generate(*a, **k))
    a = predictor.predict(proposals="sam_auto")
    b = predictor.predict(proposals="sam_auto", vocabulary=["car", "tree"])
    assert calls == [1] and torch.equal(a.boxes, b.boxes) and b.vocabulary == ["car", "tree"]
    assert a.filters.as_dict() == b.filters.as_dict()
    predictor.set_image(image)
    predictor.predict(proposals="sam_auto")
    assert calls == [1, 1]
