"""LOCALIZER sam2: SAM 2.1 as RegionSpot's localizer, loaded from a small random model written
in the official checkpoint format ({"model": state_dict}) with a tiny Hiera config, through the
same loading code as the official files; parity against the sam2 package's own predictor and
automatic mask generator."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model

from conftest import assert_same_masks, make_cfg
from regionspot.modeling.sam2_localizer import Sam2PositionTokens, load_sam2, predictor_feature_sizes
from regionspot.testing.random_backbones import SAM2_TINY_CONFIG, write_random_sam2
from regionspot.weights_files import WeightsError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sam2_path(tmp_path_factory):
    return write_random_sam2(str(tmp_path_factory.mktemp("sam2") / "sam2.1_tiny_random.pt"), seed=3)


@pytest.fixture(scope="module")
def localizer(sam2_path):
    model, arch = load_sam2(sam2_path, SAM2_TINY_CONFIG)
    return Sam2PositionTokens(model, box_chunk_size=2, precision="float32", identity=arch)


def _cfg(sam2_path, clip_path, tmp_path, **overrides):
    return make_cfg(sam2_path, clip_path, tmp_path / "cache", **{
        "MODEL.REGIONSPOT.LOCALIZER": "sam2", "MODEL.REGIONSPOT.SAM2_CONFIG": SAM2_TINY_CONFIG, **overrides})


def _images():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, (3, 120, 160), dtype=torch.uint8, generator=g),
            torch.randint(0, 256, (3, 90, 70), dtype=torch.uint8, generator=g)]


BOXES = [torch.tensor([[10.0, 10.0, 80.0, 90.0], [0.0, 0.0, 160.0, 120.0], [100.0, 20.0, 150.0, 60.0]]),
         torch.tensor([[5.0, 5.0, 50.0, 50.0], [20.0, 30.0, 69.0, 89.0]])]


def test_tokens_masks_and_iou_equal_sam2s_own_image_predictor(localizer):
    """Parity, two images batched with chunks that span both: each box's position-aware token
    (mask token 0 after the decoder's transformer, past the object-score token), its mask and
    its IoU equal SAM2ImagePredictor's for the same image and box."""
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    images = _images()
    embeddings, sizes = localizer.encode(images)
    assert sizes == [(120, 160), (90, 70)]
    ours = localizer.prompt(embeddings, BOXES, sizes, with_masks=True)
    token_only = localizer.prompt(embeddings, BOXES, sizes, with_masks=False)
    model = localizer.sam
    assert model.sam_mask_decoder.pred_obj_scores  # the token offset this test guards
    for image, boxes, mine, tokens_only in zip(images, BOXES, ours, token_only):
        predictor = SAM2ImagePredictor(model)
        predictor._bb_feat_sizes = predictor_feature_sizes(model)
        predictor.set_image(image.permute(1, 2, 0).numpy())
        captured = {}

        def keep_token(module, inputs, outputs, captured=captured):
            captured["token"] = outputs[2][:, 0]  # the decoder's single-mask token (mask token 0)

        hook = model.sam_mask_decoder.register_forward_hook(keep_token)
        masks, iou, _ = predictor.predict(box=boxes.numpy(), multimask_output=False, return_logits=True)
        hook.remove()
        masks, iou = np.asarray(masks).reshape(len(boxes), -1, *image.shape[1:]), np.asarray(iou).reshape(len(boxes))
        torch.testing.assert_close(mine.tokens, captured["token"], rtol=0, atol=1e-5)
        torch.testing.assert_close(tokens_only.tokens, mine.tokens, rtol=0, atol=1e-5)
        torch.testing.assert_close(mine.iou_predictions, torch.from_numpy(iou), rtol=0, atol=1e-5)
        pasted = localizer.paste_masks(mine.low_res_masks, None, tuple(image.shape[1:]))
        assert_same_masks(pasted, masks[:, 0] > 0)
        assert pasted.any()


def test_sam_auto_regions_equal_sam2s_own_generator(localizer):
    """sam_auto on SAM 2 (the localizer's embedding reused, filters counted) returns the regions
    of sam2's SAM2AutomaticMaskGenerator with the same settings."""
    from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

    image = _images()[0]
    settings = dict(points_per_side=4, points_per_batch=8, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                    box_nms_thresh=0.7, crop_n_layers=0, min_mask_region_area=0)
    embeddings, sizes = localizer.encode([image])
    generator = localizer.mask_generator(settings, tuple(image.shape[1:]), {k: v[0] for k, v in embeddings.items()},
                                         sizes[0])
    ours = generator.generate(image.permute(1, 2, 0).numpy())
    reference = SAM2AutomaticMaskGenerator(localizer.sam, output_mode="binary_mask", **settings)
    reference.predictor._bb_feat_sizes = predictor_feature_sizes(localizer.sam)
    theirs = reference.generate(image.permute(1, 2, 0).numpy())
    assert len(ours) == len(theirs) > 0
    assert generator.counts["generated"] == 16 * 3
    for a, b in zip(ours, theirs):
        assert a["bbox"] == b["bbox"] and np.array_equal(a["segmentation"], b["segmentation"])


def test_the_predictor_recognises_boxes_and_sam_auto_regions_with_sam2(sam2_path, clip_path, tmp_path):
    """Built from config keys alone; the head's token width follows SAM 2's decoder; the
    predictor (set_image once, then boxes and sam_auto) runs on it with SAM 2's masks."""
    from regionspot.predictor import RegionSpotPredictor

    cfg = _cfg(sam2_path, clip_path, tmp_path, **{"MODEL.MASK_ON": True,
                                                    "MODEL.REGIONSPOT.SAM_AUTO.PRED_IOU_THRESH": 0.0,
                                                    "MODEL.REGIONSPOT.SAM_AUTO.STABILITY_SCORE_THRESH": 0.0,
                                                    "MODEL.REGIONSPOT.SAM_AUTO.POINTS_PER_SIDE": 4})
    predictor = RegionSpotPredictor.from_config(cfg, vocabulary=["cat", "dog"], allow_untrained_head=True)
    model = predictor.model
    assert isinstance(model.localizer, Sam2PositionTokens)
    assert model.head.to_clip.in_features == model.localizer.token_dim == 32  # the tiny decoder's width
    assert model.pair["localizer"] == "sam2:sam2_tiny"
    image = _images()[0].permute(1, 2, 0).numpy()
    predictor.set_image(image)
    boxes = predictor.predict(BOXES[0].numpy())
    assert len(boxes.labels) == 3 and boxes.masks.shape == (3, 120, 160) and boxes.masks.any()
    regions = predictor.predict(proposals="sam_auto")
    assert regions.boxes.shape[0] > 0 and regions.masks.shape[1:] == (120, 160)
    clicked = predictor.predict(points=[[30.0, 40.0], [120.0, 90.0]], point_labels=[1, 0], return_attention=True)
    assert len(clicked.labels) == 1 and clicked.masks.shape == (1, 120, 160)
    assert clicked.attention is not None and clicked.embeddings.shape[0] == 1


def test_bad_sam2_inputs_are_clear_errors(sam2_path, sam_path, tmp_path):
    from regionspot.modeling.weights import load_sam

    with pytest.raises(WeightsError, match=r"is a SAM \(LOCALIZER sam\) file, not SAM 2"):
        load_sam2(sam_path)
    with pytest.raises(WeightsError, match=r"is a SAM 2 file \(a Hiera image encoder\), not a SAM file: set "
                                           r"MODEL.REGIONSPOT.LOCALIZER sam2"):
        load_sam(sam2_path)
    with pytest.raises(WeightsError, match=r"has no official config; set MODEL.REGIONSPOT.SAM2_CONFIG"):
        load_sam2(sam2_path)
    with pytest.raises(WeightsError, match=r"does not fit the config .*sam2.1_hiera_t.yaml: \d+ tensors of other "):
        load_sam2(sam2_path, "configs/sam2.1/sam2.1_hiera_t.yaml")
    with pytest.raises(WeightsError, match=r"SAM2_CONFIG 'nope.yaml' is neither a file nor a config"):
        load_sam2(sam2_path, "nope.yaml")
    with pytest.raises(WeightsError, match=r"SAM 2 weights file not found: .*missing.pt.*MODEL.REGIONSPOT.SAM_WEIGHTS.*"
                                           r"sam2.1_hiera_small.pt"):
        load_sam2(str(tmp_path / "missing.pt"))


def test_the_token_cache_identity_names_the_localizer(sam2_path, sam_path):
    from regionspot.data import token_cache as tc

    sam2_identity = tc.make_identity(sam2_path, "transformer", localizer="sam2")
    assert sam2_identity.localizer == "sam2" and sam2_identity.token_dim == 32
    differences = sam2_identity.differences(tc.make_identity(sam_path, "transformer"))
    assert any("localizer 'sam' != expected 'sam2'" in d for d in differences)
    with pytest.raises(WeightsError, match="LOCALIZER sam2"):
        tc.make_identity(sam_path, "transformer", localizer="sam2")


def test_train_net_trains_and_evaluates_on_the_sample_with_sam2(sam2_path, clip_path, tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, DETECTRON2_DATASETS=str(tmp_path / "datasets"), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "train_net.py"), "--config-file",
         os.path.join(REPO, "configs", "regionspot_sample_cpu.yaml"),
         "MODEL.REGIONSPOT.LOCALIZER", "sam2", "MODEL.REGIONSPOT.SAM2_CONFIG", SAM2_TINY_CONFIG,
         "MODEL.REGIONSPOT.SAM_WEIGHTS", sam2_path, "MODEL.REGIONSPOT.CLIP_WEIGHTS", clip_path,
         "MODEL.REGIONSPOT.TEXT_CACHE_DIR", str(tmp_path / "cache"), "MODEL.MASK_ON", "True",
         "SOLVER.MAX_ITER", "2", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "1", "OUTPUT_DIR", str(out)],
        cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert os.path.isfile(out / "model_final.pth")
    assert torch.load(out / "model_final.pth", weights_only=False)["regionspot_pair"]["localizer"] == "sam2:sam2_tiny"
    assert "bbox AP on regionspot_sample:" in proc.stdout and "segm AP" in proc.stdout


