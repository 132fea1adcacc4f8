"""VL_MODEL open_clip with timm image towers (EVA02: timm Eva with a class token; SigLIP: timm
VisionTransformer pooled by attention, no class token), loaded from small random models written
in the layout OpenCLIP publishes, through the same loading code as the real folders."""

import json
import logging
import os
import subprocess
import sys

import pytest
import torch
from detectron2.modeling import build_model

from conftest import make_cfg
from regionspot.modeling.open_clip_model import load_open_clip
from regionspot.modeling.semantic_features import TimmSemanticFeatures
from regionspot.modeling.text_embeddings import PROMPT_TEMPLATES
from regionspot.testing.random_backbones import OPEN_CLIP_PRESETS, TIMM_TRUNKS, write_random_open_clip
from regionspot.weights_files import WeightsError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = {"eva": "tiny-eva", "siglip": "tiny-siglip"}


@pytest.fixture(scope="module")
def timm_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("open_clip_timm")
    return {kind: write_random_open_clip(str(root / preset), preset, seed=2) for kind, preset in PRESETS.items()}


def _cfg(sam_path, folder, tmp_path, **overrides):
    return make_cfg(sam_path, folder, tmp_path / "cache", **{"MODEL.REGIONSPOT.VL_MODEL": "open_clip", **overrides})


def _images(n=2):
    return [torch.randint(0, 256, (3, 40, 70), dtype=torch.uint8, generator=torch.Generator().manual_seed(i))
            for i in range(n)]


def _tail(visual, tokens):
    """The tower's own tail on a full token sequence: trunk final norm, timm pooling / head,
    OpenCLIP's head."""
    trunk = visual.trunk
    return visual.head(trunk.forward_head(trunk.norm(tokens)))


