"""The CLIP semantic feature map: shapes, equality with CLIP's own tower, resizing."""

import pytest
import torch

from regionspot.modeling.semantic_features import ClipSemanticFeatures, resize_positional_embedding
from regionspot.modeling.weights import load_clip
from regionspot.testing.random_backbones import random_clip


@pytest.fixture(scope="module")
def clip_model(clip_path):
    return load_clip(clip_path)


@pytest.mark.parametrize("size,cls,tokens", [(224, True, 197), (224, False, 196), (336, True, 442), (336, False, 441)])
def test_feature_map_shapes(clip_model, size, cls, tokens):
    features = ClipSemanticFeatures(clip_model, size, cls)
    image = torch.randint(0, 256, (3, 240, 400), dtype=torch.uint8)
    out = features(features.preprocess([image, image]))
    assert out.shape == (2, tokens, 64) and out.dtype == torch.float32
    assert features.num_tokens == tokens


def test_official_vit_shapes_from_the_reference():
    """ViT-B/16 at 224 -> 197 x 768 (docs/method.md §3); built with random weights."""
    features = ClipSemanticFeatures(random_clip("ViT-B/16"), 224, True)
    assert features.num_tokens == 197 and features.width == 768 and features.embed_dim == 512


def test_equals_clip_tower_at_native_size(clip_model):
    """All tokens of the last block, before ln_post/proj, as CLIP's own VisionTransformer computes them."""
    features = ClipSemanticFeatures(clip_model, 224, True)
    pixels = features.preprocess([torch.randint(0, 256, (3, 100, 150), dtype=torch.uint8)])
    captured = []
    handle = clip_model.visual.transformer.register_forward_hook(lambda m, i, o: captured.append(o))
    with torch.no_grad():
        clip_model.visual(pixels)
        ours = features(pixels)
    handle.remove()
    torch.testing.assert_close(ours, captured[0].permute(1, 0, 2))
    no_cls = ClipSemanticFeatures(clip_model, 224, False)
    torch.testing.assert_close(no_cls(pixels), ours[:, 1:])


def test_positional_embedding_resize():
    pos = torch.randn(1 + 14 * 14, 8)
    assert resize_positional_embedding(pos, 14) is pos
    big = resize_positional_embedding(pos, 21)
    assert big.shape == (1 + 21 * 21, 8)
    assert torch.equal(big[0], pos[0])  # class position kept
    const = torch.ones(1 + 14 * 14, 8)
    torch.testing.assert_close(resize_positional_embedding(const, 21), torch.ones(1 + 21 * 21, 8))


def test_antialias_is_an_explicit_choice(clip_model):
    image = torch.randint(0, 256, (3, 600, 900), dtype=torch.uint8)
    plain = ClipSemanticFeatures(clip_model, 224, antialias=False).preprocess([image])
    smooth = ClipSemanticFeatures(clip_model, 224, antialias=True).preprocess([image])
    assert plain.shape == smooth.shape == (1, 3, 224, 224)
    assert (plain - smooth).abs().mean() > 1e-3


def test_input_size_must_fit_patches(clip_model):
    with pytest.raises(ValueError, match="multiple of the patch size 16"):
        ClipSemanticFeatures(clip_model, 230)