def test_the_demo_recognises_everything_with_sam2(sam2_path, clip_path, tmp_path):
    """demo/demo.py --proposals sam_auto on a bundled-style photo, LOCALIZER sam2 from keys alone."""
    from PIL import Image

    photo = tmp_path / "photo.png"
    Image.fromarray(_images()[0].permute(1, 2, 0).numpy()).save(photo)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "demo", "demo.py"), "--config-file",
         os.path.join(REPO, "configs", "regionspot_sample_cpu.yaml"), "--input", str(photo),
         "--proposals", "sam_auto", "--vocabulary", "custom", "--custom-vocabulary", "cat,dog",
         "--untrained-head", "--output", str(out), "--opts", "MODEL.REGIONSPOT.LOCALIZER", "sam2",
         "MODEL.REGIONSPOT.SAM2_CONFIG", SAM2_TINY_CONFIG, "MODEL.REGIONSPOT.SAM_WEIGHTS", sam2_path,
         "MODEL.REGIONSPOT.CLIP_WEIGHTS", clip_path, "MODEL.REGIONSPOT.TEXT_CACHE_DIR", str(tmp_path / "cache"),
         "MODEL.REGIONSPOT.SAM_AUTO.PRED_IOU_THRESH", "0.0", "MODEL.REGIONSPOT.SAM_AUTO.STABILITY_SCORE_THRESH",
         "0.0", "MODEL.REGIONSPOT.SAM_AUTO.POINTS_PER_SIDE", "4"],
        cwd=str(tmp_path), env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    predictions = json.loads((out / "photo.json").read_text())["predictions"]
    assert predictions and {p["label"] for p in predictions} <= {"cat", "dog"}
    assert (out / "photo.jpg").is_file()


