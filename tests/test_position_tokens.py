"""Position-aware tokens and masks from SAM, against SamPredictor's own path."""

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor

from conftest import assert_same_masks
from regionspot.modeling.position_tokens import TOKEN_SOURCES, SamPositionTokens
from regionspot.modeling.weights import load_sam


@pytest.fixture(scope="module")
def sam(sam_path):
    return load_sam(sam_path)


@pytest.fixture(scope="module")
def image():
    rng = np.random.RandomState(0)
    return (rng.rand(300, 470, 3) * 255).astype(np.uint8)  # non-square


BOXES = torch.tensor([[10.0, 20.0, 200.0, 250.0], [300.0, 10.0, 460.0, 290.0], [0.0, 0.0, 470.0, 300.0]])


def _reference(sam, image, boxes):
    """SamPredictor.set_image + predict_torch, with a hook reading hs[:, 1] (docs/method.md §3)."""
    predictor = SamPredictor(sam)
    predictor.set_image(image)
    captured = []
    handle = sam.mask_decoder.transformer.register_forward_hook(lambda m, i, o: captured.append(o[0]))
    try:
        with torch.no_grad():
            masks, iou, low_res = predictor.predict_torch(
                None, None, predictor.transform.apply_boxes_torch(boxes, image.shape[:2]), multimask_output=False)
    finally:
        handle.remove()
    return captured[0][:, 1], masks[:, 0], low_res, iou[:, 0]


def _ours(sam, image, boxes, with_iou=False, **kwargs):
    tokens = SamPositionTokens(sam, **kwargs)
    pixels, resized = tokens.preprocess(torch.from_numpy(image).permute(2, 0, 1))
    with torch.no_grad():
        embedding = tokens.encode_images(pixels[None])[0]
        tok, low_res, iou = tokens(embedding, boxes, image.shape[:2])
    return (tokens, tok, low_res, resized) + ((iou,) if with_iou else ())


def test_token_equals_sam_predictor_path(sam, image):
    ref_tokens, ref_masks, ref_low_res, ref_iou = _reference(sam, image, BOXES)
    tokens, tok, low_res, resized, iou = _ours(sam, image, BOXES, with_iou=True)
    assert tok.shape == (3, 256)
    torch.testing.assert_close(tok, ref_tokens, rtol=0, atol=1e-6)
    torch.testing.assert_close(low_res, ref_low_res, rtol=0, atol=1e-6)
    torch.testing.assert_close(iou, ref_iou, rtol=0, atol=1e-6)  # SAM's predicted IoU (TAP's protocol)
    assert torch.equal(tokens.paste_masks(ref_low_res, resized, image.shape[:2]), ref_masks)  # the same logits
    assert_same_masks(tokens.paste_masks(low_res, resized, image.shape[:2]), ref_masks)


def test_masks_are_pasted_in_chunks_without_changing_them(sam, image, monkeypatch):
    import regionspot.modeling.position_tokens as module

    tokens, _, low_res, resized = _ours(sam, image, BOXES)
    whole = tokens.paste_masks(low_res, resized, image.shape[:2])
    calls = []
    original = sam.postprocess_masks
    monkeypatch.setattr(module, "MASK_PASTE_CHUNK", 2)
    monkeypatch.setattr(sam, "postprocess_masks", lambda m, *a: calls.append(len(m)) or original(m, *a))
    assert torch.equal(tokens.paste_masks(low_res, resized, image.shape[:2]), whole)
    assert calls == [2, 1]


def test_box_chunking_does_not_change_tokens(sam, image):
    _, one, _, _ = _ours(sam, image, BOXES, box_chunk_size=1)
    _, all_, _, _ = _ours(sam, image, BOXES, box_chunk_size=64)
    torch.testing.assert_close(one, all_, rtol=0, atol=1e-5)


@pytest.mark.parametrize("source,dim", [("prompt_encoder", 256), ("mlp", 32), ("transformer", 256)])
def test_token_sources(sam, image, source, dim):
    tokens, tok, _, _ = _ours(sam, image, BOXES, token_source=source)
    assert tokens.token_dim == dim and tok.shape == (3, dim)
    if source == "prompt_encoder":  # the two box-corner embeddings, averaged
        sparse, _ = sam.prompt_encoder(points=None, masks=None,
                                       boxes=tokens.transform.apply_boxes_torch(BOXES, image.shape[:2]))
        torch.testing.assert_close(tok, sparse.mean(1))


def test_different_boxes_give_different_tokens(sam, image):
    _, tok, _, _ = _ours(sam, image, BOXES)
    assert (tok[0] - tok[1]).abs().max() > 1e-4


def test_no_boxes(sam, image):
    _, tok, low_res, _ = _ours(sam, image, torch.zeros(0, 4))
    assert tok.shape == (0, 256) and low_res.shape[0] == 0


def test_unknown_token_source(sam):
    with pytest.raises(ValueError, match="token_source"):
        SamPositionTokens(sam, token_source="iou_token")


@pytest.mark.parametrize("source", TOKEN_SOURCES)
def test_tokens_without_masks_are_the_same_tokens(sam, image, source):
    tokens = SamPositionTokens(sam, token_source=source)
    pixels, _ = tokens.preprocess(torch.from_numpy(image).permute(2, 0, 1))
    with torch.no_grad():
        embedding = tokens.encode_images(pixels[None])[0]
        full = tokens(embedding, BOXES, image.shape[:2])
        fast = tokens(embedding, BOXES, image.shape[:2], with_masks=False)
    assert fast.low_res_masks is None and fast.iou_predictions is None
    torch.testing.assert_close(fast.tokens, full.tokens, rtol=0, atol=1e-6)


