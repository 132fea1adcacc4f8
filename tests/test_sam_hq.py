"""LOCALIZER sam_hq: SAM-HQ as RegionSpot's localizer, from small random models written in the
official format (a plain state dict, SAM's keys + the HQ decoder's), through the same loading
code as the real sam_hq_vit_{b,l,h}.pth; parity against segment_anything_hq's own SamPredictor
and SamAutomaticMaskGenerator; the entry points (train_net, demo) on the bundled sample."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model

from conftest import assert_same_masks, make_cfg
from regionspot.modeling.position_tokens import SamPositionTokens
from regionspot.modeling.sam_hq import SamHqPositionTokens, hq_package, load_sam_hq
from regionspot.modeling.weights import load_sam
from regionspot.testing.random_backbones import random_sam, random_sam_hq, write_random_sam_hq
from regionspot.weights_files import WeightsError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.usefixtures("one_thread")

BOXES = torch.tensor([[10.0, 20.0, 200.0, 250.0], [300.0, 10.0, 460.0, 290.0], [0.0, 0.0, 470.0, 300.0]])


@pytest.fixture(scope="module")
def hq_path(tmp_path_factory):
    return write_random_sam_hq(str(tmp_path_factory.mktemp("sam_hq") / "sam_hq_random_tiny.pth"), "tiny", seed=0)


@pytest.fixture(scope="module")
def images():
    rng = np.random.RandomState(0)
    return [(rng.rand(300, 470, 3) * 255).astype(np.uint8), (rng.rand(220, 180, 3) * 255).astype(np.uint8)]


def _reference(sam, image, boxes):
    """segment_anything_hq's SamPredictor (set_image + predict_torch, single mask, SAM + HQ mask),
    with a hook reading mask token 0 at the output of the decoder's two-way transformer."""
    predictor = hq_package().SamPredictor(sam)
    predictor.set_image(image)
    captured = []
    handle = sam.mask_decoder.transformer.register_forward_hook(lambda m, i, o: captured.append(o[0]))
    try:
        with torch.no_grad():
            masks, iou, low_res = predictor.predict_torch(
                None, None, predictor.transform.apply_boxes_torch(boxes, image.shape[:2]), multimask_output=False,
                hq_token_only=False)
    finally:
        handle.remove()
    return captured[0][:, 1], masks[:, 0], low_res, iou[:, 0]


def test_tokens_masks_and_iou_equal_sam_hq_predictor_batched_over_two_images(hq_path, images):
    """Boxes of two images in shared decoder calls (chunks straddle the images) give each image
    what the package's predictor gives for it alone."""
    sam = load_sam_hq(hq_path)
    localizer = SamHqPositionTokens(sam, box_chunk_size=2, attention="official")
    boxes = [BOXES, BOXES[:2] * 0.4]
    tensors = [torch.from_numpy(im).permute(2, 0, 1) for im in images]
    with torch.no_grad():
        embeddings, sizes = localizer.encode(tensors)
    assert embeddings["image"].shape == (2, 256, 16, 16) and embeddings["interm"].shape == (2, 16, 16, 64)
    prompts = localizer.prompt(embeddings, boxes, [im.shape[:2] for im in images])
    for image, box, got, size in zip(images, boxes, prompts, sizes):
        ref_tokens, ref_masks, ref_low_res, ref_iou = _reference(sam, image, box)
        assert got.tokens.shape == (len(box), 256)
        torch.testing.assert_close(got.tokens, ref_tokens, rtol=0, atol=1e-5)
        torch.testing.assert_close(got.low_res_masks, ref_low_res, rtol=0, atol=1e-5)
        torch.testing.assert_close(got.iou_predictions, ref_iou, rtol=0, atol=1e-5)
        assert_same_masks(localizer.paste_masks(got.low_res_masks, size, image.shape[:2]), ref_masks)
    # the HQ mask is in: SAM's mask 0 alone (hq_token_only=False adds the HQ mask to it) differs
    assert not torch.allclose(prompts[0].low_res_masks, _sam_mask_only(localizer, embeddings, BOXES, images[0]))


