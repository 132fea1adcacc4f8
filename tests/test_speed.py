"""The speed switches: SDPA attention, batched inference, tokens without masks, loader-side
resizes, encoder precision and torch.compile, each against the plain path."""

import numpy as np
import pytest
import torch
from detectron2.structures import BoxMode
from PIL import Image

from conftest import build_tiny_model, make_cfg
from regionspot.data.build import build_batched_test_loader, inference_batch_size
from regionspot.data.mapper import RegionSpotDatasetMapper
from regionspot.modeling.fast_attention import sam_attention_kind, set_sam_attention
from regionspot.modeling.precision import resolve_encoder_precision
from regionspot.testing.random_backbones import random_sam

SIZES = [(300, 450), (420, 280), (256, 256), (333, 500), (200, 380)]


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """Five photos of different sizes with 0-4 boxes each, as Detectron2 dataset dicts."""
    folder = tmp_path_factory.mktemp("speed_photos")
    rng = np.random.RandomState(0)
    out = []
    for i, (h, w) in enumerate(SIZES):
        path = str(folder / f"p{i}.jpg")
        Image.fromarray((rng.rand(h, w, 3) * 255).astype(np.uint8)).save(path)
        boxes = []
        for _ in range(i % 5):
            x0, y0 = rng.uniform(0, w - 40), rng.uniform(0, h - 40)
            boxes.append([x0, y0, x0 + rng.uniform(20, w - x0), y0 + rng.uniform(20, h - y0)])
        out.append({"file_name": path, "height": h, "width": w, "image_id": i + 1,
                    "annotations": [{"bbox": b, "bbox_mode": BoxMode.XYXY_ABS, "category_id": i % 4, "iscrowd": 0}
                                    for b in boxes]})
    return out


def _outputs(model, batches):
    out = []
    with torch.no_grad():
        for batch in batches:
            out.extend(r["instances"] for r in model(batch))
    return out


