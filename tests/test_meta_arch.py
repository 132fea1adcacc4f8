"""The RegionSpot meta-architecture: frozen encoders, training loss, inference protocol."""

import pytest
import torch

from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from conftest import make_cfg


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
    torch.manual_seed(0)
    return build_model(tiny_cfg)


def test_only_the_head_trains(model):
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("head.") for n in trainable)
    model.train()
    assert model.head.training and not model.position.training and not model.semantic.training
    assert not model.position.sam.training and not model.semantic.clip.training
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
    model.test_topk = 5
    out = model(BATCH)
    assert [len(o["instances"]) for o in out] == [5, 0, 5]  # top-k (box, class) pairs; empty image handled
    inst = out[0]["instances"]
    assert inst.scores.dtype == torch.float32 and (inst.scores[:-1] >= inst.scores[1:]).all()
    assert inst.pred_classes.max() < 4
    # scores are the softmax over the vocabulary of that box
    emb = model.region_embeddings([model.region_tokens(
        model.encode_images([BATCH[0]["image"]])[0][0], BATCH[0]["instances"].gt_boxes.tensor, (240, 320))[0]],
        model.encode_images([BATCH[0]["image"]])[2])[0]
    probs = model.class_scores(emb)
    torch.testing.assert_close(probs.sum(1), torch.ones(2))
    torch.testing.assert_close(inst.scores, probs.flatten().topk(5).values)


def test_masks_only_when_mask_on(sam_path, clip_path, tmp_path):
    model = build_model(make_cfg(sam_path, clip_path, tmp_path, **{"MODEL.MASK_ON": False})).eval()
    assert not model([BATCH[0]])[0]["instances"].has("pred_masks")


def test_results_are_reported_in_the_original_image_size(model):
    model.eval()
    x = dict(BATCH[0], height=480, width=640)  # the mapper halved the image
    inst = model([x])[0]["instances"]
    assert inst.image_size == (480, 640)
    expected = {(20.0, 20.0, 200.0, 240.0), (300.0, 80.0, 600.0, 460.0)}
    assert {tuple(b.tolist()) for b in inst.pred_boxes.tensor} == expected
    assert inst.pred_masks.shape[1:] == (480, 640)


def test_sigmoid_scores_option(sam_path, clip_path, tmp_path):
    model = build_model(make_cfg(sam_path, clip_path, tmp_path, **{"MODEL.REGIONSPOT.TEST_SCORE": "sigmoid"})).eval()
    assert len(model([BATCH[2]])[0]["instances"]) == 12
    with pytest.raises(ValueError, match="TEST_SCORE"):
        build_model(make_cfg(sam_path, clip_path, tmp_path, **{"MODEL.REGIONSPOT.TEST_SCORE": "max"}))


def test_wrong_image_tensor_is_named(model):
    bad = dict(BATCH[0], image=BATCH[0]["image"].float())
    with pytest.raises(ValueError, match="img0.png.*uint8"):
        model.eval()([bad])


def test_vocabulary_switch_and_empty_vocabulary(model):
    model.set_vocabulary(["apple", "pear"])
    assert model.text_embeddings.shape == (2, 32)
    with pytest.raises(ValueError, match="vocabulary is empty"):
        model.set_vocabulary([])


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