@pytest.mark.parametrize("kind", ["eva", "siglip"])
def test_the_model_builds_from_keys_and_the_head_follows_the_tower(kind, sam_path, timm_dirs, tmp_path):
    model = build_model(_cfg(sam_path, timm_dirs[kind], tmp_path)).eval()
    encoder, preset = model.semantic_encoder, OPEN_CLIP_PRESETS[PRESETS[kind]]
    trunk_width = TIMM_TRUNKS[kind]["model_args"]["embed_dim"]
    assert isinstance(encoder, TimmSemanticFeatures)
    assert type(encoder.clip.visual.trunk).__name__ == {"eva": "Eva", "siglip": "VisionTransformer"}[kind]
    assert encoder.width == trunk_width == model.head.to_clip.out_features
    assert encoder.embed_dim == model.text_classifier.embed_dim == preset["embed_dim"]
    assert model.head.projector.out_features == preset["embed_dim"]
    assert encoder.num_tokens == (224 // 16) ** 2 + (kind == "eva")  # SigLIP has no class token to keep
    assert encoder.pixel_mean.flatten().tolist() == [0.5, 0.5, 0.5]
    assert model.text_classifier.clip is encoder.clip
    assert model.pair == {"localizer": "sam", "vl_model": f"open_clip:{PRESETS[kind]}"}


@pytest.mark.parametrize("kind", ["eva", "siglip"])
def test_feature_map_and_text_embeddings_equal_open_clips_own_forward(kind, sam_path, timm_dirs, tmp_path, caplog):
    """Parity: the feature map (the trunk's last block before its final norm), pushed through
    the tower's own tail, is open_clip's encode_image of the same pixels; the text embeddings
    are the template average of open_clip's encode_text with the model's tokenizer."""
    with caplog.at_level(logging.INFO, logger="regionspot.modeling.semantic_features"):
        model = build_model(_cfg(sam_path, timm_dirs[kind], tmp_path)).eval()
    assert ("has no class token" in caplog.text) == (kind == "siglip")
    loaded = load_open_clip(timm_dirs[kind])
    encoder = model.semantic_encoder
    with torch.no_grad():
        pixels = encoder.preprocess(_images())
        feature_map = encoder(pixels)
        pooled = _tail(loaded.model.visual, feature_map)
        reference = loaded.model.encode_image(pixels)
    grid = (224 // 16) ** 2
    assert feature_map.shape == (2, grid + (kind == "eva"), TIMM_TRUNKS[kind]["model_args"]["embed_dim"])
    torch.testing.assert_close(pooled, reference, rtol=1e-5, atol=1e-5)
    assert reference.shape == (2, encoder.embed_dim)

    names = ["cat", "traffic_light"]
    embeddings = model.text_classifier.embed(names)
    with torch.no_grad():
        expected = []
        for name in names:
            feats = loaded.model.encode_text(loaded.tokenizer([t.format(name) for t in PROMPT_TEMPLATES]))
            expected.append(torch.nn.functional.normalize(feats.float().mean(0), dim=-1))
    torch.testing.assert_close(embeddings, torch.stack(expected), rtol=1e-5, atol=1e-5)


def test_the_class_token_switch(sam_path, timm_dirs, tmp_path):
    """EVA02: USE_CLASS_TOKEN False drops the class row and keeps the patch rows as they were;
    SigLIP: no class token either way, the same patch tokens."""
    images = _images(1)
    maps = {}
    for kind in ("eva", "siglip"):
        for keep in (True, False):
            model = build_model(_cfg(sam_path, timm_dirs[kind], tmp_path, **{"MODEL.REGIONSPOT.USE_CLASS_TOKEN": keep}))
            maps[kind, keep] = model.semantic_encoder.encode(images)
            assert model.semantic_encoder.num_tokens == maps[kind, keep].shape[1]
    torch.testing.assert_close(maps["eva", False], maps["eva", True][:, 1:], rtol=0, atol=0)
    torch.testing.assert_close(maps["siglip", False], maps["siglip", True], rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["eva", "siglip"])
def test_another_input_size_goes_through_timms_set_input_size(kind, sam_path, timm_dirs, tmp_path):
    model = build_model(_cfg(sam_path, timm_dirs[kind], tmp_path, **{"MODEL.REGIONSPOT.CLIP_INPUT_SIZE": 160})).eval()
    encoder = model.semantic_encoder
    reference_model = load_open_clip(timm_dirs[kind]).model
    reference_model.visual.set_input_size(160)
    with torch.no_grad():
        pixels = encoder.preprocess(_images())
        feature_map = encoder(pixels)
        pooled = _tail(reference_model.visual, feature_map)
        reference = reference_model.encode_image(pixels)
    assert pixels.shape[-2:] == (160, 160)
    assert feature_map.shape[1] == encoder.num_tokens == (160 // 16) ** 2 + (kind == "eva")
    torch.testing.assert_close(pooled, reference, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="CLIP_INPUT_SIZE must be a positive multiple of the tower's patch size 16"):
        build_model(_cfg(sam_path, timm_dirs[kind], tmp_path, **{"MODEL.REGIONSPOT.CLIP_INPUT_SIZE": 170}))


def test_non_vit_towers_are_refused_in_one_line(tmp_path):
    tiny_text = OPEN_CLIP_PRESETS["tiny"]["text_cfg"]
    convnext = write_random_open_clip(str(tmp_path / "convnext"), model_cfg={
        "embed_dim": 24, "vision_cfg": {"image_size": 160, "timm_model_name": "test_convnext", "timm_pool": "avg",
                                        "timm_proj": "linear"}, "text_cfg": tiny_text})
    with pytest.raises(WeightsError, match=r"CLIP_WEIGHTS '.*convnext' \(OpenCLIP convnext\): its timm image tower is "
                                           r"ConvNeXt, not a ViT") as info:
        load_open_clip(convnext)
    assert "\n" not in str(info.value)
    resnet = write_random_open_clip(str(tmp_path / "resnet"), model_cfg={
        "embed_dim": 24, "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16},
        "text_cfg": tiny_text})
    with pytest.raises(WeightsError, match=r"\(OpenCLIP resnet\): an OpenCLIP model without a ViT image tower "
                                           r"\(ModifiedResNet") as info:
        load_open_clip(resnet)
    assert "\n" not in str(info.value)


def test_a_siglip_hub_tokenizer_needs_the_key(tmp_path):
    cfg = json.loads(json.dumps(OPEN_CLIP_PRESETS["tiny-siglip"]))
    cfg["text_cfg"].update(hf_tokenizer_name="timm/ViT-B-16-SigLIP", vocab_size=32000, context_length=64)
    hub = tmp_path / "ViT-B-16-SigLIP"
    hub.mkdir()
    (hub / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    (hub / "open_clip_model.safetensors").write_bytes(b"")
    with pytest.raises(WeightsError, match="'timm/ViT-B-16-SigLIP' lives on the Hugging Face hub; set "
                                           "MODEL.REGIONSPOT.OPENCLIP_TOKENIZER"):
        load_open_clip(str(hub))


def test_train_net_trains_and_evaluates_on_the_sample_with_a_siglip_tower(sam_path, timm_dirs, tmp_path):
    """The attention-pooled tower without a class token (the case the class-token rule changes)
    through the real entry point."""
    out = tmp_path / "out"
    env = dict(os.environ, DETECTRON2_DATASETS=str(tmp_path / "datasets"), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "train_net.py"), "--config-file",
         os.path.join(REPO, "configs", "regionspot_sample_cpu.yaml"),
         "MODEL.REGIONSPOT.VL_MODEL", "open_clip", "MODEL.REGIONSPOT.CLIP_WEIGHTS", timm_dirs["siglip"],
         "MODEL.REGIONSPOT.SAM_WEIGHTS", sam_path, "MODEL.REGIONSPOT.TEXT_CACHE_DIR", str(tmp_path / "cache"),
         "SOLVER.MAX_ITER", "2", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "1", "OUTPUT_DIR", str(out)],
        cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert os.path.isfile(out / "model_final.pth")
    saved = torch.load(out / "model_final.pth", weights_only=False)
    assert saved["regionspot_pair"] == {"localizer": "sam", "vl_model": "open_clip:tiny-siglip"}
    assert "bbox AP on regionspot_sample:" in proc.stdout


def test_a_local_hub_tokenizer_gets_the_configs_tokenizer_kwargs(timm_dirs, tmp_path, monkeypatch):
    """SigLIP's config asks for clean="canonicalize": the OPENCLIP_TOKENIZER folder is opened
    with it (and the config's context length), as open_clip.get_tokenizer would open the hub's."""
    import open_clip

    folder = tmp_path / "siglip-hub-tokenizer"
    folder.mkdir()
    config = json.loads((open(os.path.join(timm_dirs["siglip"], "open_clip_config.json"))).read())
    config["model_cfg"]["text_cfg"].update(hf_tokenizer_name="timm/ViT-B-16-SigLIP",
                                           tokenizer_kwargs={"clean": "canonicalize"})
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    with open(os.path.join(timm_dirs["siglip"], "open_clip_model.safetensors"), "rb") as f:
        (folder / "open_clip_model.safetensors").write_bytes(f.read())
    calls = []
    monkeypatch.setattr(open_clip.tokenizer, "HFTokenizer", lambda *a, **k: calls.append((a, k)) or "tok")
    loaded = load_open_clip(str(folder), tokenizer_dir=str(tmp_path / "tokenizer"))
    assert loaded.tokenizer == "tok"
    assert calls == [((str(tmp_path / "tokenizer"),), {"context_length": 77, "tokenizer_mode": None,
                                                        "clean": "canonicalize"})]


def test_a_local_hub_tokenizer_folder_tokenizes_the_text_embeddings(sam_path, timm_dirs, tmp_path):
    """SigLIP-style: the config names a hub tokenizer, OPENCLIP_TOKENIZER a local folder holding one
    (a real Hugging Face tokenizer saved with save_pretrained, as downloaded from the hub); the text
    classifier tokenizes with it and its embeddings equal encode_text of those tokens."""
    import open_clip
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "</s>", "<unk>", "a", "photo", "of", "the", "cat", "dog", "."]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer_dir = str(tmp_path / "tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(tokenizer_dir)
    folder = tmp_path / "siglip-with-hub-tokenizer"
    folder.mkdir()
    config = json.loads(open(os.path.join(timm_dirs["siglip"], "open_clip_config.json")).read())
    config["model_cfg"]["text_cfg"]["hf_tokenizer_name"] = "timm/ViT-B-16-SigLIP"
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    with open(os.path.join(timm_dirs["siglip"], "open_clip_model.safetensors"), "rb") as f:
        (folder / "open_clip_model.safetensors").write_bytes(f.read())
    model = build_model(_cfg(sam_path, str(folder), tmp_path, **{"MODEL.REGIONSPOT.OPENCLIP_TOKENIZER": tokenizer_dir}))
    ids = model.text_classifier.tokenizer(["a photo of the cat ."])
    assert ids[0, :6].tolist() == [3, 4, 5, 6, 7, 9]  # the folder's vocabulary, not CLIP's BPE
    reference = open_clip.tokenizer.HFTokenizer(tokenizer_dir, context_length=ids.shape[1])
    with torch.no_grad():  # the documented ensemble: mean of the unnormalised features, then L2
        expected = model.text_classifier.clip.encode_text(
            reference([t.format("cat") for t in PROMPT_TEMPLATES])).float().mean(0)
    torch.testing.assert_close(model.text_classifier.embed(["cat"])[0],
                               torch.nn.functional.normalize(expected, dim=-1), rtol=0, atol=1e-5)
