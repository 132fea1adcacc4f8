"""The localizer and the vision-language model are chosen by config keys
(MODEL.REGIONSPOT.LOCALIZER / VL_MODEL, modeling/backbones.py): RegionSpot.from_config names no
model, a registered family builds from keys alone, an unknown one is a one-line error."""

import os
import subprocess
import sys

import pytest
import torch
from detectron2.modeling import build_model

from conftest import make_cfg
from regionspot.config import ConfigError
from regionspot.modeling import backbones
from regionspot.modeling.position_tokens import SamPositionTokens
from regionspot.modeling.semantic_features import ClipSemanticFeatures
from regionspot.modeling.text_classifier import TextClassifier

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def registered():
    """Register test families for one test and remove them afterwards."""
    added = []

    def register(registry, name, fn):
        decorator = backbones.register_localizer if registry is backbones.LOCALIZER_REGISTRY else \
            backbones.register_vl_model
        decorator(name)(fn)
        added.append((registry, name))

    yield register
    for registry, name in added:
        registry._obj_map.pop(name)


def test_the_defaults_are_the_released_pair(sam_path, clip_path, tmp_path):
    cfg = make_cfg(sam_path, clip_path, tmp_path)
    assert (cfg.MODEL.REGIONSPOT.LOCALIZER, cfg.MODEL.REGIONSPOT.VL_MODEL) == ("sam", "openai_clip")
    model = build_model(cfg)
    assert isinstance(model.localizer, SamPositionTokens)
    assert isinstance(model.semantic_encoder, ClipSemanticFeatures)
    assert isinstance(model.text_classifier, TextClassifier)
    # one frozen CLIP behind both views, one localizer behind the boxes and the sam_auto source
    assert model.text_classifier.clip is model.semantic_encoder.clip
    assert model.proposal_generator.sam_auto.localizer is model.localizer


def test_a_registered_family_builds_from_keys_alone_and_the_head_follows_its_widths(
        sam_path, clip_path, tmp_path, registered):
    calls = []

    def narrow_sam(cfg):  # a localizer family with 32-d tokens (SAM's MLP-projected mask token)
        calls.append("localizer")
        cfg = cfg.clone()
        cfg.defrost()
        cfg.MODEL.REGIONSPOT.TOKEN_SOURCE = "mlp"
        return backbones.build_sam_localizer(cfg)

    def counted_clip(cfg):
        calls.append("vl_model")
        return backbones.build_openai_clip(cfg)

    registered(backbones.LOCALIZER_REGISTRY, "test_narrow_sam", narrow_sam)
    registered(backbones.VL_MODEL_REGISTRY, "test_counted_clip", counted_clip)
    cfg = make_cfg(sam_path, clip_path, tmp_path, **{"MODEL.REGIONSPOT.LOCALIZER": "test_narrow_sam",
                                                     "MODEL.REGIONSPOT.VL_MODEL": "test_counted_clip"})
    model = build_model(cfg).eval()
    assert calls == ["localizer", "vl_model"]
    assert model.localizer.token_dim == 32 and model.head.to_clip.in_features == 32
    assert model.head.to_clip.out_features == model.semantic_encoder.width
    assert model.head.projector.out_features == model.text_classifier.embed_dim
    image = torch.randint(0, 256, (3, 48, 64), dtype=torch.uint8)
    from detectron2.structures import Boxes, Instances

    instances = Instances((48, 64), gt_boxes=Boxes(torch.tensor([[2.0, 3.0, 30.0, 40.0]])))
    model.set_vocabulary(["cat", "dog"])
    out = model([{"image": image, "instances": instances}])[0]["instances"]
    assert len(out) == 2 and sorted(out.pred_classes.tolist()) == [0, 1]  # one box x two classes


@pytest.mark.parametrize("key", ["LOCALIZER", "VL_MODEL"])
def test_an_unknown_family_is_refused_naming_the_key_and_the_known_ones(sam_path, clip_path, tmp_path, key):
    cfg = make_cfg(sam_path, clip_path, tmp_path, **{f"MODEL.REGIONSPOT.{key}": "sam3"})
    known = "'sam'" if key == "LOCALIZER" else "'openai_clip'"
    with pytest.raises(ConfigError, match=rf"MODEL.REGIONSPOT.{key} 'sam3' is not a known model family "
                                          rf"\(known: .*{known}"):
        build_model(cfg)


