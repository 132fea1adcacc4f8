"""VL_MODEL open_clip: an OpenCLIP ViT as RegionSpot's vision-language model, loaded from a
small random model written in the layout OpenCLIP publishes (open_clip_config.json +
open_clip_model.safetensors), through the same loading code as the real folders."""

import json
import os
import subprocess
import sys

import pytest
import torch
from detectron2.modeling import build_model

from conftest import make_cfg
from regionspot.modeling.open_clip_model import load_open_clip
from regionspot.modeling.text_embeddings import PROMPT_TEMPLATES
from regionspot.testing.random_backbones import OPEN_CLIP_PRESETS, write_random_open_clip
from regionspot.weights_files import WeightsError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def open_clip_dir(tmp_path_factory):
    return write_random_open_clip(str(tmp_path_factory.mktemp("open_clip") / "tiny-vit"), seed=1)


def _cfg(sam_path, open_clip_dir, tmp_path, **overrides):
    return make_cfg(sam_path, open_clip_dir, tmp_path / "cache", **{"MODEL.REGIONSPOT.VL_MODEL": "open_clip",
                                                                    **overrides})


def test_the_model_builds_from_keys_alone_and_the_head_follows_its_widths(sam_path, open_clip_dir, tmp_path):
    model = build_model(_cfg(sam_path, open_clip_dir, tmp_path)).eval()
    preset = OPEN_CLIP_PRESETS["tiny"]
    assert model.semantic_encoder.width == preset["vision_cfg"]["width"] == model.head.to_clip.out_features
    assert model.text_classifier.embed_dim == preset["embed_dim"] == model.head.projector.out_features
    assert model.text_classifier.clip is model.semantic_encoder.clip
    assert model.semantic_encoder.pixel_mean.flatten().tolist() == [0.5, 0.5, 0.5]  # the folder's, not OpenAI's
    assert model.text_classifier.weights_id.startswith("open_clip:tiny-vit:file:")