def _sam_mask_only(localizer, embeddings, boxes, image):
    """SAM's mask 0 of the HQ model's decoder (without the HQ mask), from the package's own forward."""
    sam = localizer.sam
    boxes_sam = localizer.transform.apply_boxes_torch(boxes, image.shape[:2])
    sparse, dense = sam.prompt_encoder(points=None, boxes=boxes_sam, masks=None)
    with torch.no_grad():
        vit = embeddings["interm"][:1].permute(0, 3, 1, 2)
        hq = sam.mask_decoder.embedding_encoder(embeddings["image"][:1]) + sam.mask_decoder.compress_vit_feat(vit)
        masks, _ = sam.mask_decoder.predict_masks(embeddings["image"][:1], sam.prompt_encoder.get_dense_pe(),
                                                  sparse, dense, hq)
    return masks[:, :1]


def test_sdpa_attention_runs_on_sam_hqs_encoder(hq_path, images):
    sam = load_sam_hq(hq_path)
    pixels = SamHqPositionTokens(sam, attention="official").preprocess(torch.from_numpy(images[0]).permute(2, 0, 1))[0]
    with torch.no_grad():
        official = SamHqPositionTokens(sam, attention="official").encode_images(pixels[None])
        fast = SamHqPositionTokens(sam, attention="sdpa").encode_images(pixels[None])
    from regionspot.modeling.fast_attention import sam_attention_kind

    assert sam_attention_kind(sam.image_encoder) == "sdpa"
    for key in ("image", "interm"):
        torch.testing.assert_close(fast[key], official[key], rtol=0, atol=1e-4)


def test_the_hq_token_moves_the_position_token_and_only_it(images):
    """The HQ output token is one more query of the two-way transformer, so the position-aware
    token differs from plain SAM's with the same SAM weights; removing the HQ token from the
    queries gives SAM's token exactly. The size of the change on this random model is printed
    (docs/models.md quotes it)."""
    sam, hq = random_sam("tiny", seed=0), random_sam_hq("tiny", seed=0)
    plain = SamPositionTokens(sam, attention="official")
    ours = SamHqPositionTokens(hq, attention="official")
    image = torch.from_numpy(images[0]).permute(2, 0, 1)
    with torch.no_grad():
        embeddings, _ = ours.encode([image])
        sam_embedding, _ = plain.encode([image])
        torch.testing.assert_close(embeddings["image"], sam_embedding, rtol=0, atol=0)  # same SAM weights
        hq_tokens = ours.prompt(embeddings, [BOXES], [image.shape[-2:]], with_masks=False)[0].tokens
        sam_tokens = plain.prompt(sam_embedding, [BOXES], [image.shape[-2:]], with_masks=False)[0].tokens
        weight = hq.mask_decoder.hf_token.weight
        hq.mask_decoder.hf_token.weight = torch.nn.Parameter(weight[:0])  # no HQ query
        try:
            without = ours.prompt(embeddings, [BOXES], [image.shape[-2:]], with_masks=False)[0].tokens
        finally:
            hq.mask_decoder.hf_token.weight = weight
    torch.testing.assert_close(without, sam_tokens, rtol=0, atol=1e-6)
    relative = ((hq_tokens - sam_tokens).norm(dim=1) / sam_tokens.norm(dim=1))
    cosine = torch.nn.functional.cosine_similarity(hq_tokens, sam_tokens, dim=1)
    print(f"SAM-HQ vs SAM token (random tiny model): relative L2 {relative.tolist()}, cosine {cosine.tolist()}")
    assert (relative > 1e-4).all()


def test_loader_refuses_files_of_the_other_family_and_broken_files(hq_path, sam_path, tmp_path):
    with pytest.raises(WeightsError) as e:
        load_sam_hq(sam_path)
    message = str(e.value)
    assert "\n" not in message and sam_path in message and "MODEL.REGIONSPOT.SAM_WEIGHTS" in message
    assert "LOCALIZER sam" in message and "not a SAM-HQ state dict" in message
    with pytest.raises(WeightsError, match=r"is a SAM-HQ file .*set MODEL.REGIONSPOT.LOCALIZER sam_hq") as e:
        load_sam(hq_path)
    assert "\n" not in str(e.value) and hq_path in str(e.value)

    state = torch.load(hq_path, weights_only=True)
    missing = dict(state)
    missing.pop("mask_decoder.embedding_maskfeature.3.weight")
    missing["mask_decoder.extra.weight"] = torch.zeros(1)
    torch.save(missing, tmp_path / "broken.pth")
    with pytest.raises(WeightsError, match=r"missing keys mask_decoder.embedding_maskfeature.3.weight; "
                                           r"unexpected keys mask_decoder.extra.weight") as e:
        load_sam_hq(str(tmp_path / "broken.pth"))
    assert "\n" not in str(e.value)
    shapes = dict(state)
    shapes["mask_decoder.hf_token.weight"] = torch.zeros(1, 8)
    torch.save(shapes, tmp_path / "shapes.pth")
    with pytest.raises(WeightsError, match="does not match SAM-HQ's layout: .*hf_token") as e:
        load_sam_hq(str(tmp_path / "shapes.pth"))
    assert "\n" not in str(e.value)
    tiny_vit = dict(state, **{"image_encoder.layers.0.blocks.0.attn.qkv.weight": torch.zeros(1)})
    torch.save(tiny_vit, tmp_path / "tiny_vit.pth")
    with pytest.raises(WeightsError, match="light HQ-SAM .*not support"):
        load_sam_hq(str(tmp_path / "tiny_vit.pth"))
    with pytest.raises(WeightsError, match="SAM weights file not found"):
        load_sam_hq(str(tmp_path / "sam_hq_vit_b.pth"))