def _assert_same_detections(a, b, atol=1e-5):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert len(x) == len(y) and x.image_size == y.image_size
        torch.testing.assert_close(x.scores, y.scores, rtol=0, atol=atol)
        assert torch.equal(x.pred_classes, y.pred_classes)
        torch.testing.assert_close(x.pred_boxes.tensor, y.pred_boxes.tensor, rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------- SDPA attention
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sdpa_attention_equals_the_official_forward(dtype):
    """Windowed and global blocks, with (random, non-zero) relative-position tables."""
    sam = random_sam("tiny", seed=3)
    encoder = sam.image_encoder
    assert any(p.abs().max() > 0 for n, p in encoder.named_parameters() if "rel_pos" in n)
    x = torch.randn(2, 3, encoder.img_size, encoder.img_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        official = encoder(x).float()
        assert set_sam_attention(encoder, "sdpa") == 2 and sam_attention_kind(encoder) == "sdpa"
        fast = encoder(x).float()
        set_sam_attention(encoder, "official")
        assert sam_attention_kind(encoder) == "official"
        again = encoder(x).float()
    assert torch.equal(again, official)  # switching back restores segment_anything's own forward
    tolerance = 1e-5 if dtype == torch.float32 else 0.1
    assert (fast - official).abs().max() <= tolerance * official.abs().max()
    assert (fast - official).abs().max() > 0 or dtype == torch.float32


def test_sdpa_attention_bias_is_the_decomposed_relative_position_term():
    """The bias added inside SDPA is exactly what add_decomposed_rel_pos adds to q k^T."""
    from segment_anything.modeling.image_encoder import add_decomposed_rel_pos

    from regionspot.modeling.fast_attention import relative_position_bias

    sam = random_sam("tiny", seed=1)
    attention = next(m for m in sam.image_encoder.modules() if type(m).__name__ == "Attention")
    h = w = 14
    q = torch.randn(4, h * w, attention.rel_pos_h.shape[1])
    zeros = torch.zeros(4, h * w, h * w)
    expected = add_decomposed_rel_pos(zeros, q, attention.rel_pos_h, attention.rel_pos_w, (h, w), (h, w))
    torch.testing.assert_close(relative_position_bias(q, attention, (h, w)), expected, rtol=0, atol=1e-6)


def test_sdpa_attention_in_row_chunks_equals_one_call(monkeypatch):
    """Queries taken a few token rows at a time (each with its slice of the bias) give exactly
    the output of one SDPA call with the whole bias, with and without autograd."""
    from regionspot.modeling import fast_attention

    sam = random_sam("tiny", seed=5)
    encoder = sam.image_encoder.eval()
    x = torch.randn(2, 3, encoder.img_size, encoder.img_size, generator=torch.Generator().manual_seed(1))
    set_sam_attention(encoder, "sdpa")
    calls = []
    sdpa = fast_attention.F.scaled_dot_product_attention

    def counting(q, *args, **kwargs):
        calls.append(q.shape[-2])  # queries in this call
        return sdpa(q, *args, **kwargs)

    monkeypatch.setattr(fast_attention.F, "scaled_dot_product_attention", counting)
    monkeypatch.setattr(fast_attention, "BIAS_CHUNK_ELEMENTS", 1 << 40)
    with torch.no_grad():
        whole = encoder(x)
    whole_calls = list(calls)
    calls.clear()
    monkeypatch.setattr(fast_attention, "BIAS_CHUNK_ELEMENTS", 1)  # one token row per call
    with torch.no_grad():
        chunked = encoder(x)
    assert len(calls) > len(whole_calls) and max(calls) < max(whole_calls)
    # the same attention over fewer query rows per call: equal up to the kernel's rounding, which
    # may depend on the number of rows (a wrong bias slice would change the output by O(1))
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-5)
    with_grad = encoder(x)
    with_grad.sum().backward()
    rel = next(p for n, p in encoder.named_parameters() if "rel_pos" in n)
    assert rel.grad is not None and rel.grad.abs().sum() > 0
    torch.testing.assert_close(with_grad.detach(), whole, rtol=0, atol=1e-5)  # autograd: another SDPA kernel


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sdpa_encoder_on_the_meta_device(dtype):
    """The GPU-shaped call (a batch of 4, half precision, the whole encoder through the SDPA
    forwards) on torch's meta device: shapes and dtypes hold without running any kernel."""
    sam = random_sam("tiny", seed=2)
    encoder = sam.image_encoder.to(device="meta", dtype=dtype).eval()
    set_sam_attention(encoder, "sdpa")
    with torch.no_grad():
        out = encoder(torch.empty(4, 3, encoder.img_size, encoder.img_size, device="meta", dtype=dtype))
    assert out.device.type == "meta" and out.dtype == dtype
    assert out.shape == (4, sam.prompt_encoder.embed_dim, *sam.prompt_encoder.image_embedding_size)


def test_attention_switch_errors():
    with pytest.raises(ValueError, match="SAM attention must be one of"):
        set_sam_attention(random_sam("tiny").image_encoder, "flash")
    with pytest.raises(ValueError, match="no segment_anything attention layer"):
        set_sam_attention(torch.nn.Linear(2, 2), "sdpa")


# ----------------------------------------------------------------------------- batching
def test_batched_loader_and_model_give_the_per_image_results(sam_path, clip_path, tmp_path, records):
    """TEST.IMS_PER_BATCH 3 (encoders and decoder once per batch, resizes in the loader) gives
    what one image at a time with the model's own resizes gives."""
    plain_cfg = make_cfg(sam_path, clip_path, tmp_path / "t", **{"TEST.IMS_PER_BATCH": 1,
                                                                   "MODEL.REGIONSPOT.LOADER_RESIZE": False})
    fast_cfg = make_cfg(sam_path, clip_path, tmp_path / "t", **{"TEST.IMS_PER_BATCH": 3})
    model = build_tiny_model(plain_cfg).eval()
    plain_batches = list(build_batched_test_loader(plain_cfg, records, RegionSpotDatasetMapper(plain_cfg, False)))
    fast_batches = list(build_batched_test_loader(fast_cfg, records, RegionSpotDatasetMapper(fast_cfg, False)))
    assert [len(b) for b in plain_batches] == [1] * 5 and [len(b) for b in fast_batches] == [3, 2]
    assert "sam_input" not in plain_batches[0][0] and "clip_input" not in plain_batches[0][0]
    first = fast_batches[0][0]
    assert first["sam_input"].dtype == torch.uint8 and max(first["sam_input"].shape[-2:]) == 256  # tiny SAM
    assert first["clip_input"].shape == (3, 224, 224) and first["clip_input"].dtype == torch.float32

    calls = []
    encoder = model.localizer.sam.image_encoder
    hook = encoder.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        plain = _outputs(model, plain_batches)
        assert calls == [1] * 5
        calls.clear()
        fast = _outputs(model, fast_batches)
        assert calls == [3, 2]  # SAM's encoder once per batch
    finally:
        hook.remove()
    assert [len(r) for r in plain] == [min(900, len(d["annotations"]) * 4) for d in records]
    _assert_same_detections(fast, plain)


def test_inference_batch_size_auto(tiny_cfg):
    cfg = tiny_cfg.clone()
    cfg.TEST.IMS_PER_BATCH = 0
    assert inference_batch_size(cfg) == 1
    cfg.MODEL.DEVICE = "cuda"
    assert inference_batch_size(cfg) == 16
    cfg.TEST.IMS_PER_BATCH = 5
    assert inference_batch_size(cfg) == 5


# ----------------------------------------------------------------------------- masks only when needed
def test_masks_are_decoded_only_when_needed(tiny_cfg, records, monkeypatch):
    model = build_tiny_model(tiny_cfg).eval()
    inputs = [RegionSpotDatasetMapper(tiny_cfg, False)(records[3])]
    upscaled = []
    hook = model.localizer.sam.mask_decoder.output_upscaling.register_forward_hook(lambda *a: upscaled.append(1))
    try:
        model.mask_on = False
        without = _outputs(model, [inputs])
        assert not upscaled and not without[0].has("pred_masks")
        model.mask_on = True
        with_masks = _outputs(model, [inputs])
        assert upscaled and with_masks[0].has("pred_masks")
    finally:
        hook.remove()
    _assert_same_detections(without, with_masks, atol=0)  # the same tokens either way
    from regionspot.modeling.postprocess import RecognitionProtocol

    assert model.needs_sam_masks(RecognitionProtocol(selection="tap"), mask_on=False)
    assert not model.needs_sam_masks(RecognitionProtocol(), mask_on=False)


def test_postprocess_refuses_masks_that_were_not_computed(tiny_model, tiny_cfg, records):
    inputs = [RegionSpotDatasetMapper(tiny_cfg, False)(records[2])]
    with torch.no_grad():
        features = tiny_model.encode_images([inputs[0]["image"]])
        proposals = tiny_model.propose(inputs, features)
        recognition = tiny_model.recognize(features, proposals, tiny_model.text_embeddings, with_masks=False)[0]
        assert recognition.low_res_masks is None and recognition.iou_predictions is None
        with pytest.raises(RuntimeError, match="SAM's masks were not computed"):
            tiny_model.postprocess(recognition, (10, 10), mask_on=True)


# ----------------------------------------------------------------------------- precision
def test_encoder_precision_resolution():
    assert resolve_encoder_precision("auto", torch.device("cuda")) == torch.float16  # the released autocast
    assert resolve_encoder_precision("auto", torch.device("cpu")) == torch.float32
    assert resolve_encoder_precision("bfloat16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ValueError, match="ENCODER_PRECISION must be one of"):
        resolve_encoder_precision("int8", torch.device("cpu"))


def test_bfloat16_on_a_cpu_without_native_support_is_named_once(tmp_path, monkeypatch, caplog):
    """bfloat16 encoders on a CPU whose flags list no AVX512-BF16/AMX/BF16: one warning per
    process (emulated bfloat16 ran 7.9x slower than float32 on an AVX2 AMD EPYC); none where the
    CPU has it, none for float32."""
    from regionspot.modeling import precision

    emulated = tmp_path / "cpuinfo_avx2"
    emulated.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n")
    native = tmp_path / "cpuinfo_amx"
    native.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16\n")
    assert precision.cpu_flags(str(native)) >= {"avx512_bf16", "amx_bf16"}
    assert precision.cpu_flags(str(tmp_path / "missing")) is None
    read = precision.cpu_flags
    for info, expected in ((native, 0), (emulated, 1)):
        monkeypatch.setattr(precision, "_warned_emulated_bfloat16", False)
        monkeypatch.setattr(precision, "cpu_flags", lambda path=str(info): read(path))
        caplog.clear()
        with caplog.at_level("WARNING", logger=precision.__name__):
            for _ in range(3):
                assert precision.resolve_encoder_precision("bfloat16", "cpu") == torch.bfloat16
            assert precision.resolve_encoder_precision("float32", "cpu") == torch.float32
        lines = [r.getMessage() for r in caplog.records if "without native bfloat16" in r.getMessage()]
        assert len(lines) == expected, lines
    assert "slower than float32" in lines[0] and "ENCODER_PRECISION" in lines[0]




@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_reduced_precision_encoders_on_the_cpu(tiny_cfg, records, precision):
    """bfloat16 (the optional CPU path) and float16 (the CUDA default's code path, run here on
    the CPU since CI has no GPU): the encoders really run in that dtype, results stay sane."""
    model = build_tiny_model(tiny_cfg).eval()
    inputs = [RegionSpotDatasetMapper(tiny_cfg, False)(r) for r in records[1:3]]
    reference = _outputs(model, [inputs])
    model.localizer.precision = model.semantic_encoder.precision = precision
    dtype = getattr(torch, precision)
    assert model.localizer.dtype == model.semantic_encoder.dtype == dtype
    dtypes = []
    hooks = [model.localizer.sam.image_encoder.blocks[0].attn.qkv.register_forward_hook(
                 lambda m, i, o: dtypes.append(o.dtype)),
             model.semantic_encoder.clip.visual.conv1.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))]
    try:
        with torch.no_grad():
            model.encode_images([x["image"] for x in inputs])
    finally:
        for h in hooks:
            h.remove()
    assert dtypes == [dtype, dtype]  # SAM and CLIP really ran in that precision
    fast = _outputs(model, [inputs])
    assert [len(r) for r in fast] == [len(r) for r in reference]
    assert all(torch.isfinite(r.scores).all() for r in fast)


# ----------------------------------------------------------------------------- compile
def test_compiled_encoders_give_the_same_features_and_keep_the_checkpoint_keys(tiny_cfg, records):
    model = build_tiny_model(tiny_cfg).eval()
    keys = list(model.state_dict())
    images = [RegionSpotDatasetMapper(tiny_cfg, False)(r)["image"] for r in records[:2]]
    with torch.no_grad():
        eager = model.encode_images(images)
        model.compile_encoders()
        compiled = model.encode_images(images)
    assert list(model.state_dict()) == keys  # checkpoints load and save as before
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a.sam_embedding, b.sam_embedding, rtol=0, atol=1e-4)
        torch.testing.assert_close(a.semantic, b.semantic, rtol=0, atol=1e-4)
