"""The RegionSpot meta-architecture: frozen encoders, training loss, inference protocol."""

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from conftest import build_tiny_model, make_cfg
from regionspot.modeling.text_classifier import vocabulary_from_config


def _input(h, w, boxes, classes=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    instances = Instances((h, w))
    instances.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    instances.gt_classes = torch.tensor(classes if classes is not None else [0] * len(boxes), dtype=torch.int64)
    image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
    return {"image": image, "instances": instances, "height": h, "width": w, "file_name": f"img{seed}.png"}


BATCH = [_input(240, 320, [[10, 10, 100, 120], [150, 40, 300, 230]], [0, 2]),
         _input(300, 200, [], [], seed=1),
         _input(180, 260, [[0, 0, 260, 180], [20, 30, 60, 90], [100, 100, 200, 170]], [1, 3, 3], seed=2)]


@pytest.fixture
def model(tiny_cfg):
    return build_tiny_model(tiny_cfg)


def test_only_the_head_trains(model):
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("head.") for n in trainable)
    model.train()
    assert model.head.training and not model.localizer.training and not model.semantic_encoder.training
    assert not model.localizer.sam.training and not model.semantic_encoder.clip.training
    losses = model(BATCH)
    assert set(losses) == {"loss_region_focal"} and torch.isfinite(losses["loss_region_focal"])
    losses["loss_region_focal"].backward()
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("head."))
    assert all(p.grad is not None for p in model.head.parameters())