def test_feature_map_and_text_embeddings_equal_open_clips_own_forward(sam_path, open_clip_dir, tmp_path):
    """Parity: the class row of the semantic feature map, through OpenCLIP's ln_post and proj,
    is open_clip's encode_image of the same pixels; the text embeddings are the template
    average of open_clip's encode_text with its own tokenizer."""
    model = build_model(_cfg(sam_path, open_clip_dir, tmp_path)).eval()
    loaded = load_open_clip(open_clip_dir)
    encoder = model.semantic_encoder
    images = [torch.randint(0, 256, (3, 40, 70), dtype=torch.uint8, generator=torch.Generator().manual_seed(i))
              for i in range(2)]
    with torch.no_grad():
        pixels = encoder.preprocess(images)
        feature_map = encoder(pixels)
        pooled = loaded.model.visual.ln_post(feature_map[:, 0]) @ loaded.model.visual.proj
        reference = loaded.model.encode_image(pixels)
    assert feature_map.shape == (2, 1 + (224 // 16) ** 2, OPEN_CLIP_PRESETS["tiny"]["vision_cfg"]["width"])
    torch.testing.assert_close(pooled, reference, rtol=1e-5, atol=1e-5)

    names = ["cat", "traffic_light"]
    embeddings = model.text_classifier.embed(names)
    with torch.no_grad():
        expected = []
        for name in names:
            text = name  # the released class-name style keeps underscores
            feats = loaded.model.encode_text(loaded.tokenizer([t.format(text) for t in PROMPT_TEMPLATES]))
            expected.append(torch.nn.functional.normalize(feats.float().mean(0), dim=-1))
    torch.testing.assert_close(embeddings, torch.stack(expected), rtol=1e-5, atol=1e-5)


def test_its_text_cache_never_serves_another_vl_model(sam_path, clip_path, open_clip_dir, tmp_path):
    open_model = build_model(_cfg(sam_path, open_clip_dir, tmp_path))
    clip_model = build_model(make_cfg(sam_path, clip_path, tmp_path / "cache"))
    names = ["cat", "dog"]
    assert open_model.text_classifier.cache_path(names) != clip_model.text_classifier.cache_path(names)
    a, b = open_model.text_classifier.embed(names), clip_model.text_classifier.embed(names)
    assert a.shape == (2, 24) and b.shape == (2, 32)
    assert os.path.isfile(open_model.text_classifier.cache_path(names))


def test_a_head_trained_on_one_pair_is_refused_on_another(sam_path, open_clip_dir, head_path, tmp_path):
    """Checkpoints record the pair; a head of the released pair (SAM + OpenAI CLIP) is refused by
    an OpenCLIP model, naming both pairs, and a head saved on the OpenCLIP pair loads back."""
    from regionspot.checkpoint import CheckpointError, RegionSpotCheckpointer

    model = build_model(_cfg(sam_path, open_clip_dir, tmp_path))
    assert model.pair == {"localizer": "sam", "vl_model": "open_clip:tiny-vit"}
    with pytest.raises(CheckpointError, match=r"is a head trained on localizer 'sam' \+ vision-language model "
                                              r"'openai_clip', but this model is localizer 'sam' \+ "
                                              r"vision-language model 'open_clip:tiny-vit'"):
        RegionSpotCheckpointer(model).load(head_path)
    RegionSpotCheckpointer(model, save_dir=str(tmp_path / "heads")).save("open_clip_head")
    saved = str(tmp_path / "heads" / "open_clip_head.pth")
    assert torch.load(saved, weights_only=False)["regionspot_pair"] == model.pair
    other = build_model(_cfg(sam_path, open_clip_dir, tmp_path))
    RegionSpotCheckpointer(other).load(saved)
    assert all(torch.equal(a, b) for a, b in zip(model.head.state_dict().values(), other.head.state_dict().values()))


def test_bad_open_clip_inputs_are_clear_errors(sam_path, open_clip_dir, tmp_path):
    weights_file = os.path.join(open_clip_dir, "open_clip_model.safetensors")
    with pytest.raises(WeightsError, match="set MODEL.REGIONSPOT.OPENCLIP_MODEL"):
        load_open_clip(weights_file)
    with pytest.raises(WeightsError, match="OPENCLIP_MODEL 'ViT-Nope' is not an OpenCLIP architecture"):
        load_open_clip(weights_file, "ViT-Nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(WeightsError, match="without open_clip_config.json"):
        load_open_clip(str(empty))
    with pytest.raises(WeightsError, match="does not exist"):
        load_open_clip(str(tmp_path / "missing"))
    # an average-pooled ViT: no class token to pool, refused with the reason
    cfg = json.loads(json.dumps(OPEN_CLIP_PRESETS["tiny"]))
    cfg["vision_cfg"]["pool_type"] = "avg"
    avg = write_random_open_clip(str(tmp_path / "avg"), model_cfg=cfg)
    with pytest.raises(WeightsError, match="pools with 'avg'.*class-token ViT"):
        load_open_clip(avg)
    # a tokenizer OpenCLIP would download: the key to set is named
    cfg = json.loads(json.dumps(OPEN_CLIP_PRESETS["tiny"]))
    cfg["text_cfg"]["hf_tokenizer_name"] = "some-org/some-tokenizer"
    hub = str(tmp_path / "hub")
    os.makedirs(hub)
    with open(os.path.join(hub, "open_clip_config.json"), "w") as f:
        json.dump({"model_cfg": cfg}, f)
    with open(os.path.join(hub, "open_clip_model.safetensors"), "wb") as f:
        f.write(b"")
    with pytest.raises(WeightsError, match="'some-org/some-tokenizer' lives on the Hugging Face hub; set "
                                           "MODEL.REGIONSPOT.OPENCLIP_TOKENIZER"):
        load_open_clip(hub)


def test_train_net_trains_and_evaluates_on_the_sample_with_open_clip(sam_path, open_clip_dir, tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, DETECTRON2_DATASETS=str(tmp_path / "datasets"), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "train_net.py"), "--config-file",
         os.path.join(REPO, "configs", "regionspot_sample_cpu.yaml"),
         "MODEL.REGIONSPOT.VL_MODEL", "open_clip", "MODEL.REGIONSPOT.CLIP_WEIGHTS", open_clip_dir,
         "MODEL.REGIONSPOT.SAM_WEIGHTS", sam_path, "MODEL.REGIONSPOT.TEXT_CACHE_DIR", str(tmp_path / "cache"),
         "SOLVER.MAX_ITER", "2", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "1", "OUTPUT_DIR", str(out)],
        cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert os.path.isfile(out / "model_final.pth")
    assert "bbox AP on regionspot_sample:" in proc.stdout


@pytest.mark.parametrize("config", ["regionspot_sam_openclip_b16.yaml", "regionspot_sam_openclip_b16_stage1.yaml"])
def test_the_open_clip_configs_build_with_their_folder(config, sam_path, open_clip_dir, tmp_path):
    from regionspot.config import load_config

    cfg = load_config(os.path.join(REPO, "configs", config))
    assert cfg.MODEL.REGIONSPOT.VL_MODEL == "open_clip" and cfg.MODEL.REGIONSPOT.LOCALIZER == "sam"
    cfg.MODEL.REGIONSPOT.SAM_WEIGHTS, cfg.MODEL.REGIONSPOT.CLIP_WEIGHTS = sam_path, open_clip_dir
    cfg.MODEL.REGIONSPOT.TEXT_CACHE_DIR, cfg.MODEL.DEVICE = str(tmp_path / "cache"), "cpu"
    model = build_model(cfg)
    assert model.pair["vl_model"] == "open_clip:tiny-vit"


def test_the_dump_tool_fills_the_cache_an_open_clip_model_reads(sam_path, open_clip_dir, tmp_path, capsys):
    from conftest import load_tool

    dump = load_tool("dump_text_embeddings")
    cache = tmp_path / "cache"
    argv = ["--config-file", os.path.join(REPO, "configs", "regionspot_sample_cpu.yaml"), "--vocabulary", "custom",
            "--custom-vocabulary", "cat,dog", "--opts", "MODEL.REGIONSPOT.VL_MODEL", "open_clip",
            "MODEL.REGIONSPOT.CLIP_WEIGHTS", open_clip_dir, "MODEL.REGIONSPOT.TEXT_CACHE_DIR", str(cache)]
    assert dump.main(argv) == 0
    assert "2 classes x 81 templates" in capsys.readouterr().out
    model = build_model(_cfg(sam_path, open_clip_dir, tmp_path))
    written = model.text_classifier.cache_path(["cat", "dog"])
    assert os.path.dirname(written) == str(cache) and os.path.isfile(written)