def test_boxes_of_several_images_share_decoder_calls(sam, image, monkeypatch):
    """One batch of 3 images (sizes differ, one without boxes) in chunks that straddle images
    gives each image what it gets alone."""
    rng = np.random.RandomState(1)
    images = [image, (rng.rand(200, 150, 3) * 255).astype(np.uint8), image[:, ::-1].copy()]
    boxes = [BOXES, torch.zeros(0, 4), BOXES[:2] * 0.5]
    tokens = SamPositionTokens(sam, box_chunk_size=2)
    with torch.no_grad():
        pixels = torch.stack([tokens.preprocess(torch.from_numpy(im).permute(2, 0, 1))[0] for im in images])
        embeddings = tokens.encode_images(pixels)
        calls = []
        original = sam.prompt_encoder.forward
        monkeypatch.setattr(sam.prompt_encoder, "forward",
                            lambda **kw: calls.append(len(kw["boxes"])) or original(**kw))
        batched = tokens.prompt(embeddings, boxes, [im.shape[:2] for im in images])
        assert calls == [2, 2, 1]  # 5 boxes of 3 images, 2 per call: not one call per image
        monkeypatch.undo()
        alone = [tokens(e, b, im.shape[:2]) for e, b, im in zip(embeddings, boxes, images)]
    for got, want, b in zip(batched, alone, boxes):
        assert got.tokens.shape == (len(b), 256) and got.low_res_masks.shape[0] == len(b)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=0, atol=1e-5)


def test_mapper_resize_is_used_and_equals_the_models(sam, image):
    from regionspot.transforms import resize_for_sam

    tokens = SamPositionTokens(sam)
    tensor = torch.from_numpy(image).permute(2, 0, 1)
    resized = resize_for_sam(tensor, tokens.input_size)
    assert resized.dtype == torch.uint8 and max(resized.shape[-2:]) == tokens.input_size
    own, size = tokens.preprocess(tensor)
    given, given_size = tokens.preprocess(torch.zeros(3, 1, 1, dtype=torch.uint8), resized=resized)
    assert torch.equal(own, given) and size == given_size
    wrong = resize_for_sam(tensor, tokens.input_size // 2)  # another SAM's size: ignored, resized again
    assert torch.equal(tokens.preprocess(tensor, resized=wrong)[0], own)


CLICKS = np.array([[120.0, 140.0], [400.0, 60.0], [30.0, 280.0]], dtype=np.float32)
CLICK_LABELS = np.array([1, 1, 0])


def test_point_prompt_equals_sam_predictor_predict(sam, image):
    """prompt_points = SamPredictor.predict(point_coords, point_labels, multimask_output=False),
    with and without a mask prompt (issue 15, prompts beyond boxes)."""
    predictor = SamPredictor(sam)
    predictor.set_image(image)
    tokens = SamPositionTokens(sam)
    pixels, resized = tokens.preprocess(torch.from_numpy(image).permute(2, 0, 1))
    with torch.no_grad():
        embedding = tokens.encode_images(pixels[None])[0]
    ours = tokens.prompt_points(embedding, resized, image.shape[:2], torch.from_numpy(CLICKS),
                                torch.from_numpy(CLICK_LABELS))
    captured = []  # the two-way transformer's output tokens: hs[:, 1] is mask token 0
    handle = sam.mask_decoder.transformer.register_forward_hook(lambda m, i, o: captured.append(o[0]))
    try:
        masks, iou, low_res = predictor.predict(CLICKS, CLICK_LABELS, multimask_output=False)
    finally:
        handle.remove()
    side = 4 * embedding.shape[-1]
    assert ours.tokens.shape == (1, 256) and ours.low_res_masks.shape == (1, 1, side, side)
    torch.testing.assert_close(ours.tokens, captured[0][:, 1], rtol=0, atol=1e-5)
    np.testing.assert_allclose(ours.low_res_masks[0].numpy(), low_res, rtol=0, atol=1e-5)
    np.testing.assert_allclose(ours.iou_predictions.numpy(), iou, rtol=0, atol=1e-5)
    assert_same_masks(tokens.paste_masks(ours.low_res_masks, resized, image.shape[:2])[0], masks[0])

    # a mask prompt (here: a rectangle in the image's pixels) enters as SAM's mask_input
    mask = np.zeros(image.shape[:2], bool)
    mask[50:200, 80:300] = True
    with_mask = tokens.prompt_points(embedding, resized, image.shape[:2], torch.from_numpy(CLICKS[:1]),
                                     torch.ones(1, dtype=torch.int64), torch.from_numpy(mask))
    mask_input = tokens.mask_to_sam_input(torch.from_numpy(mask), resized)[0].numpy()
    _, iou_m, low_res_m = predictor.predict(CLICKS[:1], np.ones(1), mask_input=mask_input, multimask_output=False)
    np.testing.assert_allclose(with_mask.low_res_masks[0].numpy(), low_res_m, rtol=0, atol=1e-5)
    np.testing.assert_allclose(with_mask.iou_predictions.numpy(), iou_m, rtol=0, atol=1e-5)
    assert not torch.allclose(with_mask.low_res_masks, ours.low_res_masks)
    # mask_input lies in SAM's padded frame: inside the rectangle positive, the padding negative
    scale = side / max(image.shape[:2])
    assert mask_input[0, int(125 * scale), int(190 * scale)] > 0 and mask_input[0, side - 2, side - 2] < 0

    with pytest.raises(ValueError, match="labels"):
        tokens.prompt_points(embedding, resized, image.shape[:2], torch.from_numpy(CLICKS), torch.tensor([1, 2, 0]))
    with pytest.raises(ValueError, match="needs points"):
        tokens.prompt_points(embedding, resized, image.shape[:2])