def test_a_few_steps_fit_the_labels(model):
    """The head can learn: a few AdamW steps lower the loss on a fixed batch."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    first = None
    for _ in range(15):
        loss = model(BATCH)["loss_region_focal"]
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.7 * first


def test_batch_without_boxes_gives_a_zero_loss_that_reaches_every_parameter(model):
    model.train()
    loss = model([BATCH[1]])["loss_region_focal"]
    assert loss.item() == 0.0
    loss.backward()
    assert all(p.grad is not None for p in model.head.parameters())


def test_inference_protocol(model):
    model.eval()
    model.protocol = model.protocol.replace(topk=5)
    out = model(BATCH)
    assert [len(o["instances"]) for o in out] == [5, 0, 5]  # top-k (box, class) pairs; empty image handled
    inst = out[0]["instances"]
    assert inst.scores.dtype == torch.float32 and (inst.scores[:-1] >= inst.scores[1:]).all()
    assert inst.pred_classes.max() < 4
    # scores are the softmax over the vocabulary of that box (ground truth: proposal score 1)
    features = model.encode_images([BATCH[0]["image"]])
    from regionspot.modeling.proposals.gt import proposals_from_ground_truth

    recognition = model.recognize(features, [proposals_from_ground_truth(BATCH[0]["instances"])],
                                  model.text_embeddings)[0]
    probs = recognition.logits.softmax(-1)
    torch.testing.assert_close(probs.sum(1), torch.ones(2))
    torch.testing.assert_close(inst.scores, probs.flatten().topk(5).values)
    assert torch.equal(inst.proposal_scores, torch.ones(5))


def test_masks_only_when_mask_on(sam_path, clip_path, tmp_path):
    model = build_tiny_model(make_cfg(sam_path, clip_path, tmp_path, **{"MODEL.MASK_ON": False})).eval()
    assert not model([BATCH[0]])[0]["instances"].has("pred_masks")


def test_results_are_reported_in_the_original_image_size(model):
    model.eval()
    x = dict(BATCH[0], height=480, width=640)  # the mapper halved the image
    inst = model([x])[0]["instances"]
    assert inst.image_size == (480, 640)
    expected = {(20.0, 20.0, 200.0, 240.0), (300.0, 80.0, 600.0, 460.0)}
    assert {tuple(b.tolist()) for b in inst.pred_boxes.tensor} == expected
    assert inst.pred_masks.shape[1:] == (480, 640)


def test_a_box_with_many_classes_has_one_mask(model):
    """900 (box, class) pairs on 2 boxes hold 2 bitmaps, pasted once each."""
    model.eval()
    vocabulary = [f"class {i}" for i in range(450)]
    model.set_vocabulary(vocabulary, torch.nn.functional.normalize(torch.randn(450, 32), dim=-1))
    model.protocol = model.protocol.replace(topk=900)
    inst = model([dict(BATCH[0], height=480, width=640)])[0]["instances"]
    masks = inst.pred_masks
    assert len(inst) == 900 and len(masks) == 900 and masks.bitmaps.shape == (2, 480, 640)
    for box in range(2):  # every detection of a box points at that box's bitmap
        rows = (inst.pred_boxes.tensor == inst.pred_boxes.tensor[box]).all(1)
        assert len(set(masks.index[rows].tolist())) == 1
    assert torch.equal(masks[3], masks.bitmaps[masks.index[3]])
    sub = inst[inst.pred_classes == inst.pred_classes[0]]  # Instances indexing keeps the sharing
    assert sub.pred_masks.bitmaps is masks.bitmaps


def test_sigmoid_scores_option(sam_path, clip_path, tmp_path):
    cfg = make_cfg(sam_path, clip_path, tmp_path, **{"MODEL.REGIONSPOT.TEST_SCORE": "sigmoid"})
    model = build_tiny_model(cfg).eval()
    assert len(model([BATCH[2]])[0]["instances"]) == 12
    with pytest.raises(ValueError, match="TEST_SCORE"):
        build_model(make_cfg(sam_path, clip_path, tmp_path, **{"MODEL.REGIONSPOT.TEST_SCORE": "max"}))


def test_wrong_image_tensor_is_named(model):
    image = BATCH[0]["image"]
    for bad, expected in [(image.float() * 2, "img0.png.*0-255"), (image[:1], r"img0.png.*\(3, H, W\)"),
                          (image.double().fill_(float("nan")), "img0.png.*NaN"), (image.int(), "img0.png.*uint8")]:
        with pytest.raises(ValueError, match=expected):
            model.eval()([dict(BATCH[0], image=bad)])


def test_float_image_in_0_255_equals_uint8(model):
    """Detectron2's DefaultPredictor hands float32 images in 0-255: same result as uint8."""
    model.eval()
    with torch.no_grad():
        ref = model([BATCH[0]])[0]["instances"]
        got = model([dict(BATCH[0], image=BATCH[0]["image"].float())])[0]["instances"]
    assert torch.equal(ref.scores, got.scores) and torch.equal(ref.pred_classes, got.pred_classes)


def test_vocabulary_switch_and_empty_vocabulary(model):
    model.set_vocabulary(["apple", "pear"])
    assert model.text_embeddings.shape == (2, 32) and model.class_names == ["apple", "pear"]
    with pytest.raises(ValueError, match="vocabulary is empty"):
        model.set_vocabulary([])
    with pytest.raises(ValueError, match="duplicate"):
        model.set_vocabulary(["Pear", "pear"])  # a dataset's twins need allow_duplicates=True


def test_config_vocabulary_is_encoded_once_and_set_vocabulary_replaces_it(tiny_cfg, monkeypatch):
    """build_model gives the config's vocabulary; its text embeddings are computed on the first
    inference, once; after set_vocabulary the forward never encodes text."""
    model = build_model(tiny_cfg).eval()
    assert model.text_embeddings is None and model.vocabularies.pending == vocabulary_from_config(tiny_cfg)
    calls = []
    original = model.text_classifier.embed
    monkeypatch.setattr(model.text_classifier, "embed", lambda *a, **k: calls.append(a) or original(*a, **k))
    model([BATCH[0]])
    model([BATCH[0]])
    assert len(calls) == 1 and model.class_names == vocabulary_from_config(tiny_cfg)
    assert model.vocabularies.pending is None
    model.set_vocabulary(["cat", "dog"])
    monkeypatch.setattr(model.text_classifier, "embed", lambda *a, **k: pytest.fail("text encoded in the forward"))
    assert len(model([BATCH[0]])[0]["instances"]) == 4