@pytest.mark.parametrize("config", ["regionspot_sam2s_openclip_l.yaml", "regionspot_sam2s_openclip_l_stage1.yaml",
                                    "regionspot_sam2s_openclip_l_stage2.yaml"])
def test_the_sam2_openclip_configs_build_with_their_files(config, sam2_path, tmp_path):
    """The pair configs name SAM 2.1 + OpenCLIP by keys alone (the files swapped for random ones)."""
    from regionspot.config import load_config
    from regionspot.testing.random_backbones import write_random_open_clip

    cfg = load_config(os.path.join(REPO, "configs", config))
    rs = cfg.MODEL.REGIONSPOT
    assert (rs.LOCALIZER, rs.VL_MODEL) == ("sam2", "open_clip")
    assert os.path.basename(rs.SAM_WEIGHTS) == "sam2.1_hiera_small.pt"
    rs.SAM_WEIGHTS, rs.SAM2_CONFIG = sam2_path, SAM2_TINY_CONFIG
    rs.CLIP_WEIGHTS = write_random_open_clip(str(tmp_path / "tiny-vit"), seed=1)
    rs.TEXT_CACHE_DIR, cfg.MODEL.DEVICE = str(tmp_path / "cache"), "cpu"
    model = build_model(cfg)
    assert model.pair == {"localizer": "sam2:sam2_tiny", "vl_model": "open_clip:tiny-vit"}


