"""The localizer interface (modeling/localizer.py): a new family is one Localizer subclass and one
registration. A toy family defined here from the interface alone runs the predictor, training
and the sam_auto proposal source; every registered family implements the interface and shares
its token-source rule."""

import json
import os

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from torch import nn

from conftest import REPO, build_tiny_model, make_cfg
from regionspot.modeling import backbones
from regionspot.modeling.localizer import BoxPrompts, Localizer, paste_in_chunks
from regionspot.weights_files import ARCHITECTURE_READERS, TOKEN_SOURCES, WeightsError

pytestmark = pytest.mark.usefixtures("one_thread")

WIDTH, SIDE, PATCH = 16, 64, 16  # toy decoder width, square input side, image-encoder stride


class ToyPromptable(nn.Module):
    """A tiny promptable model of its own layout (no SAM module): a strided convolution as the
    image encoder, linear point embeddings, and a decoder whose mask token mixes the prompt and
    the image, with a hypernetwork against an upscaled embedding for the masks."""

    def __init__(self):
        super().__init__()
        self.image_encoder = nn.Conv2d(3, WIDTH, PATCH, PATCH)
        self.point_embed = nn.Linear(2, WIDTH)
        self.label_embed = nn.Embedding(5, WIDTH)  # 0/1: negative/positive click, 2/3: box corners, 4: pad
        self.no_mask = nn.Parameter(torch.randn(WIDTH))
        self.mask_down = nn.Conv2d(1, WIDTH, 4, 4)
        self.mask_token = nn.Parameter(torch.randn(WIDTH))
        self.mixer = nn.Linear(WIDTH, WIDTH)
        self.hypernet = nn.Linear(WIDTH, WIDTH // 8)
        self.upscale = nn.ConvTranspose2d(WIDTH, WIDTH // 8, 4, 4)
        self.iou_head = nn.Linear(WIDTH, 1)
        self.register_buffer("pixel_mean", torch.tensor([0.5, 0.5, 0.5]).view(3, 1, 1))


def toy_architecture(state_dict):
    """The toy family's weights-file reader (the SAM-token cache's identity)."""
    if "mask_token" not in state_dict:
        raise WeightsError("not a toy state dict: key 'mask_token' is missing")
    return {"out_chans": int(state_dict["mask_token"].shape[0])}


class ToyMaskGenerator:
    """``sam_auto`` for the toy: one clicked region per grid point, with the attributes and
    counts of SAM's generator that the filter report reads."""

    def __init__(self, localizer, image_shape, embedding, input_size, points_per_side=2, pred_iou_thresh=0.0,
                 stability_score_thresh=0.0, box_nms_thresh=0.7, min_mask_region_area=0, **_):
        self.localizer, self.embedding, self.input_size = localizer, embedding, input_size
        self.points_per_side = points_per_side
        self.pred_iou_thresh, self.stability_score_thresh = pred_iou_thresh, stability_score_thresh
        self.box_nms_thresh, self.crop_nms_thresh, self.min_mask_region_area = box_nms_thresh, 0.7, min_mask_region_area
        self.counts = dict.fromkeys(("generated", "pred_iou", "stability", "crop_edge", "box_nms", "crop_nms",
                                     "small_regions"), 0)

    def generate(self, image: np.ndarray):
        h, w = image.shape[:2]
        steps = (np.arange(self.points_per_side) + 0.5) / self.points_per_side
        regions = []
        for y in steps * h:
            for x in steps * w:
                prompt = self.localizer.prompt_points(self.embedding, self.input_size, (h, w),
                                                      torch.tensor([[x, y]]), torch.tensor([1]))
                mask = self.localizer.paste_masks(prompt.low_res_masks, self.input_size, (h, w))[0].cpu()
                self.counts["generated"] += 1
                if not mask.any():
                    self.counts["stability"] += 1
                    continue
                ys, xs = mask.nonzero(as_tuple=True)
                x0, y0 = int(xs.min()), int(ys.min())
                regions.append({"segmentation": mask.numpy(), "bbox": [x0, y0, int(xs.max()) - x0, int(ys.max()) - y0],
                                "predicted_iou": float(prompt.iou_predictions[0]), "stability_score": 1.0})
        return regions


class ToyLocalizer(Localizer):
    """The toy family: every method the interface asks of a family, nothing more."""

    @property
    def input_size(self) -> int:
        return SIDE

    @property
    def decoder_width(self) -> int:
        return self.sam.mask_token.shape[0]

    def preprocess(self, image, resized=None):
        x = image.to(self.device).float()[None] / 255.0
        x = torch.nn.functional.interpolate(x, size=(SIDE, SIDE), mode="bilinear", align_corners=False)[0]
        return x - self.sam.pixel_mean, tuple(image.shape[-2:])

    def encode_images(self, pixels):
        return self.sam.image_encoder(pixels)

    def boxes_to_input(self, boxes, image_size):
        h, w = image_size
        return (boxes / boxes.new_tensor([w, h, w, h]) * SIDE).view(-1, 2, 2)

    def _embed_points(self, coords, labels):
        return self.sam.point_embed(coords / SIDE) + self.sam.label_embed(labels)

    def encode_boxes(self, corners):
        n = corners.shape[0]
        labels = torch.tensor([2, 3], device=corners.device).expand(n, -1)
        dense = self.sam.no_mask.view(1, -1, 1, 1).expand(n, -1, SIDE // PATCH, SIDE // PATCH)
        return self._embed_points(corners, labels), dense

    def click_coordinates(self, points, image_size):
        h, w = image_size
        return points / points.new_tensor([w, h]) * SIDE

    def encode_clicks(self, points, mask_input):
        pad = self.sam.label_embed.weight[4].view(1, 1, -1)
        sparse = pad if points is None else torch.cat([self._embed_points(points[0], points[1]), pad], dim=1)
        if mask_input is None:
            return sparse, self.sam.no_mask.view(1, -1, 1, 1).expand(1, -1, SIDE // PATCH, SIDE // PATCH)
        return sparse, self.sam.mask_down(mask_input)

    def mask_to_low_res(self, mask, sam_input_size):
        side = 4 * SIDE // PATCH
        return torch.nn.functional.interpolate(mask[None, None], size=(side, side), mode="bilinear",
                                               align_corners=False)

    def hypernetwork(self, mask_token):
        return self.sam.hypernet(mask_token)

    def decode_prompts(self, image_embeddings, sparse, dense, image_index, with_masks):
        source = image_embeddings[image_index] + dense
        mask_token = torch.tanh(self.sam.mixer(self.sam.mask_token + sparse.mean(dim=1) + source.mean(dim=(2, 3))))
        hyper = self.hypernetwork(mask_token) if with_masks else None
        token = self.select_token(mask_token, sparse, hyper)
        if not with_masks:
            return BoxPrompts(token.float(), None, None)
        masks = torch.einsum("nc,nchw->nhw", hyper, self.sam.upscale(source))[:, None]
        return BoxPrompts(token.float(), masks.float(), torch.sigmoid(self.sam.iou_head(mask_token))[:, 0].float())

    def prompt_points(self, image_embedding, sam_input_size, image_size, points=None, labels=None, mask=None):
        return self.prompt_clicks(image_embedding, sam_input_size, image_size, points, labels, mask)

    def paste_masks(self, low_res_masks, resized_size, output_size):
        return paste_in_chunks(low_res_masks, tuple(output_size), lambda chunk: torch.nn.functional.interpolate(
            chunk, size=tuple(output_size), mode="bilinear", align_corners=False)[:, 0] > 0)

    def mask_generator(self, settings, image_shape, embedding, input_size):
        return ToyMaskGenerator(self, image_shape, embedding, input_size, **settings)


def build_toy_localizer(cfg) -> Localizer:
    """The toy family's builder: its model from ``SAM_WEIGHTS`` (a plain state dict), the part's switches."""
    rs = cfg.MODEL.REGIONSPOT
    model = ToyPromptable()
    model.load_state_dict(torch.load(rs.SAM_WEIGHTS, map_location="cpu", weights_only=True))
    return ToyLocalizer(model, rs.TOKEN_SOURCE, rs.BOX_CHUNK_SIZE, rs.ENCODER_PRECISION, rs.SAM_ATTENTION)


@pytest.fixture(scope="module")
def toy_family(tmp_path_factory):
    """The toy family registered (the one registration a family needs) for this module, with
    its weights file; removed afterwards."""
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("toy") / "toy_localizer.pth")
    torch.save(ToyPromptable().state_dict(), path)
    backbones.register_localizer("toy", architecture=toy_architecture)(build_toy_localizer)
    yield path
    backbones.LOCALIZER_REGISTRY._obj_map.pop("toy")
    ARCHITECTURE_READERS.pop("toy")


@pytest.fixture(scope="module")
def toy_model(toy_family, clip_path, tmp_path_factory):
    cfg = make_cfg(toy_family, clip_path, tmp_path_factory.mktemp("text_cache"),
                   **{"MODEL.REGIONSPOT.LOCALIZER": "toy", "MODEL.MASK_ON": True})
    return build_tiny_model(cfg).eval()


@pytest.fixture(scope="module")
def image():
    return (np.random.RandomState(3).rand(90, 120, 3) * 255).astype(np.uint8)


def test_the_toy_family_builds_from_its_registration_alone(toy_model):
    localizer = toy_model.localizer
    assert isinstance(localizer, ToyLocalizer) and localizer.family == "toy"
    assert toy_model.pair["localizer"] == "toy"  # meta_arch records pair_name
    assert localizer.token_dim == WIDTH and toy_model.head.to_clip.in_features == WIDTH
    assert toy_model.proposal_generator.sam_auto.localizer is localizer


def test_the_predictor_runs_boxes_clicks_and_sam_auto_with_the_toy(toy_model, image):
    from regionspot.predictor import RegionSpotPredictor

    predictor = RegionSpotPredictor(toy_model, 90, 200, vocabulary=["cat", "dog", "car"])
    predictor.set_image(image)
    boxes = [[5, 5, 60, 70], [30, 10, 110, 80]]
    out = predictor.predict(boxes)
    assert len(out.labels) > 0 and out.masks.shape[1:] == image.shape[:2]
    assert set(out.labels) <= {"cat", "dog", "car"}
    # the region embeddings are the head's on the toy's tokens of those boxes
    tensor = torch.from_numpy(image).permute(2, 0, 1)
    embeddings, sizes = toy_model.localizer.encode([tensor])
    tokens = toy_model.localizer.prompt(embeddings, [torch.tensor(boxes, dtype=torch.float32)], [image.shape[:2]],
                                        with_masks=False)[0].tokens
    assert tokens.shape == (2, WIDTH) and torch.isfinite(tokens).all()
    clicked = predictor.predict(points=[[40, 30]], point_labels=[1])
    assert clicked.masks.shape[1:] == image.shape[:2]
    found = predictor.predict(proposals="sam_auto")
    assert len(found.labels) > 0 and found.masks.shape[1:] == image.shape[:2]
    assert found.filters.steps and any("sam_auto" in step.stage for step in found.filters.steps)


def test_sam_auto_regions_are_the_toy_generators(toy_model, image):
    tensor = torch.from_numpy(image).permute(2, 0, 1)
    features = toy_model.encode_images([tensor])
    proposals = toy_model.generate_proposals("sam_auto", features)[0]
    feature = features[0]
    generator = toy_model.localizer.mask_generator(toy_model.proposal_generator.sam_auto.settings, image.shape[:2],
                                                   feature.sam_embedding, feature.sam_input_size)
    regions = generator.generate(image)
    assert len(proposals) == len(regions) > 0
    assert {m.numpy().tobytes() for m in proposals.proposal_masks} == {r["segmentation"].tobytes() for r in regions}


def test_a_few_training_iterations_with_the_toy(toy_family, clip_path, tmp_path, forget_new_datasets, monkeypatch):
    """train_net trains the head on the toy's tokens and records the toy in the checkpoint's pair."""
    import train_net
    from regionspot.data.datasets.regionspot_sample import (
        _load_sample_dicts,
        prepare_regionspot_sample,
        sample_vocabulary_metadata,
    )

    root = str(tmp_path / "sample")
    json_path, image_root = prepare_regionspot_sample(root)
    DatasetCatalog.register("toy_family_sample", lambda: _load_sample_dicts(root))
    MetadataCatalog.get("toy_family_sample").set(json_file=json_path, image_root=image_root, evaluator_type="lvis",
                                                 **sample_vocabulary_metadata())
    monkeypatch.chdir(REPO)
    out = str(tmp_path / "out")
    args = train_net.get_parser().parse_args([
        "--config-file", "configs/regionspot_sample_cpu.yaml",
        "MODEL.REGIONSPOT.LOCALIZER", "toy", "MODEL.REGIONSPOT.SAM_WEIGHTS", toy_family,
        "MODEL.REGIONSPOT.CLIP_WEIGHTS", clip_path, "MODEL.REGIONSPOT.TEXT_CACHE_DIR", str(tmp_path / "cache"),
        "OUTPUT_DIR", out, "DATASETS.TRAIN", "('toy_family_sample',)", "DATASETS.TEST", "()",
        "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "2"])
    train_net.main(args)
    with open(os.path.join(out, "metrics.json")) as f:
        losses = [json.loads(line)["total_loss"] for line in f if "total_loss" in line]
    assert losses and all(np.isfinite(losses))
    saved = torch.load(os.path.join(out, "model_final.pth"), weights_only=True)
    assert saved["iteration"] == 1
    assert saved["regionspot_pair"]["localizer"] == "toy"


def test_the_toy_weights_reader_gives_the_token_cache_identity(toy_family):
    from regionspot.data.token_cache import make_identity

    identity = make_identity(toy_family, "mlp", localizer="toy")
    assert identity.localizer == "toy" and identity.token_dim == WIDTH // 8


# ----------------------------------------------------------------------------- every family


@pytest.fixture(scope="module")
def family_cfgs(sam_path, clip_path, tmp_path_factory, toy_family):
    """A config per registered family, with a small random model in its file format."""
    from regionspot.testing.random_backbones import SAM2_TINY_CONFIG, write_random_sam2, write_random_sam_hq

    folder = tmp_path_factory.mktemp("families")
    files = {
        "sam": {"MODEL.REGIONSPOT.SAM_WEIGHTS": sam_path},
        "sam_hq": {"MODEL.REGIONSPOT.SAM_WEIGHTS": write_random_sam_hq(str(folder / "sam_hq.pth"))},
        "sam2": {"MODEL.REGIONSPOT.SAM_WEIGHTS": write_random_sam2(str(folder / "sam2.pt")),
                 "MODEL.REGIONSPOT.SAM2_CONFIG": SAM2_TINY_CONFIG},
        "toy": {"MODEL.REGIONSPOT.SAM_WEIGHTS": toy_family},
    }
    assert set(files) == {name for name, _ in backbones.LOCALIZER_REGISTRY}, "a registered family has no test files"
    return {name: make_cfg(sam_path, clip_path, folder, **{"MODEL.REGIONSPOT.LOCALIZER": name, **keys})
            for name, keys in files.items()}


def test_every_registered_family_implements_the_interface(family_cfgs):
    for name, cfg in family_cfgs.items():
        localizer = backbones.build_localizer(cfg)
        assert isinstance(localizer, Localizer), name
        assert localizer.family == name and localizer.pair_name.split(":")[0] == name
        for source in TOKEN_SOURCES:
            localizer.token_source = source
            assert localizer.token_dim == (localizer.decoder_width // 8 if source == "mlp" else localizer.decoder_width)


def test_an_invalid_token_source_is_the_same_one_line_error_for_every_family(family_cfgs):
    messages = {}
    for name, cfg in family_cfgs.items():
        cfg = cfg.clone()
        cfg.MODEL.REGIONSPOT.TOKEN_SOURCE = "hypernetwork"
        with pytest.raises(ValueError) as caught:
            backbones.build_localizer(cfg)
        messages[name] = str(caught.value)
    assert len(set(messages.values())) == 1, messages
    (message,) = set(messages.values())
    assert "\n" not in message and "'hypernetwork'" in message and all(s in message for s in TOKEN_SOURCES)


def test_a_builder_that_returns_no_localizer_is_refused(sam_path, clip_path, tmp_path):
    backbones.register_localizer("not_a_localizer")(lambda cfg: nn.Identity())
    try:
        cfg = make_cfg(sam_path, clip_path, tmp_path, **{"MODEL.REGIONSPOT.LOCALIZER": "not_a_localizer"})
        with pytest.raises(TypeError, match="'not_a_localizer' returned a Identity, not a .*Localizer"):
            backbones.build_localizer(cfg)
    finally:
        backbones.LOCALIZER_REGISTRY._obj_map.pop("not_a_localizer")


def test_every_registered_vl_family_gives_a_semantic_encoder(clip_path, sam_path, tmp_path):
    """The vision-language side's interface: each family's semantic encoder is a SemanticEncoder."""
    from regionspot.modeling.semantic_features import SemanticEncoder
    from regionspot.testing.random_backbones import write_random_open_clip

    files = {"openai_clip": clip_path, "open_clip": write_random_open_clip(str(tmp_path / "tiny-vit"))}
    assert set(files) == {name for name, _ in backbones.VL_MODEL_REGISTRY}, "a registered family has no test files"
    for name, path in files.items():
        cfg = make_cfg(sam_path, path, tmp_path, **{"MODEL.REGIONSPOT.VL_MODEL": name})
        encoder = backbones.build_vl_model(cfg).semantic_encoder
        assert isinstance(encoder, SemanticEncoder), name
        pixels = encoder.preprocess([torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8)])
        assert encoder(pixels).shape == (1, encoder.num_tokens, encoder.width)
