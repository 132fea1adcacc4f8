"""A user's own LVIS- or COCO-format dataset, registered and evaluated (or trained on) from the
command line alone, with its own vocabulary; runs never write over their inputs."""

import json
import os

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

import train_net
from conftest import REPO
from regionspot.data.datasets.regionspot_sample import prepare_regionspot_sample
from regionspot.data.datasets.user import load_dataset_json, register_dataset
from regionspot.data.validation import InputError


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("photos"))
    json_path, image_root = prepare_regionspot_sample(root)
    return json.load(open(json_path)), image_root


def _user_json(sample, path, fmt):
    """The sample as a user would have it: only the categories it uses (LVIS ids, not 1..N);
    LVIS style with coco_url only, or COCO style with file_name and no LVIS fields."""
    data, _ = sample
    used = {a["category_id"] for a in data["annotations"]}
    categories = [c for c in data["categories"] if c["id"] in used]
    images = []
    for img in data["images"]:
        entry = {"id": img["id"], "height": img["height"], "width": img["width"]}
        if fmt == "lvis":
            entry.update(coco_url=f"http://images.example.org/val2017/{img['file_name']}",
                         neg_category_ids=[], not_exhaustive_category_ids=[])
        else:
            entry["file_name"] = img["file_name"]
        images.append(entry)
    if fmt == "coco":
        categories = [{"id": c["id"], "name": c["name"]} for c in categories]
    annotations = [dict(a) for a in data["annotations"]]
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return str(path), sorted(c["name"] for c in categories)


def _eval(tmp_path, sam_path, clip_path, name, json_path, image_root, *opts):
    out = str(tmp_path / f"eval_{name}")
    argv = ["--config-file", os.path.join(REPO, "configs", "regionspot_sample_cpu.yaml"), "--eval-only",
            "--untrained-head", "--register", name, json_path, image_root, "MODEL.REGIONSPOT.SAM_WEIGHTS", sam_path,
            "MODEL.REGIONSPOT.CLIP_WEIGHTS", clip_path, "MODEL.REGIONSPOT.TEXT_CACHE_DIR", str(tmp_path / "cache"),
            "OUTPUT_DIR", out, "DATASETS.TEST", f"('{name}',)", *opts]
    results = train_net.main(train_net.get_parser().parse_args(argv))
    return results[name], json.load(open(os.path.join(out, "inference", name, "metrics.json"))), out


# every test forgets the datasets it registered (conftest.forget_new_datasets)
pytestmark = pytest.mark.usefixtures("forget_new_datasets")


def test_an_lvis_json_with_its_own_vocabulary(tmp_path, sample, sam_path, clip_path, monkeypatch):
    monkeypatch.chdir(REPO)
    json_path, names = _user_json(sample, tmp_path / "mine_lvis.json", "lvis")
    _, image_root = sample
    results, metrics, out = _eval(tmp_path, sam_path, clip_path, "my_lvis_photos", json_path, image_root)
    assert {"AP", "APr", "APc", "APf"} <= set(results["bbox"])
    assert f"softmax over {len(names)} classes" in metrics["protocol"]["description"]
    assert sorted(MetadataCatalog.get("my_lvis_photos").thing_classes) == names
    detections = json.load(open(os.path.join(out, "inference", "my_lvis_photos", "lvis_instances_results.json")))
    used = {a["category_id"] for a in sample[0]["annotations"]}
    assert detections and {d["category_id"] for d in detections} <= used  # the json's own category ids


def test_a_coco_json_is_evaluated_with_the_coco_evaluator(tmp_path, sample, sam_path, clip_path, monkeypatch):
    monkeypatch.chdir(REPO)
    json_path, names = _user_json(sample, tmp_path / "mine_coco.json", "coco")
    results, metrics, _ = _eval(tmp_path, sam_path, clip_path, "my_coco_photos", json_path, sample[1])
    assert {"AP", "AP50", "AP75"} <= set(results["bbox"]) and "APr" not in results["bbox"]
    assert MetadataCatalog.get("my_coco_photos").evaluator_type == "coco"


def test_training_on_a_registered_dataset(tmp_path, sample, sam_path, clip_path, monkeypatch):
    monkeypatch.chdir(REPO)
    json_path, _ = _user_json(sample, tmp_path / "train.json", "coco")
    out = str(tmp_path / "train")
    argv = ["--config-file", "configs/regionspot_sample_cpu.yaml", "--register", "my_train", json_path, sample[1],
            "MODEL.REGIONSPOT.SAM_WEIGHTS", sam_path, "MODEL.REGIONSPOT.CLIP_WEIGHTS", clip_path,
            "MODEL.REGIONSPOT.TEXT_CACHE_DIR", str(tmp_path / "cache"), "OUTPUT_DIR", out,
            "DATASETS.TRAIN", "('my_train',)", "DATASETS.TEST", "()", "SOLVER.MAX_ITER", "2",
            "SOLVER.IMS_PER_BATCH", "2"]
    train_net.main(train_net.get_parser().parse_args(argv))
    assert os.path.exists(os.path.join(out, "model_final.pth"))