def test_the_token_cache_identity_names_the_family(hq_path, sam_path):
    """Tokens of SAM-HQ never serve SAM: with the same SAM tensors (the HQ file read as SAM) the
    identities differ in the family and the architecture (the HQ decoder's vit_dim)."""
    from regionspot.data.token_cache import make_identity

    hq = make_identity(hq_path, "transformer", localizer="sam_hq")
    as_sam = make_identity(hq_path, "transformer", localizer="sam")
    assert hq.localizer == "sam_hq" and hq.token_dim == 256 and '"vit_dim":64' in hq.sam_architecture
    differences = hq.differences(as_sam)
    assert any("localizer 'sam' != expected 'sam_hq'" in d for d in differences), differences
    with pytest.raises(WeightsError, match=r"LOCALIZER sam_hq\): not a SAM-HQ state dict"):
        make_identity(sam_path, "transformer", localizer="sam_hq")


def test_the_model_builds_from_keys_and_sam_auto_equals_sam_hqs_own_generator(hq_path, clip_path, tmp_path):
    cfg = make_cfg(hq_path, clip_path, tmp_path / "cache", **{"MODEL.REGIONSPOT.LOCALIZER": "sam_hq"})
    model = build_model(cfg).eval()
    assert isinstance(model.localizer, SamHqPositionTokens) and model.pair["localizer"] == "sam_hq"
    assert model.head.to_clip.in_features == model.localizer.token_dim == 256
    sam_auto = model.proposal_generator.sam_auto
    sam_auto.settings = dict(sam_auto.settings, points_per_side=4, pred_iou_thresh=0.0,
                             stability_score_thresh=0.0)
    image = torch.from_numpy((np.random.RandomState(5).rand(200, 300, 3) * 255).astype(np.uint8)).permute(2, 0, 1)
    features = model.encode_images([image])
    encoder = model.localizer.sam.image_encoder
    original = encoder.forward
    encoder.forward = lambda x: pytest.fail("SAM-HQ re-encoded the image")
    try:
        proposals = model.generate_proposals("sam_auto", features)[0]
    finally:
        encoder.forward = original
    reference = hq_package().SamAutomaticMaskGenerator(model.localizer.sam, output_mode="binary_mask",
                                                       **sam_auto.settings).generate(
        np.ascontiguousarray(image.permute(1, 2, 0).numpy()))  # the package encodes the image itself
    assert len(proposals) == len(reference) > 0
    assert {m.numpy().tobytes() for m in proposals.proposal_masks} == {r["segmentation"].tobytes() for r in reference}


def test_a_head_of_the_released_pair_is_refused_on_sam_hq(hq_path, clip_path, head_path, tmp_path):
    from regionspot.checkpoint import CheckpointError, RegionSpotCheckpointer

    model = build_model(make_cfg(hq_path, clip_path, tmp_path / "cache", **{"MODEL.REGIONSPOT.LOCALIZER": "sam_hq"}))
    with pytest.raises(CheckpointError, match=r"is a head trained on localizer 'sam' \+ vision-language model "
                                              r"'openai_clip', but this model is localizer 'sam_hq' \+ "
                                              r"vision-language model 'openai_clip'"):
        RegionSpotCheckpointer(model).load(head_path)