def test_train_net_refuses_an_unknown_localizer_in_one_line(sam_path, clip_path, tmp_path):
    env = dict(os.environ, DETECTRON2_DATASETS=str(tmp_path / "datasets"), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "train_net.py"), "--config-file",
         os.path.join(REPO, "configs", "regionspot_sample_cpu.yaml"), "--eval-only", "--untrained-head",
         "MODEL.REGIONSPOT.SAM_WEIGHTS", sam_path, "MODEL.REGIONSPOT.CLIP_WEIGHTS", clip_path,
         "MODEL.REGIONSPOT.LOCALIZER", "sam2.1_hiera_s", "OUTPUT_DIR", str(tmp_path / "out")],
        cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    known = ", ".join(repr(name) for name, _ in sorted(backbones.LOCALIZER_REGISTRY))  # 'sam', 'sam_hq', ...
    assert "'sam_hq'" in known and "'sam2'" in known
    assert errors == ["train_net.py: error: MODEL.REGIONSPOT.LOCALIZER 'sam2.1_hiera_s' is not a known model "
                      f"family (known: {known})"], proc.stderr[-2000:]


@pytest.fixture(scope="module")
def family_files(sam_path, clip_path, tmp_path_factory):
    """One small random model per family, in its official file format."""
    from regionspot.testing.random_backbones import (
        SAM2_TINY_CONFIG,
        write_random_open_clip,
        write_random_sam2,
        write_random_sam_hq,
    )

    folder = tmp_path_factory.mktemp("families")
    return {
        "sam": {"MODEL.REGIONSPOT.SAM_WEIGHTS": sam_path},
        "sam_hq": {"MODEL.REGIONSPOT.SAM_WEIGHTS": write_random_sam_hq(str(folder / "sam_hq.pth"))},
        "sam2": {"MODEL.REGIONSPOT.SAM_WEIGHTS": write_random_sam2(str(folder / "sam2.pt")),
                 "MODEL.REGIONSPOT.SAM2_CONFIG": SAM2_TINY_CONFIG},
        "openai_clip": {"MODEL.REGIONSPOT.CLIP_WEIGHTS": clip_path},
        "open_clip": {"MODEL.REGIONSPOT.CLIP_WEIGHTS": write_random_open_clip(str(folder / "tiny-vit"))},
    }


@pytest.mark.parametrize("vl_model", ["openai_clip", "open_clip"])
@pytest.mark.parametrize("localizer", ["sam", "sam_hq", "sam2"])
def test_every_localizer_and_vl_model_pair_builds_from_keys_alone(localizer, vl_model, family_files, sam_path,
                                                                  clip_path, tmp_path):
    """Each of the 3 x 2 pairs is two config keys (and its files); the head's widths follow the pair
    and the model records it; a box is recognised end to end."""
    cfg = make_cfg(sam_path, clip_path, tmp_path, **family_files[localizer], **family_files[vl_model],
                   **{"MODEL.REGIONSPOT.LOCALIZER": localizer, "MODEL.REGIONSPOT.VL_MODEL": vl_model})
    model = build_model(cfg).eval()
    assert model.pair["localizer"].split(":")[0] == localizer and model.pair["vl_model"].split(":")[0] == vl_model
    assert model.head.to_clip.in_features == model.localizer.token_dim
    assert model.head.to_clip.out_features == model.semantic_encoder.width
    assert model.head.projector.out_features == model.semantic_encoder.embed_dim == model.text_classifier.embed_dim
    image = torch.randint(0, 256, (3, 96, 128), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    from detectron2.structures import Boxes, Instances

    with torch.no_grad():
        features = model.encode_images([image])
        proposals = Instances((96, 128))
        proposals.proposal_boxes = Boxes(torch.tensor([[10.0, 10.0, 60.0, 80.0]]))
        proposals.objectness_logits = torch.ones(1)
        text = model.text_classifier.embed(["cat", "dog"])
        (recognition,) = model.recognize(features, [proposals], text, with_masks=True)
    assert recognition.logits.shape == (1, 2) and torch.isfinite(recognition.logits).all()
    assert model.localizer.paste_masks(recognition.low_res_masks, features[0].sam_input_size, (96, 128)).shape == \
        (1, 96, 128)