def test_forward_without_any_vocabulary_names_set_vocabulary(tiny_cfg):
    cfg = tiny_cfg.clone()
    cfg.defrost()
    cfg.DATASETS.TEST, cfg.DATASETS.TRAIN = (), ()
    cfg.MODEL.REGIONSPOT.VOCABULARY = "dataset"
    model = build_model(cfg).eval()
    with pytest.raises(RuntimeError, match="set_vocabulary"):
        model([BATCH[0]])


def test_input_without_boxes_is_named(model):
    bad = {k: v for k, v in BATCH[0].items() if k != "instances"}
    with pytest.raises(ValueError, match="img0.png.*no boxes"):
        model.eval()([bad])


def test_precomputed_text_embeddings(model):
    emb = torch.nn.functional.normalize(torch.randn(3, 32), dim=-1)
    model.set_vocabulary(["a", "b", "c"], text_embeddings=emb)
    assert torch.equal(model.text_embeddings, emb)
    with pytest.raises(ValueError, match=r"\(2, 32\)"):
        model.set_vocabulary(["a", "b"], text_embeddings=emb)


def test_vocabulary_state_is_one_object_that_moves_with_the_model_and_stays_out_of_checkpoints(model):
    """The evaluation vocabulary's embeddings are a buffer of the model (model.to moves them, a
    float64 cast shows it on the CPU) yet never a state-dict key; the training vocabularies and
    the evaluation one live side by side in model.vocabularies."""
    emb = torch.nn.functional.normalize(torch.randn(3, 32), dim=-1)
    model.set_vocabulary(["a", "b", "c"], text_embeddings=emb, ancestors={2: [0]})
    model.set_vocabulary(["x", "y"], torch.nn.functional.normalize(torch.randn(2, 32), dim=-1), dataset="D")
    assert any(b is model.text_embeddings for b in model.buffers())
    assert not [k for k in model.state_dict() if "vocabular" in k or "text_embeddings" in k]
    assert model.vocabularies.for_training({"dataset": "D"}).names == ["x", "y"]
    fallback = model.vocabularies.for_training({"dataset": "unknown"})
    assert fallback.names == ["a", "b", "c"] and fallback.ancestors == {2: [0]}
    model.to(torch.float64)  # the fixture is this test's own model
    assert model.text_embeddings.dtype == torch.float64
    assert model.vocabularies.for_training({}).text_embeddings.dtype == torch.float64
    with pytest.raises(AttributeError):
        model.text_embeddings = emb  # read-only: set_vocabulary sets it


def test_live_logits_are_the_released_region_logits_bit_for_bit(tiny_model):
    """recognize() keeps unit region embeddings for later scoring, yet its logits are exactly the
    released computation (region_logits of the head's raw output), not a re-normalised copy."""
    from detectron2.structures import Boxes, Instances

    from regionspot.modeling.head import region_logits

    image = torch.randint(0, 256, (3, 120, 160), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    proposals = Instances((120, 160))
    proposals.proposal_boxes = Boxes(torch.tensor([[5.0, 5.0, 90.0, 100.0], [40.0, 20.0, 150.0, 110.0]]))
    proposals.objectness_logits = torch.ones(2)
    with torch.no_grad():
        features = tiny_model.encode_images([image])
        text = tiny_model.text_classifier.embed(["cat", "dog", "car"])
        (recognition,) = tiny_model.recognize(features, [proposals], text, with_masks=False)
        prompts = tiny_model.prompt_boxes(features, [proposals], with_masks=False)
        (raw,) = tiny_model.head.embed_regions([prompts[0].tokens], features[0].semantic[None])
    assert torch.equal(recognition.logits, region_logits(raw, text, tiny_model.logit_scale))
    assert torch.allclose(recognition.embeddings.norm(dim=-1), torch.ones(2))