@pytest.fixture(scope="module")
def trained(hq_path, clip_path, tmp_path_factory):
    """train_net.py with LOCALIZER sam_hq on the bundled sample: 2 iterations, then evaluation."""
    tmp = tmp_path_factory.mktemp("train_sam_hq")
    out = tmp / "out"
    env = dict(os.environ, DETECTRON2_DATASETS=str(tmp / "datasets"), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "train_net.py"), "--config-file",
         os.path.join(REPO, "configs", "regionspot_sample_cpu.yaml"),
         "MODEL.REGIONSPOT.LOCALIZER", "sam_hq", "MODEL.REGIONSPOT.SAM_WEIGHTS", hq_path,
         "MODEL.REGIONSPOT.CLIP_WEIGHTS", clip_path, "MODEL.REGIONSPOT.TEXT_CACHE_DIR", str(tmp / "cache"),
         "SOLVER.MAX_ITER", "2", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "1", "OUTPUT_DIR", str(out)],
        cwd=str(tmp), env=env, capture_output=True, text=True, timeout=900)
    return proc, out, tmp


def test_train_net_trains_and_evaluates_on_the_sample_with_sam_hq(trained):
    proc, out, _ = trained
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    checkpoint = torch.load(out / "model_final.pth", weights_only=False)
    assert checkpoint["regionspot_pair"]["localizer"] == "sam_hq" and checkpoint["iteration"] == 1
    metrics = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert np.isfinite(metrics[0]["total_loss"])  # a training step on SAM-HQ's tokens
    # box AP and, with the sample's MASK_ON, mask AP from SAM-HQ's masks
    assert "bbox AP on regionspot_sample:" in proc.stdout and "segm AP on regionspot_sample:" in proc.stdout
    assert "Loaded SAM-HQ from" in (out / "log.txt").read_text()
    assert "Importing from timm" not in proc.stderr  # the package's import warnings stay out of the console