def test_clicks_and_a_mask_prompt_equal_sam2s_own_predictor(localizer):
    """prompt_points on SAM 2 = SAM2ImagePredictor.predict(point_coords, point_labels,
    mask_input, multimask_output=False): mask logits, IoU and the decoder's token."""
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    image = _images()[0]
    embeddings, sizes = localizer.encode([image])
    embedding = {k: v[0] for k, v in embeddings.items()}
    clicks, labels = np.array([[30.0, 40.0], [120.0, 90.0]], np.float32), np.array([1, 0])
    mask = np.zeros((120, 160), bool)
    mask[20:90, 10:100] = True
    predictor = SAM2ImagePredictor(localizer.sam)
    predictor._bb_feat_sizes = predictor_feature_sizes(localizer.sam)
    predictor.set_image(image.permute(1, 2, 0).numpy())
    for with_mask in (False, True):
        ours = localizer.prompt_points(embedding, sizes[0], (120, 160), torch.from_numpy(clicks),
                                       torch.from_numpy(labels), torch.from_numpy(mask) if with_mask else None)
        mask_input = localizer.mask_to_sam_input(torch.from_numpy(mask), sizes[0])[0].numpy() if with_mask else None
        captured = {}

        def keep_token(module, inputs, outputs, captured=captured):
            captured["token"] = outputs[2][:, 0]

        hook = localizer.sam.sam_mask_decoder.register_forward_hook(keep_token)
        masks, iou, low_res = predictor.predict(clicks, labels, mask_input=mask_input, multimask_output=False,
                                                return_logits=True)
        hook.remove()
        # the predictor returns its low-res logits clamped to +-32
        np.testing.assert_allclose(ours.low_res_masks[0].clamp(-32, 32).numpy(), low_res, rtol=0, atol=1e-5)
        np.testing.assert_allclose(ours.iou_predictions.numpy(), iou, rtol=0, atol=1e-5)
        torch.testing.assert_close(ours.tokens, captured["token"], rtol=0, atol=1e-5)
        assert_same_masks(localizer.paste_masks(ours.low_res_masks, sizes[0], (120, 160))[0], masks[0] > 0)
