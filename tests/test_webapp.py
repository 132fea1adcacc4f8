"""The web app's logic without a browser (regionspot.webapp.RegionSpotApp): sessions never see
each other's image, vocabulary or results; each bad input is a one-line message; clicks make
boxes and points; the JSON of the predictions is written per session."""

import json

import numpy as np
import pytest
from PIL import Image

from regionspot.data.validation import InputError
from regionspot.webapp import BOXES, EVERYTHING, POINTS, RegionSpotApp

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def app(tiny_model):
    return RegionSpotApp(tiny_model, 256, 512, sample=True, max_pixels=200_000)


@pytest.fixture
def photos(tmp_path):
    rng = np.random.RandomState(0)
    paths = []
    for name, size in (("a.png", (240, 320)), ("b.png", (200, 260))):
        Image.fromarray((rng.rand(*size, 3) * 255).astype(np.uint8)).save(tmp_path / name)
        paths.append(str(tmp_path / name))
    return paths


def test_sessions_are_isolated(app, photos):
    app.set_image("alice", photos[0])
    app.set_image("bob", photos[1])
    app.click("alice", BOXES, 10, 10)
    app.click("alice", BOXES, 200, 150)
    app.click("bob", BOXES, 5, 5)
    app.click("bob", BOXES, 100, 120)
    app.click("bob", BOXES, 120, 20)
    app.click("bob", BOXES, 250, 190)
    app.recognise("alice", "cat, dog", BOXES)
    app.recognise("bob", "car, tree, sky", BOXES)
    alice, bob = app.session("alice"), app.session("bob")
    assert alice.image.shape == (240, 320, 3) and bob.image.shape == (200, 260, 3)
    assert alice.predictions.vocabulary == ["cat", "dog"] and bob.predictions.vocabulary == ["car", "tree", "sky"]
    assert len(alice.predictions.labels) == 1 and len(bob.predictions.labels) == 2
    assert alice.predictor is not bob.predictor and alice.predictor.model is bob.predictor.model
    assert alice.folder != bob.folder
    saved = json.loads(open(app.json_path("alice")).read())
    assert saved["image"] == "a.png" and len(saved["predictions"]) == 1 and saved["random_weights"] is True
    assert len(saved["predictions"][0]["top_classes"]) == 2
    assert [len(row) for row in app.table("bob")] == [7, 7]
    assert app.attention_image("bob", app.region_choices("bob")[1]).shape[2] == 3


def test_messages_for_bad_inputs(app, photos, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a photo")
    with pytest.raises(InputError, match="notes.txt is not an image"):
        app.set_image("k", str(text))
    big = tmp_path / "big.png"
    Image.new("RGB", (600, 400)).save(big)
    with pytest.raises(InputError, match="too large: 240,000 pixels"):
        app.set_image("k", str(big))
    with pytest.raises(InputError, match="upload a photo"):
        app.recognise("k", "cat", EVERYTHING)
    app.set_image("k", photos[0])
    with pytest.raises(ValueError, match="vocabulary is empty"):
        app.recognise("k", " , \n", EVERYTHING)
    with pytest.raises(ValueError, match="duplicate"):
        app.recognise("k", "cat, Cat", EVERYTHING)
    with pytest.raises(InputError, match="no boxes yet"):
        app.recognise("k", "cat", BOXES)
    app.click("k", POINTS, 50, 50, negative=True)
    with pytest.raises(InputError, match="no positive click"):
        app.recognise("k", "cat", POINTS)
    assert "opposite corner" in app.click("k", BOXES, 10, 10)
    assert "too small" in app.click("k", BOXES, 11, 11)


def test_points_and_a_new_image_clears_the_prompts(app, photos):
    app.set_image("k", photos[0])
    app.click("k", POINTS, 100, 80)
    status, count = app.recognise("k", "cat, dog", POINTS)
    assert count in (0, 1) and ("1 region(s)" in status or "No regions found" in status)
    assert app.prompt_image("k").shape == (240, 320, 3)
    app.set_image("k", photos[1])
    assert app.session("k").points == [] and app.session("k").predictions is None


def test_sessions_are_bounded(tiny_model, photos):
    app = RegionSpotApp(tiny_model, 256, 512, max_sessions=2)
    for key in ("a", "b", "c"):
        app.session(key)
    assert list(app.sessions) == ["b", "c"]
    app.forget("b")
    assert list(app.sessions) == ["c"]


def test_a_mask_prompt_alone_or_with_clicks(app, photos, tmp_path):
    """A mask image of the photo (any resolution, same aspect ratio) is a prompt in Points mode,
    alone or with clicks; bad masks are one-line messages; Clear drops it."""
    app.set_image("carol", photos[0])  # 320 x 240
    mask = np.zeros((120, 160), np.uint8)  # half resolution
    mask[20:80, 30:110] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    assert "4,800 pixels" in app.set_mask("carol", str(tmp_path / "mask.png"))
    status, count = app.recognise("carol", "cat, dog", POINTS)
    assert count == 1, status
    alone = app.session("carol").predictions
    app.click("carol", POINTS, 100.0, 90.0)
    _, count = app.recognise("carol", "cat, dog", POINTS)
    assert count == 1 and not np.array_equal(app.session("carol").predictions.masks, alone.masks)
    Image.fromarray(np.zeros((100, 300), np.uint8)).save(tmp_path / "wide.png")
    with pytest.raises(InputError, match="same aspect ratio"):
        app.set_mask("carol", str(tmp_path / "wide.png"))
    Image.fromarray(np.zeros((120, 160), np.uint8)).save(tmp_path / "empty.png")
    with pytest.raises(InputError, match="is empty"):
        app.set_mask("carol", str(tmp_path / "empty.png"))
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(InputError, match="is not an image"):
        app.set_mask("carol", str(tmp_path / "notes.txt"))
    app.clear_prompts("carol")
    with pytest.raises(InputError, match="no positive click"):
        app.recognise("carol", "cat, dog", POINTS)