def test_the_demo_runs_with_the_sam_hq_head(trained, hq_path, clip_path):
    proc, out, tmp = trained
    assert proc.returncode == 0, proc.stderr[-2000:]
    image = tmp / "in" / "a.png"
    image.parent.mkdir(exist_ok=True)
    from PIL import Image

    Image.fromarray((np.random.RandomState(0).rand(240, 320, 3) * 255).astype(np.uint8)).save(image)
    boxes = tmp / "boxes.json"
    boxes.write_text(json.dumps({"a.png": [[10, 10, 100, 120], [150, 40, 300, 230]]}))
    demo = subprocess.run(
        [sys.executable, os.path.join(REPO, "demo", "demo.py"), "--config-file",
         os.path.join(REPO, "configs", "regionspot_sample_cpu.yaml"), "--input", str(image), "--boxes", str(boxes),
         "--vocabulary", "custom", "--custom-vocabulary", "cat,dog", "--output", str(tmp / "demo"),
         "--opts", "MODEL.REGIONSPOT.LOCALIZER", "sam_hq", "MODEL.REGIONSPOT.SAM_WEIGHTS", hq_path,
         "MODEL.REGIONSPOT.CLIP_WEIGHTS", clip_path, "MODEL.REGIONSPOT.TEXT_CACHE_DIR", str(tmp / "cache"),
         "MODEL.WEIGHTS", str(out / "model_final.pth")],
        cwd=str(tmp), env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert demo.returncode == 0, demo.stdout[-2000:] + demo.stderr[-2000:]
    predictions = json.loads((tmp / "demo" / "a.json").read_text())["predictions"]
    assert [p["box_xyxy"] for p in predictions] == [[10, 10, 100, 120], [150, 40, 300, 230]]
    assert {p["label"] for p in predictions} <= {"cat", "dog"}
    assert os.path.isfile(tmp / "demo" / "a.jpg")


@pytest.mark.parametrize("config", ["regionspot_samhq_b_clip_l.yaml", "regionspot_samhq_b_clip_l_stage1.yaml"])
def test_the_sam_hq_configs_build_with_its_file(config, hq_path, clip_path, tmp_path):
    from regionspot.config import load_config

    cfg = load_config(os.path.join(REPO, "configs", config))
    assert cfg.MODEL.REGIONSPOT.LOCALIZER == "sam_hq" and cfg.MODEL.REGIONSPOT.VL_MODEL == "openai_clip"
    assert os.path.basename(cfg.MODEL.REGIONSPOT.SAM_WEIGHTS) == "sam_hq_vit_b.pth"
    cfg.MODEL.REGIONSPOT.SAM_WEIGHTS, cfg.MODEL.REGIONSPOT.CLIP_WEIGHTS = hq_path, clip_path
    cfg.MODEL.REGIONSPOT.TEXT_CACHE_DIR, cfg.MODEL.DEVICE = str(tmp_path / "cache"), "cpu"
    model = build_model(cfg)
    assert isinstance(model.localizer, SamHqPositionTokens) and model.pair["localizer"] == "sam_hq"


def test_the_extraction_tool_fills_a_sam_hq_token_cache_that_sam_does_not_read(hq_path, tmp_path, capsys,
                                                                              forget_new_datasets):
    """tools/extract_sam_tokens.py with LOCALIZER sam_hq: the cache holds SAM-HQ's tokens of the
    boxes and their flips, and is refused to a SAM identity of the same file."""
    from conftest import load_tool
    from regionspot.data import token_cache as tc
    from test_token_cache import image_tensor, make_dataset

    json_path, image_root, records = make_dataset(tmp_path / "data", "hq_synth")
    args = ["--config-file", os.path.join(REPO, "configs", "regionspot_sample_cpu.yaml"), "--dataset", "hq_synth",
            "--output-dir", str(tmp_path / "cache"), "--register", "hq_synth", json_path, image_root,
            "--num-workers", "0", "--opts", "MODEL.REGIONSPOT.LOCALIZER", "sam_hq",
            "MODEL.REGIONSPOT.SAM_WEIGHTS", hq_path]
    assert load_tool("extract_sam_tokens").main(args) == 0
    assert "; complete" in capsys.readouterr().out
    identity = tc.make_identity(hq_path, "transformer", "float32", localizer="sam_hq")
    cache = tc.SamTokenCache(str(tmp_path / "cache"), "hq_synth", identity)
    assert cache.complete and len(cache) == len(records)
    localizer = SamHqPositionTokens(load_sam_hq(hq_path))
    for r in records:
        expected = tc.compute_image_tokens(localizer, image_tensor(r), tc.annotation_boxes(r))
        for flip, key in ((False, ""), (True, "_flip")):
            tokens, boxes = cache.lookup_record(r, flip)
            assert torch.equal(boxes, expected["boxes" + key])
            torch.testing.assert_close(tokens, expected["tokens" + key], rtol=0, atol=1e-5)
    with pytest.raises(tc.TokenCacheError, match="localizer 'sam_hq' != expected 'sam'"):
        tc.SamTokenCache(str(tmp_path / "cache"), "hq_synth",
                         tc.make_identity(hq_path, "transformer", "float32", localizer="sam"))


def test_clicks_and_a_mask_prompt_equal_sam_hqs_own_predictor(hq_path, images):
    """prompt_points on SAM-HQ = the package's SamPredictor.predict(point_coords, point_labels,
    mask_input, multimask_output=False, hq_token_only=False): mask logits, IoU and token."""
    sam = load_sam_hq(hq_path)
    localizer = SamHqPositionTokens(sam, attention="official")
    image = images[0]
    with torch.no_grad():
        embeddings, sizes = localizer.encode([torch.from_numpy(image).permute(2, 0, 1)])
    embedding = {k: v[0] for k, v in embeddings.items()}
    clicks, labels = np.array([[120.0, 140.0], [400.0, 60.0]], np.float32), np.array([1, 0])
    mask = np.zeros(image.shape[:2], bool)
    mask[50:200, 80:300] = True
    predictor = hq_package().SamPredictor(sam)
    predictor.set_image(image)
    for with_mask in (False, True):
        ours = localizer.prompt_points(embedding, sizes[0], image.shape[:2], torch.from_numpy(clicks),
                                       torch.from_numpy(labels), torch.from_numpy(mask) if with_mask else None)
        mask_input = localizer.mask_to_sam_input(torch.from_numpy(mask), sizes[0])[0].numpy() if with_mask else None
        captured = []
        handle = sam.mask_decoder.transformer.register_forward_hook(lambda m, i, o, c=captured: c.append(o[0]))
        try:
            masks, iou, low_res = predictor.predict(clicks, labels, mask_input=mask_input, multimask_output=False,
                                                    hq_token_only=False)
        finally:
            handle.remove()
        np.testing.assert_allclose(ours.low_res_masks[0].numpy(), low_res, rtol=0, atol=1e-5)
        np.testing.assert_allclose(ours.iou_predictions.numpy(), iou, rtol=0, atol=1e-5)
        torch.testing.assert_close(ours.tokens, captured[0][:, 1], rtol=0, atol=1e-5)
        assert_same_masks(localizer.paste_masks(ours.low_res_masks, sizes[0], image.shape[:2])[0], masks[0])
