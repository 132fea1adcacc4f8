"""Loading SAM and CLIP from files in the official formats (random weights)."""

import pytest
import torch

from regionspot.modeling.weights import WeightsError, load_clip, load_sam, sam_architecture
from regionspot.testing.random_backbones import SAM_PRESETS, random_sam, write_random_clip


@pytest.mark.parametrize("preset", ["tiny", "vit_b"])
def test_sam_architecture_read_from_state_dict(preset):
    arch = sam_architecture(random_sam(preset).state_dict())
    expected = SAM_PRESETS[preset]
    assert arch["embed_dim"] == expected["embed_dim"]
    assert arch["depth"] == expected["depth"]
    assert arch["num_heads"] == expected["num_heads"]
    assert arch["global_attn_indexes"] == expected["global_attn_indexes"]
    assert arch["img_size"] == expected.get("img_size", 1024)


def test_load_sam_roundtrip(sam_path):
    sam = load_sam(sam_path)
    saved = torch.load(sam_path, weights_only=True)
    assert set(sam.state_dict()) == set(saved)
    assert all(torch.equal(sam.state_dict()[k], v) for k, v in saved.items())
    assert not any(p.requires_grad for p in sam.parameters())


def test_clip_jit_archive_and_state_dict_load_the_same(tmp_path, clip_path):
    plain = write_random_clip(str(tmp_path / "plain.pt"), "tiny", seed=0, jit=False)
    a, b = load_clip(clip_path), load_clip(plain)
    # the archive carries OpenAI's extra entries, like the official ViT-B-16.pt
    assert {"input_resolution", "context_length", "vocab_size"} <= set(torch.jit.load(clip_path).state_dict())
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.visual.input_resolution == 224 and a.visual.conv1.out_channels == 64


@pytest.mark.parametrize("loader,name,url_part", [
    (load_sam, "sam_vit_b_01ec64.pth", "dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth"),
    (load_clip, "ViT-L-14.pt", "openaipublic.azureedge.net/clip/models/"),
])
def test_missing_weights_file_names_the_official_file(tmp_path, loader, name, url_part):
    with pytest.raises(WeightsError) as e:
        loader(str(tmp_path / name))
    message = str(e.value)
    assert name in message and url_part in message and "MODEL.REGIONSPOT." in message


def test_corrupt_weights_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "sam_vit_b_01ec64.pth"
    bad.write_bytes(b"this is not a checkpoint")
    with pytest.raises(WeightsError, match="cannot read SAM weights"):
        load_sam(str(bad))
    with pytest.raises(WeightsError, match="cannot load CLIP weights"):
        load_clip(str(bad))


def test_sam_file_holding_something_else(tmp_path):
    path = tmp_path / "sam.pth"
    torch.save({"weight": torch.zeros(2)}, path)
    with pytest.raises(WeightsError, match="not a SAM state dict"):
        load_sam(str(path))
