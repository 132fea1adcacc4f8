"""The project's JSON files are strict JSON: a NaN or infinite number (e.g. APr of a dataset
without rare categories, every metric when there are no detections) is written as null, never
as a bare NaN that strict parsers reject."""

import json
import math
import os

import numpy as np
import pytest

from conftest import REPO
from regionspot.io import write_json_atomic


def _refuse(constant):
    raise ValueError(f"not strict JSON: {constant}")


def strict_load(path):
    with open(path, encoding="utf-8") as f:
        return json.loads(f.read(), parse_constant=_refuse)


def test_write_json_atomic_writes_null_for_nan_and_infinity(tmp_path):
    obj = {"AP": 12.5, "APr": float("nan"), "inf": float("inf"), "neg": -math.inf,
           "nested": [{"x": float("nan")}, (1, np.float64("nan"), np.float32(0.5), np.int64(3))], "s": "NaN"}
    path = write_json_atomic(str(tmp_path / "m.json"), obj)
    assert strict_load(path) == {"AP": 12.5, "APr": None, "inf": None, "neg": None,
                                 "nested": [{"x": None}, [1, None, 0.5, 3]], "s": "NaN"}
    assert os.listdir(tmp_path) == ["m.json"]  # atomic: no temporary file left
    assert math.isnan(obj["APr"])  # the caller's object is not modified
    assert json.loads(open(path).read()) == strict_load(path)  # indented as before, any parser reads it
    assert open(path).read().startswith('{\n  "AP": 12.5')


def test_dumps_strict_json_keeps_ordinary_output():
    from regionspot.io import dumps_strict_json, strict_json_value

    obj = {"a": [1, 2.5, None, True], "b": {"c": "d"}}
    assert dumps_strict_json(obj, separators=(",", ":")) == json.dumps(obj, separators=(",", ":"))
    assert dumps_strict_json([float("nan")], allow_nan=True) == "[null]"  # strict whatever is asked
    assert strict_json_value((float("nan"), {"k": (2.0,)})) == [None, {"k": [2.0]}]
    with pytest.raises(TypeError):
        dumps_strict_json({"x": object()})


def test_metrics_json_is_strict_when_a_metric_is_nan(tmp_path):
    """What train_net.py --eval-only writes: <OUTPUT_DIR>/inference/<dataset>/metrics.json."""
    from regionspot.config import load_config
    from regionspot.engine.trainer import report_results

    cfg = load_config(os.path.join(REPO, "configs", "regionspot_sample_cpu.yaml"))
    cfg.OUTPUT_DIR = str(tmp_path)
    results = {"bbox": {"AP": 41.0, "AP50": 60.0, "APr": float("nan"), "APc": 40.0, "APf": float("nan")}}
    protocol = {"proposals": "gt", "description": "proposals: ground-truth boxes (score 1)"}
    report_results(cfg, "my_photos", results, protocol, None)
    metrics = strict_load(tmp_path / "inference" / "my_photos" / "metrics.json")
    assert metrics["results"]["bbox"] == {"AP": 41.0, "AP50": 60.0, "APr": None, "APc": 40.0, "APf": None}
    assert metrics["dataset"] == "my_photos"
