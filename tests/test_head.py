"""The head: released parameter names, shapes and counts; padding; logits."""

import pytest
import torch

from regionspot.modeling.head import RegionSpotHead, region_logits


def released_shapes(d, e, layers=3):
    """The checkpoint table of docs/method.md §4, without the `model.` prefix."""
    shapes = {"to_clip.weight": (d, 256), "to_clip.bias": (d,),
              "decoder.norm.weight": (d,), "decoder.norm.bias": (d,),
              "projector.weight": (e, d), "projector.bias": (e,)}
    for i in range(layers):
        p = f"decoder.layers.{i}."
        for attn in ("self_attn", "multihead_attn"):
            shapes.update({p + attn + ".in_proj_weight": (3 * d, d), p + attn + ".in_proj_bias": (3 * d,),
                           p + attn + ".out_proj.weight": (d, d), p + attn + ".out_proj.bias": (d,)})
        shapes.update({p + "linear1.weight": (2048, d), p + "linear1.bias": (2048,),
                       p + "linear2.weight": (d, 2048), p + "linear2.bias": (d,)})
        for n in (1, 2, 3):
            shapes.update({p + f"norm{n}.weight": (d,), p + f"norm{n}.bias": (d,)})
    return shapes


@pytest.mark.parametrize("variant,d,e,count", [("BB", 768, 512, 24_226_304), ("BL", 1024, 768, 38_853_376)])
def test_released_names_shapes_and_counts(variant, d, e, count):
    head = RegionSpotHead(256, d, e)
    state = head.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == released_shapes(d, e)
    assert len(state) == 60
    assert sum(p.numel() for p in head.parameters()) == count


def test_depth_is_configurable():
    assert len(RegionSpotHead(256, 64, 32, num_layers=6).decoder.layers) == 6


def test_padding_does_not_change_real_regions():
    torch.manual_seed(0)
    head = RegionSpotHead(256, 64, 32, dropout=0.0).eval()
    features = torch.randn(2, 10, 64)
    a, b = torch.randn(3, 256), torch.randn(5, 256)
    padded = torch.zeros(2, 5, 256)
    padded[0, :3], padded[1] = a, b
    mask = torch.tensor([[False] * 3 + [True] * 2, [False] * 5])
    with torch.no_grad():
        batched = head(padded, features, mask)
        alone = head(a[None], features[:1])
        garbage = padded.clone()
        garbage[0, 3:] = 100.0  # padded slots must not leak into real ones
        batched2 = head(garbage, features, mask)
    torch.testing.assert_close(batched[0, :3], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched2[0, :3], batched[0, :3], atol=1e-5, rtol=1e-5)


def test_cross_attention_reads_the_feature_map():
    torch.manual_seed(0)
    head = RegionSpotHead(256, 64, 32, dropout=0.0).eval()
    tokens = torch.randn(1, 2, 256)
    with torch.no_grad():
        assert (head(tokens, torch.randn(1, 10, 64)) - head(tokens, torch.randn(1, 10, 64))).abs().max() > 1e-3


def test_region_logits_are_scaled_cosines():
    regions = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    logits = region_logits(regions, text, 100.0)
    torch.testing.assert_close(logits, torch.tensor([[100.0, 0.0], [70.7107, 70.7107]]))


def test_attention_path_equals_the_decoder_and_rows_are_distributions():
    """return_attention runs the decoder layer by layer (paper Fig. 4's maps): the same embeddings
    as nn.TransformerDecoder, with padding, and one distribution over the L tokens per layer."""
    torch.manual_seed(0)
    head = RegionSpotHead(256, 64, 32, dropout=0.0).eval()
    tokens, features = torch.randn(2, 4, 256), torch.randn(2, 10, 64)
    mask = torch.tensor([[False] * 3 + [True], [False] * 4])
    with torch.no_grad():
        plain = head(tokens, features, mask)
        recorded, attention = head(tokens, features, mask, return_attention=True)
    torch.testing.assert_close(recorded, plain, rtol=1e-5, atol=1e-5)
    assert attention.shape == (2, 3, 4, 10) and attention.dtype == torch.float32
    torch.testing.assert_close(attention.sum(-1), torch.ones(2, 3, 4))
    # a feature-map token that matches nothing special still gets a share; the maps differ by layer
    assert not torch.allclose(attention[:, 0], attention[:, 1])


def test_embed_regions_returns_per_image_attention():
    torch.manual_seed(0)
    head = RegionSpotHead(256, 64, 32, dropout=0.0).eval()
    tokens, features = [torch.randn(2, 256), torch.randn(5, 256)], torch.randn(2, 10, 64)
    with torch.no_grad():
        plain = head.embed_regions(tokens, features)
        embeddings, attention = head.embed_regions(tokens, features, return_attention=True)
    assert [a.shape for a in attention] == [(2, 3, 10), (5, 3, 10)]
    for p, e in zip(plain, embeddings):
        torch.testing.assert_close(e, p, rtol=1e-5, atol=1e-5)


def test_attention_is_not_recorded_when_off(monkeypatch):
    """Off, the plain decoder runs: no layer-by-layer path, no attention weights asked of any layer."""
    head = RegionSpotHead(256, 64, 32).eval()
    calls = []
    monkeypatch.setattr(head, "forward_with_attention", lambda *a, **k: calls.append(1))
    for layer in head.decoder.layers:
        original = layer.multihead_attn.forward

        def spy(*args, _original=original, **kwargs):
            calls.append(kwargs.get("need_weights"))
            return _original(*args, **kwargs)
        monkeypatch.setattr(layer.multihead_attn, "forward", spy)
    with torch.no_grad():
        head.embed_regions([torch.randn(2, 256)], torch.randn(1, 10, 64))
    assert calls == [False, False, False]