def test_image_paths_from_coco_url_and_file_name(tmp_path, sample):
    json_path, _ = _user_json(sample, tmp_path / "urls.json", "lvis")
    _, image_root = sample
    records = load_dataset_json(json_path, image_root)  # no "val2017" folder: the name in the root
    assert all(os.path.isfile(r["file_name"]) for r in records)
    os.makedirs(tmp_path / "root" / "val2017")
    for r in records[:1]:
        os.symlink(r["file_name"], tmp_path / "root" / "val2017" / os.path.basename(r["file_name"]))
    split = load_dataset_json(json_path, str(tmp_path / "root"))  # root without a trailing separator
    assert split[0]["file_name"] == str(tmp_path / "root" / "val2017" / os.path.basename(records[0]["file_name"]))


def test_registration_errors_are_named(tmp_path, sample):
    with pytest.raises(InputError, match="image folder not found"):
        register_dataset("x", str(tmp_path / "a.json"), str(tmp_path / "nowhere"))
    with pytest.raises(InputError, match="dataset json not found"):
        register_dataset("x", str(tmp_path / "a.json"), str(tmp_path))
    (tmp_path / "bad.json").write_text('{"images": [], "annotations": []}')
    with pytest.raises(InputError, match="bad.json: lacks the list 'categories'"):
        register_dataset("x", str(tmp_path / "bad.json"), str(tmp_path))
    json_path, _ = _user_json(sample, tmp_path / "ok.json", "coco")
    other, _ = _user_json(sample, tmp_path / "other.json", "lvis")
    register_dataset("taken", json_path, str(tmp_path))
    register_dataset("taken", json_path, str(tmp_path))  # the same again: nothing to do
    with pytest.raises(InputError, match="already registered"):
        register_dataset("taken", other, str(tmp_path))


def test_detectron2_registrations_with_empty_metadata_get_their_vocabulary(tmp_path, sample, sam_path, clip_path,
                                                                           monkeypatch):
    """register_coco_instances(name, {}, ...): the vocabulary is read by loading the dataset."""
    from detectron2.data.datasets import register_coco_instances

    from regionspot.config import load_config
    from regionspot.modeling.text_classifier import vocabulary_from_config

    json_path, names = _user_json(sample, tmp_path / "d2.json", "coco")
    register_coco_instances("d2_registered", {}, json_path, sample[1])
    cfg = load_config(os.path.join(REPO, "configs", "regionspot_sample_cpu.yaml"),
                      ["MODEL.REGIONSPOT.VOCABULARY", "dataset"])
    assert sorted(vocabulary_from_config(cfg, "d2_registered")) == names


def test_runs_never_write_over_their_inputs(tmp_path, sample, sam_path, clip_path, monkeypatch):
    monkeypatch.chdir(REPO)
    out = tmp_path / "run"
    results_file = out / "inference" / "regionspot_sample" / "lvis_instances_results.json"
    results_file.parent.mkdir(parents=True)
    results_file.write_text("[]")  # a previous run's detections, now used as proposals
    base = ["--config-file", "configs/regionspot_sample_cpu.yaml", "OUTPUT_DIR", str(out),
            "MODEL.REGIONSPOT.SAM_WEIGHTS", sam_path, "MODEL.REGIONSPOT.CLIP_WEIGHTS", clip_path]
    argv = ["--eval-only", "--untrained-head"] + base + ["MODEL.REGIONSPOT.PROPOSALS", "file",
                                                         "MODEL.REGIONSPOT.PROPOSAL_FILE", str(results_file)]
    with pytest.raises(ValueError, match="PROPOSAL_FILE .*lvis_instances_results.json.*would be overwritten"):
        train_net.main(train_net.get_parser().parse_args(argv))
    (out / "model_final.pth").write_bytes(b"weights")
    with pytest.raises(ValueError, match="MODEL.WEIGHTS .*model_final.pth.*would be overwritten"):
        train_net.main(train_net.get_parser().parse_args(base + ["MODEL.WEIGHTS", str(out / "model_final.pth")]))
    assert results_file.read_text() == "[]" and (out / "model_final.pth").read_bytes() == b"weights"


def test_a_dataset_from_the_config_alone(tmp_path, sample):
    from regionspot.config import ConfigError, load_config

    json_path, names = _user_json(sample, tmp_path / "cfg.json", "coco")
    cfg = load_config(os.path.join(REPO, "configs", "regionspot_sample_cpu.yaml"),
                      ["DATASETS.REGISTER", f"[['from_config', '{json_path}', '{sample[1]}']]",
                       "DATASETS.TEST", "('from_config',)"])
    assert sorted(MetadataCatalog.get("from_config").thing_classes) == names
    assert len(DatasetCatalog.get("from_config")) == len(sample[0]["images"])
    with pytest.raises(ConfigError, match=r"DATASETS.REGISTER entries must be \[NAME, JSON, IMAGE_ROOT\]"):
        load_config(os.path.join(REPO, "configs", "regionspot_sample_cpu.yaml"), ["DATASETS.REGISTER", "[['x']]"])
    assert cfg.DATASETS.TEST == ("from_config",)
