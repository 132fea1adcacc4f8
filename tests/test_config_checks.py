"""Config values are checked when the config is loaded, with the key named; the device default
works with and without a GPU; a dataset that is not registered is named."""

import logging
import os

import pytest
import torch

import train_net
from conftest import REPO
from regionspot.config import ConfigError, load_config, resolve_device

BL = os.path.join(REPO, "configs", "regionspot_bl.yaml")


def test_paper_configs_run_where_they_are_loaded(caplog):
    """No MODEL.DEVICE in the paper configs: the GPU when there is one, else the CPU, said in the log."""
    with caplog.at_level(logging.INFO, logger="regionspot.config"):
        cfg = load_config(BL)
    if torch.cuda.is_available():
        assert cfg.MODEL.DEVICE == "cuda"
    else:
        assert cfg.MODEL.DEVICE == "cpu" and "no CUDA GPU is available: running on the CPU" in caplog.text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only machine")
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_an_explicit_gpu_on_a_cpu_machine_is_named(device):
    with pytest.raises(ConfigError, match=f"MODEL.DEVICE is '{device}' but this machine has no usable CUDA GPU"):
        load_config(BL, ["MODEL.DEVICE", device])


def test_unknown_device_is_named():
    with pytest.raises(ConfigError, match="MODEL.DEVICE 'gpu0' is not a device"):
        resolve_device("gpu0")
    assert resolve_device("cpu") == "cpu"


@pytest.mark.parametrize("key,value,expected", [
    ("INPUT.MIN_SIZE_TEST", "0", "INPUT.MIN_SIZE_TEST must be positive"),
    ("SOLVER.IMS_PER_BATCH", "-2", "SOLVER.IMS_PER_BATCH must be positive"),
    ("MODEL.REGIONSPOT.TEST_TOPK", "0", "MODEL.REGIONSPOT.TEST_TOPK must be positive"),
    ("MODEL.REGIONSPOT.BOX_CHUNK_SIZE", "0", "MODEL.REGIONSPOT.BOX_CHUNK_SIZE must be positive"),
    ("MODEL.REGIONSPOT.DROPOUT", "1.5", r"MODEL.REGIONSPOT.DROPOUT must be in \[0, 1\)"),
    ("MODEL.REGIONSPOT.PROPOSALS", "'selective_search'", "MODEL.REGIONSPOT.PROPOSALS must be one of"),
    ("MODEL.REGIONSPOT.TOKEN_SOURCE", "'iou'", "MODEL.REGIONSPOT.TOKEN_SOURCE must be one of"),
    ("MODEL.REGIONSPOT.VOCABULARY", "'imagenet'", "MODEL.REGIONSPOT.VOCABULARY must be one of"),
    ("MODEL.REGIONSPOT.SAM_AUTO.POINTS_PER_SIDE", "0", "SAM_AUTO.POINTS_PER_SIDE must be positive"),
    ("TEST.DETECTIONS_PER_IMAGE", "0", "TEST.DETECTIONS_PER_IMAGE must be positive"),
    ("TEST.IMS_PER_BATCH", "-1", "TEST.IMS_PER_BATCH must be positive, or 0"),
    ("MODEL.REGIONSPOT.ENCODER_PRECISION", "'half'", "MODEL.REGIONSPOT.ENCODER_PRECISION must be one of"),
    ("MODEL.REGIONSPOT.SAM_ATTENTION", "'flash'", "MODEL.REGIONSPOT.SAM_ATTENTION must be one of"),
    ("MODEL.REGIONSPOT.SAM_INPUT_SIZE", "0", "MODEL.REGIONSPOT.SAM_INPUT_SIZE must be positive"),
])
def test_bad_values_are_named_at_load_time(key, value, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(BL, [key, value])


def test_custom_vocabulary_needs_names():
    with pytest.raises(ConfigError, match="CUSTOM_VOCABULARY is empty"):
        load_config(BL, ["MODEL.REGIONSPOT.VOCABULARY", "custom"])


def test_a_dataset_that_is_not_registered_is_named(tmp_path, sam_path, clip_path, monkeypatch):
    monkeypatch.chdir(REPO)
    argv = ["--config-file", "configs/regionspot_sample_cpu.yaml", "--eval-only", "OUTPUT_DIR", str(tmp_path),
            "DATASETS.TEST", "('my_photos',)"]
    with pytest.raises(ValueError, match="DATASETS.TEST names 'my_photos', which is not registered.*--register"):
        train_net.main(train_net.get_parser().parse_args(argv))
    assert not os.listdir(tmp_path)  # refused before anything was written


def test_building_a_model_needs_no_training_set(sam_path, clip_path):
    """The paper configs name objects365 for training; evaluation and the predictor never need it."""
    from detectron2.modeling import build_model

    cfg = load_config(BL, ["MODEL.DEVICE", "cpu", "MODEL.REGIONSPOT.SAM_WEIGHTS", sam_path,
                           "MODEL.REGIONSPOT.CLIP_WEIGHTS", clip_path])
    assert cfg.DATASETS.TRAIN == ("objects365_v1_train",) and cfg.MODEL.REGIONSPOT.VOCABULARY == "dataset"
    model = build_model(cfg)
    assert model.class_names is None  # the vocabulary comes later, per dataset or per predictor
